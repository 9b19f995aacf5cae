"""What went wrong in an attempt: each failed rank (`RankFailure`), the one that caused the
others (`root_cause`), its class, whether a retry can help, and what to do about it.

Pure functions over what ranks left behind (exit codes, error records, log tails); both
supervisors use exactly these.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from orchestrator.contract import (
    DIVERGED_TYPE,
    FLIGHT_RECORDER_PREFIX,
    HANG_TYPE,
    LAUNCHER_TYPE,
    PREEMPTED_EXIT_CODE,
    PREEMPTED_TYPE,
    STALE_TYPE,
)

# Errors that fail the same way every time: restarting cannot help.
NON_RETRYABLE_TYPES = frozenset(
    {
        "SyntaxError",
        "IndentationError",
        "ImportError",
        "ModuleNotFoundError",
        "NameError",
        "AttributeError",
        "TypeError",
        "FileNotFoundError",
        "KeyError",
        "NotImplementedError",
        "DeviceError",  # orchestrator.runtime.device: the rank cannot get a GPU of its own
    }
)

_PEER_LOSS = re.compile(
    r"(Connection closed by peer|Connection reset by peer|Broken pipe|connection refused|"
    r"DistNetworkError|DistStoreError|DistBackendError|Socket Timeout|timed out|Timeout|"
    r"NCCL communicator was aborted|Watchdog caught collective operation timeout|NCCL error|"
    r"Gloo connectFullMesh failed|ECONNRESET|EPIPE)",
    re.IGNORECASE,
)
# NCCL's own words: an error code, its watchdog's timeout, a communicator aborted on a peer's
# failure (TORCH_NCCL_ASYNC_ERROR_HANDLING=1 ends the process with one of these).
_NCCL = re.compile(
    r"(NCCL error|nccl(Unhandled\w*Error|SystemError|InternalError|InvalidUsage|RemoteError)|"
    r"Watchdog caught collective operation timeout|NCCL communicator)"
)
_OOM = re.compile(
    r"(OutOfMemoryError|out of memory|MemoryError|CUBLAS_STATUS_ALLOC_FAILED|std::bad_alloc)", re.IGNORECASE
)
_DEVICE_MISMATCH = re.compile(
    r"Expected all tensors to be on the same device|"
    r"Input type \(.*\) and weight type \(.*\) should be the same"
)
# argparse (and click, optparse) report a bad command line as "prog: error: ..." and exit 2.
_USAGE_ERROR = re.compile(r"\S: error: ")
USAGE_EXIT_CODE = 2

HINTS = {
    "oom": (
        "out of memory: lower the per-rank batch size (keep the global batch with gradient accumulation),"
        " use AMP, or give each rank more memory (resources.memory / fewer ranks per node)"
    ),
    "device_mismatch": (
        "tensors on different devices: move the model once with model.to(ctx.device)"
        " before wrapping it in DDP, and every batch with batch.to(ctx.device) before the forward pass"
    ),
    "communication": (
        "a peer was lost or a collective timed out: this rank is usually a victim;"
        " look at the other ranks' errors (and the hang watchdog) for the first failure"
    ),
    "nccl": (
        "an NCCL collective failed or timed out: usually a victim of a peer that died, hung or lost"
        f" its network; the flight recorder's dumps ({FLIGHT_RECORDER_PREFIX}N in the attempt's log folder,"
        " read with `python -m torch.distributed.flight_recorder.fr_trace`) show which collective"
        " each rank was in; NCCL_DEBUG=INFO in job.env logs more"
    ),
    "user_error": (
        "this error repeats on every attempt, so it was not retried:"
        " fix the code or the config and submit again"
    ),
    "usage": (
        "the job rejected its own command line (exit 2, a usage error), so it was not retried: check job.args"
    ),
    "hang": "the rank stopped making progress; its Python stacks were dumped into its log",
    "diverged": (
        "the loss or the gradient norm became NaN or infinite: lower the learning rate (or warm it up),"
        " clip gradients, prefer bf16 (or a GradScaler with fp16), check the data for bad samples;"
        " restart.on_divergence: rollback restarts from the newest checkpoint past the data window"
    ),
    "stale": (
        "a newer incarnation of this run has started (a requeued job, or a restart elsewhere); this one"
        " stopped rather than write over its checkpoints"
    ),
    "signal": (
        "the rank was killed by a signal from outside"
        " (the kernel's OOM killer sends SIGKILL; check `dmesg` and resources.memory)"
    ),
}


class FailureClass(StrEnum):
    PREEMPTED = "preempted"  # a stop on request: checkpointed, not a failure
    OOM = "oom"
    DEVICE_MISMATCH = "device_mismatch"
    COMMUNICATION = "communication"  # lost a peer: usually a victim, not the cause
    USER_ERROR = "user_error"  # fails the same way every time
    HANG = "hang"
    DIVERGED = "diverged"  # a non-finite loss or gradient norm: a retry from the same data repeats it
    SIGNAL = "signal"  # killed from outside
    STALE = "stale"  # a newer incarnation of the run has started: this one must stop, for good
    ERROR = "error"


@dataclass(frozen=True)
class Classified:
    kind: FailureClass
    retryable: bool
    hint: str | None


def is_peer_loss(message: str) -> bool:
    return bool(_PEER_LOSS.search(message or ""))


def classify(*, exitcode: int | None, error_type: str | None, message: str) -> Classified:
    text = f"{error_type or ''}: {message or ''}"
    if exitcode == PREEMPTED_EXIT_CODE or error_type == PREEMPTED_TYPE:
        return Classified(FailureClass.PREEMPTED, True, None)
    if error_type == STALE_TYPE:
        return Classified(FailureClass.STALE, False, HINTS["stale"])
    if error_type == HANG_TYPE:
        return Classified(FailureClass.HANG, True, HINTS["hang"])
    if error_type == DIVERGED_TYPE:
        return Classified(FailureClass.DIVERGED, False, HINTS["diverged"])
    if _OOM.search(text):
        return Classified(FailureClass.OOM, True, HINTS["oom"])
    if _DEVICE_MISMATCH.search(text):
        return Classified(FailureClass.DEVICE_MISMATCH, False, HINTS["device_mismatch"])
    if error_type in NON_RETRYABLE_TYPES:
        return Classified(FailureClass.USER_ERROR, False, HINTS["user_error"])
    if error_type is None and exitcode == USAGE_EXIT_CODE and _USAGE_ERROR.search(message or ""):
        return Classified(FailureClass.USER_ERROR, False, HINTS["usage"])
    if _NCCL.search(text):
        return Classified(FailureClass.COMMUNICATION, True, HINTS["nccl"])
    if is_peer_loss(text):
        return Classified(FailureClass.COMMUNICATION, True, HINTS["communication"])
    if error_type is None and exitcode is not None and exitcode < 0:
        hint = HINTS["signal"] if exitcode == -signal.SIGKILL else None
        return Classified(FailureClass.SIGNAL, True, hint)
    return Classified(FailureClass.ERROR, True, None)


@dataclass(frozen=True, kw_only=True)
class RankFailure:
    """One rank's failure in an attempt; `rank` is None when only the whole step's exit status
    is known (an srun step that failed before any rank left a record)."""

    rank: int | None
    node_rank: int | None
    exitcode: int
    time: float
    error_type: str | None
    message: str

    @property
    def who(self) -> str:
        if self.rank is None:
            return "the step" if self.node_rank is None else f"node {self.node_rank}"
        return f"rank {self.rank}" if self.node_rank is None else f"rank {self.rank} (node {self.node_rank})"

    @property
    def describe(self) -> str:
        if self.error_type == LAUNCHER_TYPE:  # the message names the process and what happened
            return self.message
        if self.error_type == HANG_TYPE:
            how = "hung"
        elif self.exitcode < 0:
            how = f"killed by {signal.Signals(-self.exitcode).name}"
        else:
            how = f"exit code {self.exitcode}"
        return f"{self.who} {how}: {self.message}" if self.message else f"{self.who} {how}"

    @property
    def classified(self) -> Classified:
        return classify(exitcode=self.exitcode, error_type=self.error_type, message=self.message)

    @property
    def is_stop_on_request(self) -> bool:
        return self.classified.kind is FailureClass.PREEMPTED

    def to_json(self) -> dict[str, Any]:
        c = self.classified
        return {
            "rank": self.rank,
            "node_rank": self.node_rank,
            "exitcode": self.exitcode,
            "time": round(self.time, 6),
            "error_type": self.error_type,
            "message": self.message,
            "class": c.kind.value,
            "hint": c.hint,
        }

    @classmethod
    def launcher_failed(cls, message: str, *, node_rank: int | None, time: float) -> RankFailure:
        """Our own process between supervisor and ranks (a fork server, a node agent) failed:
        `message` names it and what happened; the ranks it held are its victims."""
        return cls(
            rank=None,
            node_rank=node_rank,
            exitcode=-signal.SIGKILL,
            time=time,
            error_type=LAUNCHER_TYPE,
            message=message[:500],
        )

    @classmethod
    def from_record(
        cls, record: dict[str, Any], *, rank: int | None, node_rank: int | None, exitcode: int, time: float
    ) -> RankFailure:
        """From a rank's error record (contract.read_error_record); `time` if it has none."""
        error_type = record.get("type")
        text = f"{error_type}: {record.get('message')}" if error_type else str(record.get("message", ""))
        return cls(
            rank=rank,
            node_rank=node_rank,
            exitcode=exitcode,
            time=float(record.get("time") or time),
            error_type=error_type,
            message=text[:500],
        )


