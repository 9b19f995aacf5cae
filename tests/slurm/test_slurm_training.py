"""After training, on the real Slurm cluster: a run submitted with --profile leaves each
attempt's profile in the shared run directory (`orch profile` reads it from the login node),
and `orch report` draws the Slurm run like a local one."""

from __future__ import annotations

import json

import pytest

from ..conftest import JOBS, run_orch, write_config
from .conftest import wait_final

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("slurm_cluster")]


def test_a_profiled_slurm_run_and_its_report(tmp_path):
    cfg = write_config(
        tmp_path,
        JOBS / "train_ddp.py",
        backend="slurm",
        args=["--steps", "30", "--log-every", "10"],
        resources={"nodes": 2, "ranks_per_node": 1, "cpus_per_rank": 1, "time_limit": "5"},
        slurm={"partition": "debug"},
        profile={"wait": 5, "warmup": 1, "active": 3, "ranks": [0, 1]},
    )
    proc = run_orch("submit", str(cfg), "--run-id", "profiled", "--profile", "--json")
    assert proc.returncode == 0, proc.stderr
    st = wait_final(cfg, "profiled", timeout=240)
    assert st["state"] == "succeeded", st
    folder = tmp_path / "runs" / "profiled" / "profile" / "attempt-0"
    workers = sorted(p.name.split(".")[0] for p in folder.glob("*.pt.trace.json"))
    assert workers == ["rank-0", "rank-1"]  # one trace per profiled rank, each from its own node
    shown = run_orch("profile", "profiled", "--config", str(cfg), "--json")
    assert shown.returncode == 0, shown.stderr
    ranks = json.loads(shown.stdout)["ranks"]
    assert sorted(ranks) == ["0", "1"] and all(r["steps"] == 3 for r in ranks.values())
    report = run_orch("report", "profiled", "--config", str(cfg), "--json")
    assert report.returncode == 0, report.stderr
    result = json.loads(report.stdout)
    assert result["state"] == "succeeded" and "loss" in result["series"] and result["attempts"] == 1
