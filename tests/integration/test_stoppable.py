"""Always stoppable, and our own processes fail loudly (issue 13, points 2 and 3).

A SIGTERM to `orch run` ends the run within restart.stop_grace_s + 5 s whatever the supervisor
waits on (a stopped fork server, a stopped rank, a stopped storage server); a second SIGTERM
ends it at once. A fork server killed or stopped mid-attempt is that attempt's root cause, and
the next attempt forks from a fresh server. Each test checks that its fault took effect (the
process it stopped was in state T, the one it killed is gone) before judging the outcome."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from ..conftest import TEST_JOBS, orch_cmd, read_events, run_orch, start_moto, wait_for, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GRACE_S = 3.0
BOUND_S = GRACE_S + 5.0  # the promise: stopped within the grace + 5 s


def _start(cfg: Path, run_id: str) -> subprocess.Popen:
    return subprocess.Popen(
        orch_cmd("run", str(cfg), "--run-id", run_id, "--quiet"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _start_long_run(tmp_path: Path, run_id: str) -> tuple[subprocess.Popen, Path, dict]:
    """Two ranks that would live for two minutes, started: `orch run`, its run dir, and its
    attempt_started event."""
    cfg = write_config(
        tmp_path, TEST_JOBS / "brief.py", args=["--live-s", "120"], restart={"stop_grace_s": GRACE_S}
    )
    orch = _start(cfg, run_id)
    run_dir = tmp_path / "runs" / run_id
    return orch, run_dir, wait_for(lambda: _attempt_started(run_dir), 120, "attempt 0 to start")


def _attempt_started(run_dir: Path, attempt: int = 0) -> dict | None:
    for event in read_events(run_dir):
        if event["event"] == "attempt_started" and event["attempt"] == attempt:
            return event
    return None


def _fork_server(orch: subprocess.Popen) -> psutil.Process:
    servers = [
        p for p in psutil.Process(orch.pid).children() if "orchestrator.launch.forkserver" in p.cmdline()
    ]
    assert len(servers) == 1, servers
    return servers[0]


def _stop_and_time(orch: subprocess.Popen) -> float:
    t0 = time.monotonic()
    orch.send_signal(signal.SIGTERM)
    try:
        orch.wait(timeout=BOUND_S + 30)
    except subprocess.TimeoutExpired:
        orch.kill()
        raise
    return time.monotonic() - t0


def _assert_nothing_left(pids: list[int]) -> None:
    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(lambda: all(gone(p) for p in pids), 10, f"every process of the run to be gone ({pids})")


def _ranks_of(orch: subprocess.Popen) -> list[int]:
    """The run's ranks: the fork server's children (a forked rank's /proc environ is the
    server's, so the env contract cannot tell them)."""
    try:
        return [p.pid for p in _fork_server(orch).children()]
    except (AssertionError, psutil.Error):
        return []


def _stopped(proc: psutil.Process) -> bool:
    return proc.status() == psutil.STATUS_STOPPED


def test_sigterm_stops_a_run_whose_fork_server_is_stopped(tmp_path):
    orch, run_dir, started = _start_long_run(tmp_path, "wedged")
    server = _fork_server(orch)
    server.send_signal(signal.SIGSTOP)
    wait_for(lambda: _stopped(server), 5, "the fork server to be stopped")
    took = _stop_and_time(orch)
    assert took <= BOUND_S, f"took {took:.1f}s; {orch.stderr.read()[-2000:]}"
    assert orch.returncode == 128 + signal.SIGTERM
    _assert_nothing_left([server.pid, *started["pids"]])


def test_sigterm_stops_a_run_with_a_stopped_rank(tmp_path):
    orch, run_dir, started = _start_long_run(tmp_path, "halted")
    rank = psutil.Process(started["pids"][1])
    rank.send_signal(signal.SIGSTOP)
    wait_for(lambda: _stopped(rank), 5, "rank 1 to be stopped")
    took = _stop_and_time(orch)
    assert took <= BOUND_S, f"took {took:.1f}s"
    assert orch.returncode == 128 + signal.SIGTERM
    events = read_events(run_dir)
    assert events[-1]["event"] == "run_finished" and events[-1]["status"] == "stopped"
    _assert_nothing_left(started["pids"])


def test_a_second_sigterm_stops_at_once(tmp_path):
    # Ranks that ignore SIGTERM would hold the run for the whole grace (60 s here).
    cfg = write_config(tmp_path, TEST_JOBS / "stubborn.py", restart={"stop_grace_s": 60})
    orch = _start(cfg, "stubborn")
    run_dir = tmp_path / "runs" / "stubborn"
    started = wait_for(lambda: _attempt_started(run_dir), 120, "attempt 0 to start")
    logs = run_dir / "logs" / "attempt-0"
    wait_for(lambda: all((logs / f"rank-{r}.log").read_text() == "ready\n" for r in (0, 1)), 60, "ranks")
    orch.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    assert orch.poll() is None, "the first SIGTERM should wait out the grace"
    assert all(psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in started["pids"])
    t0 = time.monotonic()
    orch.send_signal(signal.SIGTERM)
    orch.wait(timeout=30)
    took = time.monotonic() - t0
    assert took < 3.0, f"the second SIGTERM took {took:.1f}s"
    assert orch.returncode == 128 + signal.SIGTERM
    assert "a second stop signal: killed every rank" in orch.stderr.read()
    _assert_nothing_left(started["pids"])
    # The forced stop still recorded the run's end (its storage answered): stopped, not lost.
    end = read_events(run_dir)[-1]
    assert end["event"] == "run_finished" and end["status"] == "stopped" and end["forced"], end
    assert end["reason"] == "a second stop signal: every rank killed", end
    assert json.loads(run_orch("status", str(run_dir), "--json").stdout)["state"] == "stopped"


@pytest.fixture
def private_s3():
    """An S3 API server of this test's own (the session's is shared: it must not be stopped)."""
    proc, env = start_moto("stall")
    yield proc, env
    proc.send_signal(signal.SIGCONT)
    proc.kill()
    proc.wait()


def test_sigterm_stops_a_run_whose_storage_server_is_stopped(tmp_path, private_s3):
    server, s3_env = private_s3
    cfg = write_config(
        tmp_path,
        TEST_JOBS / "brief.py",
        args=["--live-s", "120"],
        storage={"root": "s3://stall/runs"},
        restart={"stop_grace_s": GRACE_S},
    )
    orch = subprocess.Popen(
        orch_cmd("run", str(cfg), "--run-id", "stalled", "--quiet"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **s3_env},
    )
    ranks = wait_for(lambda: len(_ranks_of(orch)) == 2 and _ranks_of(orch), 120, "both ranks to run")
    server.send_signal(signal.SIGSTOP)
    wait_for(lambda: _stopped(psutil.Process(server.pid)), 5, "the storage server to be stopped")
    took = _stop_and_time(orch)
    assert took <= BOUND_S, f"took {took:.1f}s"
    assert orch.returncode == 128 + signal.SIGTERM
    assert "killed every rank; `orch resume stalled` continues the run" in orch.stderr.read()
    _assert_nothing_left(ranks)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_fork_server_killed_or_stopped_mid_attempt_is_the_root_cause_and_is_replaced(tmp_path, how):
    cfg = write_config(
        tmp_path,
        TEST_JOBS / "brief.py",
        args=["--live-s", "6"],
        restart={"stop_grace_s": GRACE_S, "max_restarts": 1, "backoff_s": 0.1},
    )
    orch = _start(cfg, "server")
    run_dir = tmp_path / "runs" / "server"
    first = wait_for(lambda: _attempt_started(run_dir), 120, "attempt 0 to start")
    server = _fork_server(orch)
    server.send_signal(getattr(signal, how))  # the root cause below shows that it took effect
    out, err = orch.communicate(timeout=180)
    assert orch.returncode == 0, err[-2000:]
    events = read_events(run_dir)
    ended = [e for e in events if e["event"] == "attempt_ended"]
    assert [e["status"] for e in ended] == ["failed", "succeeded"], ended
    cause = ended[0]["root_cause"]
    what = "was killed by SIGKILL" if how == "SIGKILL" else "was stopped (SIGSTOP)"
    assert cause["error_type"] == "LauncherFailed" and cause["rank"] is None, cause
    assert cause["message"].startswith(f"the fork server (pid {server.pid}) {what}"), cause
    assert f"attempt 0 failed: the fork server (pid {server.pid}) {what}" in err
    second = _attempt_started(run_dir, 1)
    assert second is not None and second["launcher"] == "fork", second
    assert f"starting a fresh fork server: the fork server (pid {server.pid})" in err
    # The new server is another process, and the old one and its ranks are gone.
    assert _fork_server_gone(server) and not set(first["pids"]) & set(second["pids"])
    _assert_nothing_left(first["pids"])


def _fork_server_gone(server: psutil.Process) -> bool:
    try:
        return server.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
