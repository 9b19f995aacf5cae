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
import enum
import hashlib
import io
import os
import pickle
import random
import signal
import sys
import threading
import time
import zlib
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, NoReturn

import numpy as np
import torch
import torch.distributed as dist

from orchestrator.contract import (
    CKPT_MODEL_KEY,
    CKPT_STATE_FILE,
    ENV_CKPT_ASYNC,
    ENV_CKPT_INTERVAL,
    ENV_CKPT_KEEP,
    ENV_INCARNATION,
    Event,
    Phase,
)
from orchestrator.storage.causes import storage_cause
from orchestrator.storage.ckpt_store import (
    AlreadyCommitted,
    CheckpointStore,
    CorruptCheckpoint,
    FileEntry,
    StaleIncarnation,
    make_token,
    manifest_int,
    step_dir_name,
)
from orchestrator.storage.faults import fault_point

from . import divergence, heartbeat, preemption, prefault, profiling
from .accumulation import GradientAccumulation
from .ddp_layout import MANIFEST_KEY as DDP_LAYOUT_KEY
from .ddp_layout import current_layout
from .dist import DistContext
from .divergence import DivergenceError, DivergenceGuard

STATE_FILE = CKPT_STATE_FILE


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded; the message is one line."""


class _Refused(Exception):
    """This save must not be written (its error is already set)."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__


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
    """sha256 over (name, dtype, shape, CRC-32 of the bytes) of every tensor, in name order.

    The bytes go through CRC-32 (zlib, ~3.8 GB/s here and free of the GIL) rather than sha256
    (~1.7 GB/s): the digest is computed beside every checkpoint write, on a core the write
    needs too. Any difference in a tensor's bytes up to 32 bits long, a single flipped bit
    included, changes its CRC, so equal digests mean equal weights for anything but a
    deliberate collision.
    """
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
            h.update(zlib.crc32(t.reshape(-1).view(torch.uint8).numpy()).to_bytes(4, "little"))
    return h.hexdigest()


def save_state(obj: Any, fh: Any) -> None:
    """torch.save without torch's own CRC-32 pass: every file is checksummed as it is written
    (storage.ckpt_store), and torch's pass ran serially on top of that one."""
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(obj, fh)
    finally:
        torch.serialization.set_crc32_options(previous)


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Every random generator a step may draw from: Python's, numpy's, torch's CPU one and, on a
    GPU rank, that of the rank's own device (only it: another device's generator belongs to the
    rank that trains there, and reading it would start a CUDA context on it)."""
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
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore rng_state()'s generators; the saved device generator goes to this rank's device,
    whatever its index was when saved (a resumed rank may see its GPU under another index)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    saved = state.get("cuda")
    if saved is not None and device is not None and device.type == "cuda":
        if isinstance(saved, (list, tuple)):  # older checkpoints: every device's generator
            saved = saved[device.index if device.index is not None and device.index < len(saved) else 0]
        torch.cuda.set_rng_state(saved, device)


@dataclass(frozen=True)
class _Chosen:
    """The checkpoint rank 0 verified, as every rank loads it."""

    step: int
    manifest: dict[str, Any]
    directory: str


def _close_all(held: dict[str, Any]) -> None:
    """Close the descriptors among `held` (open verified files nobody loaded)."""
    for value in list(held.values()):
        if isinstance(value, int):
            os.close(value)
    held.clear()


class _LoadFailure(Exception):
    """One file of a checkpoint could not be loaded; the message names the file and the class."""


def load_failure(exc: BaseException) -> str:
    """What kind of failure a load raised: the storage (the bytes could not be read), the
    format (they are not a torch checkpoint, or not the one expected), or a refusal
    (weights_only=True found more than tensors and plain containers)."""
    if isinstance(exc, (OSError, CorruptCheckpoint)):
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _one_line(exc)
        return f"storage error: {reason}"
    if isinstance(exc, pickle.UnpicklingError) and "weights only" in str(exc).lower():
        return (
            "refused to load: it holds more than tensors and plain containers"
            f" (weights_only=True): {_one_line(exc)}"
        )
    return f"unreadable format ({type(exc).__name__}): {_one_line(exc)}"


def _load(loader: Callable[[], Any], what: str) -> Any:
    try:
        return loader()
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError and friends
        raise _LoadFailure(f"{what}: {load_failure(exc)}") from None


def _check_archive(head: bytes, what: str) -> None:
    """torch.save writes zip archives; anything else would reach torch's legacy unpickler,
    whose error reads like a weights_only refusal."""
    if head != b"PK\x03\x04":
        raise _LoadFailure(f"{what}: unreadable format: not a torch checkpoint (no zip archive)")


def _owned(obj: Any) -> Any:
    """Tensors copied out of a memory-mapped checkpoint file, so that nothing kept after the
    restore (optimizer state) depends on a file that retention will delete (on NFS, a read of
    an unlinked mapped file can fail with ESTALE or SIGBUS)."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _owned(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_owned(v) for v in obj)
    return obj


