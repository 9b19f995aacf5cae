"""Persistent node agents (issue 15, point 1) with stand-ins for srun and scontrol
(tests/jobs/fake_slurm.py), so the Slurm supervisor's own code runs here without a cluster: no
rank outlives its supervisor, and a restart forks from the same agents at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from orchestrator.spec.config import config_to_dict, load_config
from orchestrator.storage.rundir import RunDir

from ..conftest import REPO, TEST_JOBS, read_events, wait_for, write_config

FAKE_SLURM = TEST_JOBS / "fake_slurm.py"


# An srun whose step's tasks are a process group of their own (scancel ends the group, as Slurm
# ends a step's tasks), and whose task on node @NODE@ never starts its agent: it hangs before
# it could connect (a hung shared filesystem, say), and leaves a mark that it did.
HANGING_SRUN = """
import os, sys
os.setsid()
with open(os.environ["FAKE_SRUN_PID"], "w") as fh:
    fh.write(str(os.getpid()))
args = sys.argv[1:]
cut = next(i for i, a in enumerate(args) if not a.startswith("--"))
hang = 'if [ "$SLURM_NODEID" = "@NODE@" ]; then : >"$FAKE_SRUN_PID.hung"; exec sleep 600; fi; exec "$@"'
fake = [sys.executable, @FAKE_SLURM@, "srun", *args[:cut]]
os.execv(sys.executable, [*fake, "/bin/sh", "-c", hang, "-", *args[cut:]])
"""


def _tools(tmp_path: Path, hang_node: int | None) -> None:
    (tmp_path / "bin").mkdir()
    tools = {
        tool: f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_SLURM}" {tool} "$@"\n'
        for tool in ("srun", "scontrol")
    }
    if hang_node is not None:
        srun = tmp_path / "srun.py"
        srun.write_text(
            HANGING_SRUN.replace("@NODE@", str(hang_node)).replace("@FAKE_SLURM@", repr(str(FAKE_SLURM)))
        )
        pid = tmp_path / "srun.pid"
        tools["srun"] = f'#!/bin/sh\nFAKE_SRUN_PID="{pid}" exec "{sys.executable}" "{srun}" "$@"\n'
        tools["squeue"] = "#!/bin/sh\necho 4242.0\n"
        tools["scancel"] = f'#!/bin/bash\nkill -KILL -- -"$(cat "{pid}")"\n'
    for tool, text in tools.items():
        stub = tmp_path / "bin" / tool
        stub.write_text(text)
        stub.chmod(0o755)


def _supervisor(
    tmp_path: Path,
    script: Path,
    args: list[str],
    hang_node: int | None = None,
    patch: str = "",
    **sections,
) -> tuple[subprocess.Popen, Path]:
    """The Slurm supervisor of a 2 x 2 run of `script`, started as its batch step (`patch`:
    Python run first in its process, to shorten one of its timeouts)."""
    _tools(tmp_path, hang_node)
    cfg = write_config(
        tmp_path,
        script,
        args=args,
        backend="slurm",
        resources={"nodes": 2, "ranks_per_node": 2, "cpus_per_rank": 1},
        **sections,
    )
    config = load_config(str(cfg))
    run = RunDir(str(tmp_path / "runs" / "p"))
    run.create(
        {"run_id": "p", "backend": "slurm", "base_dir": config.base_dir, "config": config_to_dict(config)}
    )
    env = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_RESTART_COUNT": "0",
        "FAKE_SLURM_LOG": str(tmp_path / "scontrol.log"),
    }
    code = f"{patch}\nfrom orchestrator.backends.slurm.supervisor import supervise; supervise({run.url!r})"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return proc, Path(run.local_path)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _pids(log: Path) -> list[int]:
    line = next(x for x in log.read_text().splitlines() if "forked ranks" in x)
    return [int(p) for p in line.split("(pids ")[1].rstrip(")").split()]


def test_agents_and_ranks_leave_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    proc, run_dir = _supervisor(tmp_path, TEST_JOBS / "brief.py", ["--live-s", "60"])
    try:
        logs = [run_dir / "logs" / "attempt-0" / f"node-{n}.log" for n in range(2)]
        wait_for(
            lambda: all(log.exists() and "forked ranks" in log.read_text() for log in logs), 120, "the ranks"
        )
        agents = [
            json.loads((run_dir / "logs" / "attempt-0" / f"node-{n}.agent.json").read_text())["pid"]
            for n in range(2)
        ]
        ranks = [pid for log in logs for pid in _pids(log)]
        assert all(_alive(pid) for pid in [*agents, *ranks])
        proc.kill()  # the fault: the supervisor dies without a word
        proc.wait()
        assert not _alive(proc.pid)
        # The agents see their channel close, stop their ranks and leave (the ranks would
        # otherwise live 60 s).
        wait_for(lambda: not any(_alive(pid) for pid in [*agents, *ranks]), 15, "agents and ranks to leave")
        assert all("leaving" in log.read_text() or "exit" in log.read_text() for log in logs)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_restart_forks_from_the_same_agents_at_once(tmp_path: Path) -> None:
    # Rank 3 fails on attempt 0 only; the restart is a message to the same two agents, whose
    # fork servers are warm: its ranks are forked within a fraction of a second.
    proc, run_dir = _supervisor(
        tmp_path,
        TEST_JOBS / "fail.py",
        [],
        job={"env": {"FAIL_ONLY_ATTEMPT": "0", "FAIL_RANK": "3"}},
        restart={"max_restarts": 1, "backoff_s": 0},
    )
    try:
        assert proc.wait(timeout=180) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    events = read_events(run_dir)
    assert [e["status"] for e in events if e["event"] == "attempt_ended"] == ["failed", "succeeded"]
    assert [e["agent_step"] for e in events if e["event"] == "attempt_started"] == ["new", "kept"]
    for node in range(2):
        records = [
            json.loads((run_dir / "logs" / f"attempt-{a}" / f"node-{node}.agent.json").read_text())
            for a in (0, 1)
        ]
        assert records[0]["pid"] == records[1]["pid"] and records[1]["code"] == 0
        line = next(
            x
            for x in (run_dir / "logs" / "attempt-1" / f"node-{node}.log").read_text().splitlines()
            if "forked ranks" in x
        )
        assert float(line.split(" in ")[1].split("s")[0]) < 1.0, line  # no new import of torch


def test_a_node_whose_agent_never_says_hello_breaks_the_step_within_the_deadline(tmp_path: Path) -> None:
    # Node 1's task hangs before its agent connects; node 0's ranks would live 60 s. The step
    # is broken once the agents' deadline to introduce themselves has passed (6 s here), the
    # attempt ends naming node 1, and with no restarts left the run fails: nothing waits for
    # a HELLO or an ENDED that cannot come.
    proc, run_dir = _supervisor(
        tmp_path,
        TEST_JOBS / "brief.py",
        ["--live-s", "60"],
        hang_node=1,
        patch="import orchestrator.backends.slurm.supervisor as s; s.AGENTS_JOIN_S = 6.0",
        restart={"max_restarts": 0},
    )
    try:
        assert proc.wait(timeout=45) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
        pid = tmp_path / "srun.pid"
        if pid.exists():
            try:
                os.killpg(int(pid.read_text()), signal.SIGKILL)  # the step's tasks, if left
            except ProcessLookupError:
                pass
    events = read_events(run_dir)
    # the fault fired: node 1's task hung instead of running its agent (node 0's joined: only
    # node 1 is named below)
    assert (tmp_path / "srun.pid.hung").exists()
    assert [e["status"] for e in events if e["event"] == "attempt_ended"] == ["failed"]
    (finished,) = [e for e in events if e["event"] == "run_finished"]
    cause = finished["root_cause"]
    assert finished["status"] == "failed" and cause["node_rank"] == 1, cause
    assert "node 1 " in cause["message"] and "never introduced" in cause["message"], cause
