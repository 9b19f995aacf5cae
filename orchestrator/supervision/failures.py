"""Failure classes: what went wrong in an attempt, whether a retry can help, and what to do.

Both supervisors (local and Slurm) classify the root-cause rank's failure with `classify`
and apply `retry_allowed`. Pure functions over the error record a rank left behind.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass

from orchestrator.contract import PREEMPTED_EXIT_CODE, PREEMPTED_TYPE

# Errors that fail the same way every time: restarting cannot help.
NON_RETRYABLE_TYPES = frozenset({
    "SyntaxError", "IndentationError", "ImportError", "ModuleNotFoundError", "NameError",
    "AttributeError", "TypeError", "FileNotFoundError", "KeyError", "NotImplementedError",
})

_PEER_LOSS = re.compile(
    r"(Connection closed by peer|Connection reset by peer|Broken pipe|connection refused|"
    r"DistNetworkError|DistStoreError|DistBackendError|Socket Timeout|timed out|Timeout|"
    r"NCCL communicator was aborted|Gloo connectFullMesh failed|ECONNRESET|EPIPE)",
    re.IGNORECASE,
)
_OOM = re.compile(r"(OutOfMemoryError|out of memory|MemoryError|CUBLAS_STATUS_ALLOC_FAILED|std::bad_alloc)", re.IGNORECASE)
_DEVICE_MISMATCH = re.compile(r"Expected all tensors to be on the same device|Input type \(.*\) and weight type \(.*\) should be the same")

HINTS = {
    "oom": "out of memory: lower the per-rank batch size (keep the global batch with gradient accumulation), use AMP, or give each rank more memory (resources.memory / fewer ranks per node)",
    "device_mismatch": "tensors on different devices: move the model once with model.to(ctx.device) before wrapping it in DDP, and every batch with batch.to(ctx.device) before the forward pass",
    "communication": "a peer was lost or a collective timed out: this rank is usually a victim; look at the other ranks' errors (and the hang watchdog) for the first failure",
    "user_error": "this error repeats on every attempt, so it was not retried: fix the code or the config and submit again",
    "hang": "the rank stopped making progress; its Python stacks were dumped into its log",
    "signal": "the rank was killed by a signal from outside (the kernel's OOM killer sends SIGKILL; check `dmesg` and resources.memory)",
}


@dataclass(frozen=True)
class Classified:
    kind: str  # preempted | oom | device_mismatch | communication | user_error | hang | signal | error
    retryable: bool
    hint: str | None


def is_peer_loss(message: str) -> bool:
    return bool(_PEER_LOSS.search(message or ""))


def classify(*, exitcode: int | None, error_type: str | None, message: str) -> Classified:
    text = f"{error_type or ''}: {message or ''}"
    if exitcode == PREEMPTED_EXIT_CODE or error_type == PREEMPTED_TYPE:
        return Classified("preempted", True, None)
    if error_type == "Hang":
        return Classified("hang", True, HINTS["hang"])
    if _OOM.search(text):
        return Classified("oom", True, HINTS["oom"])
    if _DEVICE_MISMATCH.search(text):
        return Classified("device_mismatch", False, HINTS["device_mismatch"])
    if error_type in NON_RETRYABLE_TYPES:
        return Classified("user_error", False, HINTS["user_error"])
    if is_peer_loss(text):
        return Classified("communication", True, HINTS["communication"])
    if error_type is None and exitcode is not None and exitcode < 0:
        hint = HINTS["signal"] if exitcode == -signal.SIGKILL else None
        return Classified("signal", True, hint)
    return Classified("error", True, None)
