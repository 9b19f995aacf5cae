"""TensorBoard's files of a run directory on an object store are staged in a private folder of the
temp directory (one per attempt) and copied to the store when rank 0's Metrics ends: at close(),
or at exit for a rank that never calls it (a preemption stop exits from step_end, a job may just
return). Either way the staged copy goes once it is in the store, so preempted and restarted
attempts leave nothing behind in /tmp; when the store cannot take it, it stays and the rank's
stderr says where."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import pytest

from ..conftest import S3_BUCKET

# Rank 0 of a one-rank run in the run directory argv[1]: scalars, then an exit without close().
RANK = """
import sys, torch
from orchestrator.runtime import Metrics
from orchestrator.runtime.dist import DistContext

ctx = DistContext(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0, nnodes=1,
                  backend="gloo", device=torch.device("cpu"), run_id="r1", run_dir=sys.argv[1], attempt=3)
metrics = Metrics(ctx)
for step in range(1, 4):
    metrics.scalars(step, loss=1.0 / step)
sys.exit(0)  # as a preemption stop leaves step_end: never metrics.close()
"""


@pytest.fixture
def private_tmp(tmp_path: Path) -> Path:
    folder = tmp_path / "tmp"
    folder.mkdir(mode=0o700)
    return folder


def rank_exits(run_dir: str, tmp: Path) -> subprocess.CompletedProcess:
    """RANK run to its end, its temp directory `tmp`."""
    return subprocess.run(
        [sys.executable, "-c", RANK, run_dir],
        env={**os.environ, "TMPDIR": str(tmp)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def staged(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("orch-tb-"))


def test_a_rank_that_exits_without_close_leaves_no_staging_folder_and_its_scalars_stored(
    s3_server, private_tmp
):
    # Before: only close() removed the staged folder; the exit path published and left it.
    url = f"s3://{S3_BUCKET}/tb-staging-{uuid.uuid4().hex[:8]}/r1"
    exited = rank_exits(url, private_tmp)
    assert exited.returncode == 0, exited.stderr
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    stored = [name for name in fs.find(f"{path}/tb") if name.endswith(".attempt3")]
    assert len(stored) == 1, fs.find(path)
    assert b"loss" in fs.cat_file(stored[0]), "the attempt's scalars are in the store"
    assert staged(private_tmp) == [], "the staged copy stays in the temp directory"


def test_a_staged_copy_the_store_did_not_take_stays_and_stderr_says_where(s3_server, private_tmp):
    url = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/r1"  # the store refuses every write
    exited = rank_exits(url, private_tmp)
    assert exited.returncode == 0, exited.stderr
    (kept,) = staged(private_tmp)
    assert any(p.name.endswith(".attempt3") for p in (private_tmp / kept).iterdir()), "the only copy"
    assert exited.stderr.strip().splitlines()[-1] == (
        f"orch: TensorBoard scalars of attempt 3 not copied to {url}/tb: kept in {private_tmp / kept}"
    ), exited.stderr
