"""GPU assignment on the real cluster, whose nodes have fake GPUs (gres/gpu backed by dummy
devices, scripts/slurm/start.sh with SLURMLAB_GPUS): Slurm sets CUDA_VISIBLE_DEVICES from its
allocation as it would on a GPU cluster. On 2 nodes x 2 ranks, in both launch modes, with and
without per-task binding in slurm.extra_flags, every rank must see a GPU no other rank uses and
derive the right device index from what it sees (tests/jobs/gpu_probe.py records both)."""

from __future__ import annotations

import json

import pytest

from ..conftest import TEST_JOBS, write_config
from .conftest import submit, wait_final

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("slurm_cluster")]

# (launch mode, slurm.extra_flags, GPUs each rank sees)
CASES = {
    "agent": ("auto", [], 2),
    "agent-per-task": ("auto", ["--gpus-per-task=1"], 1),
    "agent-bind": ("auto", ["--gpu-bind=single:1"], 1),
    "task": ("subprocess", [], 2),
    "task-per-task": ("subprocess", ["--gpus-per-task=1"], 1),
    "task-bind": ("subprocess", ["--gpu-bind=single:1"], 1),
}


def test_every_rank_gets_its_own_gpu_in_both_launch_modes_with_and_without_binding(tmp_path):
    configs = {}
    for name, (mode, flags, _) in CASES.items():
        (tmp_path / name).mkdir()
        configs[name] = write_config(
            tmp_path / name,
            TEST_JOBS / "gpu_probe.py",
            backend="slurm",
            resources={"nodes": 2, "ranks_per_node": 2, "cpus_per_rank": 1, "gpus_per_node": 2},
            distributed={"backend": "gloo"},
            launch={"mode": mode},
            slurm={"partition": "debug", "extra_flags": flags},
        )
        submit(configs[name], name)  # all at once: the cluster's 3 x 4 fake GPUs fit three
    for name, (mode, _flags, each) in CASES.items():
        st = wait_final(configs[name], name)
        assert st["state"] == "succeeded", (name, st)
        run_dir = tmp_path / name / "runs" / name
        ranks = [json.loads((run_dir / f"gpu-{r}.json").read_text()) for r in range(4)]
        for rec in ranks:
            assert "error" not in rec, (name, rec)
            assert len(rec["visible"]) == each, (name, rec)
            # one GPU per rank: cuda:0; the node's GPUs: cuda:LOCAL_RANK
            assert rec["index"] == (0 if each == 1 else rec["local_rank"]), (name, rec)
        placed = {(rec["slurm_node"], rec["gpu"]) for rec in ranks}
        assert len(placed) == 4, (name, ranks)  # no two ranks on one GPU
        assert len({rec["slurm_node"] for rec in ranks}) == 2, (name, ranks)
        launcher = "node-agent" if mode == "auto" else "task-per-rank"
        started = [
            json.loads(line)
            for line in (run_dir / "events.jsonl").read_text().splitlines()
            if '"attempt_started"' in line
        ]
        assert [e["launcher"] for e in started] == [launcher], (name, started)
