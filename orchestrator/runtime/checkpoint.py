"""Collective checkpoints of training state to the run directory, and exact resume from them.

    ckpt = Checkpointer(ctx, model=model, optimizer=opt, scheduler=sched, scaler=scaler, sampler=sampler)
    progress = ckpt.restore()            # None on a fresh start
    ...
    if ckpt.should_save(step):
        ckpt.save(step, epoch=epoch)     # every rank calls it at the same step
    ckpt.close()                         # waits for a background save

Rank 0 writes `state.pt` (model, optimizer, scheduler, scaler, progress, user extras); every
rank writes `rank-RRRRR.pt` (its RNG states and sampler position). Layout, atomic commit and
fencing are in `orchestrator.storage.ckpt_store`. All checkpoint collectives run on a process group of
their own, so a background (async) save never interleaves with the training's collectives.
Loading uses `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import os
import random
import signal
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from orchestrator.contract import (
    ENV_CKPT_ASYNC,
    ENV_CKPT_INTERVAL,
    ENV_CKPT_KEEP,
    ENV_INCARNATION,
    Event,
    Phase,
)
from orchestrator.storage.ckpt_store import (
    AlreadyCommitted,
    CheckpointStore,
    CorruptCheckpoint,
    FileEntry,
    StaleIncarnation,
    make_token,
    step_dir_name,
)

from . import heartbeat, preemption
from .dist import DistContext

STATE_FILE = "state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded; the message is one line."""


class StaleIncarnationError(CheckpointError):
    """A newer incarnation of this run exists: this process must stop."""


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


@dataclass(frozen=True)
class Progress:
    step: int
    epoch: int
    extra: dict[str, Any] = field(default_factory=dict)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP-style wrappers, so keys do not depend on the wrapper."""
    return getattr(model, "module", model)


def state_digest(state: dict[str, Any]) -> str:
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
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
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


def _load(loader: Callable[[], Any], what: str) -> Any:
    try:
        return loader()
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError and friends
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{what}: refused to load: it holds more than tensors and plain containers"
            f" (weights_only=True): {first}"
        ) from None


def _warn(text: str) -> None:
    print(f"[orch.checkpoint] {text}", file=sys.stderr, flush=True)


class _Snapshot:
    """Copies of state tensors in reusable CPU buffers (an async save's only blocking work).

    Copying into buffers that already exist costs about a tenth of allocating fresh ones
    (page faults; see NOTES.md), so buffers are kept between saves.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, obj: Any, key: str = "") -> Any:
        if isinstance(obj, torch.Tensor):
            src = obj.detach()
            buf = self._buffers.get(key)
            if (
                buf is None
                or buf.shape != src.shape
                or buf.dtype != src.dtype
                or buf.stride() != src.stride()
            ):
                buf = torch.empty_strided(
                    src.shape, src.stride(), dtype=src.dtype, device="cpu", pin_memory=src.is_cuda
                )
                self._buffers[key] = buf
            buf.copy_(src, non_blocking=src.is_cuda)
            return buf
        if isinstance(obj, dict):
            return {k: self.take(v, f"{key}/{k}") for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.take(v, f"{key}/{i}") for i, v in enumerate(obj))
        return obj


