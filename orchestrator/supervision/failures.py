"""What went wrong in an attempt: each failed rank (`RankFailure`), the one that caused the
others (`root_cause`), its class, whether a retry can help, and what to do about it.

Pure functions over what ranks left behind (exit codes, error records, log tails); both
supervisors use exactly these.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Sequence
from dataclasses import dataclass, replace
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
    redact_text,
)

# The characters of a failure's message that decisions read and events.jsonl and the console
# show. The message itself is kept whole, so that job.pass_env values are redacted in all of it
# before it is cut (a secret across the cut left its start visible).
MESSAGE_LIMIT = 500

# Errors of the job's own code: they fail the same way on every attempt, so none is retried.
NON_RETRYABLE_TYPES = frozenset(
    {
        "SyntaxError",
        "IndentationError",
        "TabError",
        "NameError",
        "AttributeError",
        "TypeError",
        "KeyError",
        "NotImplementedError",
        "DeviceError",  # orchestrator.runtime.device: the rank cannot get a GPU of its own
    }
)
# Something the job needs from its machine is not there: a module, a file. When every rank
# fails so before the run's first step, no retry brings it (policy.decide's start-up rule);
# later in a run, an import or an open on a flaky shared filesystem can fail once and work on
# the next attempt, so there it is retried as any other error.
MISSING_TYPES = frozenset({"ImportError", "ModuleNotFoundError", "FileNotFoundError"})

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
    "missing": (
        "the job could not find a module or file it needs: install the module for the Python that runs"
        " the job (job.python, else the one orch runs with; under Slurm, on the nodes), or fix the import"
        " or the path"
    ),
    "int_env": (
        "init_process_group takes numbers, and environment variables are strings: pass"
        " rank=int(os.environ['RANK']), world_size=int(os.environ['WORLD_SIZE']), or leave both out"
        " (init_method='env://' reads RANK and WORLD_SIZE itself)"
    ),
    "nccl_without_gpu": (
        "the nccl backend needs a GPU for every rank, and this rank has none (no GPU visible, no driver,"
        " or a torch built without CUDA): on CPUs use gloo (distributed.backend: gloo, or"
        " backend='gloo'), or give every rank a GPU (resources.gpus_per_node; under Slurm, a GPU"
        " partition)"
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
    MISSING = "missing"  # a module or file the job needs is not there (MISSING_TYPES)
    HANG = "hang"
    DIVERGED = "diverged"  # a non-finite loss or gradient norm: a retry from the same data repeats it
    SIGNAL = "signal"  # killed from outside
    STALE = "stale"  # a newer incarnation of the run has started: this one must stop, for good
    ERROR = "error"


@dataclass(frozen=True)
class KnownError:
    """A known error of setting a job up: an exception class (`types`, the record's type field)
    and the words that tell it among that class's errors (`pattern`, over the message). Knowing
    it names it and attaches its fix (HINTS[name]); the failure's class still comes from its
    exception type. `fatal_at_start` is data: whether, failing so on every rank before the first
    step (policy.cannot_start), it is a user error that no retry cures, where its type alone
    (a RuntimeError, an AssertionError) would say nothing."""

    name: str
    types: frozenset[str]
    pattern: re.Pattern[str]
    fatal_at_start: bool


# Known start-up errors, in one place. A CUDA out-of-memory and tensors on different devices
# have their own classes and hints (_OOM, _DEVICE_MISMATCH).
STARTUP_ERRORS = (
    # The PyTorch guide's init_process_group(..., rank=os.environ['RANK'], ...), typed as read:
    # torch's rendezvous refuses strings, naming this rank's value ("`rank` must be an integer. 3").
    # A RuntimeError: only this entry makes it fatal at start (a code bug, the same everywhere).
    KnownError(
        "int_env", frozenset({"RuntimeError"}), re.compile(r"`(rank|world_size)` must be an integer"), True
    ),
    # No GPU for nccl: the same on every rank of every node is the job's configuration; on one
    # node only, a bad node (the start-up rule then retries: it needs the failure on every node).
    KnownError(
        "nccl_without_gpu",
        frozenset({"RuntimeError", "DistBackendError", "AssertionError"}),
        re.compile(
            r"Distributed package doesn't have NCCL built in|ProcessGroupNCCL is only supported with GPUs"
            r"|Torch not compiled with CUDA enabled|Found no NVIDIA driver|No CUDA GPUs are available"
        ),
        True,
    ),
)


@dataclass(frozen=True)
class Classified:
    kind: FailureClass
    retryable: bool
    hint: str | None
    # No retry cures it when it stops the run's first attempt on every rank before the first
    # step (policy.decide's start-up rule): a missing module, every error that is never retried
    # anyway (by its type), and a known start-up error whose entry says so (data).
    fatal_at_start: bool = False
    known: str | None = None  # the STARTUP_ERRORS entry it is


def is_peer_loss(message: str) -> bool:
    return bool(_PEER_LOSS.search(message or ""))


def known_startup_error(error_type: str | None, message: str) -> KnownError | None:
    """The STARTUP_ERRORS entry for an exception of class `error_type` saying `message`: only
    among the entries for that class (None: a log line, which names no exception for sure)."""
    if error_type is None:
        return None
    return next((k for k in STARTUP_ERRORS if error_type in k.types and k.pattern.search(message)), None)


def classify(*, exitcode: int | None, error_type: str | None, message: str) -> Classified:
    """The failure's class, from its exception type (and exit code) first; a known start-up
    error (STARTUP_ERRORS) adds its name, its fix and, as its entry says, fatal_at_start."""
    base = _classify(exitcode=exitcode, error_type=error_type, message=message)
    known = known_startup_error(error_type, message or "")
    if known is None or base.kind in (FailureClass.PREEMPTED, FailureClass.STALE, FailureClass.HANG):
        return base
    return replace(
        base,
        hint=HINTS[known.name],
        known=known.name,
        fatal_at_start=base.fatal_at_start or known.fatal_at_start,
    )


def _classify(*, exitcode: int | None, error_type: str | None, message: str) -> Classified:
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
        return Classified(FailureClass.DEVICE_MISMATCH, False, HINTS["device_mismatch"], fatal_at_start=True)
    if error_type in NON_RETRYABLE_TYPES:
        return Classified(FailureClass.USER_ERROR, False, HINTS["user_error"], fatal_at_start=True)
    if error_type in MISSING_TYPES:
        return Classified(FailureClass.MISSING, True, HINTS["missing"], fatal_at_start=True)
    if error_type is None and exitcode == USAGE_EXIT_CODE and _USAGE_ERROR.search(message or ""):
        return Classified(FailureClass.USER_ERROR, False, HINTS["usage"], fatal_at_start=True)
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
    message: str  # whole, as recorded; `head` is what is decided on, stored and shown
    where: str | None = None  # FILE:LINE of the job's code that raised it, from its record

    @property
    def head(self) -> str:
        return self.message[:MESSAGE_LIMIT]

    def without_secrets(self, secrets: Sequence[str]) -> RankFailure:
        """This failure with each of `secrets` (the job.pass_env values) redacted from its whole
        message, and a message that ends with a secret's first characters (cut before it reached
        us) ending with the redaction marker instead: it goes into events.jsonl."""
        message = redact_text(self.message, secrets)
        return self if message == self.message else replace(self, message=message)

    @property
    def who(self) -> str:
        if self.rank is None:
            return "the step" if self.node_rank is None else f"node {self.node_rank}"
        return f"rank {self.rank}" if self.node_rank is None else f"rank {self.rank} (node {self.node_rank})"

    @property
    def describe(self) -> str:
        if self.error_type == LAUNCHER_TYPE:  # the message names the process and what happened
            return self.head
        if self.error_type == HANG_TYPE:
            how = "hung"
        elif self.exitcode < 0:
            how = f"killed by {signal.Signals(-self.exitcode).name}"
        else:
            how = f"exit code {self.exitcode}"
        at = f" (at {self.where})" if self.where else ""
        return f"{self.who} {how}: {self.head}{at}" if self.message else f"{self.who} {how}{at}"

    @property
    def classified(self) -> Classified:
        return classify(exitcode=self.exitcode, error_type=self.error_type, message=self.head)

    @property
    def own(self) -> bool:
        """Whether the rank failed of its own accord: not stopped (on request, by a signal such
        as the supervisor's stop), not a peer's victim, not a launcher or a hang."""
        return (
            self.rank is not None
            and (self.error_type is not None or self.exitcode > 0)
            and self.error_type not in (LAUNCHER_TYPE, HANG_TYPE)
            and not self.is_stop_on_request
            and not is_peer_loss(self.head)
        )

    @property
    def signature(self) -> tuple[str | None, str]:
        """What two ranks share when they failed the same way: the class and the message, or
        the known error it is (its message may name the rank: "`rank` must be an integer. 3")."""
        return self.error_type, self.classified.known or self.head

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
            "message": self.head,
            "where": self.where,
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
            message=message,
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
            message=text,
            where=str(record["where"]) if record.get("where") else None,
        )


def one_failure_everywhere(failures: Sequence[RankFailure], *, nodes: int, ranks_per_node: int) -> bool:
    """Whether the job failed alike everywhere, not one rank or one node of it: every rank that
    failed of its own accord (RankFailure.own) failed the same way (.signature), and those ranks
    are the whole world, or more than one rank with one on every node.

    Ranks that the stop after the first failure ended before they could fail (our SIGTERM, a
    node agent's stop, srun's --kill-on-bad-exit) count neither way. Locally the loop lets the
    others fail on their own first (loop.START_FAILURE_SETTLE_S), and an error every rank meets
    is then recorded by every rank; across nodes a node's first failure stops its others, so
    every node having failed alike is the most that can be asked. A single rank failing alone
    (a missing node-local shard) or one node's ranks (a node without GPUs) is not enough: a
    retry may not meet it."""
    own = [f for f in failures if f.own]
    if len({f.signature for f in own}) != 1:
        return False
    ranks = {f.rank for f in own}
    if len(ranks) == nodes * ranks_per_node:
        return True
    on_nodes = {f.node_rank if f.node_rank is not None else (f.rank or 0) // ranks_per_node for f in own}
    return len(ranks) > 1 and len(on_nodes) == nodes


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
    if seen is not None and not is_peer_loss(seen.head):
        recorded = [
            f
            for f in failures
            if f.error_type is not None and not f.is_stop_on_request and not is_peer_loss(f.head)
        ]
        if seen.is_stop_on_request:
            return min(recorded, key=lambda f: f.time) if recorded else seen
        earlier = [f for f in recorded if f.time < seen.time]
        return min(earlier, key=lambda f: f.time) if earlier else seen
    real = [f for f in failures if not f.is_stop_on_request]
    primary = [f for f in real if not is_peer_loss(f.head)]
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
            return line.strip()
    return exception_line(lines)


def exception_line(lines: Sequence[str]) -> str:
    """The line a person reads first in a crashed process's output: the exception of the last
    traceback (the first line after its header that is not indented), else the last line that
    looks like an error."""
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
    if starts:
        for line in lines[starts[-1] + 1 :]:
            if line.strip() and not line[0].isspace():
                return line.strip()
    for line in reversed(lines):
        stripped = line.strip()
        if (
            stripped
            and not stripped.startswith(("File ", "^", "~"))
            and ("Error" in stripped or "Exception" in stripped or ": " in stripped)
        ):
            return stripped
    return lines[-1].strip() if lines else ""