def root_cause(failures: Sequence[RankFailure], first_seen: int | None = None) -> RankFailure | None:
    """The failure that caused the others.

    - A real failure outranks a stop on request (exit 75 with a Preempted record): a rank that
      crashed while the others checkpointed on a signal is still a crash.
    - A rank that loses a peer fails too (gloo "connection closed", a collective timeout), often
      writing its record before the supervisor sees the peer's exit: those count only when
      nothing else failed.
    - `first_seen` is the rank whose exit the supervisor saw first, where it watches each rank
      (locally); it stops the rest after that, so ranks that left no record of their own (our
      SIGTERM or SIGKILL) are then not causes. A rank killed by a signal has no record either,
      and its time is when its exit was seen: only a record written before that moment can
      name an earlier cause.
    """
    if not failures:
        return None
    seen = next((f for f in failures if f.rank == first_seen), None) if first_seen is not None else None
    if seen is not None and not is_peer_loss(seen.message):
        recorded = [
            f
            for f in failures
            if f.error_type is not None and not f.is_stop_on_request and not is_peer_loss(f.message)
        ]
        if seen.is_stop_on_request:
            return min(recorded, key=lambda f: f.time) if recorded else seen
        earlier = [f for f in recorded if f.time < seen.time]
        return min(earlier, key=lambda f: f.time) if earlier else seen
    real = [f for f in failures if not f.is_stop_on_request]
    primary = [f for f in real if not is_peer_loss(f.message)]
    if not primary:
        stops = [f for f in failures if f.is_stop_on_request]
        if stops:
            return min(stops, key=lambda f: f.time)  # a coordinated stop; peer losses follow it
        primary = real
    return min(primary, key=lambda f: f.time)


def abort_line(lines: Sequence[str]) -> str:
    """Why a process aborted itself (SIGABRT): NCCL's watchdog ends a rank with std::abort after
    logging the collective that failed; else the usual exception line."""
    for line in reversed(lines):
        if _NCCL.search(line):
            return line.strip()[:500]
    return exception_line(lines)


def exception_line(lines: Sequence[str]) -> str:
    """The line a person reads first in a crashed process's output: the exception of the last
    traceback (the first line after its header that is not indented), else the last line that
    looks like an error."""
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
    if starts:
        for line in lines[starts[-1] + 1 :]:
            if line.strip() and not line[0].isspace():
                return line.strip()[:500]
    for line in reversed(lines):
        stripped = line.strip()
        if (
            stripped
            and not stripped.startswith(("File ", "^", "~"))
            and ("Error" in stripped or "Exception" in stripped or ": " in stripped)
        ):
            return stripped[:500]
    return lines[-1].strip()[:500] if lines else ""
