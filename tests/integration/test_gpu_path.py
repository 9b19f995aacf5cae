"""The GPU path on a host without GPUs (issue 14): `orch run` slices the host's GPUs among its
simulated nodes through CUDA_VISIBLE_DEVICES (faked here: a user's CUDA_VISIBLE_DEVICES names
the GPUs orch may use), every rank derives a distinct GPU, a config this host cannot satisfy is
one line before anything starts, job.deterministic reaches the ranks, the flight recorder dumps
a rank stuck in a collective into its log folder (named by `orch status`), and a job whose
imports touch CUDA still starts (that import is not preloaded, the reason said)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from ..conftest import TEST_JOBS, read_events, run_orch, write_config

pytestmark = pytest.mark.slow


def _records(run_dir: Path, world: int) -> list[dict]:
    return [json.loads((run_dir / f"gpu-{rank}.json").read_text()) for rank in range(world)]


@pytest.mark.parametrize("mode", ["auto", "subprocess"])
def test_each_simulated_node_gets_its_slice_of_the_host_gpus(tmp_path: Path, mode: str) -> None:
    cfg = write_config(
        tmp_path,
        TEST_JOBS / "gpu_probe.py",
        resources={"nodes": 2, "ranks_per_node": 2, "gpus_per_node": 2},
        distributed={"backend": "gloo", "timeout_s": 123},
        job={"script": str(TEST_JOBS / "gpu_probe.py"), "deterministic": True},
        launch={"mode": mode},
    )
    # A host with 5 GPUs, named out of order: nodes get consecutive slices of that list.
    proc = run_orch("run", str(cfg), "--run-id", "gpus", "--quiet", env={"CUDA_VISIBLE_DEVICES": "3,1,4,0,2"})
    assert proc.returncode == 0, proc.stderr
    records = _records(tmp_path / "runs" / "gpus", 4)
    assert [r["visible"] for r in records] == [["3", "1"], ["3", "1"], ["4", "0"], ["4", "0"]]
    assert [r["index"] for r in records] == [0, 1, 0, 1]  # cuda:LOCAL_RANK among the node's GPUs
    assert len({r["gpu"] for r in records}) == 4, records  # every rank its own GPU
    assert all(r["deterministic"] and r["cublas_workspace"] == ":4096:8" for r in records)
    assert {r["collective_timeout_s"] for r in records} == {"123"}


def test_gpus_per_node_zero_hides_the_host_gpus(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, TEST_JOBS / "gpu_probe.py", resources={"nodes": 1, "ranks_per_node": 2})
    proc = run_orch("run", str(cfg), "--run-id", "cpu", "--quiet", env={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert proc.returncode == 0, proc.stderr
    records = _records(tmp_path / "runs" / "cpu", 2)
    assert [r["visible"] for r in records] == [[], []]  # a CPU node: auto picks gloo
    assert all("no GPU visible" in r["error"] for r in records)
    assert not any(r["deterministic"] for r in records)


@pytest.mark.parametrize(
    "visible,sections,field,words",
    [
        (
            "0,1,2",
            {"resources": {"nodes": 2, "ranks_per_node": 2, "gpus_per_node": 2}},
            "resources.gpus_per_node",
            "2 node(s) x 2 GPU(s) = 4, but this host has 3 (CUDA_VISIBLE_DEVICES='0,1,2')",
        ),
        (
            "",
            {"resources": {"ranks_per_node": 1, "gpus_per_node": 1}, "distributed": {"backend": "nccl"}},
            "distributed.backend",
            "nccl needs CUDA, and this host has no GPU (CUDA_VISIBLE_DEVICES='')",
        ),
        (
            "0,1",
            {"resources": {"ranks_per_node": 2, "gpus_per_node": 1}, "distributed": {"backend": "nccl"}},
            "resources.ranks_per_node",
            "2 ranks per node with 1 GPU(s) per node: nccl needs a GPU per rank",
        ),
    ],
)
def test_a_gpu_request_the_host_cannot_meet_is_one_line_before_anything_starts(
    tmp_path: Path, visible: str, sections: dict, field: str, words: str
) -> None:
    cfg = write_config(tmp_path, TEST_JOBS / "gpu_probe.py", **sections)
    proc = run_orch("run", str(cfg), "--run-id", "nope", env={"CUDA_VISIBLE_DEVICES": visible})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and words in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "nope").exists()  # nothing was created


def test_render_shows_each_node_its_gpus(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        TEST_JOBS / "gpu_probe.py",
        resources={"nodes": 2, "ranks_per_node": 1, "gpus_per_node": 1},
    )
    proc = run_orch("render", str(cfg), env={"CUDA_VISIBLE_DEVICES": "7,5"})
    assert proc.returncode == 0, proc.stderr
    assert "CUDA_VISIBLE_DEVICES: '7'" in proc.stdout and "CUDA_VISIBLE_DEVICES: '5'" in proc.stdout


def test_flight_recorder_dumps_a_rank_stuck_in_a_collective_on_a_hang(tmp_path: Path) -> None:
    # Rank 1 sleeps before step 10's all-reduce; rank 0 waits inside it, in gloo's C++ code,
    # where no Python signal handler runs. The watchdog's SIGUSR1 must still get its flight
    # recorder's buffer (on for gloo through job.env; on by default with NCCL) into the log folder.
    cfg = write_config(
        tmp_path,
        TEST_JOBS / "hang.py",
        job={
            "script": str(TEST_JOBS / "hang.py"),
            "env": {"HANG_HOW": "sleep", "HANG_STEP": "10", "HANG_RANK": "1", "TORCH_FR_BUFFER_SIZE": "200"},
        },
        storage={"checkpoint_interval": 5},
        watchdog={"hang_timeout_s": 3},
    )
    proc = run_orch("run", str(cfg), "--run-id", "fr", "--quiet")
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "runs" / "fr"
    assert [e["rank"] for e in read_events(run_dir) if e["event"] == "hang_detected"] == [1]
    logs = run_dir / "logs" / "attempt-0"
    dump = logs / "nccl-trace-rank-0"
    assert dump.exists(), sorted(p.name for p in logs.iterdir())
    entries = pickle.loads(dump.read_bytes())["entries"]
    # the collective rank 0 was stuck in: the last all-reduce, never completed
    assert entries and "all_reduce" in entries[-1]["profiling_name"], entries[-1]
    assert entries[-1]["state"] != "completed", entries[-1]
    assert "flight recorder dumped to" in (logs / "rank-0.log").read_text()
    status = run_orch("status", "fr", "--config", str(cfg))
    assert f"nccl trace {dump}" in status.stdout, status.stdout
    st = json.loads(run_orch("status", "fr", "--config", str(cfg), "--json").stdout)
    assert str(dump) in st["flight_recorder_dumps"]


def test_a_job_whose_imports_touch_cuda_is_not_preloaded_and_says_why(tmp_path: Path) -> None:
    # A library that initialises CUDA when imported makes the fork server unsafe to fork from
    # (a child cannot use its parent's CUDA context). Simulated on this CPU host by the state
    # torch's own lazy init leaves (tests/jobs/lib/cuda_at_import.py), installed as a library (on
    # PYTHONPATH, not beside the script: the server preloads libraries, not the job's own files).
    lib = TEST_JOBS / "lib"
    cfg = write_config(
        tmp_path,
        TEST_JOBS / "cuda_job.py",
        job={"script": str(TEST_JOBS / "cuda_job.py")},
        resources={"nodes": 1, "ranks_per_node": 2},
    )
    path = os.pathsep.join([str(lib), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = run_orch("run", str(cfg), "--run-id", "cuda", "--json", env={"PYTHONPATH": path})
    assert proc.returncode == 0, proc.stderr
    # The server drops that import and starts again without it (each rank imports it after the
    # fork, in its own process); the reason is logged and kept in the run's events.
    said = "not preloading cuda_at_import: after importing cuda_at_import: CUDA is initialised"
    assert said in proc.stderr, proc.stderr
    events = read_events(tmp_path / "runs" / "cuda")
    notices = [e["message"] for e in events if e["event"] == "launcher_notice"]
    assert any(said in n for n in notices), notices
    started = [e for e in events if e["event"] == "attempt_started"]
    assert started[0]["launcher"] == "fork", started[0]
    for rank in (0, 1):
        assert (tmp_path / "runs" / "cuda" / f"ran-{rank}").exists()
