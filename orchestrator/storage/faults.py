"""Named failure points for fault-injection tests (a failpoint, as in databases).

`ORCH_FAULT=<point>[@N][:<action>]` makes the N-th (default 1st) pass through `<point>` in this
process crash (`exit`, the default: os._exit(86), like a kill at that instant), raise
(`enospc`, `eio`; `nomem` and `runtime` raise MemoryError and RuntimeError) or stall
(`sleep=SECONDS`, a slow disk). Several faults: comma-separated (`ckpt.write:enospc,
ckpt.discard:eio`: a save fails, then so does the clean-up). Unset, a point costs one dict
lookup.

A test must know that its fault fired: a renamed or moved point would otherwise leave it
testing nothing. Each firing is remembered in this process (`fired()`) and, when
`ORCH_FAULT_RECORD` names a file, appended to it before the action (a crash leaves the line
behind: it is written before os._exit), for a test that injects into another process
(`read_record`).
"""

from __future__ import annotations

import errno
import os
import time

from orchestrator.contract import ENV_FAULT

ENV_FAULT_RECORD = "ORCH_FAULT_RECORD"
CRASH_EXIT_CODE = 86
_counts: dict[str, int] = {}
_fired: list[str] = []


def _parse(spec: str) -> tuple[str, int, str]:
    point, _, action = spec.partition(":")
    point, _, nth = point.partition("@")
    return point, int(nth or 1), action or "exit"


def reset() -> None:
    """Forget how often each point was passed (a test that sets ORCH_FAULT in-process)."""
    _counts.clear()
    _fired.clear()


def fired() -> list[str]:
    """The faults that fired in this process since the last reset(), as `point@N`."""
    return list(_fired)


def read_record(path: str | os.PathLike[str]) -> list[str]:
    """The faults that fired in the processes that shared the record file `path`."""
    try:
        with open(path, encoding="utf-8") as fh:
            return [line.strip() for line in fh if line.strip()]
    except FileNotFoundError:
        return []


def _remember(name: str, nth: int) -> None:
    _fired.append(f"{name}@{nth}")
    path = os.environ.get(ENV_FAULT_RECORD)
    if path:
        # One O_APPEND write: lines from several processes never interleave.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, f"{name}@{nth}\n".encode())
        finally:
            os.close(fd)


def fault_point(name: str) -> None:
    spec = os.environ.get(ENV_FAULT)
    if not spec or name not in spec:
        return
    for one in spec.split(","):
        point, nth, action = _parse(one.strip())
        if point != name:
            continue
        _counts[name] = _counts.get(name, 0) + 1
        if _counts[name] == nth:
            _remember(name, nth)
            _act(action)
        return


def _act(action: str) -> None:
    if action == "exit":
        os._exit(CRASH_EXIT_CODE)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if action == "eio":
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    if action == "nomem":  # not an OSError: the failures that used to skip the collectives
        raise MemoryError("injected by ORCH_FAULT")
    if action == "runtime":
        raise RuntimeError("injected by ORCH_FAULT")
    if action.startswith("sleep="):
        time.sleep(float(action.split("=", 1)[1]))
        return
    raise ValueError(f"ORCH_FAULT: unknown action {action!r}")
