"""Collective checkpoints of training state to the run directory, and resume from them.

    ckpt = Checkpointer(ctx, model=model, optimizer=opt, scheduler=sched, scaler=scaler, sampler=sampler)
    progress = ckpt.restore()            # None on a fresh start
    ...
    if ckpt.should_save(step):
        ckpt.save(step, epoch=epoch)     # every rank calls it at the same step
    ckpt.close()

Rank 0 writes `state.pt` (model, optimizer, scheduler, scaler, progress, user extras); every
rank writes `rank-RRRRR.pt` (its RNG states and sampler position). The layout and the atomic
commit are in `orchestrator.ckpt_store`; loading uses `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import secrets
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..ckpt_store import CheckpointStore, CorruptCheckpoint, FileEntry, step_dir_name
from .dist import DistContext

STATE_FILE = "state.pt"


class CheckpointError(RuntimeError):
    pass


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


@dataclass(frozen=True)
class Progress:
    step: int
    epoch: int
    extra: dict[str, Any] = field(default_factory=dict)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP/FSDP-style wrappers, so keys do not depend on the wrapper."""
    return getattr(model, "module", model)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        if not isinstance(value, torch.Tensor):
            continue
        t = value.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes, what: str) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError and friends
        raise CheckpointError(
            f"{what}: refused to load (weights_only=True allows tensors and plain containers only): {str(exc).splitlines()[0]}"
        ) from None


def _warn(text: str) -> None:
    print(f"[orch.checkpoint] {text}", file=sys.stderr, flush=True)


class Checkpointer:
    def __init__(
        self,
        ctx: DistContext,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        scaler: Any = None,
        sampler: Any = None,
        url: str | None = None,
        interval: int | None = None,
        keep: int | None = None,
    ) -> None:
        self.ctx = ctx
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.sampler = sampler
        base = url or (f"{ctx.run_dir.rstrip('/')}/ckpt" if ctx.run_dir else None)
        if base is None:
            raise CheckpointError("no checkpoint location: run under `orch run` (ORCH_RUN_DIR) or pass url=")
        self.store = CheckpointStore(base)
        self.interval = interval or int(os.environ.get("ORCH_CKPT_INTERVAL", "50"))
        self.keep = max(2, keep or int(os.environ.get("ORCH_CKPT_KEEP", "2")))
        self.last_saved_step: int | None = None
        self.last_save_s: float | None = None

    # ------------------------------------------------------------------ save

    def should_save(self, step: int) -> bool:
        return step > 0 and step % self.interval == 0 and step != self.last_saved_step

    def _app_state(self, step: int, epoch: int, extra: dict[str, Any] | None) -> dict[str, Any]:
        state: dict[str, Any] = {
            "model": unwrap(self.model).state_dict(),
            "progress": {"step": step, "epoch": epoch},
            "extra": dict(extra or {}),
        }
        for name in ("optimizer", "scheduler", "scaler"):
            obj = getattr(self, name)
            if obj is not None:
                state[name] = obj.state_dict()
        return state

    def _rank_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"rng": rng_state(), "world_size": self.ctx.world_size}
        if self.sampler is not None:
            state["sampler"] = self.sampler.state_dict()
        return state

    def save(self, step: int, *, epoch: int = 0, extra: dict[str, Any] | None = None) -> None:
        """Collective: every rank calls it with the same step. Returns once committed."""
        started = time.monotonic()
        token = f"a{self.ctx.attempt}-{secrets.token_hex(4)}"
        agreed: list[Any] = [(step, token)]
        dist.broadcast_object_list(agreed, src=0)
        if agreed[0][0] != step:
            raise CheckpointError(f"rank {self.ctx.rank} saves step {step} but rank 0 saves step {agreed[0][0]}")
        token = agreed[0][1]
        outcome: tuple[list[FileEntry], str | None]
        tmp = ""
        try:
            tmp = self.store.tmp_dir(step, token)
            entries = [self.store.write_file(tmp, rank_file(self.ctx.rank), _to_bytes(self._rank_state()))]
            digest = None
            if self.ctx.is_main:
                app = self._app_state(step, epoch, extra)
                digest = state_digest(app["model"])
                entries.append(self.store.write_file(tmp, STATE_FILE, _to_bytes(app)))
            outcome = (entries, None)
        except OSError as exc:
            outcome = ([], f"rank {self.ctx.rank}: {exc.strerror or exc}")
        gathered: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(gathered, outcome)
        errors = [err for _, err in gathered if err]
        result: list[Any] = [None]
        if self.ctx.is_main:
            if errors:
                result[0] = f"checkpoint {step_dir_name(step)} not saved: {errors[0]}"
                self._discard(tmp)
            else:
                try:
                    all_entries = [e for ents, _ in gathered for e in ents]
                    self.store.commit(
                        tmp,
                        step,
                        all_entries,
                        {"epoch": epoch, "world_size": self.ctx.world_size, "model_digest": digest, "incarnation": token},
                    )
                    self.store.prune(self.keep, protect=[step_dir_name(step)])
                except OSError as exc:
                    result[0] = f"checkpoint {step_dir_name(step)} not committed: {exc.strerror or exc}"
                    self._discard(tmp)
        dist.broadcast_object_list(result, src=0)
        if result[0]:
            raise CheckpointError(result[0])
        self.last_saved_step = step
        self.last_save_s = time.monotonic() - started

    def _discard(self, tmp: str) -> None:
        if not tmp:
            return
        try:
            self.store.fs.rm(tmp, recursive=True)
        except (OSError, FileNotFoundError):
            pass

    # ------------------------------------------------------------------ restore

    def _pick_step(self) -> int | None:
        """Rank 0 picks the newest checkpoint that verifies; every rank gets its choice."""
        choice: list[Any] = [None]
        if self.ctx.is_main:
            for step in self.store.committed_steps():
                try:
                    self.store.verify(step)
                except CorruptCheckpoint as exc:
                    _warn(f"skipping corrupt checkpoint: {exc}")
                    continue
                choice[0] = step
                break
        dist.broadcast_object_list(choice, src=0)
        return choice[0]

    def restore(self) -> Progress | None:
        """Load the newest committed checkpoint into the registered objects (collective)."""
        step = self._pick_step()
        if step is None:
            return None
        manifest = self.store.read_manifest(step)
        files = manifest["files"]
        app = _from_bytes(self.store.read_file(step, STATE_FILE, files[STATE_FILE]), f"{step_dir_name(step)}/{STATE_FILE}")
        unwrap(self.model).load_state_dict(app["model"])
        for name in ("optimizer", "scheduler", "scaler"):
            obj = getattr(self, name)
            if obj is not None and name in app:
                obj.load_state_dict(app[name])
        same_world = int(manifest.get("world_size", -1)) == self.ctx.world_size
        own = rank_file(self.ctx.rank) if same_world else rank_file(0)
        rank_state = _from_bytes(self.store.read_file(step, own, files[own]), f"{step_dir_name(step)}/{own}")
        if same_world:
            set_rng_state(rank_state["rng"])
        if self.sampler is not None and "sampler" in rank_state:
            # The consumed count is global, so any rank's file gives the position of the world.
            self.sampler.load_state_dict(rank_state["sampler"])
        progress = app["progress"]
        self.last_saved_step = int(progress["step"])
        return Progress(step=int(progress["step"]), epoch=int(progress["epoch"]), extra=dict(app.get("extra", {})))

    def close(self) -> None:
        """Wait for pending work (a no-op for synchronous saves)."""
