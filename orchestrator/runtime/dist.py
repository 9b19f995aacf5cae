"""Process-group start-up from the env contract (what torchrun or `orch` set)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from orchestrator.contract import (
    ENV_ATTEMPT,
    ENV_COLLECTIVE_TIMEOUT,
    ENV_DETERMINISTIC,
    ENV_DIST_BACKEND,
    ENV_ERROR_FILE,
    ENV_LOG_DIR,
    ENV_RUN_DIR,
    ENV_RUN_ID,
    Phase,
)

from . import heartbeat, nccl
from .determinism import make_deterministic
from .device import rank_device
from .errorfile import install_excepthook

DEFAULT_TIMEOUT_S = 600.0  # torch's own default for NCCL


@dataclass(frozen=True, kw_only=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    nnodes: int
    backend: str
    device: torch.device
    run_id: str
    run_dir: str | None
    attempt: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def choose_backend(requested: str | None = None) -> str:
    """auto: nccl when this process can see a GPU, gloo otherwise."""
    requested = (requested or os.environ.get(ENV_DIST_BACKEND) or "auto").lower()
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def init(
    backend: str | None = None, timeout_s: float | None = None, deterministic: bool | None = None
) -> DistContext:
    """Join the process group described by the env contract and pick this rank's device.

    Without the contract (a plain `python train.py`) it starts a one-rank group, so the same
    script runs anywhere. `timeout_s` (default: distributed.timeout_s, else 600) bounds every
    collective; `deterministic` (default: job.deterministic) turns on deterministic kernels.
    With NCCL, the rank's GPU comes from what it sees (orchestrator.runtime.device), the
    communicators are created eagerly on it (device_id), and NCCL's error handling and flight
    recorder are set up (orchestrator.runtime.nccl).
    """
    install_excepthook()
    heartbeat.install()
    backend = choose_backend(backend)
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if deterministic if deterministic is not None else os.environ.get(ENV_DETERMINISTIC) == "1":
        make_deterministic()  # before any CUDA work: cuBLAS reads its workspace setting once
    if timeout_s is None:
        timeout_s = float(os.environ.get(ENV_COLLECTIVE_TIMEOUT) or DEFAULT_TIMEOUT_S)
    nccl.configure(backend=backend, log_dir=_log_dir(), rank=rank)
    if backend == "nccl":
        device = torch.device("cuda", rank_device())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        # device_id: NCCL communicators are created now, on this rank's GPU, instead of lazily
        # at the first collective on a device torch would have to guess.
        device_id = device if backend == "nccl" else None
        if "MASTER_ADDR" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(
                backend,
                init_method="env://",
                rank=rank,
                world_size=world,
                timeout=timeout,
                device_id=device_id,
            )
        else:
            store = dist.FileStore(tempfile.mktemp(prefix="orch-store-"), 1)
            dist.init_process_group(
                backend, store=store, rank=0, world_size=1, timeout=timeout, device_id=device_id
            )
    return DistContext(
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        local_world_size=_env_int("LOCAL_WORLD_SIZE", world),
        node_rank=_env_int("NODE_RANK", _env_int("GROUP_RANK", 0)),
        nnodes=_env_int("NNODES", 1),
        backend=backend,
        device=device,
        run_id=os.environ.get(ENV_RUN_ID, "standalone"),
        run_dir=os.environ.get(ENV_RUN_DIR),
        attempt=_env_int(ENV_ATTEMPT, _env_int("TORCHELASTIC_RESTART_COUNT", 0)),
    )


def _log_dir() -> str | None:
    """The rank's attempt log folder: where its error file lives (ORCH_LOG_DIR under Slurm)."""
    error_file = os.environ.get(ENV_ERROR_FILE)
    return os.path.dirname(error_file) if error_file else os.environ.get(ENV_LOG_DIR) or None


def shutdown() -> None:
    heartbeat.beat(0, Phase.EXIT)
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(
    model: torch.nn.Module, ctx: DistContext, *, checkpoint_url: str | None = None, **kwargs: object
) -> torch.nn.Module:
    """DistributedDataParallel whose gradient-bucket layout cannot make a resumed run drift.

    DDP regroups its gradient buckets after its first iteration, in every process, so a
    resumed run would reduce its first step in another layout than the uninterrupted run did
    at that step; with more than two ranks another summation order changes the last bits of
    the weights. Checkpoints record the layout DDP settled on, and on more than two ranks this
    builds a resumed run's DDP with it (runtime/ddp_layout.py), so resumes are bitwise exact
    at DDP's full speed. `checkpoint_url`: where the Checkpointer saves, if not the run
    directory's `ckpt`. Pass find_unused_parameters=True when some steps leave parameters
    unused (DDP's own requirement; DDP then keeps its initial layout anyway).
    """
    from torch.nn.parallel import DistributedDataParallel

    from .ddp_layout import initial_layout, newest_layout, remember

    kwargs.setdefault("find_unused_parameters", False)
    if ctx.device.type == "cuda":
        kwargs.setdefault("device_ids", [ctx.device.index])
    layout = None
    if ctx.world_size > 2 and not kwargs["find_unused_parameters"]:
        url = checkpoint_url or (f"{ctx.run_dir.rstrip('/')}/ckpt" if ctx.run_dir else None)
        found = [newest_layout(url) if url and ctx.rank == 0 else None]
        if dist.is_initialized():
            dist.broadcast_object_list(found, src=0)  # every rank builds the same buckets
        layout = found[0]
    with initial_layout(model, layout):
        ddp = DistributedDataParallel(model, **kwargs)  # type: ignore[arg-type]
    remember(ddp)  # a Checkpointer given the inner module still finds its buckets
    ddp.register_forward_hook(_mark_backward)
    return ddp


def _mark_backward(_module: torch.nn.Module, _inputs: object, output: object) -> None:
    """Once backward reaches this output, the rank waits in DDP's gradient all-reduce for
    every peer: its heartbeat says so (phase sync), so a hang is blamed on the rank that
    never got there."""
    if torch.compiler.is_compiling():  # a hook on an intermediate would break a full graph
        return
    tensor = _first_tensor_with_grad(output)
    if tensor is not None:
        tensor.register_hook(_entered_backward)


def _first_tensor_with_grad(output: object) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output if output.requires_grad else None
    if isinstance(output, dict):
        output = list(output.values())
    for item in output if isinstance(output, (list, tuple)) else ():
        found = _first_tensor_with_grad(item)
        if found is not None:
            return found
    return None


def _entered_backward(_grad: torch.Tensor) -> None:
    heartbeat.waiting_for_peers()
