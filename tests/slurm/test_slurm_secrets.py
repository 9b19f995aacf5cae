"""Secrets on the real Slurm cluster: a job.pass_env value exported where `orch submit` runs
reaches every rank on every node, through sbatch and each attempt's srun step, yet no file of
the run directory (run.yaml, events, rank and node logs, submitit's batch script, pickles and
batch log) holds it."""

from __future__ import annotations

import json

import pytest

from ..conftest import run_orch, write_config
from ..integration.test_secrets import DIGEST, JOB, SECRET, SECRET_NAME, assert_not_at_rest
from .conftest import wait_final

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("slurm_cluster")]


def test_pass_env_secret_reaches_ranks_on_every_node_and_no_file(tmp_path):
    script = tmp_path / "show_digest.py"
    script.write_text(JOB)
    cfg = write_config(
        tmp_path,
        script,
        backend="slurm",
        job={"pass_env": [SECRET_NAME]},
        resources={"nodes": 2, "ranks_per_node": 1, "cpus_per_rank": 1, "time_limit": "5"},
        slurm={"partition": "debug"},
    )
    env = {SECRET_NAME: SECRET}
    proc = run_orch("submit", str(cfg), "--run-id", "passed", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["job_id"]
    st = wait_final(cfg, "passed", timeout=240)
    assert st["state"] == "succeeded" and st["attempts"] == 2, st  # rank 1 fails its first attempt
    logs = run_orch("logs", "passed", "--config", str(cfg))
    assert logs.returncode == 0, logs.stderr
    for rank in (0, 1):
        assert f"[rank {rank}] rank {rank} sees digest {DIGEST}" in logs.stdout
    run_dir = tmp_path / "runs" / "passed"
    files = {str(p): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert any(p.name.endswith("_submission.sh") for p in (run_dir / "slurm").iterdir())  # the batch script
    assert_not_at_rest(files, proc.stdout, proc.stderr, logs.stdout, logs.stderr)
