"""Each rank writes an error file on an uncaught exception, so the supervisor can name the
root cause (type, message, traceback, time) instead of guessing from exit codes."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from types import TracebackType

from orchestrator.contract import ENV_ERROR_FILE, error_record

_installed = False


def write_error_file(exc: BaseException, path: str | None = None) -> None:
    write_record(
        type(exc).__name__,
        str(exc)[:4000],
        path=path,
        traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-20000:],
    )


# Blank bytes the error file holds from the rank's start (blank reads as "no record"): when the
# run directory's disk is full at the moment of failure, often because of that failure, the
# record is written over them instead of being lost with the root cause it names.
RESERVED_BYTES = 8192


def reserve(path: str | None = None) -> None:
    """Allocate this rank's error file now, as blank space, unless it exists."""
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
    if not path:
        return
    record = error_record(
        kind, message, rank=int(os.environ.get("RANK", "-1")), time=time.time(), pid=os.getpid(), **extra
    )
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(record, fh)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        _write_in_reserved_space(path, record)


def _write_in_reserved_space(path: str, record: dict[str, object]) -> None:
    """Overwrite the blank space `reserve` allocated (no new blocks needed), without the
    traceback (it also reaches the rank's log) and with the message cut to fit."""
    fitted = {k: v for k, v in record.items() if k != "traceback"}
    fitted["message"] = str(record.get("message", ""))[: RESERVED_BYTES // 2]
    body = json.dumps(fitted).encode()
    try:
        size = os.path.getsize(path)
        if size < len(body):
            return  # not reserved, or holding a longer record: nothing fits safely
        fd = os.open(path, os.O_WRONLY)
    except OSError:
        return  # the traceback still reaches the rank's log
    try:
        os.pwrite(fd, body.ljust(size, b" "), 0)
    except OSError:
        pass
    finally:
        os.close(fd)


def install_excepthook() -> None:
    """Record uncaught exceptions in the error file (ORCH_ERROR_FILE), then let Python print them as usual."""
    global _installed
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
