"""What a user gets for bad input and for runs that are not what they seem: one line, the exit
status docs/cli.md gives, and nothing signalled or created by mistake."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from ..conftest import JOBS, run_orch, write_config


def one_line_exit(proc: subprocess.CompletedProcess, code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    return write_config(tmp_path, JOBS / "train_ddp.py", args=["--steps", "5"])


def test_bad_input_exits_2_in_one_line(cfg, tmp_path, monkeypatch):
    assert "--ranks: rank 5 is outside the world of 2 ranks" in one_line_exit(
        run_orch("run", str(cfg), "--ranks", "5"), 2
    )
    assert "--run-id: 'bad/id' may use" in one_line_exit(run_orch("run", str(cfg), "--run-id", "bad/id"), 2)
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "run.yaml").write_text("run_id: taken\n")
    assert "run taken already exists" in one_line_exit(run_orch("run", str(cfg), "--run-id", "taken"), 2)
    monkeypatch.delenv("ORCH_TEST_UNSET", raising=False)
    assert "job.pass_env: ORCH_TEST_UNSET is not set" in one_line_exit(
        run_orch("run", str(cfg), "--set", "job.pass_env=[ORCH_TEST_UNSET]"), 2
    )
    assert "submit: needs the slurm backend" in one_line_exit(run_orch("submit", str(cfg)), 2)
    assert "--resume: name the run" in one_line_exit(run_orch("run", str(cfg), "--resume"), 2)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["taken"], "nothing was created"


def _fake_run(tmp_path: Path, pid: int, pid_started: float) -> Path:
    """A run directory whose supervisor was `pid`, started at `pid_started`, on this host."""
    import socket

    run = tmp_path / "runs" / "fake"
    run.mkdir(parents=True)
    (run / "run.yaml").write_text(yaml.safe_dump({"run_id": "fake", "backend": "local"}))
    events = [
        {"time": time.time() - 30, "event": "run_started", "host": socket.gethostname(), "pid": pid,
         "pid_started": pid_started, "backend": "local"},
        {"time": time.time() - 29, "event": "attempt_started", "attempt": 0},
    ]  # fmt: skip
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run


def test_cancel_never_signals_a_reused_pid(tmp_path):
    # The recorded pid is alive, but it is another process (started later than the record says):
    # the run is lost, and cancel must not send it SIGTERM.
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = psutil.Process(stranger.pid).create_time()
        run = _fake_run(tmp_path, stranger.pid, started - 100)
        st = json.loads(run_orch("status", str(run), "--json").stdout)
        assert st["state"] == "lost"
        line = one_line_exit(run_orch("cancel", str(run)), 1)
        assert "is not running: its supervisor" in line and "orch resume fake" in line
        time.sleep(0.3)
        assert stranger.poll() is None, "the stranger was signalled"
    finally:
        stranger.kill()
        stranger.wait()


def test_cancel_of_a_gone_supervisor_is_one_line(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run = _fake_run(tmp_path, gone.pid, time.time() - 31)
    assert "is not running" in one_line_exit(run_orch("cancel", str(run)), 1)
    assert json.loads(run_orch("status", str(run), "--json").stdout)["state"] == "lost"


def test_a_run_directory_that_cannot_be_created_is_one_line(cfg):
    line = one_line_exit(run_orch("run", str(cfg), "--set", "storage.root=/proc/nope"), 2)
    assert (
        line.startswith("storage.root: cannot create the run directory /proc/nope/")
        and "No such file" in line
    )
    no_credentials = {
        "AWS_ACCESS_KEY_ID": "",
        "AWS_SECRET_ACCESS_KEY": "",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    line = one_line_exit(
        run_orch("run", str(cfg), "--set", "storage.root=s3://orch-no-bucket/runs", env=no_credentials), 2
    )
    # Refused by the backend's storage probe or by creating the run directory: either names both.
    assert line.startswith("storage.root: ") and "s3://orch-no-bucket/runs" in line
    assert "NoCredentialsError" in line
