"""Records, per rank, which GPUs the launcher exposed and the device the runtime derives from
them, so that tests on hosts without GPUs can check the assignment with a faked visible-device
count: CUDA_VISIBLE_DEVICES names the (fake) GPUs, and orchestrator.runtime.device.cuda_index
turns their count into the rank's device index, as rank_device() does with torch's count on a
GPU host. Joins the group with gloo, so it runs anywhere."""

import json
import os

import torch

from orchestrator import runtime
from orchestrator.launch.gpus import visible_ids
from orchestrator.runtime.device import DeviceError, cuda_index

ctx = runtime.init()
visible = visible_ids(os.environ.get("CUDA_VISIBLE_DEVICES", ""))
record = {
    "rank": ctx.rank,
    "local_rank": ctx.local_rank,
    "node_rank": ctx.node_rank,
    "host": os.uname().nodename,
    "slurm_node": os.environ.get("SLURMD_NODENAME"),
    "visible": list(visible),
    "deterministic": torch.are_deterministic_algorithms_enabled(),
    "cublas_workspace": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    "collective_timeout_s": os.environ.get("ORCH_COLLECTIVE_TIMEOUT_S"),
}
try:
    index = cuda_index(visible=len(visible), local_rank=ctx.local_rank, local_world_size=ctx.local_world_size)
    record["index"], record["gpu"] = index, visible[index]
except DeviceError as exc:
    record["error"] = str(exc)
with open(os.path.join(os.environ["ORCH_RUN_DIR"], f"gpu-{ctx.rank}.json"), "w") as fh:
    json.dump(record, fh)
# No rank leaves before every rank has joined: a peer still connecting its gloo mesh to one that
# exited fails ("Connection closed by peer").
torch.distributed.barrier()
runtime.shutdown()
