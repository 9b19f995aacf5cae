"""Whether a local run's supervisor still runs, and whether a recorded pid may be signalled.

A run directory is not always its owner's alone: a shared folder, or a team's object store (no
POSIX permissions at all), lets others write its events. So a `run_started` (or `sweep_started`)
record is a claim to check, never a fact. Pids are reused, and a record may name any process:

- alive (`orch status`): the recorded pid runs, and started when the record says (`pid_started`,
  which orch always writes): a reused pid started later;
- signalled (`orch cancel`): alive as above, and it holds the directory's claim
  (storage/rundir.py: a starter takes it before it records its start and holds it past its
  end). Who holds a claim is written in its lock file by the holder itself, in a file of ours
  that is never read through a link nor when another user's, so no record can forge it; and
  only orch's own starters hold it, whatever process they are (`orch run`, `orch resume`, a
  notebook calling the API), so no command line needs guessing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from orchestrator.errors import OrchError

if TYPE_CHECKING:
    from orchestrator.storage.rundir import RunDir
    from orchestrator.storage.sweepdir import SweepDir

# psutil derives a start time from the boot time and clock ticks: equal for one process read
# twice; a reused pid started later (by at least a tick, far more in practice).
START_TIME_TOLERANCE_S = 0.5


class NotTheSupervisor(OrchError):
    """A recorded pid that is not, or cannot be shown to be, the supervisor that wrote the record:
    it is never signalled. `str()` says why, in one line."""


class SupervisorGone(NotTheSupervisor):
    """The recorded supervisor no longer runs (exited, or its pid is another process's now)."""


def process_start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None if there is none."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None


def supervisor_alive(start: Mapping[str, Any]) -> bool:
    """Whether the supervisor that wrote `start` (a run_started or sweep_started event on this
    host) still runs: its pid, with the start time the record gives. Another user's process,
    which this user may not inspect, counts as alive: nothing here can tell."""
    import psutil

    try:
        _recorded_process(start)
    except NotTheSupervisor:
        return False
    except psutil.AccessDenied:
        return True
    return True


def supervisor_to_signal(start: Mapping[str, Any], directory: RunDir | SweepDir) -> int:
    """The pid `orch cancel` may send SIGTERM: the supervisor that `start` records, shown to be it
    (its start time, and the claim of `directory`, a RunDir or SweepDir, held by it).
    SupervisorGone when it no longer runs; NotTheSupervisor (one line) when the record names a
    process it cannot be shown to be."""
    import psutil

    from orchestrator.storage.rundir import this_host

    try:
        pid = _recorded_process(start).pid
    except psutil.AccessDenied:
        raise NotTheSupervisor(
            f"pid {start.get('pid')} is another user's process; not signalling it"
        ) from None
    holder = _claim_holder(directory)
    if holder is None:  # nothing holds the claim: no supervisor is at work on it
        raise SupervisorGone(f"its supervisor (pid {pid}) is gone")
    if holder.get("pid") != pid or holder.get("host") != this_host():
        held_by = f"pid {holder['pid']} on {holder.get('host')}" if holder.get("pid") else "another process"
        raise NotTheSupervisor(
            f"pid {pid}, which its events name as its supervisor, does not hold its claim"
            f" ({held_by} does); not signalling it"
        )
    return pid


def _recorded_process(start: Mapping[str, Any]) -> Any:
    """The psutil.Process that `start` names, running and started when `start` says:
    NotTheSupervisor for a record orch did not write, SupervisorGone for a process gone or
    replaced; psutil.AccessDenied passes through (another user's process)."""
    import psutil

    pid, started = _recorded_pid(start)
    gone = SupervisorGone(f"its supervisor (pid {pid}) is gone")
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            raise gone
        created = proc.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        raise gone from None
    if abs(created - started) >= START_TIME_TOLERANCE_S:
        raise gone  # the pid was reused: another process has it now
    return proc


def _recorded_pid(start: Mapping[str, Any]) -> tuple[int, float]:
    """(pid, pid_started) of a start record, checked for the form orch writes them in. A pid of
    0 or below would make os.kill signal a whole process group, or every process of ours."""
    pid, started = start.get("pid"), start.get("pid_started")
    event = start.get("event", "start")
    if type(pid) is not int or pid <= 0:
        raise NotTheSupervisor(f"events.jsonl: {event} names {pid!r}, which is no pid; not signalling it")
    if type(started) not in (int, float) or not math.isfinite(started):  # NaN would match any time
        raise NotTheSupervisor(
            f"events.jsonl: {event} names pid {pid} without a valid start time (pid_started);"
            " not signalling it"
        )
    return pid, float(started)


def _claim_holder(directory: RunDir | SweepDir) -> dict[str, Any] | None:
    """What the holder of `directory`'s claim wrote of itself (pid, host, since), or None when no
    one holds it. Learnt by trying to take it (released at once): a lock file that is a link or
    another user's is refused, so what it says is what one of our own processes wrote."""
    from orchestrator.storage.rundir import DirectoryClaimed

    try:
        claim = directory.claim()
    except DirectoryClaimed as held:
        return held.holder
    except OSError as exc:  # NotPrivate (a link, another user's), or storage that refuses it
        from orchestrator.storage.causes import storage_cause

        raise NotTheSupervisor(f"cannot read who holds its claim: {storage_cause(exc)}") from None
    claim.release()
    return None
