"""Pure parts of supervision: root cause choice, backoff, status folding."""

import json
import signal

from orchestrator.contract import read_error_record as read_error_file
from orchestrator.spec.config import parse_config
from orchestrator.supervision.failures import RankFailure, is_peer_loss, root_cause
from orchestrator.supervision.policy import backoff_delay
from orchestrator.supervision.status import summarize


def failure(rank, t, etype=None, msg="", code=1):
    return RankFailure(rank=rank, node_rank=0, exitcode=code, time=t, error_type=etype, message=msg)


def test_sigkilled_rank_beats_peers_that_lost_it():
    killed = failure(2, 10.05, code=-signal.SIGKILL)
    peers = [
        failure(0, 10.01, "RuntimeError", "Connection closed by peer [127.0.0.1]:1234"),
        failure(1, 10.02, "DistNetworkError", "Broken pipe"),
    ]
    assert root_cause([*peers, killed], 2) is killed


def test_earliest_real_error_wins_over_first_seen_exit():
    early = failure(3, 5.0, "ValueError", "bad shape")
    later = failure(1, 6.0, "KeyError", "x")
    assert root_cause([later, early], 1) is early


def test_only_peer_losses_still_give_a_cause():
    only = [
        failure(0, 2.0, "RuntimeError", "Connection reset by peer"),
        failure(1, 1.0, "RuntimeError", "timed out"),
    ]
    assert root_cause(only, None).rank == 1
    assert is_peer_loss("Gloo connectFullMesh failed") and not is_peer_loss("ValueError: bad")


def test_backoff_doubles_up_to_the_cap():
    cfg = parse_config(
        {"job": {"module": "x"}, "restart": {"backoff_s": 1.5, "backoff_max_s": 5}}, check_files=False
    )
    assert [backoff_delay(cfg.restart, n) for n in (1, 2, 3, 4)] == [1.5, 3.0, 5, 5]


def test_error_file_formats(tmp_path):
    ours = tmp_path / "a.json"
    ours.write_text(json.dumps({"type": "ValueError", "message": "m", "time": 3.0}))
    assert read_error_file(str(ours))["type"] == "ValueError"
    elastic = tmp_path / "b.json"
    elastic.write_text(
        json.dumps({"message": {"message": "OSError: disk full", "extraInfo": {"timestamp": "7"}}})
    )
    assert read_error_file(str(elastic)) == {"type": "OSError", "message": "disk full", "time": 7.0}
    assert read_error_file(str(tmp_path / "missing.json")) is None


def test_summarize_follows_the_ledger():
    events = [
        {"time": 0.0, "event": "run_started", "backend": "local"},
        {"time": 1.0, "event": "attempt_started", "attempt": 0},
        {"time": 5.0, "event": "attempt_ended", "attempt": 0, "status": "failed", "root_cause": {"rank": 1}},
        {"time": 6.0, "event": "attempt_started", "attempt": 1},
    ]
    live = summarize(events, supervisor_alive=True, now=10.0)
    assert (
        live["state"] == "running"
        and live["current_attempt"] == 1
        and live["attempts"] == 2
        and live["wall_s"] == 10.0
    )
    assert summarize(events, supervisor_alive=False, now=10.0)["state"] == "lost"
    done = summarize([*events, {"time": 9.0, "event": "run_finished", "status": "succeeded"}])
    assert done["state"] == "succeeded" and done["root_cause"] is None and done["wall_s"] == 9.0


def test_scheduler_state_fills_what_events_cannot_say():
    from orchestrator.backends.slurm.scheduler import map_state
    from orchestrator.supervision.status import merge_scheduler_state

    submitted = summarize([{"time": 0.0, "event": "submitted", "backend": "slurm", "job_id": "7"}], now=5.0)
    assert submitted["state"] == "pending" and submitted["job_id"] == "7"
    assert merge_scheduler_state(submitted, map_state("PENDING"), "PENDING")["state"] == "pending"
    running = summarize(
        [
            {"time": 0.0, "event": "submitted", "backend": "slurm", "job_id": "7"},
            {"time": 1.0, "event": "job_started", "backend": "slurm"},
            {"time": 2.0, "event": "attempt_started", "attempt": 0},
        ],
        now=5.0,
    )
    assert running["state"] == "running"
    assert merge_scheduler_state(running, map_state("REQUEUED"), "REQUEUED")["state"] == "preempted-requeued"
    killed = merge_scheduler_state(running, map_state("NODE_FAIL"), "NODE_FAIL")
    assert killed["state"] == "failed" and "NODE_FAIL" in killed["root_cause"]["message"]
    assert merge_scheduler_state(running, map_state("CANCELLED"), "CANCELLED")["state"] == "cancelled"
    done = summarize(
        [
            {"time": 0.0, "event": "submitted", "backend": "slurm", "job_id": "7"},
            {"time": 9.0, "event": "run_finished", "status": "succeeded"},
        ]
    )
    assert (
        merge_scheduler_state(done, map_state("RUNNING"), "RUNNING")["state"] == "succeeded"
    )  # the ledger's end wins
    preempted = summarize(
        [
            {"time": 0.0, "event": "submitted", "backend": "slurm", "job_id": "7"},
            {"time": 1.0, "event": "job_started", "backend": "slurm"},
            {"time": 3.0, "event": "requeued", "job_id": "7"},
        ],
        now=5.0,
    )
    assert preempted["state"] == "preempted-requeued"


