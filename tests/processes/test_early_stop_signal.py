"""A stop warning (SIGUSR2) that reaches a rank while it is still importing must neither kill it
nor be lost: both launchers start ranks with SIGUSR2 blocked, and the runtime's preemption
handler unblocks it, so the pending warning is delivered the moment the handler exists.

Slurm sends its `--signal` warning up to 60 s before the requested lead time, so on a short
job it can land during `import torch`; before this, the Slurm task script ignored it and the
job ran into its time limit without a checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from orchestrator.launch.processes import SubprocessLauncher
from orchestrator.launch.readiness import wait_ready
from orchestrator.spec.plan import RankSpec

from ..conftest import REPO

# Stands in for a job: says it is alive, "imports" until the warning has arrived (pending: held
# blocked, as both launchers start ranks), then installs the runtime's handler and reports what
# it was asked. Waiting for the warning, not for a fixed time, makes it land before the handler.
WAIT_FOR_WARNING = """
import signal, time
deadline = time.monotonic() + 20
while signal.SIGUSR2 not in signal.sigpending():
    assert time.monotonic() < deadline, "the warning never became pending"
    time.sleep(0.01)
"""
JOB = (
    'print("importing", flush=True)\n'
    + WAIT_FOR_WARNING
    + "from orchestrator.runtime import preemption\n"
    + "preemption.install()  # unblocks: the pending warning reaches the handler at once\n"
    + 'print(f"requested={preemption.requested()}", flush=True)\n'
)


def _wait_line(stream, timeout: float = 30) -> str:
    ready, _ = wait_ready([stream], timeout=timeout)
    assert ready, "the job printed nothing"
    return stream.readline()


def test_warning_during_import_is_delivered_under_the_slurm_task_script() -> None:
    env = {
        **os.environ,
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "ORCH_LOG_DIR": "/tmp",
        "PYTHONPATH": str(REPO),
    }
    proc = subprocess.Popen(
        ["/bin/bash", str(REPO / "templates" / "slurm_task.sh"), sys.executable, "-c", JOB],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert _wait_line(proc.stdout) == "importing\n"
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, f"killed by the warning: {proc.returncode}"
    assert out.strip() == f"requested={int(signal.SIGUSR2)}"


def test_warning_during_import_is_delivered_under_the_local_launcher(tmp_path: Path) -> None:
    spec = RankSpec(
        rank=0, local_rank=0, node_rank=0, argv=(sys.executable, "-c", JOB), env={"PYTHONPATH": str(REPO)}
    )
    log = tmp_path / "rank-0.log"
    group = SubprocessLauncher().start_attempt([spec], [str(log)], [{}])
    try:
        deadline = time.monotonic() + 30
        while "importing" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline, "the job printed nothing"
            time.sleep(0.01)
        os.kill(group.ranks[0].pid, signal.SIGUSR2)
        assert group.ranks[0].popen.wait(timeout=30) == 0, log.read_text()
    finally:
        group.close()
    assert log.read_text().splitlines()[-1] == f"requested={int(signal.SIGUSR2)}"


def test_a_job_without_the_runtime_is_not_killed_by_the_warning() -> None:
    # A plain torchrun-style script never installs the handler: the warning stays pending.
    env = {
        **os.environ,
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "ORCH_LOG_DIR": "/tmp",
    }
    plain = "print('up', flush=True)\n" + WAIT_FOR_WARNING + "print('done', flush=True)\n"
    proc = subprocess.Popen(
        ["/bin/bash", str(REPO / "templates" / "slurm_task.sh"), sys.executable, "-c", plain],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert _wait_line(proc.stdout) == "up\n"
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and out == "done\n"