def synchronize_devices() -> None:
    """Wait for every GPU's queued work, not only the current device's: a snapshot's
    non-blocking copies may come from tensors on any device of this rank."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for device in range(torch.cuda.device_count()):
            torch.cuda.synchronize(device)


def unloadable_extra(extra: dict[str, Any] | None) -> str | None:
    """Why an `extra` value would make the checkpoint impossible to restore, or None.

    Restore loads with weights_only=True, which refuses anything but tensors, plain Python
    values and containers of them (a numpy scalar, say). Found at save time, before anything
    is written: committing it would replace loadable checkpoints with one no restart can load.
    """
    for key, value in (extra or {}).items():
        if isinstance(value, torch.Tensor):
            continue  # always loadable; an EMA copy of the weights is not worth serializing twice
        buffer = io.BytesIO()
        try:
            torch.save(value, buffer)
            buffer.seek(0)
            torch.load(buffer, weights_only=True)
        except Exception:  # noqa: BLE001 - pickling errors, weights_only refusals: all the same here
            kind = f"{type(value).__module__}.{type(value).__qualname__}".removeprefix("builtins.")
            return (
                f"extra[{key!r}]: a {kind} cannot be restored with weights_only=True; save tensors or"
                " plain Python values (float(x), x.tolist(), torch.tensor(x))"
            )
    return None


def _skipped_samples(before: dict[str, Any] | None, after: dict[str, Any] | None) -> int | None:
    """Samples the whole world skips from sampler state `before` to `after` (across epochs)."""
    if not before or not after:
        return None
    epochs = int(after["epoch"]) - int(before["epoch"])
    return epochs * int(before["dataset_len"]) + int(after["consumed"]) - int(before["consumed"])


def saved_after(diverged: dict[str, Any], step: int, saved_by: int | None) -> bool:
    """Whether the checkpoint of `step`, saved by incarnation `saved_by`, comes after the
    divergence `diverged` (its event): past its last step, or saved by a later attempt (the
    rollback's own, say, at a step inside the diverged window). Restoring it rolls nothing back,
    whether or not a sampler position tells so. An incarnation is the attempt that ran it
    (ORCH_INCARNATION); a checkpoint that names none is judged by its step alone."""
    if step > int(diverged.get("last_step", step)):
        return True
    attempt = diverged.get("attempt")
    return saved_by is not None and attempt is not None and saved_by > int(attempt)


def _warn(text: str) -> None:
    print(f"[orch.checkpoint] {text}", file=sys.stderr, flush=True)


def _raise(result: _SaveResult) -> NoReturn:
    """A failed or fenced save's error."""
    raise (StaleIncarnationError if result.outcome is _Outcome.STALE else CheckpointError)(result.message)


class Snapshot:
    """Copies of state tensors in reusable CPU buffers (an async save's only blocking work).

    Copying into buffers that already exist costs about a tenth of allocating fresh ones
    (page faults; see NOTES.md), so buffers are kept between saves.
    """

    def __init__(self) -> None:
        # Keyed by the path of keys to each tensor, as a tuple: joined into one string, the
        # paths ("a/b",) and ("a", "b") would share a buffer and one would overwrite the other.
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}

    def take(self, obj: Any, key: tuple[Any, ...] = (), defer: DeferredCopies | None = None) -> Any:
        """The state with every tensor copied into its buffer; a tensor that `defer` accepts
        gets its buffer now and its copy later (DeferredCopies.run)."""
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
            if defer is not None and defer.accepts(src):
                defer.add(key, buf, src)
            else:
                buf.copy_(src, non_blocking=src.is_cuda)
            return buf
        if isinstance(obj, dict):
            return {k: self.take(v, (*key, k), defer) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.take(v, (*key, i), defer) for i, v in enumerate(obj))
        return obj


class DeferredCopies:
    """An async save's copies of the tensors that only the optimizer's step changes (the
    parameters and the optimizer's state, on CPU), run beside the next forward and backward
    instead of blocking training: the optimizer's next step waits for them (a step pre-hook,
    Checkpointer._before_optimizer_step). Anything else (buffers, which a forward changes;
    RNG, sampler, scheduler, scaler, extra) is copied before save() returns.

    A tensor written in place outside the optimizer's step (user code: an EMA swap) before or
    while it is copied is caught by its version counter, and that save is skipped, never
    committed torn. The check cannot run on the background thread when its copies end:
    PyTorch bumps the counter when an in-place kernel returns, so a write that overlaps the copy
    may still be running, its bump still to come. It runs on the training thread instead, the
    only writer, at its first point after the copies where it runs no kernel: the optimizer's
    step (which waits for the copies anyway), the next wait(), save() or close() (`settle`),
    or, once the copies are done, any other entry of the training thread into the runtime: a
    forward of the model (a pre-hook, so an evaluation that never steps the optimizer still
    lets the save commit), step_end(), should_save() (Checkpointer._settle_if_copied).
    Every write that began before that point has returned by then, with its bump. The commit
    waits for that check; a write that came after the copy, before the check, skips the save
    too (the counter cannot tell it from one that overlapped). Copying these tensors before
    save() returns would close the window as well, at the cost this class exists to remove (a
    memcpy of the weights and optimizer state on the training thread); the check costs one pass
    over the version counters. Writes through `.data` bypass version counters; a job that
    writes parameters that way between a save and the next step should not use async_save."""

    def __init__(self, storages: set[int]) -> None:
        self._storages = storages  # data pointers of the tensors that may be copied later
        self._copies: list[tuple[tuple[Any, ...], torch.Tensor, torch.Tensor, int]] = []
        self.done = threading.Event()  # every copy made (or failed)
        self._settled = threading.Event()  # the training thread has compared the versions
        self._changed: str | None = None
        self.finished_at: float | None = None
        self.gate_entered_at: float | None = None  # set by the optimizer's step, if it waited

    def accepts(self, src: torch.Tensor) -> bool:
        return src.device.type == "cpu" and src.untyped_storage().data_ptr() in self._storages

    def add(self, key: tuple[Any, ...], buf: torch.Tensor, src: torch.Tensor) -> None:
        self._copies.append((key, buf, src, src._version))

    def __len__(self) -> int:
        return len(self._copies)

    def run(self) -> None:
        """The background thread: copy every deferred tensor."""
        try:
            for _key, buf, src, _version in self._copies:
                buf.copy_(src)
        finally:
            self.finished_at = time.monotonic()
            self.done.set()

    def settle(self) -> None:
        """The training thread, at a point where it runs no kernel: wait for the copies, then
        note the first tensor whose version moved since save() (see the class). Idempotent."""
        if self._settled.is_set():
            return
        self.done.wait()
        self._changed = next(
            (
                "/".join(str(k) for k in key)
                for key, _buf, src, version in self._copies
                if src._version != version
            ),
            None,
        )
        self._copies.clear()  # no reference to the live tensors outlives the check
        self._settled.set()

    def changed(self) -> str | None:
        """The background thread, before the commit: wait for `settle`; the tensor written in
        place between save() and it, if any."""
        self._settled.wait()
        return self._changed

    def waited_s(self) -> float:
        """How long the optimizer's step waited for the copies (0 if it never did)."""
        entered = self.gate_entered_at
        if entered is None or self.finished_at is None:
            return 0.0
        return max(0.0, self.finished_at - entered)


