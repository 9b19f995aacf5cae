"""Which GPU a rank uses: derived from what the rank can see and what the plan says.

Launchers expose GPUs in one of two shapes, and a rank must not guess which:
- every GPU of the node to every rank (torchrun, the local backend, `srun --gres` without per-task
  binding, a node agent): the rank takes `cuda:LOCAL_RANK`;
- one GPU per rank (`--gpus-per-task=1`, `--gpu-bind=single:1`, `map_gpu`, ...): the rank sees
  one device, `cuda:0`, and `cuda:LOCAL_RANK` would be another rank's GPU or none.
Anything else (a rank seeing 2 GPUs while 4 ranks share its node, or none at all) cannot give
each rank its own GPU, and is one line naming the variables instead of a crash inside NCCL.
"""

from __future__ import annotations

import os

VISIBLE_VAR = "CUDA_VISIBLE_DEVICES"


class DeviceError(RuntimeError):
    """The rank cannot be given a GPU of its own; the message is one line naming the variables."""


def cuda_index(*, visible: int, local_rank: int, local_world_size: int) -> int:
    """The device index of this rank among the `visible` GPUs. Pure."""
    if visible == 1:
        return 0  # one device per rank: bound by the launcher
    if visible >= local_world_size and 0 <= local_rank < visible:
        return local_rank  # the node's GPUs, one per local rank
    shown = os.environ.get(VISIBLE_VAR)
    seen = f"{VISIBLE_VAR}={shown!r}" if shown is not None else f"{VISIBLE_VAR} unset"
    if visible == 0:
        raise DeviceError(
            f"no GPU visible to rank (LOCAL_RANK={local_rank}, {seen}): nccl needs one GPU per rank;"
            " set resources.gpus_per_node, or distributed.backend: gloo to train on CPU"
        )
    raise DeviceError(
        f"cannot give each rank its own GPU: this rank sees {visible} GPUs ({seen}) while"
        f" LOCAL_WORLD_SIZE={local_world_size} ranks share its node (LOCAL_RANK={local_rank});"
        " expose either one GPU per rank or one per local rank"
    )


def rank_device() -> int:
    """This rank's CUDA device index, from torch's visible-device count and the env contract."""
    import torch

    if not torch.cuda.is_available():
        built = torch.version.cuda
        why = "no GPU is visible" if built else f"torch {torch.__version__} is built without CUDA"
        raise DeviceError(f"distributed.backend nccl needs CUDA, but {why} (LOCAL_RANK={_local_rank()})")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    return cuda_index(
        visible=torch.cuda.device_count(), local_rank=_local_rank(), local_world_size=local_world
    )


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK") or 0)
