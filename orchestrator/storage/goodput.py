"""The goodput ledger: where a run's wall time went, from its events alone. Pure; read by
`orch status` and by rank 0's Metrics (TensorBoard `orch/goodput`), hence here beside the ledger.

Per attempt (from `attempt_started` to `attempt_ended`):
- start-up: until rank 0's first training step (`training_started`), minus the restore; and
  before a local run's first attempt, the launcher's warm-up (`run_started` to `attempt_started`);
- restore: loading the checkpoint (`restored`);
- checkpoint stall: how long saves blocked training (`checkpoint_committed.block_s`);
- lost work: on a failure, the training since the last committed checkpoint, which the next
  attempt does again;
- productive: the rest.
Between attempts: backoff waits; before the first: queue wait (Slurm: `submitted` to
`job_started`, and again for each requeue); stopped: from a stopped, failed or lost run's last
event to its `orch resume`.

An attempt that never ended (its supervisor died: the run is lost) ends at the run's last event,
as a failure: what it trained since its last commit is lost work.

A run directory may be written by others: an event without a time a clock can show has no place
on the timeline and is left out, and a duration or attempt not of the type orch writes is read as
absent (storage/recorded.py).
"""

from __future__ import annotations

from typing import Any, Iterable

from orchestrator.contract import Event
from orchestrator.storage.recorded import moment, ordinal, seconds

CAUSES = ("queue", "startup", "restore", "checkpoint", "lost_work", "backoff", "stopped", "other")


def ledger(events: Iterable[dict[str, Any]], now: float | None = None) -> dict[str, Any]:
    timed = sorted(((t, e) for e in events if (t := moment(e)) is not None), key=lambda te: te[0])
    lost = dict.fromkeys(CAUSES, 0.0)
    productive = 0.0
    attempts: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    waiting_since: float | None = None  # submitted or requeued, not yet running
    backoff_since: float | None = None
    launching_since: float | None = None
    first = last = None
    for t, ev in timed:
        kind = ev.get("event")
        first = t if first is None else first
        if kind == Event.RESUMED:
            stopped_at = last if last is not None else t  # the run's last sign of life
            if current is not None:  # the lost attempt ended there
                attempts.append(_close(current, stopped_at, "lost", lost))
                productive += attempts[-1]["productive_s"]
                current = None
            lost["stopped"] += t - stopped_at
        last = t
        if kind == Event.RUN_STARTED:
            launching_since = t  # the launcher warms up (the fork server imports torch)
        elif kind in (Event.SUBMITTED, Event.REQUEUED):
            waiting_since = t
        elif kind == Event.JOB_STARTED and waiting_since is not None:
            lost["queue"] += t - waiting_since
            waiting_since = None
        elif kind == Event.RESTART_SCHEDULED:
            backoff_since = t
        elif kind == Event.ATTEMPT_STARTED:
            if launching_since is not None:
                lost["startup"] += t - launching_since
                launching_since = None
            if backoff_since is not None:
                lost["backoff"] += t - backoff_since
                backoff_since = None
            current = {
                "attempt": ordinal(ev.get("attempt")),
                "start": t,
                "training_started": None,
                "restore_s": 0.0,
                "stall_s": 0.0,
                "last_commit": None,
            }
        elif current is not None and kind == Event.RESTORED:
            current["restore_s"] = seconds(ev.get("restore_s")) or 0.0
        elif current is not None and kind == Event.TRAINING_STARTED:
            current["training_started"] = t
        elif current is not None and kind == Event.CHECKPOINT_COMMITTED:
            current["stall_s"] += seconds(ev.get("block_s")) or 0.0
            current["last_commit"] = t
        elif current is not None and kind == Event.ATTEMPT_ENDED:
            attempts.append(_close(current, t, ev.get("status", "failed"), lost))
            productive += attempts[-1]["productive_s"]
            current = None
    if current is not None and now is not None:  # an attempt still running
        attempts.append(_close(current, now, "running", lost))
        productive += attempts[-1]["productive_s"]
        last = now
    elif current is not None and last is not None:  # lost: nothing runs, the clock has stopped
        attempts.append(_close(current, last, "lost", lost))
        productive += attempts[-1]["productive_s"]
    wall = (last - first) if first is not None and last is not None else 0.0
    accounted = productive + sum(lost.values())
    lost["other"] += max(0.0, wall - accounted)  # gaps the events do not explain
    return {
        "wall_s": round(wall, 3),
        "productive_s": round(productive, 3),
        "goodput": round(productive / wall, 4) if wall > 0 else None,
        "lost_s": {k: round(v, 3) for k, v in lost.items()},
        "attempts": attempts,
    }


def _close(a: dict[str, Any], end: float, status: str, lost: dict[str, float]) -> dict[str, Any]:
    wall = end - a["start"]
    # Jobs that do not use the runtime's Checkpointer never say when training began: count
    # their whole attempt as training.
    trained_from = a["training_started"] if a["training_started"] is not None else a["start"]
    startup_and_restore = max(0.0, trained_from - a["start"])
    restore = min(a["restore_s"], startup_and_restore)
    startup = startup_and_restore - restore
    training = max(0.0, end - trained_from)
    stall = min(a["stall_s"], training)
    lost_work = 0.0
    if status in ("failed", "lost"):
        since = a["last_commit"] if a["last_commit"] is not None else trained_from
        lost_work = max(0.0, end - max(since, trained_from))
    productive = max(0.0, training - stall - lost_work)
    lost["startup"] += startup
    lost["restore"] += restore
    lost["checkpoint"] += stall
    lost["lost_work"] += lost_work
    return {
        "attempt": a["attempt"],
        "status": status,
        "wall_s": round(wall, 3),
        "startup_s": round(startup, 3),
        "restore_s": round(restore, 3),
        "checkpoint_stall_s": round(stall, 3),
        "lost_work_s": round(lost_work, 3),
        "productive_s": round(productive, 3),
    }


def format_goodput(summary: dict[str, Any]) -> str:
    if summary["goodput"] is None:
        return "goodput    -"
    lost = ", ".join(f"{k.replace('_', ' ')} {v:.1f}s" for k, v in summary["lost_s"].items() if v >= 0.05)
    return (
        f"goodput    {summary['goodput'] * 100:.1f}%"
        f" ({summary['productive_s']:.1f}s productive of {summary['wall_s']:.1f}s"
        + (f"; lost: {lost})" if lost else ")")
    )
