"""A real Slurm cluster for the tests: slurmctld, slurmdbd + MariaDB (sacct works) and three
slurmd daemons as nodes n1..n3 with 4 fake GPUs each (gres/gpu on dummy devices), started by
the project's own scripts/slurm/start.sh and stopped (and wiped) after the session. Needs root
and the packages of scripts/slurm/install.sh, which the README's test command installs.
ORCH_SKIP_SLURM=1 skips this group explicitly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from ..conftest import REPO, run_orch

SCRIPTS = REPO / "scripts" / "slurm"


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    if os.environ.get("ORCH_SKIP_SLURM") == "1":
        pytest.skip("ORCH_SKIP_SLURM=1")
    if os.geteuid() != 0 or not shutil.which("slurmctld"):
        pytest.fail(
            "the Slurm tests need root and scripts/slurm/install.sh (the README's test command runs it)"
        )
    state = Path("/tmp") / f"orch-slurm-test-{os.getpid()}"
    env = {
        **os.environ,
        **{
            "SLURMLAB_NODES": "3",
            "SLURMLAB_CTLD_PORT": "17817",
            "SLURMLAB_CPUS": "256",
            "SLURMLAB_GPUS": "4",
        },
    }
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "start.sh"), str(state)], env=env, capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0:
        pytest.fail(f"scripts/slurm/start.sh failed: {proc.stderr[-2000:]}")
    print(f"slurm test cluster up in {time.monotonic() - t0:.1f}s")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "etc" / "slurm.conf")
    try:
        yield state
    finally:
        subprocess.run(
            ["bash", str(SCRIPTS / "stop.sh"), str(state), "--wipe"], capture_output=True, timeout=180
        )
        _kill_leftovers(str(state / "etc" / "slurm.conf"))
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


def _kill_leftovers(conf: str) -> None:
    """Job processes of this cluster that outlived its daemons (stopped mid-KillWait)."""
    marker = f"SLURM_CONF={conf}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if marker in fh.read().split(b"\0") and int(pid) != os.getpid():
                    os.kill(int(pid), 9)
        except (OSError, ValueError):
            continue


def submit(cfg: Path, run_id: str) -> str:
    proc = run_orch("submit", str(cfg), "--run-id", run_id, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["job_id"]


def status(cfg: Path, run_id: str) -> dict:
    proc = run_orch("status", run_id, "--config", str(cfg), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def wait_final(cfg: Path, run_id: str, timeout: float = 300) -> dict:
    """Until both sides agree the run is over: the supervisor records its outcome a moment before
    the batch script exits and Slurm leaves RUNNING, so a final state alone can still show the job
    live in the scheduler. And until the supervisor has recorded the run's end (`run_finished`
    after the latest start): a cancelled job is CANCELLED in Slurm while its supervisor still
    stops the ranks with a checkpoint, and between a failed attempt and its restart the ledger
    says failed; a busy machine can also time out the scheduler query. A supervisor that never
    records its end (killed) is given 20 s."""
    deadline = time.monotonic() + timeout
    final_since = None
    while time.monotonic() < deadline:
        st = status(cfg, run_id)
        scheduler_live = st.get("slurm_state") in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING")
        if st["state"] in ("succeeded", "failed", "stopped", "cancelled") and not scheduler_live:
            final_since = final_since or time.monotonic()
            if _end_recorded(Path(st["run_dir"])) or time.monotonic() - final_since > 20:
                return st
        else:
            final_since = None
        time.sleep(1)
    raise AssertionError(f"run {run_id} did not finish in {timeout}s: {st}")


def _end_recorded(run_dir: Path) -> bool:
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    kinds = [json.loads(line)["event"] for line in lines if line]
    starts = [i for i, k in enumerate(kinds) if k in ("job_started", "resumed", "restart_scheduled")]
    ends = [i for i, k in enumerate(kinds) if k == "run_finished"]
    return bool(ends) and (not starts or ends[-1] > starts[-1])
