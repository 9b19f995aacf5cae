"""The user's journey with the real CLI on the default job: run -> cancel -> status -> resume
(exact), a lost supervisor, resuming on another world size, and what each command prints and
exits with on the way."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from ..conftest import JOBS, TEST_JOBS, orch_cmd, read_events, run_orch, wait_for, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ARGS = ["--steps", "60", "--log-every", "10", "--step-sleep", "0.05", "--dataset-size", "1024"]


def config(tmp_path: Path, **sections) -> Path:
    return write_config(
        tmp_path, JOBS / "train_ddp.py", args=ARGS, storage={"checkpoint_interval": 10}, **sections
    )


def status(cfg: Path, run_id: str) -> dict:
    proc = run_orch("status", run_id, "--config", str(cfg), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def start(cfg: Path, run_id: str) -> subprocess.Popen:
    return subprocess.Popen(
        orch_cmd("run", str(cfg), "--run-id", run_id, "--quiet"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_a_checkpoint(run_dir: Path) -> None:
    wait_for(
        lambda: any(e["event"] == "checkpoint_committed" for e in read_events(run_dir)),
        120,
        "a committed checkpoint",
    )


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("journey-ref")
    cfg = config(tmp)
    proc = run_orch("run", str(cfg), "--run-id", "ref", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "[rank " not in proc.stdout + proc.stderr, "--quiet shows no rank output"
    assert "[orch] run ref succeeded" in proc.stderr
    return status(cfg, "ref")["newest_checkpoint_digest"]


def test_cancel_then_resume_ends_in_the_uninterrupted_weights(tmp_path, reference):
    cfg = config(tmp_path)
    run_dir = tmp_path / "runs" / "j"
    proc = start(cfg, "j")
    wait_for_a_checkpoint(run_dir)
    live = status(cfg, "j")
    progress = live["progress"]  # from the heartbeats, and the total the job declared
    assert live["state"] == "running" and progress["total_steps"] == 60, live
    assert progress["step"] >= 10 and progress["steps_per_s"] > 0 and progress["eta_s"] is not None
    assert sorted(r["rank"] for r in progress["ranks"]) == [0, 1]
    text = run_orch("status", "j", "--config", str(cfg)).stdout
    assert "progress   step " in text and "/60 (" in text and "ETA" in text and "ranks      2 beating" in text
    refused = run_orch("resume", "j", "--config", str(cfg))
    assert refused.returncode == 2 and "is running" in one_line(refused.stderr)
    cancel = run_orch("cancel", "j", "--config", str(cfg))
    assert cancel.returncode == 0, cancel.stderr
    assert "asked the supervisor of run j" in cancel.stdout
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    st = status(cfg, "j")
    assert st["state"] == "cancelled" and st["root_cause"] is None, st
    stopped_at = st["newest_checkpoint"]
    assert stopped_at is not None and stopped_at < 60
    # Only restart.*, resources.* and job.args may change on resume.
    bad = run_orch("resume", "j", "--config", str(cfg), "--set", "storage.keep=5")
    assert bad.returncode == 2 and "storage.keep: cannot change on resume" in one_line(bad.stderr)
    resumed = run_orch("run", str(cfg), "--resume", "--run-id", "j", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming run j (cancelled) as attempt 1, from checkpoint step {stopped_at}" in resumed.stderr
    st = status(cfg, "j")
    assert st["state"] == "succeeded" and st["attempts"] == 2 and st["root_cause"] is None
    assert st["newest_checkpoint"] == 60 and st["newest_checkpoint_digest"] == reference
    assert "stopped" in st["goodput"]["lost_s"] and st["goodput"]["lost_s"]["stopped"] > 0
    again = run_orch("resume", "j", "--config", str(cfg))
    assert again.returncode == 2 and "succeeded; there is nothing to resume" in one_line(again.stderr)
    restored = [e for e in read_events(run_dir) if e["event"] == "restored"]
    assert restored and restored[-1]["step"] == stopped_at


def test_a_lost_run_shows_lost_and_resumes_exactly(tmp_path, reference):
    cfg = config(tmp_path)
    run_dir = tmp_path / "runs" / "l"
    proc = start(cfg, "l")
    wait_for_a_checkpoint(run_dir)
    proc.send_signal(signal.SIGKILL)  # the supervisor dies; its reaper takes the ranks along
    proc.communicate(timeout=60)
    first = status(cfg, "l")
    assert first["state"] == "lost", first
    second = status(cfg, "l")
    assert second["wall_s"] == first["wall_s"], "a lost run's clock stops at its last event"
    assert second["goodput"]["wall_s"] == first["goodput"]["wall_s"]
    cancel = run_orch("cancel", "l", "--config", str(cfg))
    assert cancel.returncode == 1
    assert "is not running: its supervisor" in one_line(cancel.stderr) and "orch resume l" in cancel.stderr
    resumed = run_orch("resume", "l", "--config", str(cfg), "--ranks", "0")
    assert resumed.returncode == 0, resumed.stderr
    shown = resumed.stdout.splitlines()
    assert shown and all(line.startswith("[rank 0] ") for line in shown), shown[:5]
    st = status(cfg, "l")
    assert st["state"] == "succeeded" and st["newest_checkpoint_digest"] == reference


def test_resume_on_another_world_size_sees_every_sample_once(tmp_path):
    n = 101  # odd: the remainder never divides by 2 or 3 ranks evenly
    cfg = write_config(
        tmp_path,
        TEST_JOBS / "sample_log.py",
        args=["--dataset-size", str(n), "--batch", "2", "--step-sleep", "0.15"],
        storage={"checkpoint_interval": 3},
    )
    run_dir = tmp_path / "runs" / "w"
    proc = start(cfg, "w")
    wait_for_a_checkpoint(run_dir)
    assert run_orch("cancel", "w", "--config", str(cfg)).returncode == 0
    proc.communicate(timeout=120)
    stopped_at = status(cfg, "w")["newest_checkpoint"]
    assert stopped_at is not None
    resumed = run_orch(
        "resume", "w", "--config", str(cfg), "--set", "resources.ranks_per_node=3", "--quiet",
        "--", "--dataset-size", str(n), "--batch", "2", "--step-sleep", "0.05",
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert (run_dir / "run-before-attempt-1.yaml").exists()
    frozen = yaml.safe_load((run_dir / "run.yaml").read_text())["config"]
    assert frozen["resources"]["ranks_per_node"] == 3 and frozen["job"]["args"][-1] == "0.05"

    def seen(attempt: int, ranks: int, keep) -> list[int]:
        out = []
        for rank in range(ranks):
            for line in (run_dir / f"samples-a{attempt}-r{rank}.jsonl").read_text().splitlines():
                record = json.loads(line)
                if keep(record["step"]):
                    out.extend(record["idx"])
        return out

    before = seen(0, 2, lambda s: s <= stopped_at)
    after = seen(1, 3, lambda s: s > stopped_at)
    assert not (run_dir / "samples-a1-r3.jsonl").exists()
    counts = Counter(before + after)
    assert set(counts) == set(range(n)), "every sample of the epoch is seen"
    # Padding (as DistributedSampler pads) repeats at most world_size - 1 samples per start.
    assert sum(counts.values()) - n <= (2 - 1) + (3 - 1), counts.most_common(5)
    assert Counter(before)[max(before, key=before.count)] == 1, "no sample twice before the stop"


def test_ranks_print_to_stdout_the_orchestrator_to_stderr(tmp_path):
    cfg = config(tmp_path, job={"args": ["--steps", "20", "--log-every", "10"]})
    proc = run_orch("run", str(cfg), "--run-id", "s", "--backend", "local")
    assert proc.returncode == 0, proc.stderr
    out, err = proc.stdout.splitlines(), proc.stderr.splitlines()
    assert [line for line in out if "loss" in line], "`orch run | grep loss` finds the ranks' lines"
    assert all(line.startswith("[rank ") for line in out), out
    assert err and all(line.startswith("[orch] ") for line in err), err


def test_a_rank_traceback_reads_as_python_prints_it(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text("def f():\n    raise ValueError('boom')\n\n\nf()\n")
    cfg = write_config(tmp_path, script, restart={"max_restarts": 0})
    proc = run_orch("run", str(cfg), "--run-id", "t")
    assert proc.returncode == 1
    log = (tmp_path / "runs" / "t" / "logs" / "attempt-0" / "rank-0.log").read_text()
    plain = subprocess.run([sys.executable, str(script)], capture_output=True, text=True).stderr
    assert log.strip() == plain.strip(), log  # no fork-server or runpy frames on top
    assert "[rank 0] Traceback (most recent call last):" in proc.stdout


def test_a_usage_error_in_the_job_is_not_retried(tmp_path):
    cfg = config(tmp_path, restart={"max_restarts": 3})
    proc = run_orch("run", str(cfg), "--run-id", "u", "--set", "job.args=[--bogus]", "--quiet")
    assert proc.returncode == 1
    assert "train_ddp.py: error: unrecognized arguments: --bogus" in proc.stderr
    assert "check job.args" in proc.stderr
    events = read_events(tmp_path / "runs" / "u")
    assert [e["attempt"] for e in events if e["event"] == "attempt_started"] == [0], "not retried"


def test_the_documented_way_to_get_the_weights_out(tmp_path, reference):
    # The snippet in docs/runtime.md, run as written on a finished run of the default job.
    import re

    import torch

    from orchestrator.runtime import state_digest

    text = (Path(__file__).resolve().parents[2] / "docs" / "runtime.md").read_text()
    snippet = re.search(r"<!-- weights-snippet -->\n```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "get_weights.py").write_text(snippet)
    cfg = config(tmp_path)
    assert run_orch("run", str(cfg), "--run-id", "done", "--quiet").returncode == 0
    proc = subprocess.run(
        [sys.executable, "get_weights.py", str(tmp_path / "runs" / "done")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    weights = torch.load(tmp_path / "model.pt", weights_only=True)
    assert state_digest(weights) == reference


def test_quick_start_without_a_config_file(tmp_path):
    # torchrun-style: a script (or -m module), ranks per node, nodes, and the job's own
    # arguments after `--`; the same run directory, run id and supervision as a configured run.
    import shutil

    shutil.copy(TEST_JOBS / "env_dump.py", tmp_path / "dump.py")

    def orch_here(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(orch_cmd(*args), cwd=tmp_path, capture_output=True, text=True, timeout=240)

    proc = orch_here(
        "run", "--nproc-per-node", "2", "--nnodes", "2", "dump.py", "--", "--flag", "two words", "on"
    )
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("dump-")
    for rank in range(4):
        seen = json.loads((run_dir / f"env-{rank}.json").read_text())
        assert seen["argv"] == ["--flag", "two words", "on"] and seen["WORLD_SIZE"] == "4"
        assert seen["NNODES"] == "2" and seen["LOCAL_RANK"] == str(rank % 2) and seen["torchelastic_launched"]
    st = orch_here("status", run_dir.name, "--json")
    assert st.returncode == 0 and json.loads(st.stdout)["state"] == "succeeded", st.stderr

    proc = orch_here("run", "--nproc-per-node", "3", "-m", "dump", "--run-id", "mod", "--", "--flag", "m")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "runs" / "mod" / "env-2.json").read_text())["argv"] == ["--flag", "m"]

    render = orch_here(
        "render", "--nproc-per-node", "2", "--nnodes", "3", "--set", "job.env={MODE: fast}", "-m", "dump",
        "--", "--lr", "0.1",
    )  # fmt: skip
    assert render.returncode == 0, render.stderr
    assert "- -m\n- dump\n- --lr\n- '0.1'\n" in render.stdout and "world_size: 6" in render.stdout
    assert "  MODE: fast\n" in render.stdout
    missing = orch_here("run", "nope.py")
    assert missing.returncode == 2 and "command line: job.script: file not found" in missing.stderr


def test_logs_of_a_run_as_a_user_reads_them(tmp_path):
    # orch logs on a default (fork server) run of two attempts: the latest, one rank, an older
    # attempt, and -f, which follows the run to its end.
    cfg = write_config(tmp_path, TEST_JOBS / "fail.py", job={"env": {"FAIL_ONLY_ATTEMPT": "0"}})
    proc = start(cfg, "g")
    wait_for(lambda: (tmp_path / "runs" / "g" / "run.yaml").exists(), 60, "the run directory")
    follow = run_orch("logs", "g", "--config", str(cfg), "-f", "--rank", "0", timeout=180)
    assert follow.returncode == 0, follow.stderr
    assert "[rank 0] rank 0: attempt 1 succeeded" in follow.stdout and "[rank 1]" not in follow.stdout
    proc.communicate(timeout=60)
    latest = run_orch("logs", "g", "--config", str(cfg))
    assert latest.returncode == 0, latest.stderr
    assert "[rank 0] rank 0: attempt 1 succeeded" in latest.stdout
    assert "[rank 1] rank 1: attempt 1 succeeded" in latest.stdout
    first = run_orch("logs", "g", "--config", str(cfg), "--attempt", "0", "--rank", "1")
    assert first.returncode == 0 and "[rank 1] ValueError: deliberate failure for the test" in first.stdout
    assert all(line.startswith("[rank 1] ") for line in first.stdout.splitlines())
    none = run_orch("logs", "g", "--config", str(cfg), "--attempt", "7")
    assert none.returncode == 1 and "no logs for attempt 7" in one_line(none.stderr)


def test_an_unmodified_lightning_fabric_script_runs_on_two_nodes(tmp_path):
    # Fabric picks its launcher from the environment: with torchrun's whole variable set it
    # takes the ranks as they are (TorchElasticEnvironment) instead of spawning its own.
    import shutil

    shutil.copy(TEST_JOBS / "fabric_train.py", tmp_path / "fabric_train.py")
    proc = subprocess.run(
        orch_cmd("run", "--nproc-per-node", "2", "--nnodes", "2", "fabric_train.py", "--quiet"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"fabric-{rank}.json").read_text()) for rank in range(4)]
    for rank, report in enumerate(reports):
        assert report["environment"] == "TorchElasticEnvironment"
        assert (report["global_rank"], report["world_size"]) == (rank, 4)
        assert (report["node_rank"], report["local_rank"]) == divmod(rank, 2)
        assert report["all_reduce"] == 1 + 2 + 3 + 4
    assert len({r["weight"] for r in reports}) == 1, "DDP kept the replicas equal"
