"""Whether a local run's supervisor still runs: by pid and the process's start time, on the
host recorded when it started (pids are reused; a pid alone could name a stranger)."""

from __future__ import annotations

from typing import Any


def process_start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None if there is none."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None


def supervisor_alive(start: dict[str, Any]) -> bool:
    """Whether the supervisor that wrote `start` (a run_started event on this host) still runs:
    the pid alone is not enough, pids are reused, so its start time must match too."""
    import psutil

    pid, started = int(start["pid"]), start.get("pid_started")
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        created = proc.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True
    # psutil derives the start time from boot time and clock ticks: equal for one process,
    # read twice; a reused pid started later.
    return started is None or abs(created - float(started)) < 0.5
