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

from ..conftest import JOBS, read_events, run_orch, write_config


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


# ---------------------------------------------------------------------------- start-up errors
# Issue 27, point 9: a job that cannot start fails the same way on every attempt; restarting it
# three times (until the crash-loop rule stops it) only repeats the error. Said once, with its
# line, and not retried; a failure that differs between ranks or comes after a step still is.


def start_script(tmp_path: Path, text: str, **sections: object) -> tuple[Path, Path]:
    """A job script of `text` and its config (2 ranks, 2 restarts allowed)."""
    script = tmp_path / "train.py"
    script.write_text(text)
    sections.setdefault("restart", {"max_restarts": 2, "backoff_s": 0.1, "stop_grace_s": 3})
    return script, write_config(tmp_path, script, **sections)


def attempts_and_restarts(run_dir: Path) -> tuple[list[int], int]:
    events = read_events(run_dir)
    started = [e["attempt"] for e in events if e["event"] == "attempt_started"]
    return started, sum(e["event"] == "restart_scheduled" for e in events)


def orch_lines(stderr: str) -> list[str]:
    """The supervisor's lines about attempts (not the final summary, which says the outcome)."""
    return [line for line in stderr.splitlines() if line.startswith("[orch]") and "failed after" not in line]


def said_once_not_retried(proc: subprocess.CompletedProcess, run_dir: Path, error: str, where: str) -> str:
    """The run failed after one attempt, with no restart, and its error was said once with its
    file:line; the line that says it."""
    assert proc.returncode == 1, proc.stderr
    assert attempts_and_restarts(run_dir) == ([0], 0), proc.stderr
    lines = orch_lines(proc.stderr)
    saying = [line for line in lines if error in line]
    assert len(saying) == 1 and where in saying[0], proc.stderr
    assert not any(" from the newest committed checkpoint" in line for line in lines), proc.stderr
    return saying[0]


@pytest.mark.parametrize("mode", ["auto", "subprocess"])
def test_a_missing_import_is_said_once_and_not_retried(tmp_path, mode):
    script, cfg = start_script(
        tmp_path, "import os\nimport orch_no_such_module_for_the_test  # noqa\n", launch={"mode": mode}
    )
    proc = run_orch("run", str(cfg), "--run-id", "imp", "--quiet")
    run_dir = tmp_path / "runs" / "imp"
    error = "ModuleNotFoundError: No module named 'orch_no_such_module_for_the_test'"
    said_once_not_retried(proc, run_dir, error, f"{script}:2")
    status = run_orch("status", str(run_dir)).stdout
    assert error in status and f"{script}:2" in status and "hint" in status, status
    cause = json.loads(run_orch("status", str(run_dir), "--json").stdout)["root_cause"]
    assert cause["error_type"] == "ModuleNotFoundError" and cause["where"] == f"{script}:2", cause


def test_a_missing_module_entrypoint_is_not_retried(tmp_path):
    cfg = write_config(tmp_path, "unused.py", job={"script": None, "module": "orch_no_such_pkg_for_the_test"})
    proc = run_orch("run", str(cfg), "--run-id", "mod", "--quiet")
    assert proc.returncode == 1, proc.stderr
    assert attempts_and_restarts(tmp_path / "runs" / "mod") == ([0], 0), proc.stderr
    assert "No module named orch_no_such_pkg_for_the_test" in proc.stderr


def test_the_guides_init_snippet_with_string_ranks_gets_the_fix(tmp_path):
    # The PyTorch guide's call, typed as a reader would: env:// values passed as strings.
    script, cfg = start_script(
        tmp_path,
        "import os\n"
        "import torch.distributed as dist\n"
        "dist.init_process_group(\n"
        "    backend='gloo', init_method='env://',\n"
        "    rank=os.environ['RANK'], world_size=os.environ['WORLD_SIZE'],\n"
        ")\n",
    )
    proc = run_orch("run", str(cfg), "--run-id", "snip", "--quiet")
    said_once_not_retried(proc, tmp_path / "runs" / "snip", "must be an integer", f"{script}:3")
    assert "int(os.environ['RANK'])" in proc.stderr, proc.stderr