def test_watchdog_limits_by_phase_and_step_time():
    from orchestrator.spec.config import WatchdogSpec
    from orchestrator.supervision.watchdog import silent_ranks

    auto = WatchdogSpec(min_hang_s=10, hang_factor=20, startup_timeout_s=300, save_timeout_s=100)
    beats = {
        0: (50, 1000.0, "train", 0.1),  # 20 x 0.1 = 2 s < min 10 s: limit 10, silent 5: fine
        1: (50, 980.0, "train", 1.0),  # limit 20, silent 25: hung
        2: (3, 990.0, "train", 0.1),  # warming up: start-up limit 300
        3: (60, 950.0, "save", 0.1),  # saving: limit 100, silent 55: fine
        4: None,  # no heartbeats: not judged
    }
    hung = silent_ranks(auto, beats, now=1005.0)
    assert [(h.rank, h.limit_s) for h in hung] == [(1, 20.0)]
    fixed = WatchdogSpec(hang_timeout_s=3.0)
    assert [h.rank for h in silent_ranks(fixed, beats, now=1005.0)] == [1, 2, 0]  # longest silence first
    # Ranks waiting inside a collective (phase sync) are victims: the one not waiting comes first,
    # even when a waiting rank went quiet a moment earlier.
    waiting = {0: (10, 990.0, "sync", 0.1), 1: (10, 990.05, "train", 0.1), 2: (10, 989.99, "sync", 0.1)}
    assert [h.rank for h in silent_ranks(fixed, waiting, now=1005.0)] == [1, 2, 0]


def test_failure_classes_and_hints():
    from orchestrator.supervision.failures import classify

    assert (
        classify(
            exitcode=1, error_type="OutOfMemoryError", message="CUDA out of memory. Tried to allocate"
        ).kind
        == "oom"
    )
    assert "gradient accumulation" in classify(exitcode=1, error_type="OutOfMemoryError", message="x").hint
    c = classify(
        exitcode=1,
        error_type="RuntimeError",
        message="Expected all tensors to be on the same device, but found cuda:0 and cpu",
    )
    assert c.kind == "device_mismatch" and not c.retryable and ".to(ctx.device)" in c.hint
    assert classify(exitcode=1, error_type="NameError", message="x").retryable is False
    assert (
        classify(exitcode=1, error_type="DistBackendError", message="Connection closed by peer").kind
        == "communication"
    )
    assert classify(exitcode=-9, error_type=None, message="").kind == "signal"
    assert classify(exitcode=75, error_type=None, message="").kind == "preempted"
    assert classify(exitcode=0, error_type="Hang", message="no heartbeat").kind == "hang"
    assert classify(exitcode=1, error_type="ValueError", message="bad").kind == "error"


def test_goodput_ledger_on_a_scripted_timeline():
    from orchestrator.storage.goodput import ledger

    events = [
        {"time": 0.0, "event": "submitted"},
        {"time": 10.0, "event": "job_started"},  # 10 s in the queue
        {"time": 10.0, "event": "attempt_started", "attempt": 0},
        {"time": 13.0, "event": "restored", "restore_s": 1.0},  # 2 s start-up + 1 s restore
        {"time": 13.0, "event": "training_started"},
        {"time": 23.0, "event": "checkpoint_committed", "block_s": 2.0},
        {
            "time": 30.0,
            "event": "attempt_ended",
            "attempt": 0,
            "status": "failed",
        },  # 7 s since the commit: lost
        {"time": 30.0, "event": "restart_scheduled"},
        {"time": 31.0, "event": "attempt_started", "attempt": 1},  # 1 s backoff
        {"time": 33.0, "event": "restored", "restore_s": 0.5},
        {"time": 33.0, "event": "training_started"},
        {"time": 40.0, "event": "checkpoint_committed", "block_s": 1.0},
        {"time": 45.0, "event": "attempt_ended", "attempt": 1, "status": "succeeded"},
    ]
    g = ledger(events)
    assert g["wall_s"] == 45.0
    assert g["lost_s"] == {
        "queue": 10.0,
        "startup": 3.5,
        "restore": 1.5,
        "checkpoint": 3.0,
        "lost_work": 7.0,
        "backoff": 1.0,
        "stopped": 0.0,
        "other": 0.0,
    }
    # attempt 0: 17 s of training - 2 s stall - 7 s lost = 8; attempt 1: 12 - 1 = 11
    assert [a["productive_s"] for a in g["attempts"]] == [8.0, 11.0]
    assert g["productive_s"] == 19.0 and g["goodput"] == round(19 / 45, 4)
    assert g["productive_s"] + sum(g["lost_s"].values()) == g["wall_s"]


