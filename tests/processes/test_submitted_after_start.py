"""sbatch returns the job id only once the job is queued, and a job may start (and write
`job_started`) before `orch submit` appends `submitted` (issue 27, point 7): the ledger must not
call that run pending. Stand-ins for sbatch (it starts the job's ledger before it answers) and
for a scheduler that knows nothing of the job (unreachable, or its records purged), so only the
ledger speaks."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from orchestrator import api

from ..conftest import TEST_JOBS, read_events, write_config

SBATCH = """\
import json, os, sys, time
# The job starts at once: its supervisor's first event lands before sbatch answers.
with open(os.environ["STUB_LEDGER"], "a") as fh:
    fh.write(json.dumps({"time": time.time(), "event": "job_started", "job_id": "4242",
                         "restart_count": 0, "backend": "slurm"}) + "\\n")
print("Submitted batch job 4242")
"""


def stand_ins(tmp_path: Path, monkeypatch, ledger: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch.py").write_text(SBATCH)
    tools = {"sbatch": f'exec "{sys.executable}" "{bin_dir / "sbatch.py"}" "$@"', "scancel": "exit 0"}
    tools.update({name: "exit 1" for name in ("sacct", "squeue", "scontrol")})  # knows nothing
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STUB_LEDGER", str(ledger))


def submitted_early(tmp_path: Path, monkeypatch) -> api.Run:
    cfg = write_config(
        tmp_path,
        TEST_JOBS / "brief.py",
        backend="slurm",
        resources={"nodes": 1, "ranks_per_node": 1, "cpus_per_rank": 1},
    )
    stand_ins(tmp_path, monkeypatch, tmp_path / "runs" / "early" / "events.jsonl")
    run = api.submit(api.load_config(str(cfg)), run_id="early", check=False)
    kinds = [e["event"] for e in read_events(Path(run.url))]
    assert kinds == ["job_started", "submitted"], kinds  # the order this test is about
    return run


def test_a_job_started_before_sbatch_answered_is_running_not_pending(tmp_path, monkeypatch):
    run = submitted_early(tmp_path, monkeypatch)
    st = run.status()
    assert (st.state, st.job_id, st.slurm_state) == ("running", "4242", None)
    (row,) = api.list_runs(str(tmp_path / "runs"))  # `orch ls` folds the ledger alone
    assert row["state"] == "running", json.dumps(row)


def test_a_cancel_of_a_job_started_before_sbatch_answered_is_not_a_cancel_before_it_ran(
    tmp_path, monkeypatch
):
    run = submitted_early(tmp_path, monkeypatch)
    assert run.cancel() == "cancelled Slurm job 4242 of run early"
    # The job runs on, checkpointing, until its supervisor records the cancel: still running.
    assert run.status().state == "running"
