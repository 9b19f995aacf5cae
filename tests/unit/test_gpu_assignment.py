"""The GPU path's pure parts: a rank's device from what it sees, each simulated node's slice of
the host's GPUs, NCCL's settings (overridable), NCCL failures classified, and, with torch's
CUDA calls faked (this host has no GPU), what init() hands init_process_group and which device
generator a checkpoint keeps. tests/integration/test_gpu_path.py runs the same through `orch run`;
scripts/gpu-check.sh on a real GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from orchestrator.backends.slurm.render import gpus_per_rank, srun_environ
from orchestrator.launch.gpus import host_gpus, visible_ids
from orchestrator.runtime import checkpoint, nccl
from orchestrator.runtime.device import DeviceError, cuda_index
from orchestrator.spec.config import parse_config
from orchestrator.spec.plan import gpu_slices, node_gpus
from orchestrator.supervision.failures import FailureClass, abort_line, classify

from ..conftest import REPO


@pytest.mark.parametrize(
    "visible,local_rank,local_world,index",
    [
        (1, 0, 1, 0),
        (1, 3, 4, 0),  # --gpus-per-task=1 / --gpu-bind: each rank sees its own GPU as cuda:0
        (4, 3, 4, 3),  # the node's GPUs, one per local rank
        (8, 1, 4, 1),  # more GPUs than ranks: one each, from the first
    ],
)
def test_a_rank_derives_its_device_from_what_it_sees(
    visible: int, local_rank: int, local_world: int, index: int
) -> None:
    assert cuda_index(visible=visible, local_rank=local_rank, local_world_size=local_world) == index


def test_a_rank_that_cannot_get_its_own_gpu_is_one_line_naming_the_variables(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(DeviceError) as info:
        cuda_index(visible=2, local_rank=3, local_world_size=4)
    message = str(info.value)
    assert "\n" not in message
    for words in ("sees 2 GPUs", "CUDA_VISIBLE_DEVICES='0,1'", "LOCAL_WORLD_SIZE=4", "LOCAL_RANK=3"):
        assert words in message, message
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(
        DeviceError, match=r"no GPU visible to rank \(LOCAL_RANK=0, CUDA_VISIBLE_DEVICES unset\)"
    ):
        cuda_index(visible=0, local_rank=0, local_world_size=1)
    # and a rank that dies of it is not retried: it would fail the same way every time
    verdict = classify(exitcode=1, error_type="DeviceError", message=message)
    assert verdict.kind == FailureClass.USER_ERROR and not verdict.retryable


def test_simulated_nodes_get_consecutive_slices_of_the_host_gpus() -> None:
    host = ("3", "1", "GPU-aa", "0", "2")
    assert node_gpus(host, nodes=2, gpus_per_node=2) == ["3,1", "GPU-aa,0"]
    assert node_gpus(host, nodes=5, gpus_per_node=1) == list(host)
    assert node_gpus(host, nodes=3, gpus_per_node=0) is None  # CPU nodes: CUDA_VISIBLE_DEVICES=""


def _slurm_config(mode: str = "auto", gpus_per_node: int = 4, ranks_per_node: int = 2):
    raw = {
        "backend": "slurm",
        "job": {"script": "train.py"},
        "resources": {"nodes": 2, "ranks_per_node": ranks_per_node, "gpus_per_node": gpus_per_node},
        "distributed": {"backend": "gloo"},
        "launch": {"mode": mode},
    }
    return parse_config(raw, check_files=False)


@pytest.mark.parametrize(
    "batch_env,gpus_per_node,each",
    [
        ({}, 4, None),  # no binding: every rank sees the node's GPUs
        ({"SLURM_GPUS_PER_TASK": "1"}, 4, 1),
        ({"SLURM_GPUS_PER_TASK": "a100:2"}, 4, 2),  # `[type:]count`
        ({"SLURM_GPU_BIND": "single:1"}, 4, 2),  # srun's binding: an equal share per task
        ({"SLURM_GPU_BIND": "verbose,none"}, 4, None),
        ({"SLURM_GPU_BIND": "closest"}, 1, None),  # fewer GPUs than ranks: nothing to share out
    ],
)
def test_per_task_gpu_binding_of_the_batch_step_gives_each_rank_a_share(
    batch_env, gpus_per_node, each
) -> None:
    assert gpus_per_rank(batch_env, _slurm_config(gpus_per_node=gpus_per_node)) == each


def test_a_node_agent_step_drops_per_task_gpu_options_and_applies_them_itself() -> None:
    batch = {"SLURM_NTASKS": "4", "SLURM_GPUS_PER_TASK": "1", "SLURM_GPU_BIND": "single:1", "HOME": "/h"}
    # srun refuses one task per node with a per-task GPU count, or binds the agent to one GPU
    assert srun_environ(batch, _slurm_config("auto")) == {"HOME": "/h", "ORCH_GPUS_PER_RANK": "1"}
    # one task per rank: srun binds each task itself
    assert srun_environ(batch, _slurm_config("subprocess")) == {
        "SLURM_GPUS_PER_TASK": "1",
        "SLURM_GPU_BIND": "single:1",
        "HOME": "/h",
    }
    assert gpu_slices(("2", "3", "5"), parts=2, each=2) == ["2,3", "5"]
    assert gpu_slices(("2",), parts=2, each=1) == ["2", ""]  # the second rank sees none, and says so


def test_host_gpus_read_cuda_visible_devices_as_cuda_does() -> None:
    assert visible_ids("0,1, 2") == ("0", "1", "2")
    assert visible_ids("2,-1,3") == ("2",)  # an invalid entry hides the rest
    assert visible_ids("") == () and visible_ids("-1") == ()
    assert visible_ids("GPU-8f2e,MIG-1c3a") == ("GPU-8f2e", "MIG-1c3a")
    assert host_gpus({"CUDA_VISIBLE_DEVICES": "4,5"}) == ("4", "5")


def test_nccl_settings_are_set_unless_the_user_chose_otherwise(tmp_path) -> None:
    settings = nccl.nccl_defaults(str(tmp_path))
    env = {"TORCH_NCCL_TRACE_BUFFER_SIZE": "50", "NCCL_DEBUG": "INFO"}  # from job.env
    nccl.apply_defaults(env, settings)
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert "TORCH_NCCL_DEBUG_INFO_TEMP_FILE" not in env  # one name per setting: no deprecation warnings
    assert env["TORCH_FR_DUMP_TEMP_FILE"] == f"{tmp_path}/nccl-trace-rank-"
    # the user's values stand, and no alias of theirs is set beside them
    assert env["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "50" and "TORCH_FR_BUFFER_SIZE" not in env
    assert env["NCCL_DEBUG"] == "INFO"
    assert nccl.trace_enabled(env) and nccl.dump_path(env, 3) == f"{tmp_path}/nccl-trace-rank-3"
    assert not nccl.trace_enabled({"TORCH_FR_BUFFER_SIZE": "0"})


@pytest.mark.parametrize(
    "line",
    [
        "torch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system"
        " error",
        "[PG ID 0 PG GUID 0(default_pg) Rank 1] Watchdog caught collective operation timeout: WorkNCCL("
        "SeqNum=81, OpType=ALLREDUCE, NumelIn=4, NumelOut=4, Timeout(ms)=600000) ran for 600081 milliseconds",
        "RuntimeError: NCCL communicator was aborted on rank 0.",
        "ncclRemoteError: A call failed possibly due to a network error or a remote process exiting"
        " prematurely.",
    ],
)
def test_nccl_errors_and_timeouts_are_communication_failures_with_a_hint(line: str) -> None:
    verdict = classify(exitcode=-6, error_type=None, message=line)
    assert verdict.kind == FailureClass.COMMUNICATION and verdict.retryable
    assert (
        verdict.hint is not None and "nccl-trace-rank-N" in verdict.hint and "NCCL_DEBUG=INFO" in verdict.hint
    )


def test_an_aborted_rank_is_described_by_nccls_reason_not_its_last_line() -> None:
    tail = [
        "step 80 loss 0.1",
        "[rank1]:[E ProcessGroupNCCL.cpp:616] [Rank 1] Watchdog caught collective operation timeout: x",
        "terminate called after throwing an instance of 'c10::DistBackendError'",
        "Exception raised from checkTimeout at ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:618",
        "frame #0: c10::Error::Error(...) + 0x57",
    ]
    assert "Watchdog caught collective operation timeout" in abort_line(tail)


def test_init_passes_device_id_timeout_and_nccl_settings(tmp_path) -> None:
    # A fake GPU host inside one process: torch's CUDA calls are replaced, init_process_group
    # records what it was given. The rank is local rank 1 of 2 and sees both GPUs.
    probe = """