def test_a_syntax_error_is_said_once_and_not_retried(tmp_path):
    script, cfg = start_script(tmp_path, "import os\n\n\ndef f(:\n    pass\n")
    proc = run_orch("run", str(cfg), "--run-id", "syn", "--quiet")
    said_once_not_retried(proc, tmp_path / "runs" / "syn", "SyntaxError", f"{script}:4")


def test_start_up_errors_that_differ_between_ranks_are_retried(tmp_path):
    # Rank 1 cannot import one module; rank 0 reports another when it is stopped (its SIGTERM
    # handler raises it), so both ranks' records exist and disagree: not one cause, retried.
    ready = tmp_path / "rank0-ready"
    script, cfg = start_script(
        tmp_path,
        "import os, signal, time\n"
        "if os.environ['RANK'] == '0':\n"
        "    def stopped(*_):\n"
        "        raise ModuleNotFoundError(\"No module named 'orch_missing_a'\")\n"
        "    signal.signal(signal.SIGTERM, stopped)\n"
        f"    open({str(ready)!r}, 'w').close()\n"
        "    time.sleep(60)\n"
        f"while not os.path.exists({str(ready)!r}):\n"
        "    time.sleep(0.01)\n"
        "import orch_missing_b  # noqa\n",
        restart={"max_restarts": 1, "backoff_s": 0.1, "stop_grace_s": 5},
    )
    proc = run_orch("run", str(cfg), "--run-id", "differ", "--quiet")
    run_dir = tmp_path / "runs" / "differ"
    assert proc.returncode == 1 and attempts_and_restarts(run_dir) == ([0, 1], 1), proc.stderr
    records = {
        json.loads((run_dir / "logs" / "attempt-0" / f"rank-{r}.error.json").read_text())["message"]
        for r in (0, 1)
    }
    assert records == {"No module named 'orch_missing_a'", "No module named 'orch_missing_b'"}  # fired


def test_an_import_error_after_the_first_step_is_retried(tmp_path):
    # Mid-run, an import that fails (a flaky shared filesystem) may work on the next attempt.
    _, cfg = start_script(
        tmp_path,
        "import torch.distributed as dist\n"
        "from orchestrator import runtime\n"
        "from orchestrator.runtime import heartbeat\n"
        "ctx = runtime.init()\n"
        "heartbeat.beat(1)  # step 1 done\n"
        "dist.barrier()\n"
        "import orch_missing_mid_run  # noqa\n",
        restart={"max_restarts": 1, "backoff_s": 0.1, "stop_grace_s": 3},
    )
    proc = run_orch("run", str(cfg), "--run-id", "mid", "--quiet")
    assert proc.returncode == 1, proc.stderr
    assert attempts_and_restarts(tmp_path / "runs" / "mid") == ([0, 1], 1), proc.stderr


def test_one_ranks_missing_file_at_start_is_retried(tmp_path):
    # Issue 27, follow-up 10: rank 1 cannot open its node-local shard; rank 0 is fine (it waits
    # for its peer, as in a rendezvous) and is stopped. One rank's error is not the job's: the
    # run restarts, though the error is one that would be fatal on every rank.
    script, cfg = start_script(
        tmp_path,
        "import os, time\n"
        "if os.environ['RANK'] == '1':\n"
        f"    open({str(tmp_path / 'local' / 'shard-1')!r})\n"
        "time.sleep(60)\n",
        restart={"max_restarts": 1, "backoff_s": 0.1, "stop_grace_s": 3},
    )
    proc = run_orch("run", str(cfg), "--run-id", "shard", "--quiet")
    run_dir = tmp_path / "runs" / "shard"
    assert proc.returncode == 1 and attempts_and_restarts(run_dir) == ([0, 1], 1), proc.stderr
    record = json.loads((run_dir / "logs" / "attempt-0" / "rank-1.error.json").read_text())
    assert record["type"] == "FileNotFoundError" and record["where"] == f"{script}:3"  # fired
    assert not (run_dir / "logs" / "attempt-0" / "rank-0.error.json").exists()  # rank 0 was stopped
