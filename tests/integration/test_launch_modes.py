"""The two ways the local backend starts ranks (launch.mode): forked from the pre-warmed fork
server (auto) and fresh interpreters (subprocess). A rank must not be able to tell them apart,
the supervisor must get every exit status, and the fork server must fall back, saying why,
where forking is unsafe."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import psutil
import pytest

from ..conftest import TEST_JOBS, read_events, run_orch, write_config

pytestmark = pytest.mark.integration

STATE_JOB = TEST_JOBS / "process_state.py"
MODES = ["auto", "subprocess"]
LAUNCHED_BY = {"auto": "fork", "subprocess": "subprocess"}


def _launchers(run_dir: Path) -> list[str]:
    return [e["launcher"] for e in read_events(run_dir) if e["event"] == "attempt_started"]


@pytest.mark.parametrize("mode", MODES)
def test_a_rank_cannot_tell_how_it_was_started(tmp_path: Path, mode: str) -> None:
    cfg = write_config(
        tmp_path,
        STATE_JOB,
        args=["--flag", "a b"],
        launch={"mode": mode},
        resources={"cpus_per_rank": 2},
        job={
            "script": str(STATE_JOB),
            "env": {"PROCESS_EXIT": "atexit"},
            "pass_env": ["PROCESS_SECRET"],  # a secret reaches the ranks from the submitting env
        },
    )
    proc = run_orch("run", str(cfg), "--run-id", "state", "--json", env={"PROCESS_SECRET": "s3cr3t"})
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "runs" / "state"
    assert _launchers(run_dir) == [LAUNCHED_BY[mode]]
    states = [json.loads((run_dir / f"state-{r}-0.json").read_text()) for r in range(2)]
    for rank, state in enumerate(states):
        assert state["name"] == "__main__"
        assert state["argv"] == [str(STATE_JOB), "--flag", "a b"]
        assert state["path0"] == str(STATE_JOB.parent) and state["local"] == "local module found"
        assert state["torch_threads"] == 2  # resources.cpus_per_rank, although torch was imported earlier
        assert state["usr2_blocked"] and state["sigint_handler"] and state["stdin_empty"]
        assert state["secret_seen"] == "s3cr3t"
        assert not state["pgid_is_own"]  # in the attempt's process group, led by its reaper
        log = (run_dir / "logs" / "attempt-0" / f"rank-{rank}.log").read_text()
        assert f"unflushed line from rank {rank}" in log and f"atexit ran on rank {rank}" in log
    # numpy's global RNG is seeded afresh in every rank, as in fresh interpreters
    assert states[0]["numpy_random"] != states[1]["numpy_random"]
    if mode == "auto":
        assert "fork server ready: imported torch" in proc.stderr
        assert (
            "local_helper" not in proc.stderr.split("fork server ready")[1].splitlines()[0]
        )  # never preload the job's own modules
    else:
        assert "starting ranks as fresh interpreters: launch.mode is subprocess" in proc.stderr


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["code", "raise"])
def test_every_exit_status_reaches_the_supervisor(tmp_path: Path, mode: str, how: str) -> None:
    cfg = write_config(
        tmp_path,
        STATE_JOB,
        launch={"mode": mode},
        restart={"max_restarts": 0},
        job={"script": str(STATE_JOB), "env": {"PROCESS_EXIT": how, "PROCESS_CODE": "3"}},
    )
    proc = run_orch("run", str(cfg), "--run-id", "exits", "--json")
    assert proc.returncode == 1, proc.stderr
    cause = json.loads(proc.stdout)["root_cause"]
    ended = [e for e in read_events(tmp_path / "runs" / "exits") if e["event"] == "attempt_ended"][0]
    assert cause["rank"] == 1
    if how == "code":
        # rank 0 exits 0 on its own, or -15 when rank 1's failure made the supervisor stop it first
        assert (
            cause["exitcode"] == 3 and ended["exit_codes"]["1"] == 3 and ended["exit_codes"]["0"] in (0, -15)
        )
    else:
        assert cause["exitcode"] == 1 and cause["message"] == "RuntimeError: raised on purpose"
        log = (tmp_path / "runs" / "exits" / "logs" / "attempt-0" / "rank-1.log").read_text()
        assert "Traceback (most recent call last)" in log and 'process_state.py", line' in log


def test_another_interpreter_falls_back_to_fresh_processes_and_says_why(tmp_path: Path) -> None:
    wrapper = tmp_path / "python-wrapper"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    cfg = write_config(tmp_path, STATE_JOB, job={"script": str(STATE_JOB), "python": str(wrapper)})
    proc = run_orch("run", str(cfg), "--run-id", "other", "--json")
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "runs" / "other"
    assert _launchers(run_dir) == ["subprocess"]
    notice = [e for e in read_events(run_dir) if e["event"] == "launcher_notice"]
    assert (
        len(notice) == 1
        and f"job.python ({wrapper}) is not the interpreter the fork server runs" in notice[0]["message"]
    )
    assert "starting ranks as fresh interpreters: job.python" in proc.stderr


def test_a_preload_that_starts_a_thread_is_dropped_and_ranks_still_fork(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "threadstarter.py").write_text(
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(60,), name='poller', daemon=True).start()\n"
    )
    cfg = write_config(
        tmp_path,
        STATE_JOB,
        launch={"preload": ["threadstarter"]},
        job={"script": str(STATE_JOB), "env": {"PYTHONPATH": str(lib)}},
    )
    proc = run_orch("run", str(cfg), "--run-id", "threads", "--json")
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "runs" / "threads"
    assert _launchers(run_dir) == ["fork"]
    notice = next(e for e in read_events(run_dir) if e["event"] == "launcher_notice")["message"]
    assert (
        "not preloading threadstarter: after importing threadstarter: Python threads are running (poller)"
        in notice
    )


def test_restarts_fork_from_the_same_server(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        TEST_JOBS / "fail.py",
        restart={"max_restarts": 2, "backoff_s": 0.1},
        job={"script": str(TEST_JOBS / "fail.py"), "env": {"FAIL_ONLY_ATTEMPT": "0", "FAIL_RANK": "1"}},
    )
    proc = run_orch("run", str(cfg), "--run-id", "again", "--json")
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "runs" / "again"
    assert _launchers(run_dir) == ["fork", "fork"]
    assert proc.stderr.count("fork server ready") == 1  # imported once for both attempts
    # The server left with the run.
    log = (run_dir / "logs" / "forkserver.log").read_text()
    pid = int(log.split("[forkserver] pid ")[1].split(":")[0])
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