import json, os, torch, torch.distributed as dist
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 2
torch.cuda.set_device = lambda device: None
seen = {}
dist.init_process_group = lambda *a, **k: seen.update(backend=a[0], **{x: str(v) for x, v in k.items()})
from orchestrator import runtime
ctx = runtime.init()
print(json.dumps({"device": str(ctx.device), "seen": seen, "env": dict(os.environ)}))
"""
    env = {
        **os.environ,
        "RANK": "1",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29999",
        "ORCH_DIST_BACKEND": "nccl",
        "ORCH_COLLECTIVE_TIMEOUT_S": "42",
        "ORCH_ERROR_FILE": str(tmp_path / "rank-1.error.json"),
        "NCCL_DEBUG": "INFO",  # the user's, from job.env
        "PYTHONPATH": str(REPO),
    }
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["device"] == "cuda:1"
    assert result["seen"]["backend"] == "nccl" and result["seen"]["device_id"] == "cuda:1"
    assert result["seen"]["timeout"] == "0:00:42"
    assert result["env"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert result["env"]["TORCH_FR_DUMP_TEMP_FILE"] == f"{tmp_path}/nccl-trace-rank-"
    assert result["env"]["NCCL_DEBUG"] == "INFO"


def test_a_checkpoint_keeps_only_the_ranks_own_device_generator(monkeypatch) -> None:
    # Faked CUDA generators, one per device: only the rank's device is read, and on restore its
    # state goes to the rank's device, whatever index it had when saved.
    generators = {0: torch.tensor([0], dtype=torch.uint8), 1: torch.tensor([1], dtype=torch.uint8)}
    read, written = [], []

    def get_rng_state(device):
        read.append(device)
        return generators[torch.device(device).index].clone()

    def set_rng_state(state, device):
        written.append((int(state[0]), torch.device(device).index))

    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("read every device"))
    state = checkpoint.rng_state(torch.device("cuda", 1))
    assert read == [torch.device("cuda", 1)] and int(state["cuda"][0]) == 1
    checkpoint.set_rng_state(state, torch.device("cuda", 0))  # resumed where its GPU is cuda:0
    assert written == [(1, 0)]
    assert "cuda" not in checkpoint.rng_state(torch.device("cpu"))  # a CPU rank has none
    checkpoint.set_rng_state(state, torch.device("cpu"))  # nor restores one
    assert written == [(1, 0)]
