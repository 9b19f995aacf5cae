"""This machine's Python and torch, seen from where `orch doctor` runs: the interpreter ranks
will start with, torch and its CUDA/NCCL build, the process-group backends, the GPUs the
config asks for, and the thread settings each rank gets. (On Slurm the nodes' own environment
is what counts: `--probe` checks it there.)"""

from __future__ import annotations

import platform
import sys

from orchestrator.doctor.check import Check, fail, ok, warn
from orchestrator.spec.config import ClusterConfig

AREA = "environment"


def environment_checks(config: ClusterConfig) -> list[Check]:
    checks = [ok(AREA, "python", f"{platform.python_version()} at {sys.executable}")]
    try:
        import torch
        import torch.distributed as dist
    except ImportError as exc:
        # On Slurm the nodes' torch is what counts (the probe checks it); here it is a warning.
        found = (warn if config.backend == "slurm" else fail)(
            AREA, "torch", f"cannot import torch here: {exc}", "pip install torch (see README)"
        )
        return checks + [found]
    cuda = torch.version.cuda
    nccl = _nccl_version(torch) if cuda else None
    build = f"CUDA {cuda}, NCCL {nccl}" if cuda else "CPU build (no CUDA)"
    checks.append(ok(AREA, "torch", f"{torch.__version__} ({build})"))
    if not dist.is_available():
        checks.append(
            fail(
                AREA,
                "torch.distributed",
                "not available in this torch build",
                "install a torch build with distributed support",
            )
        )
    elif not dist.is_gloo_available():
        checks.append(
            fail(
                AREA,
                "gloo",
                "gloo is not available in this torch build",
                "install a standard torch wheel (gloo is needed on CPU and for the runtime's own"
                " collectives)",
            )
        )
    else:
        backends = ["gloo"] + (["nccl"] if dist.is_nccl_available() else [])
        checks.append(ok(AREA, "process groups", ", ".join(backends) + " available"))
    checks.append(_gpus(config, torch))
    res = config.resources
    checks.append(
        ok(
            AREA,
            "threads",
            f"each rank gets OMP_NUM_THREADS={res.cpus_per_rank} (resources.cpus_per_rank), so torch uses"
            f" {res.cpus_per_rank} intra-op thread(s) per rank",
        )
    )
    return checks


def _nccl_version(torch: object) -> str:
    try:
        version = torch.cuda.nccl.version()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a build without NCCL, or no driver
        return "unknown"
    return ".".join(str(v) for v in version) if isinstance(version, tuple) else str(version)


def _gpus(config: ClusterConfig, torch: object) -> Check:
    res = config.resources
    wanted = res.gpus_per_node
    if config.backend == "slurm":
        return ok(
            AREA,
            "GPUs",
            f"{wanted} per node asked; this is the login node: `orch doctor --probe` checks the nodes'",
        )
    from orchestrator.launch.gpus import describe, host_gpus

    have = len(host_gpus())
    need = wanted * res.nodes
    if need == 0:
        return ok(AREA, "GPUs", f"none asked (resources.gpus_per_node: 0); {have} on this machine")
    if have < need:
        return fail(
            AREA,
            "GPUs",
            f"{need} asked ({res.nodes} node(s) x {wanted}), {have} visible ({describe()})",
            "lower resources.gpus_per_node or resources.nodes, or set CUDA_VISIBLE_DEVICES to more GPUs",
        )
    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0  # type: ignore[attr-defined]
    if seen < need:
        return fail(
            AREA,
            "GPUs",
            f"the driver lists {have} GPU(s) but torch sees {seen} (torch {torch.__version__}, CUDA"  # type: ignore[attr-defined]
            f" {torch.version.cuda})",  # type: ignore[attr-defined]
            "install a torch build for this machine's CUDA driver (a CPU wheel sees no GPU)",
        )
    return ok(AREA, "GPUs", f"{need} asked, {have} visible to torch")