def test_a_job_usage_error_is_not_retried() -> None:
    from orchestrator.supervision.failures import FailureClass, classify

    usage = classify(exitcode=2, error_type=None, message="train.py: error: unrecognized arguments: --bogus")
    assert usage.kind is FailureClass.USER_ERROR and not usage.retryable and "job.args" in usage.hint
    assert classify(exitcode=2, error_type=None, message="something else").retryable
    assert classify(exitcode=1, error_type=None, message="train.py: error: x").retryable


def test_log_stream_gives_each_line_one_prefix(tmp_path) -> None:
    import io

    from orchestrator.launch.logstream import LogStreamer

    log = tmp_path / "rank-1.log"
    log.write_text("[rank1]:[W1130 12:00:00] a torch warning\n[rank1]: Traceback\nplain\n[rank2]: other\n")
    out, notes = io.StringIO(), io.StringIO()
    stream = LogStreamer(out, notes=notes)
    stream.follow(1, str(log))
    stream.note("[orch] a note\n")
    stream.flush()
    assert out.getvalue().splitlines() == [
        "[rank 1] [W1130 12:00:00] a torch warning",
        "[rank 1] Traceback",
        "[rank 1] plain",
        "[rank 1] [rank2]: other",
    ]
    assert notes.getvalue() == "[orch] a note\n"


def test_live_progress_from_heartbeats() -> None:
    from orchestrator.supervision.status import format_progress, live_progress, progress_line

    beats = {0: (120, 99.5, "train", 0.1), 1: (119, 97.0, "save", 0.1)}
    progress = live_progress(beats, 300, now=100.0)
    assert progress["step"] == 120 and progress["steps_per_s"] == 10.0 and progress["eta_s"] == 18.0
    assert [r["beat_age_s"] for r in progress["ranks"]] == [0.5, 3.0]
    assert progress_line(progress) == "step 120/300 (40%), 10.00 steps/s, ETA 18s, 2 rank(s) beating"
    assert (
        format_progress(progress)[1]
        == "ranks      2 beating at step 119-120; oldest beat 3.0s ago (rank 1, save)"
    )
    assert live_progress(beats, None, now=100.0)["eta_s"] is None
    assert live_progress({}, 300, now=100.0) is None


class _Terminal:
    def __init__(self, tty: bool) -> None:
        self.text, self.tty = "", tty

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return self.tty


def test_console_progress_is_one_redrawn_line_on_a_terminal_and_plain_lines_elsewhere(tmp_path) -> None:
    from orchestrator.launch.logstream import LogStreamer

    log = tmp_path / "rank-0.log"
    log.write_text("hello\n")
    for tty in (True, False):
        term = _Terminal(tty)
        stream = LogStreamer(term, notes=term, status=lambda: "step 5/10")
        stream._status_due = 0  # due now
        stream._refresh_status()
        stream.follow(0, str(log))
        stream.flush()
        stream.stop()
        if tty:  # drawn, cleared for the rank line, drawn again under it, cleared at the end
            assert term.text == ("[orch] step 5/10\r\x1b[K[rank 0] hello\n[orch] step 5/10\r\x1b[K"), repr(
                term.text
            )
        else:
            assert term.text == "[orch] step 5/10\n[rank 0] hello\n"


def test_a_pass_env_value_never_reaches_a_recorded_failure(monkeypatch):
    from orchestrator.supervision.loop import without_secrets

    monkeypatch.setenv("WANDB_API_KEY", "k-123456")
    monkeypatch.setenv("SHORT", "1")
    failure = RankFailure(
        rank=0,
        node_rank=0,
        exitcode=1,
        time=1.0,
        error_type="ValueError",
        message="ValueError: bad key k-123456 (1)",
    )
    clean = without_secrets(failure, ("WANDB_API_KEY", "SHORT", "UNSET"))
    assert clean.message == "ValueError: bad key <redacted> (1)"
    assert "k-123456" not in json.dumps(clean.to_json())
    assert without_secrets(failure, ()) is failure
