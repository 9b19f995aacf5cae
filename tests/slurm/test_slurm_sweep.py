"""A sweep on the real test cluster: one job array through submitit, `%max_parallel`, a task
requeued from outside resumes alone and exactly; cancel one task, then the whole sweep, then
resume only the unfinished points."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from ..conftest import JOBS, orch_cmd, read_events, run_orch, wait_for, write_config
from .test_slurm_cluster import rank0_step

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("slurm_cluster")]

ARGS = ["--steps", "60", "--log-every", "5", "--dataset-size", "512", "--lr", "{lr}"]
LRS = [0.001, 0.003, 0.01]


def sweep_config(tmp_path: Path, step_sleep: str, max_parallel: int) -> Path:
    cfg = write_config(
        tmp_path,
        JOBS / "train_ddp.py",
        args=[*ARGS, "--step-sleep", step_sleep],
        backend="slurm",
        resources={"nodes": 2, "ranks_per_node": 1, "cpus_per_rank": 1, "time_limit": "10"},
        storage={"checkpoint_interval": 20},
        slurm={"partition": "debug", "signal_lead_s": 30, "max_requeues": 3},
    )
    data = yaml.safe_load(cfg.read_text())
    data["sweep"] = {"grid": {"lr": LRS}, "max_parallel": max_parallel}
    cfg.write_text(yaml.safe_dump(data))
    return cfg


def sweep_status(cfg: Path, sweep_id: str) -> dict:
    proc = run_orch("status", sweep_id, "--config", str(cfg), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def wait_sweep(cfg: Path, sweep_id: str, states: set[str], timeout: float = 300) -> dict:
    def done():
        st = sweep_status(cfg, sweep_id)
        return st if all(r["state"] in states for r in st["rows"]) else None

    return wait_for(done, timeout, f"every point of {sweep_id} in {states}", interval=2)


def digest(cfg: Path, run: str) -> tuple[int, str]:
    rows = json.loads(run_orch("checkpoints", run, "--config", str(cfg), "--json").stdout)
    return rows[-1]["step"], rows[-1]["model_digest"]


def test_a_sweep_is_one_job_array_and_a_requeued_task_resumes_alone_and_exactly(tmp_path):
    cfg = sweep_config(tmp_path, "0.05", max_parallel=3)
    data = yaml.safe_load(cfg.read_text())
    cfg.write_text(yaml.safe_dump({**data, "backend": "local"}))  # --backend slurm makes it a Slurm sweep
    proc = run_orch("sweep", str(cfg), "--backend", "slurm", "--sweep-id", "sw", "--json")
    assert proc.returncode == 0, proc.stderr
    submitted = json.loads(proc.stdout)
    job_ids = [r["job_id"] for r in submitted["rows"]]
    array = job_ids[0].split("_")[0]
    assert job_ids == [f"{array}_{i}" for i in range(3)]
    # One sbatch of an array, at most max_parallel tasks at once.
    batch = next((tmp_path / "runs" / "sw" / "slurm").glob("*_submission.sh")).read_text()
    assert "#SBATCH --array=0-2%3" in batch

    run1 = tmp_path / "runs" / "sw" / "1"
    wait_for(lambda: rank0_step(run1) >= 25, 180, "point 1 training past step 25")
    subprocess.run(["scontrol", "requeue", job_ids[1]], check=True)
    st = wait_sweep(cfg, "sw", {"succeeded", "failed", "cancelled"})
    assert [r["state"] for r in st["rows"]] == ["succeeded"] * 3, st
    started = [
        [e for e in read_events(tmp_path / "runs" / "sw" / str(i)) if e["event"] == "job_started"]
        for i in range(3)
    ]
    assert [len(s) for s in started] == [1, 2, 1]  # only the requeued task ran again
    assert {e["job_id"] for e in started[1]} == {started[1][0]["job_id"]}  # the same task, requeued
    assert [r["attempts"] for r in st["rows"]] == [1, 2, 1]
    assert all(r["scalars"].get("loss") is not None and r["step"] == 60 for r in st["rows"])

    # Every point ends where the same point run alone, locally, ends.
    for i, lr in enumerate(LRS):
        args = json.dumps([*ARGS[:-1], str(lr), "--step-sleep", "0"])
        proc = run_orch(
            "run", str(cfg), "--backend", "local", "--run-id", f"alone-{i}", "--quiet",
            "--set", f"job.args={args}", "--set", "sweep=null", timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert digest(cfg, f"alone-{i}") == digest(cfg, f"sw/{i}"), i


def test_cancel_one_task_then_the_sweep_then_resume_the_unfinished(tmp_path):
    cfg = sweep_config(tmp_path, "0.3", max_parallel=3)  # slow steps, and one task at a time:
    assert run_orch("sweep", str(cfg), "--max-parallel", "1", "--sweep-id", "c").returncode == 0
    wait_for(lambda: sweep_status(cfg, "c")["rows"][0]["state"] == "running", 120, "point 0 running", 1)
    proc = run_orch("cancel", "c/0", "--config", str(cfg))
    assert proc.returncode == 0 and "cancelled Slurm job" in proc.stdout and "_0 of run c/0" in proc.stdout
    wait_for(lambda: sweep_status(cfg, "c")["rows"][0]["state"] == "cancelled", 120, "point 0 cancelled", 1)
    proc = run_orch("cancel", "c", "--config", str(cfg))
    assert proc.returncode == 0 and "Slurm job(s) of sweep c" in proc.stdout, proc.stderr
    st = wait_sweep(cfg, "c", {"cancelled", "succeeded"}, timeout=120)
    assert "cancelled" in {r["state"] for r in st["rows"]}
    # No task's supervisor took the cancel for a preemption (the ledger names an array task
    # ARRAY_TASK, its SLURM_JOB_ID is a number of its own: both are the job's names).
    for i in range(3):
        kinds = [e["event"] for e in read_events(tmp_path / "runs" / "c" / str(i))]
        assert "requeued" not in kinds and "preempted" not in kinds, kinds

    # Only the points that did not succeed go again, as a second job array.
    proc = run_orch("resume", "c", "--config", str(cfg), "--json")
    assert proc.returncode == 0, proc.stderr
    st = wait_sweep(cfg, "c", {"succeeded", "failed", "cancelled"}, timeout=400)
    assert [r["state"] for r in st["rows"]] == ["succeeded"] * 3, st
    arrays = {e["array_job_id"] for e in read_events(tmp_path / "runs" / "c") if e["event"] == "submitted"}
    assert len(arrays) == 2  # the sweep, and its resume: a second array of the unfinished points
    proc = run_orch("resume", "c", "--config", str(cfg))
    assert proc.returncode == 2 and "every point of sweep c succeeded" in proc.stderr


def test_the_readmes_slurm_sweep_command_on_the_default_job(tmp_path):
    from ..integration.test_sweeps import default_job_copy, readme_sweep_commands

    command = readme_sweep_commands()[2]
    assert command[:2] == ["orch", "sweep"] and "--backend" in command
    work = default_job_copy(tmp_path)
    proc = subprocess.run(
        orch_cmd(*command[1:], "--json"), cwd=work, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    sweep_id = json.loads(proc.stdout)["sweep_id"]
    batch = next((work / "runs" / sweep_id / "slurm").glob("*_submission.sh")).read_text()
    assert "#SBATCH --array=0-2%3" in batch
    st = wait_sweep(work / "cluster.yaml", sweep_id, {"succeeded", "failed", "cancelled"}, timeout=400)
    assert [(r["state"], r["step"]) for r in st["rows"]] == [("succeeded", 100)] * 3, st
