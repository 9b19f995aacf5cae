"""Exact resume under real faults: ranks SIGKILLed at seeded random steps, runs on S3."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest

from orchestrator.storage.rundir import RunDir

from ..conftest import JOBS, S3_BUCKET, TEST_JOBS, orch_cmd, read_events, run_orch, wait_for, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 90
ARGS = ["--steps", str(STEPS), "--log-every", "1", "--step-sleep", "0.04", "--dataset-size", "1024"]


def final_digest(run_ref: str, config: Path) -> tuple[int, str]:
    status = run_orch("status", run_ref, "--config", str(config), "--json")
    assert status.returncode == 0, status.stderr
    st = json.loads(status.stdout)
    return st["newest_checkpoint"], st["newest_checkpoint_digest"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[int, str]:
    tmp = tmp_path_factory.mktemp("reference")
    cfg = write_config(tmp, JOBS / "train_ddp.py", args=ARGS, storage={"checkpoint_interval": 10})
    proc = run_orch("run", str(cfg), "--run-id", "ref", "--quiet")
    assert proc.returncode == 0, proc.stderr
    return final_digest("ref", cfg)


def _attempt_log(run_dir: Path, attempt: int) -> str:
    path = run_dir / "logs" / f"attempt-{attempt}" / "rank-0.log"
    return path.read_text() if path.exists() else ""


# The second with async saves: their parameters and optimizer state are copied beside the next
# forward/backward (until the optimizer's step), and must still be exactly the step's.
@pytest.mark.parametrize("seed,async_save", [(1, False), (2, True)])
def test_three_random_kills_end_in_the_uninterrupted_weights(tmp_path, reference, seed, async_save):
    rng = random.Random(seed)
    kill_steps = sorted(rng.sample(range(5, STEPS - 5), 3))
    # The example job, held at its last step in the attempts to be killed: a kill that comes
    # late (a loaded machine) still lands in a live attempt instead of after its end.
    cfg = write_config(
        tmp_path,
        TEST_JOBS / "held_train.py",
        args=ARGS,
        job={"env": {"HOLD_STEP": str(STEPS), "HOLD_ATTEMPTS": str(len(kill_steps))}},
        storage={"checkpoint_interval": 10, "async_save": async_save},
        restart={"max_restarts": 3, "backoff_s": 0.1, "crash_loop_attempts": 0},
    )  # kills may land between two checkpoints
    run_dir = tmp_path / "runs" / "faulty"
    proc = subprocess.Popen(
        orch_cmd("run", str(cfg), "--run-id", "faulty", "--quiet"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for attempt, step in enumerate(kill_steps):
            # Kill once this attempt has trained past `step` (a resumed attempt starts at its checkpoint).
            wait_for(
                lambda step=step, attempt=attempt: any(
                    line.startswith(f"step {s}/")
                    for s in range(step, STEPS + 1)
                    for line in _attempt_log(run_dir, attempt).splitlines()
                ),
                120,
                f"attempt {attempt} at step {step}",
            )
            pids = [
                e["pids"]
                for e in read_events(run_dir)
                if e["event"] == "attempt_started" and e["attempt"] == attempt
            ][0]
            os.kill(rng.choice(pids), signal.SIGKILL)
            wait_for(
                lambda attempt=attempt: any(
                    e["event"] == "attempt_started" and e["attempt"] == attempt + 1
                    for e in read_events(run_dir)
                ),
                60,
                f"attempt {attempt + 1}",
            )
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    ended = [e["status"] for e in read_events(run_dir) if e["event"] == "attempt_ended"]
    assert ended == ["failed", "failed", "failed", "succeeded"]
    assert final_digest(str(run_dir), cfg) == reference


def test_run_with_its_run_directory_on_s3(tmp_path, s3_server, reference):
    root = f"s3://{S3_BUCKET}/runs-{os.getpid()}"
    cfg = write_config(
        tmp_path, JOBS / "train_ddp.py", args=ARGS, storage={"root": root, "checkpoint_interval": 30}
    )
    proc = run_orch("run", str(cfg), "--run-id", "ons3", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert final_digest("ons3", cfg) == reference  # same job, same weights, other storage
    staged = Path(RunDir(f"{root}/ons3").logs_path(0))
    assert not staged.parent.parent.exists(), "the staged logs were uploaded, then removed"
    logs = run_orch("logs", "ons3", "--config", str(cfg), "--rank", "0")
    assert logs.returncode == 0 and f"[rank 0] done: {STEPS} steps" in logs.stdout
    listing = run_orch("checkpoints", f"{root}/ons3", "--verify", "--json")
    rows = json.loads(listing.stdout)
    assert [r["step"] for r in rows] == [90, 60] and all(r["verified"] for r in rows)
    ls = run_orch("ls", "--config", str(cfg), "--json")
    assert [r["run_id"] for r in json.loads(ls.stdout)] == ["ons3"]
    # TensorBoard wrote rank 0's scalars locally; they were copied into the run directory, so
    # the report has its curves.
    report = run_orch("report", "ons3", "--config", str(cfg), "--json")
    assert report.returncode == 0, report.stderr
    assert "loss" in json.loads(report.stdout)["series"]


def test_four_ranks_resume_bitwise_at_ddps_full_speed(tmp_path):
    """4 ranks without find_unused_parameters: DDP rebuilds its buckets after the first step of
    every process, and a resumed run must still sum gradients as the uninterrupted one did (the
    checkpoint's recorded layout, runtime/ddp_layout.py); without it the weights drift."""
    four = {"nodes": 2, "ranks_per_node": 2}
    (tmp_path / "ref").mkdir()
    ref_cfg = write_config(
        tmp_path / "ref",
        JOBS / "train_ddp.py",
        args=ARGS,
        resources=four,
        storage={"checkpoint_interval": 10},
    )
    assert run_orch("run", str(ref_cfg), "--run-id", "ref4", "--quiet").returncode == 0
    reference = final_digest("ref4", ref_cfg)
    cfg = write_config(
        tmp_path,
        TEST_JOBS / "held_train.py",
        args=ARGS,
        resources=four,
        job={"env": {"HOLD_STEP": "45", "HOLD_ATTEMPTS": "1"}},
        storage={"checkpoint_interval": 10},
    )
    run_dir = tmp_path / "runs" / "killed"
    proc = subprocess.Popen(
        orch_cmd("run", str(cfg), "--run-id", "killed", "--quiet"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: "step 45/" in _attempt_log(run_dir, 0), 120, "attempt 0 at step 45")
        pids = next(e["pids"] for e in read_events(run_dir) if e["event"] == "attempt_started")
        os.kill(pids[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    restored = [e for e in read_events(run_dir) if e["event"] == "restored"]
    assert [e["step"] for e in restored] == [None, 40]
    for path in (run_dir / "ckpt").glob("step-*/manifest.json"):
        assert json.loads(path.read_text())["ddp_bucket_layout"], f"{path}: no DDP bucket layout"
    assert final_digest("killed", cfg) == reference
