"""Named failure points for fault-injection tests (a failpoint, as in databases).

`ORCH_FAULT=<point>[@N][:<action>]` makes the N-th (default 1st) pass through `<point>` in this
process crash (`exit`, the default: os._exit(86), like a kill at that instant), raise
(`enospc`, `eio`; `nomem` and `runtime` raise MemoryError and RuntimeError) or stall
(`sleep=SECONDS`, a slow disk). Unset, a point costs one dict lookup.
"""

from __future__ import annotations

import errno
import os
import time

from orchestrator.contract import ENV_FAULT

_counts: dict[str, int] = {}
CRASH_EXIT_CODE = 86


def _parse(spec: str) -> tuple[str, int, str]:
    point, _, action = spec.partition(":")
    point, _, nth = point.partition("@")
    return point, int(nth or 1), action or "exit"


def reset() -> None:
    """Forget how often each point was passed (a test that sets ORCH_FAULT in-process)."""
    _counts.clear()


def fault_point(name: str) -> None:
    spec = os.environ.get(ENV_FAULT)
    if not spec:
        return
    point, nth, action = _parse(spec)
    if point != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] != nth:
        return
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
