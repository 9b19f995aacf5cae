"""Each rank writes an error file on an uncaught exception, so the supervisor can name the
root cause (type, message, where, traceback, time) instead of guessing from exit codes.

The launchers record an uncaught exception too (orchestrator/launch/entry.py), from the job's
first line on; this hook is for ranks started otherwise (torchrun, a job.python of its own),
and its record, written first, is the one kept.

The job.pass_env values it redacts are every one the rank has seen: at this module's import, at
install_excepthook (runtime.init calls it first), at the failure. A job may remove a variable
once it has read it.
"""

from __future__ import annotations

import os
import sys
import time
from types import TracebackType

from orchestrator.contract import (
    ENV_ERROR_FILE,
    ERROR_FILE_RESERVED_BYTES,
    SeenSecrets,
    error_record,
    exception_record,
    write_error_record,
)

_installed = False
# Imported in a fork server (a preload), this sees the server's environment, not the rank's:
# the rank's own values come at install_excepthook.
_seen_secrets = SeenSecrets()
_seen_secrets.look(os.environ)

RESERVED_BYTES = ERROR_FILE_RESERVED_BYTES


def _rank() -> int:
    return int(os.environ.get("RANK", "-1"))


def write_error_file(exc: BaseException, path: str | None = None) -> None:
    """The record of `exc`, with the job.pass_env values it holds redacted (the supervisor
    copies its message into events.jsonl; the file itself is in the run directory)."""
    path = path or os.environ.get(ENV_ERROR_FILE)
    if path:
        secrets = _seen_secrets.look(os.environ)
        record = exception_record(exc, rank=_rank(), time=time.time(), pid=os.getpid(), secrets=secrets)
        write_error_record(path, record)


def reserve(path: str | None = None) -> None:
    """Allocate this rank's error file now, as blank space, unless it exists (see
    contract.ERROR_FILE_RESERVED_BYTES)."""
    path = path or os.environ.get(ENV_ERROR_FILE)
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return  # there already (a record, or reserved by an earlier call), or no directory
    try:
        os.write(fd, b" " * RESERVED_BYTES)
    except OSError:
        pass  # already full: the record then has only the usual way in
    finally:
        os.close(fd)


def write_record(kind: str, message: str, *, path: str | None = None, **extra: object) -> None:
    """Write this rank's exit record (an error, or a preemption) atomically; on a full disk,
    over the space reserved for it."""
    path = path or os.environ.get(ENV_ERROR_FILE)
    if path:
        record = error_record(kind, message, rank=_rank(), time=time.time(), pid=os.getpid(), **extra)
        write_error_record(path, record)


def install_excepthook() -> None:
    """Record uncaught exceptions in the error file (ORCH_ERROR_FILE), then let Python print them as usual."""
    global _installed
    _seen_secrets.look(os.environ)  # before the job can remove a variable it has read
    if _installed:
        return
    reserve()
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            write_error_file(exc)
        previous(exc_type, exc, tb)

    sys.excepthook = hook
    _installed = True