class Checkpointer:
    # Ranks agree on a stop signal by an all-reduce (the "stop vote") on steps that every rank
    # knows in advance: a vote started at one vote step is read at the next, which comes about
    # `vote_period_s` later (at least 1 and at most `max_vote_every` steps, by the longest step
    # time that any rank measured since the previous vote). One vote costs ~0.3 ms of CPU on
    # gloo (mostly as it starts: its thread takes the core), +3-6% of jobs/train_ddp.py's 12 ms
    # CPU step if every step voted (bench/step_overhead.py); a signal stops every rank within
    # two vote intervals (~0.4 s plus a step), at the same step. vote_period_s = 0: every step.
    vote_period_s: float = 0.2
    max_vote_every: int = 20

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
        async_save: bool | None = None,
        incarnation: int | None = None,
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
        self.interval = interval or int(os.environ.get(ENV_CKPT_INTERVAL, "50"))
        self.keep = max(2, keep or int(os.environ.get(ENV_CKPT_KEEP, "2")))
        self.async_save = async_save if async_save is not None else os.environ.get(ENV_CKPT_ASYNC) == "1"
        self.incarnation = (
            incarnation if incarnation is not None else int(os.environ.get(ENV_INCARNATION, ctx.attempt))
        )
        # A group of our own (collective call on every rank): background saves talk on it
        # while training talks on the default group.
        self._group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        # The stop vote runs on a third group: a background save may be using
        # self._group at the same moment, from another thread.
        self._vote_group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._snapshot = _Snapshot()
        self._pending: Future | None = None
        self._verified_step: int | None = None
        self.last_saved_step: int | None = None
        self.last_save_s: float | None = None  # write + commit time of the last save
        self.last_block_s: float | None = None  # how long the last save blocked training
        self._vote = torch.zeros(2)  # [stop flag, -proposed vote interval], all-reduced with MAX
        self._stop_vote: Any = None  # the all-reduce of self._vote, in flight
        self._vote_every = 1  # steps from one vote to the next, as agreed by the last vote read
        self._next_vote_step = 0
        self._vote_started: tuple[int, float] | None = None  # (step, monotonic time) of the last vote
        if ctx.is_main:
            self.store.register_incarnation(self.incarnation)
        preemption.install()
        atexit.register(self._wait_quietly)

    # ------------------------------------------------------------------ collectives

    def _broadcast(self, value: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def _all_gather(self, value: Any) -> list[Any]:
        out: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(out, value, group=self._group)
        return out

    # ------------------------------------------------------------------ save

    def step_end(self, step: int, *, epoch: int = 0, extra: dict[str, Any] | None = None) -> None:
        """Call once per step on every rank: saves every `interval` steps, and turns a stop
        signal (on any rank) into a checkpoint of one step and exit code 75 on every rank.

        The vote on the stop flag is an all-reduce started at one vote step and read at the
        next (every ~vote_period_s), so its latency hides behind the steps between; every rank
        reads the same result at the same step, so every rank stops at the same step.
        """
        heartbeat.beat(step, Phase.TRAIN)
        stop = False
        if self._vote_group is None:
            stop = preemption.requested() is not None
        elif step >= self._next_vote_step:
            stop = self._read_vote()
            self._start_vote(step)
        if stop:
            if self.last_saved_step != step:
                self.save(step, epoch=epoch, extra=extra)
            self.close()
            preemption.exit_preempted(step)
        if self.should_save(step):
            self.save(step, epoch=epoch, extra=extra)

    def _start_vote(self, step: int) -> None:
        """Send this rank's stop flag and its proposal for the interval after the next vote."""
        now = time.monotonic()
        proposal = 1
        if self._vote_started is not None and step > self._vote_started[0] and self.vote_period_s > 0:
            per_step = (now - self._vote_started[1]) / (step - self._vote_started[0])
            proposal = self.max_vote_every if per_step <= 0 else int(self.vote_period_s / per_step)
        self._vote_started = (step, now)
        self._vote[0] = 1.0 if preemption.requested() is not None else 0.0
        self._vote[1] = -float(
            max(1, min(self.max_vote_every, proposal))
        )  # MAX of negatives: the smallest proposal
        self._stop_vote = dist.all_reduce(
            self._vote, op=dist.ReduceOp.MAX, group=self._vote_group, async_op=True
        )
        self._next_vote_step = step + self._vote_every

    def _read_vote(self) -> bool:
        """Wait for the vote in flight, if any: whether any rank asked to stop. Every rank
        reads each vote at the same step, so every rank agrees on the next vote's step."""
        if self._stop_vote is None:
            return False
        self._stop_vote.wait()
        self._stop_vote = None
        self._vote_every = max(1, int(-self._vote[1].item()))
        return bool(self._vote[0].item())

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
            state["sampler"] = dict(self.sampler.state_dict())
        return state

    def save(self, step: int, *, epoch: int = 0, extra: dict[str, Any] | None = None) -> None:
        """Collective: every rank calls it with the same step.

        Synchronous saves return once the checkpoint is committed. Async saves return once the
        state is copied; the write and commit run in the background, and the next save (or
        close) waits for them and raises their error, if any.
        """
        blocked_from = time.monotonic()
        heartbeat.beat(step, Phase.SAVE)
        self.wait()
        self._finish_vote()
        token = make_token(self.incarnation)
        agreed_step, token = self._broadcast((step, token))
        if agreed_step != step:
            raise CheckpointError(
                f"rank {self.ctx.rank} saves step {step} but rank 0 saves step {agreed_step}"
            )
        app = self._app_state(step, epoch, extra) if self.ctx.is_main else None
        mine = self._rank_state()
        if self.async_save:
            app = self._snapshot.take(app) if app is not None else None
            mine = self._snapshot.take(mine, "rank")
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()  # the non_blocking device->host copies are done
            future: Future = Future()
            blocked = time.monotonic() - blocked_from
            thread = threading.Thread(
                target=self._run_into,
                args=(future, self._write_and_commit, step, epoch, token, app, mine, blocked),
                name="orch-ckpt-save",
                daemon=True,
            )
            thread.start()
            self._pending = future
            self.last_block_s = time.monotonic() - blocked_from
            self.last_saved_step = step
            heartbeat.beat(step, Phase.TRAIN)
            return
        self._write_and_commit(step, epoch, token, app, mine)
        self.last_block_s = time.monotonic() - blocked_from
        self.last_saved_step = step
        heartbeat.beat(step, Phase.TRAIN)

    @staticmethod
    def _run_into(future: Future, fn: Callable[..., Any], *args: Any) -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - delivered to the training thread
            future.set_exception(exc)

    def _write_and_commit(
        self,
        step: int,
        epoch: int,
        token: str,
        app: dict[str, Any] | None,
        mine: dict[str, Any],
        blocked_s: float | None = None,
    ) -> None:
        """Write, gather, commit. `blocked_s`: how long training waited (async: the snapshot;
        None for a synchronous save, which blocks for all of this)."""
        started = time.monotonic()
        tmp = ""
        entries: list[FileEntry] = []
        error: str | None = None
        digest = None
        try:
            tmp = self.store.tmp_dir(step, token)
            entries.append(
                self.store.write_stream(tmp, rank_file(self.ctx.rank), lambda fh: torch.save(mine, fh))
            )
            if app is not None:
                # The model digest is a second pass over the weights: run it beside the write.
                digest_future: Future = Future()
                hasher = threading.Thread(
                    target=self._run_into, args=(digest_future, state_digest, app["model"]), daemon=True
                )
                hasher.start()
                try:
                    entries.append(self.store.write_stream(tmp, STATE_FILE, lambda fh: torch.save(app, fh)))
                finally:
                    hasher.join()
                digest = digest_future.result()
        except OSError as exc:
            error = f"rank {self.ctx.rank}: {exc.strerror or exc}"
        gathered = self._all_gather((entries, error))
        errors = [err for _, err in gathered if err]
        result: tuple[str, str] | None = None
        if self.ctx.is_main:
            if errors:
                result = ("error", f"checkpoint {step_dir_name(step)} not saved: {errors[0]}")
            else:
                try:
                    self.store.commit(
                        tmp,
                        step,
                        token,
                        [e for ents, _ in gathered for e in ents],
                        {
                            "epoch": epoch,
                            "world_size": self.ctx.world_size,
                            "model_digest": digest,
                            "incarnation": self.incarnation,
                            # what a preemption warning must leave time for (lead-time check)
                            "write_s": round(time.monotonic() - started, 3),
                        },
                    )
                except StaleIncarnation as exc:
                    result = ("stale", str(exc))
                except AlreadyCommitted as exc:
                    result = ("stale", f"checkpoint {step_dir_name(step)} not committed: {exc}")
                except OSError as exc:
                    result = (
                        "error",
                        f"checkpoint {step_dir_name(step)} not committed: {exc.strerror or exc}",
                    )
            if result is not None:
                self._discard(tmp)
            else:
                write_s = time.monotonic() - started
                self._record_commit(step, digest, write_s, write_s if blocked_s is None else blocked_s)
                try:
                    self.store.prune(self.keep, self.incarnation, protect=[step])
                except OSError as exc:  # retention is housekeeping: never fail a committed save
                    _warn(f"could not delete old checkpoints: {exc}")
        result = self._broadcast(result)
        if result is not None:
            kind, message = result
            raise (StaleIncarnationError if kind == "stale" else CheckpointError)(message)
        self.last_save_s = time.monotonic() - started

    def _record_commit(self, step: int, digest: str | None, write_s: float, block_s: float) -> None:
        """Supervisors check the signal lead time against write_s; goodput counts block_s."""
        self._record(
            Event.CHECKPOINT_COMMITTED,
            step=step,
            write_s=round(write_s, 3),
            block_s=round(block_s, 3),
            model_digest=digest,
        )

    def _discard(self, tmp: str) -> None:
        if not tmp:
            return
        try:
            self.store.fs.rm(tmp, recursive=True)
        except (OSError, FileNotFoundError):
            pass

    def _finish_vote(self) -> None:
        """Complete an in-flight stop vote before other collectives use the group."""
        if self._read_vote():
            preemption.request(preemption.requested() or signal.SIGUSR2)

    def wait(self) -> None:
        """Wait for a background save; raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _wait_quietly(self) -> None:
        try:
            self.wait()
        except Exception as exc:  # noqa: BLE001 - at exit, report and move on
            _warn(str(exc))

    def close(self) -> None:
        """Wait for a background save to commit; raise its error."""
        self._finish_vote()
        self.wait()
        heartbeat.beat(self.last_saved_step or 0, Phase.EXIT)  # shutting down: no hang limit

    # ------------------------------------------------------------------ restore

    def _pick_step(self) -> tuple[int | None, dict[str, bytearray]]:
        """Rank 0 picks the newest checkpoint that verifies; every rank gets its choice.

        Rank 0 keeps the verified bytes of the files it loads itself.
        """
        choice = None
        cached: dict[str, bytearray] = {}
        verified_here = None
        if self.ctx.is_main:
            for step in self.store.committed_steps():
                try:
                    # Local files are loaded with mmap after this check; object-store bytes
                    # are kept so they are fetched once.
                    keep = () if self.store.renames else (STATE_FILE, rank_file(0))
                    cached = self.store.verify(step, keep=keep).data
                    verified_here = step
                except CorruptCheckpoint as exc:
                    _warn(f"skipping corrupt checkpoint: {exc}")
                    continue
                choice = step
                break
        self._verified_step = verified_here
        return self._broadcast(choice), cached

    def restore(self) -> Progress | None:
        """Load the newest committed checkpoint that verifies into the registered objects."""
        started = time.monotonic()
        progress = self._restore()
        self._record(
            Event.RESTORED,
            step=progress.step if progress else None,
            restore_s=round(time.monotonic() - started, 3),
        )
        self._record(Event.TRAINING_STARTED, step=progress.step if progress else 0)
        return progress

    def _record(self, event: Event, **fields: Any) -> None:
        """An event in the run directory's ledger, from rank 0 (goodput, lead-time check)."""
        if not (self.ctx.is_main and self.ctx.run_dir):
            return
        from orchestrator.storage.rundir import RunDir

        try:
            RunDir(self.ctx.run_dir).append_event(event, attempt=self.ctx.attempt, **fields)
        except OSError as exc:  # the ledger is bookkeeping: never fail training for it
            _warn(f"could not record {event}: {exc}")

    def _restore(self) -> Progress | None:
        self.wait()
        step, cached = self._pick_step()
        if step is None:
            return None
        manifest = self.store.read_manifest(step)
        files = manifest["files"]
        where = step_dir_name(step)

        def load(name: str) -> Any:
            path = self.store.local_path(step, name)
            if path is not None:
                # Verified by streaming (rank 0 already did, in _pick_step), then mapped:
                # no file-sized allocation, load_state_dict copies straight from the page cache.
                if self._verified_step != step:
                    self.store.read_file(step, name, files[name], keep=False)
                return _load(
                    lambda: torch.load(path, map_location="cpu", weights_only=True, mmap=True),
                    f"{where}/{name}",
                )
            data = cached.pop(name, None) or self.store.read_file(step, name, files[name])
            return _load(
                lambda: torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), f"{where}/{name}"
            )

        try:
            same_world = int(manifest.get("world_size", -1)) == self.ctx.world_size
            own = rank_file(self.ctx.rank) if same_world else rank_file(0)
            rank_state = load(own)
            app = load(STATE_FILE)
        except (CorruptCheckpoint, KeyError) as exc:
            raise CheckpointError(f"{where} changed while loading: {exc}") from None
        unwrap(self.model).load_state_dict(app["model"])
        for name in ("optimizer", "scheduler", "scaler"):
            obj = getattr(self, name)
            if obj is not None and name in app:
                obj.load_state_dict(app[name])
        if same_world:
            set_rng_state(rank_state["rng"])
        if self.sampler is not None and "sampler" in rank_state:
            # The consumed count is global, so any rank's file gives the position of the world.
            self.sampler.load_state_dict(rank_state["sampler"])
        progress = app["progress"]
        self.last_saved_step = int(progress["step"])
        return Progress(
            step=int(progress["step"]), epoch=int(progress["epoch"]), extra=dict(app.get("extra", {}))
        )
