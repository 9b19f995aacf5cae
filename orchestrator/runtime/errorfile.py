"""Each rank writes an error file on an uncaught exception, so the supervisor can name the
root cause (type, message, traceback, time) instead of guessing from exit codes."""

from __future__ import annotations

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


def write_record(kind: str, message: str, *, path: str | None = None, **extra: object) -> None:
    """Write this rank's exit record (an error, or a preemption) atomically."""
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
        pass  # the traceback still reaches the rank's log


def install_excepthook() -> None:
    """Record uncaught exceptions in the error file (ORCH_ERROR_FILE), then let Python print them as usual."""
    global _installed
    if _installed:
        return
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            write_error_file(exc)
        previous(exc_type, exc, tb)

    sys.excepthook = hook
    _installed = True