class _Outcome(enum.Enum):
    COMMITTED = "committed"
    SKIPPED = "skipped"  # a deferred copy may be torn: not committed, and not an error
    FAILED = "failed"
    STALE = "stale"  # fenced by a newer incarnation


@dataclass(frozen=True)
class _SaveResult:
    """What became of one save, as rank 0 decided it (or as another rank knows it: a write
    that failed on any rank, gathered by all, or its own failure outside the protocol); every
    rank acts on the same one (Checkpointer._agree)."""

    outcome: _Outcome
    message: str = ""


@dataclass(frozen=True)
class _PendingSave:
    """An async save in flight, as save() left it; the next save() or close() concludes it on
    every rank alike (Checkpointer._conclude_pending)."""

    step: int
    previous: int | None  # last_saved_step before it: what it goes back to if the save is not made
    future: Future  # the background work: rank 0's _SaveResult (None on the other ranks)
    copying: DeferredCopies | None  # rank 0's deferred copies, checked by the training thread
    thread: threading.Thread  # joined once the future is done: no save thread outlives close()


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
        accumulation: GradientAccumulation | None = None,
    ) -> None:
        self.ctx = ctx
        # Saves and stops only between optimizer steps (see accumulation.py).
        self.accumulation = accumulation
        self._guard = DivergenceGuard()
        self._clean_step = 0  # the newest step by which every rank's guard found all values finite
        self._epoch = 0  # as the script last said (step_end, save): recorded with a divergence
        # The `profile:` section's window of steps (ORCH_PROFILE), on the ranks it names.
        self._profiler = profiling.from_env(ctx.rank, ctx.attempt, ctx.run_dir)
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
        self._snapshot = Snapshot()
        self._pending: _PendingSave | None = None
        self._ddp_layout: list[list[str]] | None = None  # recorded in manifests (ddp_layout.py)
        # Async saves copy parameters and optimizer state beside the next forward/backward
        # (DeferredCopies) when the optimizer is known: its step is where they change.
        self._defer_copies = self.async_save and optimizer is not None
        self._copying: DeferredCopies | None = None
        self._training_thread: int | None = None  # the thread that calls save(): the only writer
        if self._defer_copies:
            assert optimizer is not None
            optimizer.register_step_pre_hook(self._before_optimizer_step)
            unwrap(model).register_forward_pre_hook(self._before_forward)
        # Steps this process committed or verified: only those count toward `keep` (retention).
        self._known_good: set[int] = set()
        # The newest step whose save was started and not found failed or skipped: the same on
        # every rank wherever the job can read it, since it changes only in save(), close() and
        # restore(), which every rank calls at the same point, and an async save's outcome is
        # agreed there by a collective (_agree), never read from a background thread nor by
        # wait() (which one rank may call alone).
        self.last_saved_step: int | None = None
        self.last_save_s: float | None = None  # write + commit time of the last save
        self.last_block_s: float | None = None  # how long the last save blocked training
        # [stop flag, -proposed vote interval, diverged flag], all-reduced with MAX
        self._vote = torch.zeros(3)
        self._stop_vote: Any = None  # the all-reduce of self._vote, in flight
        self._vote_every = 1  # steps from one vote to the next, as agreed by the last vote read
        self._next_vote_step = 0
        self._vote_started: tuple[int, float] | None = None  # (step, monotonic time) of the last vote
        if ctx.is_main:
            try:
                self.store.register_incarnation(self.incarnation)
            except StaleIncarnation as exc:  # terminal for this incarnation (failures: "stale")
                raise StaleIncarnationError(str(exc)) from None
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

    def step_end(
        self,
        step: int,
        *,
        epoch: int = 0,
        extra: dict[str, Any] | None = None,
        loss: Any = None,
        grad_norm: Any = None,
    ) -> None:
        """Call once per optimizer step on every rank: saves every `interval` steps, and turns
        a stop signal (on any rank) into a checkpoint of one step and exit code 75 on every rank.

        The vote on the stop flag is an all-reduce started at one vote step and read at the
        next (every ~vote_period_s), so its latency hides behind the steps between; every rank
        reads the same result at the same step, so every rank stops at the same step.

        `loss` and `grad_norm` (tensors or numbers), when given, go to the divergence guard: a
        value that is not finite on any rank raises DivergenceError on every rank at the next
        vote or save, whichever comes first, and nothing diverged is ever saved.
        """
        self._check_boundary("step_end")
        self._settle_if_copied()
        self._epoch = epoch
        self._guard.observe(loss, grad_norm)
        if self._profiler is not None:
            self._profiler.step(step)
        heartbeat.beat(step, Phase.TRAIN)
        stop = False
        if self._vote_group is None:
            stop = preemption.requested() is not None
        elif step >= self._next_vote_step:
            stop = self._read_vote()
            self._start_vote(step)
        if stop:
            # Even if this step's save was started: save() first waits for it, and saves again
            # if it was skipped (a no-op if it was made).
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
        self._vote[2] = 1.0 if self._guard.read() else 0.0
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
        assert self._vote_started is not None
        if self._vote[2].item():
            self._diverged(last_step=self._vote_started[0])
        self._clean_step = self._vote_started[0]
        return bool(self._vote[0].item())

    def _check_guard(self, step: int) -> None:
        """Collective: before a save, every rank's guard is read now, not at the next vote."""
        flag = torch.tensor([1.0 if self._guard.read() else 0.0])
        if self._group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if flag.item():
            self._diverged(last_step=step)
        self._clean_step = step

    def _diverged(self, *, last_step: int) -> NoReturn:
        """Every rank gets here at the same step: rank 0 records where the data stood, which
        a rollback skips to (restore); every rank raises."""
        first_step = self._clean_step + 1
        self._record(
            Event.DIVERGED,
            first_step=first_step,
            last_step=last_step,
            epoch=self._epoch,
            sampler=dict(self.sampler.state_dict()) if self.sampler is not None else None,
        )
        raise DivergenceError(divergence.message(first_step, last_step))

    def _check_boundary(self, what: str) -> None:
        if self.accumulation is not None and not self.accumulation.boundary:
            raise RuntimeError(
                f"Checkpointer.{what} between the micro-batches of an optimizer step: call it after"
                " the optimizer steps (GradientAccumulation.boundary), so a resume replays whole steps"
            )

    @property
    def vote_every(self) -> int:
        """Steps between two stop votes, as the last vote agreed (the same on every rank)."""
        return self._vote_every

    def should_save(self, step: int) -> bool:
        self._settle_if_copied()
        return step > 0 and step % self.interval == 0 and step != self.last_saved_step

    def _app_state(self, step: int, epoch: int, extra: dict[str, Any] | None) -> dict[str, Any]:
        state: dict[str, Any] = {
            CKPT_MODEL_KEY: unwrap(self.model).state_dict(),
            "progress": {"step": step, "epoch": epoch},
            "extra": dict(extra or {}),
        }
        for name in ("optimizer", "scheduler", "scaler"):
            obj = getattr(self, name)
            if obj is not None:
                state[name] = obj.state_dict()
        return state

    def _rank_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"rng": rng_state(self.ctx.device), "world_size": self.ctx.world_size}
        if self.sampler is not None:
            state["sampler"] = dict(self.sampler.state_dict())
        return state

    def save(self, step: int, *, epoch: int = 0, extra: dict[str, Any] | None = None) -> None:
        """Collective: every rank calls it with the same step.

        Synchronous saves return once the checkpoint is committed. Async saves return once the
        state is copied; the write and commit run in the background, and the next save() or
        close() waits for them: there every rank learns the outcome at once and raises its
        error, if any. Saving the step just saved is a no-op, so a job's final save should be
        unconditional: it saves again a final save that was skipped.
        """
        self._check_boundary("save")
        self._epoch = epoch
        self._training_thread = threading.get_ident()
        blocked_from = time.monotonic()
        heartbeat.beat(step, Phase.SAVE)
        self._conclude_pending()  # the previous save's outcome, on every rank before anything reads it
        self._finish_vote()
        self._check_guard(step)
        token = make_token(self.incarnation)
        agreed_step, token = self._broadcast((step, token))
        if agreed_step != step:
            raise CheckpointError(
                f"rank {self.ctx.rank} saves step {step} but rank 0 saves step {agreed_step}"
            )
        if step == self.last_saved_step:
            # Saved already (a periodic save, then the script's own final save of the same
            # step): committed, or its error raised by _conclude_pending() above. Nothing changes by saving
            # it again, and the commit would be refused as a duplicate.
            heartbeat.beat(step, Phase.TRAIN)
            return
        if self._ddp_layout is None:
            self._ddp_layout = current_layout(self.model)  # collective while a rebuild is pending
        app = self._app_state(step, epoch, extra) if self.ctx.is_main else None
        mine = self._rank_state()
        # Refused before anything is written, but inside the protocol: every rank gets the error.
        refused = unloadable_extra(extra) if self.ctx.is_main else None
        if self.async_save:
            defer = (
                DeferredCopies(self._optimized_storages()) if self._defer_copies and app is not None else None
            )
            app = self._snapshot.take(app, (), defer) if app is not None else None
            mine = self._snapshot.take(mine, ("rank",))
            synchronize_devices()  # the non_blocking device->host copies are done
            future: Future = Future()
            blocked = time.monotonic() - blocked_from
            work: tuple[Any, ...] = (self._write_and_commit, step, epoch, token, app, mine, blocked, refused)
            copying = defer if defer is not None and len(defer) else None
            if copying is not None:
                self._copying = copying
                work = (self._copy_then_commit, copying, *work[1:])
            thread = threading.Thread(
                target=self._run_into, args=(future, *work), name="orch-ckpt-save", daemon=True
            )
            thread.start()
            self._pending = _PendingSave(
                step=step, previous=self.last_saved_step, future=future, copying=copying, thread=thread
            )
            self.last_block_s = time.monotonic() - blocked_from
            self.last_saved_step = step
            heartbeat.beat(step, Phase.TRAIN)
            return
        try:
            local = self._write_and_commit(step, epoch, token, app, mine, None, refused)
        except Exception as exc:  # noqa: BLE001 - the peers wait in the agreement: join them
            local = self._failed(step, exc)
        self._conclude(self._agree(local), previous=self.last_saved_step)
        self.last_block_s = time.monotonic() - blocked_from
        self.last_saved_step = step
        heartbeat.beat(step, Phase.TRAIN)

    def _optimized_storages(self) -> set[int]:
        """Data pointers of what only the optimizer's step changes: parameters, optimizer state."""
        assert self.optimizer is not None
        tensors = list(unwrap(self.model).parameters())
        for per_param in self.optimizer.state.values():
            tensors.extend(v for v in per_param.values() if isinstance(v, torch.Tensor))
        return {t.untyped_storage().data_ptr() for t in tensors}

    def _before_optimizer_step(self, _optimizer: Any, _args: Any, _kwargs: Any) -> None:
        """The optimizer is about to change what an async save may still be copying: wait, and
        check the copies (DeferredCopies.settle: no kernel of this thread runs now)."""
        copying, self._copying = self._copying, None
        if copying is None:
            return
        if not copying.done.is_set():
            copying.gate_entered_at = time.monotonic()
        copying.settle()
        self.last_block_s = (self.last_block_s or 0.0) + copying.waited_s()

    def _before_forward(self, _module: Any, _args: Any) -> None:
        """A forward of the model (training or evaluation) is about to run on this thread."""
        if torch.compiler.is_compiling():  # traced into a graph: no Python runs there per call
            return
        self._settle_if_copied()

    def _settle_if_copied(self) -> None:
        """At an entry of the training thread into the runtime, where it runs no kernel: if an
        async save's deferred copies are done, check them now (DeferredCopies.settle), so that
        its commit does not wait for the optimizer's next step, which an evaluation may put off
        for many minutes. Never waits: copies still running are checked at a later entry."""
        copying = self._copying
        if copying is None or not copying.done.is_set() or threading.get_ident() != self._training_thread:
            return
        self._copying = None
        copying.settle()

    def _copy_then_commit(
        self,
        defer: DeferredCopies,
        step: int,
        epoch: int,
        token: str,
        app: dict[str, Any] | None,
        mine: dict[str, Any],
        blocked_s: float | None,
        refused: str | None,
    ) -> _SaveResult | None:
        """An async save's background work when copies were deferred: copy, then write and
        commit (a failed copy fails the save inside the protocol, on every rank)."""
        try:
            defer.run()
        except Exception as exc:  # noqa: BLE001 - MemoryError and friends: every rank must hear of it
            refused = refused or f"the async save's copy failed: {_one_line(exc)}"
        return self._write_and_commit(step, epoch, token, app, mine, blocked_s, refused, deferred=defer)

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
        refused: str | None = None,
        deferred: DeferredCopies | None = None,
    ) -> _SaveResult | None:
        """Write, gather, and on rank 0 commit: rank 0 returns what became of the save, the
        other ranks None, or the write failures that every rank gathered; the caller makes every
        rank act on rank 0's result (_agree: in save() at once; for an async save, in the next
        save() or close()). `blocked_s`: how long training waited (async: the
        snapshot; None for a synchronous save, which blocks for all of this). `refused`: why
        this save must not be written at all (rank 0's check of `extra`). `deferred`: rank 0's
        deferred copies, made: before committing, rank 0 waits for the training thread's check
        of them (DeferredCopies.changed), and a tensor written in place meanwhile skips the save.
        Only rank 0 waits there, after the gather: no collective of a background save waits
        for the training thread, which may not reach its check for a long time (an evaluation).

        Every rank reaches the gather whatever fails before it (any exception, not only
        OSError), and rank 0 returns a result whatever fails after it: a rank that left early
        would leave its peers blocked in the collective until the group's timeout."""
        started = time.monotonic()
        tmp = ""
        entries: list[FileEntry] = []
        error: str | None = f"rank {self.ctx.rank}: {refused}" if refused else None
        digest = None
        try:
            if error is not None:
                raise _Refused
            tmp = self.store.tmp_dir(step, token)
            entries.append(
                self.store.write_stream(tmp, rank_file(self.ctx.rank), lambda fh: save_state(mine, fh))
            )
            if app is not None:
                # The model digest is a second pass over the weights: run it beside the write.
                digest_future: Future = Future()
                hasher = threading.Thread(
                    target=self._run_into,
                    args=(digest_future, state_digest, app[CKPT_MODEL_KEY]),
                    daemon=True,
                )
                hasher.start()
                try:
                    entries.append(self.store.write_stream(tmp, STATE_FILE, lambda fh: save_state(app, fh)))
                finally:
                    hasher.join()
                digest = digest_future.result()
        except _Refused:
            pass
        except Exception as exc:  # noqa: BLE001 - MemoryError, pickling, a client library's own errors
            # A storage failure is named in words ("storage full"): it becomes the run's root cause.
            error = f"rank {self.ctx.rank}: {storage_cause(exc)}"
        gathered = self._all_gather((entries, error))
        errors = [err for _, err in gathered if err]
        name = step_dir_name(step)
        failed = _SaveResult(_Outcome.FAILED, f"checkpoint {name} not saved: {errors[0]}") if errors else None
        if not self.ctx.is_main:
            self.last_save_s = time.monotonic() - started
            return failed  # known here too: wait() raises it on every rank
        result: _SaveResult | None = failed  # None: commit
        # The wait for the training thread's check of the copies is not writing: it is left out
        # of write_s (what a preemption warning must leave time for, see check_lead_time).
        checked_from = time.monotonic()
        changed = deferred.changed() if deferred is not None and result is None else None
        held_s = time.monotonic() - checked_from
        if changed is not None:
            result = _SaveResult(
                _Outcome.SKIPPED,
                f"checkpoint {name} skipped: rank 0: {changed} changed in place before the async save"
                " could check its copy (between save() and the optimizer's next step)",
            )
        elif result is None:
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
                        "write_s": round(time.monotonic() - started - held_s, 3),
                        DDP_LAYOUT_KEY: self._ddp_layout,
                    },
                )
            except StaleIncarnation as exc:
                result = _SaveResult(_Outcome.STALE, str(exc))
            except AlreadyCommitted as exc:
                # By a newer incarnation: fenced. By this one: a step saved twice with other
                # saves in between (the same step again in a row is a no-op, see save()).
                kind = _Outcome.STALE if exc.incarnation > self.incarnation else _Outcome.FAILED
                result = _SaveResult(kind, f"checkpoint {name} not committed: {exc}")
            except Exception as exc:  # noqa: BLE001 - see the docstring
                result = _SaveResult(
                    _Outcome.FAILED, f"checkpoint {name} not committed: {storage_cause(exc)}"
                )
        if result is not None:
            self._discard(tmp, step)
            return result
        write_s = time.monotonic() - started - held_s
        self._known_good.add(step)
        if blocked_s is not None and deferred is not None:
            blocked_s += deferred.waited_s()  # the optimizer's step waited for the copies
        self._record_commit(step, digest, write_s, write_s if blocked_s is None else blocked_s)
        try:
            self.store.prune(self.keep, self.incarnation, protect=[step], known_good=self._known_good)
        except Exception as exc:  # noqa: BLE001 - housekeeping: never fail a committed save
            _warn(f"could not delete old checkpoints: {storage_cause(exc)}")
        self.last_save_s = time.monotonic() - started - held_s
        return _SaveResult(_Outcome.COMMITTED)

    def _failed(self, step: int, exc: BaseException) -> _SaveResult:
        """This rank's own failure outside the save's protocol, as a result to agree on."""
        return _SaveResult(
            _Outcome.FAILED,
            f"checkpoint {step_dir_name(step)} not saved: rank {self.ctx.rank}: {storage_cause(exc)}",
        )

    def _agree(self, local: _SaveResult | None) -> _SaveResult | None:
        """Collective: the one result every rank acts on, the first rank's that has one (rank 0
        decides every save it reached the end of; another rank has one only if it failed
        outside the protocol)."""
        return next((result for result in self._all_gather(local) if result is not None), None)

    def _conclude(self, result: _SaveResult | None, previous: int | None, *, last: bool = False) -> None:
        """Act on an agreed result, on every rank alike: a skipped or failed save sets
        last_saved_step back to `previous` (the step may be saved again); a failure raises, and
        so does a skipped save that is the `last` (close(): nothing will save it again, and the
        run would end without its final checkpoint, silently)."""
        if result is None or result.outcome is _Outcome.COMMITTED:
            return
        self.last_saved_step = previous
        if result.outcome is _Outcome.SKIPPED:
            self._defer_copies = False
            if last:
                raise CheckpointError(
                    f"{result.message}; it was the last save before close(), so the run ends without it:"
                    " save again after the in-place write, before close()"
                )
            _warn(f"{result.message}; later async saves copy every tensor before training goes on")
            return
        _raise(result)

    def _record_commit(self, step: int, digest: str | None, write_s: float, block_s: float) -> None:
        """Supervisors check the signal lead time against write_s; goodput counts block_s."""
        self._record(
            Event.CHECKPOINT_COMMITTED,
            step=step,
            write_s=round(write_s, 3),
            block_s=round(block_s, 3),
            model_digest=digest,
        )

    def _discard(self, tmp: str, step: int) -> None:
        """Delete a failed save's files, unless they are committed after all (a commit whose
        reply was lost, or an error raised after the commit landed).

        Never raises: it runs between rank 0's gather and the agreement on the result, and
        storage that just failed the save (unreachable, full) often fails this too. Files left behind are a
        dead save's; retention deletes them later."""
        try:
            if not tmp or self.store.commits_dir(step, tmp):
                return
            fault_point("ckpt.discard")
            self.store.fs.rm(tmp, recursive=True)
        except Exception as exc:  # noqa: BLE001 - any storage client's error; see the docstring
            _warn(f"could not delete the failed save's files {tmp}: {storage_cause(exc)}")

    def _finish_vote(self) -> None:
        """Complete an in-flight stop vote before other collectives use the group."""
        if self._read_vote():
            preemption.request(preemption.requested() or signal.SIGUSR2)

    def wait(self) -> None:
        """Wait for this rank's part of a background save to end; raise its error as far as
        this rank knows it (rank 0: any; another rank: a write that failed on any rank).

        Local: one rank may call it alone. It changes nothing that every rank must agree on
        (last_saved_step; a skipped save's warning): the next save() or close(), which every
        rank calls at the same point, agrees on the outcome and acts on it there, raising the
        error on every rank (again, on a rank whose wait() raised it)."""
        pending = self._pending
        if pending is not None:
            result = self._finished(pending)  # kept in the pending save's future for the agreement
            if result is not None and result.outcome in (_Outcome.FAILED, _Outcome.STALE):
                _raise(result)

    def _conclude_pending(self, *, last: bool = False) -> None:
        """Collective (save(), close(), restore()): every rank learns the background save's
        outcome from rank 0 (_agree) and acts on it at once (_conclude)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._conclude(self._agree(self._finished(pending)), previous=pending.previous, last=last)

    def _finished(self, pending: _PendingSave) -> _SaveResult | None:
        """This rank's background save, ended: rank 0's result (None on the other ranks), or
        this rank's failure outside the protocol. Rank 0 checks its deferred copies first: the
        training thread runs no kernel here (DeferredCopies), and its background save waits
        for the check before it commits."""
        if pending.copying is not None:
            self._copying = None
            pending.copying.settle()
        try:
            return pending.future.result()
        except Exception as exc:  # noqa: BLE001 - becomes the agreed error on every rank
            return self._failed(pending.step, exc)
        finally:
            # The thread has only its own frames to leave. Joined, it cannot still be running
            # when the process exits: a daemon thread that the interpreter's shutdown finds in a
            # C++ frame is ended there, and the process aborts ("terminate called without an
            # active exception"). A rank that had finished its work exited so once in CI; this
            # is the one thread of ours that could still run then.
            pending.thread.join()

    def _wait_quietly(self) -> None:
        """At exit: let a background save end (rank 0 commits it) without wait()'s collective,
        which the peers may never join now; report what did not go well."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        result = self._finished(pending)
        if result is not None and result.outcome is not _Outcome.COMMITTED:
            _warn(result.message)

    def close(self) -> None:
        """Collective: wait for a background save to commit; raise its error on every rank, or
        a CheckpointError if it was skipped (the last save, and not made)."""
        if self._profiler is not None:
            self._profiler.close()
        self._finish_vote()
        try:
            self._conclude_pending(last=True)
        finally:
            heartbeat.beat(self.last_saved_step or 0, Phase.EXIT)  # shutting down: no hang limit

    # ------------------------------------------------------------------ restore

    def _pick_step(self, skip: set[int]) -> tuple[_Chosen | None, dict[str, Any]]:
        """Rank 0 picks the newest checkpoint that verifies; every rank gets its choice with
        the manifest and data directory rank 0 resolved, so that no rank resolves them again
        (a displacement in between could give ranks different files).

        What rank 0 loads itself it keeps from the verification: the verified bytes (object
        stores), or the open files it checked (filesystems).

        Nothing rank 0 does here may raise before the broadcast: its peers wait in it. A step
        that fails to verify in any way is skipped (with a warning); a listing that fails is
        one CheckpointError on every rank.
        """
        choice: _Chosen | None = None
        held: dict[str, Any] = {}
        failure: str | None = None
        if self.ctx.is_main:
            try:
                steps = self.store.committed_steps()
            except Exception as exc:  # noqa: BLE001 - any storage client's error, see the docstring
                steps, failure = [], f"cannot list the committed checkpoints: {storage_cause(exc)}"
            for step in steps:
                if step in skip:
                    continue
                verified = self._verify_for_restore(step)
                if verified is not None:
                    choice, held = verified
                    self._known_good.add(step)
                    break
        choice, failure = self._broadcast((choice, failure))
        if failure is not None:
            raise CheckpointError(failure)
        return choice, held

    def _verify_for_restore(self, step: int) -> tuple[_Chosen, dict[str, Any]] | None:
        """Rank 0: verify one committed step, keeping what rank 0 loads itself (see _pick_step),
        or None, with a warning, if it does not verify. Never raises (but BaseException), and
        closes every file it opened unless it returns them."""
        own = (STATE_FILE, rank_file(0))  # what rank 0 loads, whatever the world size
        where = step_dir_name(step)
        fds: dict[str, int] = {}
        try:
            if self.store.renames:
                info = self.store.verify(step, skip=own)
                for name in own:
                    if name in info.manifest["files"]:
                        fds[name] = self.store.open_verified(
                            info.directory, name, info.manifest["files"][name], f"{where}/{name}"
                        )
                held: dict[str, Any] = fds
            else:
                info = self.store.verify(step, keep=own)
                held = dict(info.data)
            return _Chosen(step=step, manifest=info.manifest, directory=info.directory), held
        except CorruptCheckpoint as exc:
            _close_all(fds)
            _warn(f"skipping corrupt checkpoint: {exc}")
            # Un-committed, so that retention never counts it as one of the `keep`.
            try:
                self.store.uncommit(step, self.incarnation)
            except Exception as uncommit_error:  # noqa: BLE001 - any storage client's error
                _warn(f"could not un-commit {where}: {storage_cause(uncommit_error)}")
        except OSError as exc:  # the storage, not the checkpoint: skip it, keep it
            _close_all(fds)
            _warn(f"skipping {where}: storage error: {exc.strerror or exc}")
        except Exception as exc:  # noqa: BLE001 - what the store did not foresee (a malformed
            # manifest entry, a client library's own error): skip it and keep it, like a storage
            # error, since the fault may not be the checkpoint's.
            _close_all(fds)
            _warn(f"skipping {where}: it could not be verified: {type(exc).__name__}: {_one_line(exc)}")
        except BaseException:
            _close_all(fds)
            raise
        return None

    def restore(self) -> Progress | None:
        """Load the newest committed checkpoint that verifies into the registered objects."""
        started = time.monotonic()
        progress = self._restore()
        if progress is None:  # diverged before the first checkpoint: start over, past the data
            epoch = self._roll_forward_data(0, 0)
            progress = None if epoch is None else Progress(step=0, epoch=epoch, extra={})
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
        except Exception as exc:  # noqa: BLE001 - bookkeeping (any client's error): never fail training
            _warn(f"could not record {event}: {storage_cause(exc)}")

    def _restore(self) -> Progress | None:
        """Load the newest checkpoint that verifies and loads on every rank; any failure to
        load one (storage, format, refusal) falls back to the next older, with a warning."""
        self._conclude_pending()
        # The model's pages are mapped beside the verification read, not during the copy.
        populating = prefault.start(unwrap(self.model))
        skip: set[int] = set()
        newest_failure: str | None = None
        while True:
            chosen, held = self._pick_step(skip)
            if chosen is None:
                if newest_failure is not None:
                    raise CheckpointError(
                        f"no committed checkpoint could be loaded; the newest: {newest_failure}"
                    )
                return None
            step = chosen.step
            try:
                loaded, failure = self._load_step(chosen, held)
            finally:
                _close_all(held)
            failures = self._all_gather(failure)
            failure = next((f for f in failures if f), None)
            if failure is None:
                break
            _warn(f"cannot load {step_dir_name(step)}, trying an older checkpoint: {failure}")
            newest_failure = newest_failure or failure
            skip.add(step)
            self._known_good.discard(step)
        assert loaded is not None
        app, rank_state, same_world = loaded
        if populating is not None:
            populating.join()
        unwrap(self.model).load_state_dict(app[CKPT_MODEL_KEY])  # copies into the model's own tensors
        for name in ("optimizer", "scheduler", "scaler"):
            obj = getattr(self, name)
            if obj is not None and name in app:
                obj.load_state_dict(_owned(app[name]))  # optimizers keep what they are given
        if same_world:
            set_rng_state(rank_state["rng"], self.ctx.device)
        if self.sampler is not None and "sampler" in rank_state:
            # The consumed count is global, so any rank's file gives the position of the world.
            self.sampler.load_state_dict(rank_state["sampler"])
        progress = app["progress"]
        self.last_saved_step = self._clean_step = int(progress["step"])
        saved_by = manifest_int(chosen.manifest, "incarnation")  # information: read defensively
        epoch = self._roll_forward_data(int(progress["step"]), int(progress["epoch"]), saved_by)
        return Progress(
            step=int(progress["step"]),
            epoch=int(progress["epoch"]) if epoch is None else epoch,
            extra=_owned(dict(app.get("extra", {}))),
        )

    def _roll_forward_data(self, step: int, epoch: int, saved_by: int | None = None) -> int | None:
        """After a divergence, with restart.on_divergence: rollback, this attempt restarts from
        the newest checkpoint (before the divergence) but not from its data: the sampler skips
        to where the data stood when the divergence was found, so the window that caused it is
        not trained on again. Returns the epoch to go on in when the data moved forward; None
        when it goes on from the checkpoint's own position (`step`, `epoch`): no rollback, a
        checkpoint from after the divergence (`saved_by`: the incarnation that saved it), or
        nothing to skip by."""
        skip = self._broadcast(self._rollback_target() if self.ctx.is_main else None)
        if skip is None or saved_after(skip, step, saved_by):
            return None
        target = skip.get("sampler")
        if self.sampler is None or not target:
            # Without a sampler position on both sides nothing can move: the data goes on from
            # the checkpoint's own epoch (not the divergence's, which would skip the epochs in
            # between without a word), and the ledger says that nothing was skipped.
            if self.ctx.is_main:
                _warn(
                    "rolling back after a divergence without skipping any data: the Checkpointer has"
                    " no sampler= (or the divergence recorded none), so the same data comes again"
                    f" from epoch {epoch}"
                )
            self._record(
                Event.ROLLED_BACK, step=step, diverged_at=skip.get("last_step"), skipped=0, epoch=epoch
            )
            return None
        before = dict(self.sampler.state_dict())
        if (int(target["epoch"]), int(target["consumed"])) <= (before["epoch"], before["consumed"]):
            return None  # this checkpoint is past the window already (a later attempt saved it)
        self.sampler.epoch = int(target["epoch"])
        self.sampler.consumed = int(target["consumed"])
        new_epoch = int(skip.get("epoch", epoch))
        self._record(
            Event.ROLLED_BACK,
            step=step,
            diverged_at=skip.get("last_step"),
            skipped=_skipped_samples(before, target),
            epoch=new_epoch,
        )
        return new_epoch

    def _rollback_target(self) -> dict[str, Any] | None:
        """Rank 0: the newest divergence that a rollback was scheduled for (by the supervisor, or
        by `orch resume` with restart.on_divergence: rollback), from the run's ledger. Every
        later attempt that restores a checkpoint from before it skips past it, not only the
        first (which may fail or be preempted before it saves)."""
        if self.ctx.attempt == 0 or not self.ctx.run_dir:
            return None
        from orchestrator.storage.rundir import RunDir

        try:
            events = RunDir(self.ctx.run_dir).events()
        except Exception as exc:  # noqa: BLE001 - any storage's error: every rank must go on
            _warn(f"cannot read the run's events for a rollback: {storage_cause(exc)}")
            return None
        diverged, scheduled = None, False
        for event in events:
            if event.get("event") == Event.DIVERGED:
                diverged, scheduled = event, False
            elif event.get("event") == Event.ROLLBACK_SCHEDULED and diverged is not None:
                scheduled = True
        return diverged if scheduled else None

    def _load_step(
        self, chosen: _Chosen, held: dict[str, Any]
    ) -> tuple[tuple[dict[str, Any], dict[str, Any], bool] | None, str | None]:
        """This rank's files of the chosen step, loaded: (app state, rank state, same world
        size), or why not (one line naming the file and the failure's class). Each file is
        checked against rank 0's manifest through the same open file (or bytes) it is loaded
        from; rank 0's own were checked while it picked the step."""
        step, manifest, directory = chosen.step, chosen.manifest, chosen.directory
        where = step_dir_name(step)
        files = manifest["files"]
        try:

            def load(name: str) -> Any:
                if name not in files:
                    raise _LoadFailure(f"{where}/{name}: unreadable format: not in the manifest")
                try:
                    return read_and_load(name)
                except _LoadFailure:
                    raise
                except Exception as exc:  # noqa: BLE001 - the storage, while reading this file
                    raise _LoadFailure(f"{where}/{name}: {load_failure(exc)}") from None

            def read_and_load(name: str) -> Any:
                fault_point("ckpt.load")
                if self.store.renames:
                    fd = held.pop(name, None)
                    if fd is None:
                        fd = self.store.open_verified(directory, name, files[name], f"{where}/{name}")
                    try:
                        _check_archive(os.pread(fd, 4, 0), f"{where}/{name}")
                        # Mapped through the descriptor that was verified: no file-sized
                        # allocation, and the very bytes that were checked.
                        return _load(
                            lambda: torch.load(
                                f"/proc/self/fd/{fd}", map_location="cpu", weights_only=True, mmap=True
                            ),
                            f"{where}/{name}",
                        )
                    finally:
                        os.close(fd)
                data = held.pop(name, None) or self.store.read_file(
                    step, name, files[name], directory=directory
                )
                _check_archive(bytes(data[:4]), f"{where}/{name}")
                return _load(
                    lambda: torch.load(io.BytesIO(data), map_location="cpu", weights_only=True),
                    f"{where}/{name}",
                )

            same_world = manifest_int(manifest, "world_size") == self.ctx.world_size
            rank_state = load(rank_file(self.ctx.rank) if same_world else rank_file(0))
            app = load(STATE_FILE)
            for key in ("model", "progress"):
                if not isinstance(app, dict) or key not in app:
                    raise _LoadFailure(f"{where}/{STATE_FILE}: unreadable format: no {key!r}")
            return (app, rank_state, same_world), None
        except _LoadFailure as exc:
            return None, str(exc)
        except Exception as exc:  # noqa: BLE001 - storage errors while reading: any rank, any kind
            return None, f"{where}: {load_failure(exc)}"
