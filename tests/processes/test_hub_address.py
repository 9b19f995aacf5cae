"""Where the persistent agents' hub listens, decided once by the Slurm supervisor (`supervise()`,
channel.hub_address): a first node whose name resolves only to loopback (Debian's `127.0.1.1
HOSTNAME`) while another node of the allocation is elsewhere is refused before any step, as
the run's end, in one line (tests/unit/test_agent_channel.py checks the choice itself; the
one-node and all-on-this-host cases run in tests/processes/test_persistent_agents.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from orchestrator.spec.config import config_to_dict, load_config
from orchestrator.storage.rundir import RunDir

from ..conftest import REPO, TEST_JOBS, read_events, write_config


def test_a_loopback_first_node_with_a_node_elsewhere_is_refused_as_the_runs_end(tmp_path: Path) -> None:
    # The first node, localhost, resolves to 127.0.0.1 only; the second is a documentation
    # address (192.0.2.1, a name that needs no resolver): its agent could never reach a hub
    # bound to loopback, and the step would break only after AGENTS_JOIN_S (300 s).
    (tmp_path / "bin").mkdir()
    srun = tmp_path / "bin" / "srun"
    srun.write_text(f'#!/bin/sh\n: >"{tmp_path / "srun-ran"}"\nexit 1\n')
    srun.chmod(0o755)
    config = load_config(
        str(
            write_config(
                tmp_path,
                TEST_JOBS / "brief.py",
                backend="slurm",
                resources={"nodes": 2, "ranks_per_node": 1, "cpus_per_rank": 1},
            )
        )
    )
    run = RunDir(str(tmp_path / "runs" / "p"))
    run.create(
        {"run_id": "p", "backend": "slurm", "base_dir": config.base_dir, "config": config_to_dict(config)}
    )
    env = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "localhost,192.0.2.1",
        "SLURM_RESTART_COUNT": "0",
    }
    code = f"from orchestrator.backends.slurm.supervisor import supervise; supervise({run.url!r})"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stderr
    assert not (tmp_path / "srun-ran").exists(), "a step was started"
    ends = [e for e in read_events(Path(run.local_path)) if e["event"] == "run_finished"]
    assert len(ends) == 1 and ends[0]["status"] == "failed", (ends, proc.stderr)
    reason = ends[0]["reason"]
    assert "\n" not in reason, reason
    assert "MASTER_ADDR 'localhost' resolves only to loopback on this node (127.0.0.1)" in reason, reason
    assert "node '192.0.2.1' (192.0.2.1)" in reason and "/etc/hosts" in reason, reason
