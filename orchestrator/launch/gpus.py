"""The GPUs of this host, as CUDA_VISIBLE_DEVICES names them, without initialising CUDA.

The local backend slices them among its simulated nodes (orchestrator.spec.plan.node_gpus).
The supervisor must not touch CUDA itself (its fork server forks ranks, and a process that
initialised CUDA cannot fork), so it counts the driver's devices instead of asking torch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping

from orchestrator.contract import ENV_VISIBLE_GPUS

DRIVER_GPUS_DIR = "/proc/driver/nvidia/gpus"  # one folder per GPU the NVIDIA driver found


def visible_ids(value: str) -> tuple[str, ...]:
    """CUDA_VISIBLE_DEVICES as CUDA reads it: ids (indices, GPU-/MIG- UUIDs) up to the first
    empty or negative one, which hides every later one."""
    ids = []
    for item in value.split(","):
        item = item.strip()
        if not item or item.startswith("-"):
            break
        ids.append(item)
    return tuple(ids)


def driver_gpu_count() -> int:
    try:
        return len(os.listdir(DRIVER_GPUS_DIR))
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def host_gpus(env: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """The GPUs `orch run` may use: those CUDA_VISIBLE_DEVICES names if it is set (a user
    restricting a run to some GPUs), else every GPU of the driver."""
    if ENV_VISIBLE_GPUS in env:
        return visible_ids(env[ENV_VISIBLE_GPUS])
    return tuple(str(i) for i in range(driver_gpu_count()))


def describe(env: Mapping[str, str] = os.environ) -> str:
    """Where host_gpus() got its answer, for error messages."""
    if ENV_VISIBLE_GPUS in env:
        return f"{ENV_VISIBLE_GPUS}={env[ENV_VISIBLE_GPUS]!r}"
    return "GPUs the NVIDIA driver lists" if driver_gpu_count() else "no NVIDIA driver or GPU found"
