"""A run's state, derived from its events (the source of truth) plus its checkpoints."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.storage.ckpt_store import newest_committed
from orchestrator.storage.rundir import RunDir, this_host


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    run_dir: str
    state: str  # created | running | succeeded | failed | stopped | lost
    attempts: int
    current_attempt: int | None
    started: float | None
    finished: float | None
    wall_s: float | None
    root_cause: dict[str, Any] | None
    newest_checkpoint: int | None
    newest_checkpoint_digest: str | None
    backend: str | None
    job_id: str | None = None
    slurm_state: str | None = None
    warnings: tuple[str, ...] = ()
    goodput: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def summarize(events: list[dict[str, Any]], *, supervisor_alive: bool | None = None, now: float | None = None) -> dict[str, Any]:
    """Fold the event ledger into state fields. Pure: liveness is passed in."""
    state = "created"
    attempts = 0
    current = None
    started = finished = None
    root = None
    backend = None
    job_id = None
    warnings: list[str] = []
    for ev in events:
        kind = ev.get("event")
        if kind == "submitted":
            state, started, backend, job_id = "pending", ev.get("time"), ev.get("backend"), ev.get("job_id")
        elif kind == "job_started":
            state = "running"
            backend = ev.get("backend", backend)
        elif kind in ("preempted", "requeued") and backend == "slurm":
            state = "preempted-requeued"
        elif kind == "warning":
            warnings.append(str(ev.get("message")))
        elif kind == "run_started":
            state, started, backend = "running", ev.get("time"), ev.get("backend")
        elif kind == "attempt_started":
            attempts = max(attempts, int(ev.get("attempt", 0)) + 1)
            current = int(ev.get("attempt", 0))
            if state != "pending":
                state = "running"
        elif kind == "attempt_ended":
            if ev.get("root_cause"):
                root = ev["root_cause"]
        elif kind == "run_finished":
            state = ev.get("status", "failed")
            finished = ev.get("time")
            root = ev.get("root_cause") or (root if state != "succeeded" else None)
            current = None
    if state == "running" and supervisor_alive is False:
        state = "lost"  # the supervisor died without writing run_finished
    end = finished if finished is not None else (now if now is not None else time.time())
    return {
        "state": state,
        "attempts": attempts,
        "current_attempt": current,
        "started": started,
        "finished": finished,
        "wall_s": round(end - started, 3) if started is not None else None,
        "root_cause": root,
        "backend": backend,
        "job_id": job_id,
        "warnings": tuple(dict.fromkeys(warnings)),
    }


def merge_scheduler_state(fields: dict[str, Any], mapped: str | None, raw: str | None) -> dict[str, Any]:
    """Events are the truth for what the supervisor saw; the scheduler for what it could not
    write (still queued, requeued, or killed before it could record its end). Pure."""
    fields = dict(fields)
    if fields["state"] in ("succeeded", "failed", "stopped", "cancelled") or mapped is None:
        return fields
    if mapped in ("pending", "preempted-requeued"):
        fields["state"] = mapped
    elif mapped == "running":
        fields["state"] = "running"
    elif mapped in ("succeeded", "cancelled"):
        fields["state"] = mapped
    else:
        fields["state"] = "failed"
        fields["root_cause"] = fields.get("root_cause") or {"rank": None, "message": f"Slurm job ended {raw} before the supervisor recorded an outcome"}
    return fields


def run_status(run: RunDir) -> RunStatus:
    events = run.events()
    alive = None
    starts = [e for e in events if e.get("event") == "run_started"]
    if starts and starts[-1].get("host") == this_host() and starts[-1].get("pid"):
        alive = _pid_alive(int(starts[-1]["pid"]))
    fields = summarize(events, supervisor_alive=alive)
    raw = None
    if fields.get("job_id"):
        from orchestrator.backends.slurm.scheduler import map_state, scheduler_state

        raw = scheduler_state(str(fields["job_id"]))
        fields = merge_scheduler_state(fields, map_state(raw), raw)
    newest = newest_committed(run.child("ckpt"))
    from orchestrator.supervision.goodput import ledger

    return RunStatus(
        goodput=ledger(events, now=None if fields["state"] in ("succeeded", "failed", "stopped", "cancelled") else time.time()),
        run_id=run.run_id,
        run_dir=run.url,
        newest_checkpoint=newest.step if newest else None,
        newest_checkpoint_digest=newest.model_digest if newest else None,
        slurm_state=raw,
        **fields,
    )


def format_status(st: RunStatus) -> str:
    lines = [f"run        {st.run_id}", f"state      {st.state}"]
    if st.job_id:
        lines.append(f"slurm job  {st.job_id} ({st.slurm_state or 'unknown to the scheduler'})")
    if st.current_attempt is not None:
        lines.append(f"attempt    {st.current_attempt} (of {st.attempts} started)")
    else:
        lines.append(f"attempts   {st.attempts}")
    if st.wall_s is not None:
        lines.append(f"wall time  {st.wall_s:.1f}s")
    if st.newest_checkpoint is not None:
        digest = (st.newest_checkpoint_digest or "")[:16]
        lines.append(f"checkpoint step {st.newest_checkpoint}" + (f" (model digest {digest})" if digest else ""))
    else:
        lines.append("checkpoint none committed")
    if st.root_cause and st.state != "succeeded":
        rc = st.root_cause
        lines.append(f"root cause rank {rc.get('rank')} (node {rc.get('node_rank')}): exit {rc.get('exitcode')} {rc.get('message') or ''}".rstrip())
    if st.goodput is not None:
        from orchestrator.supervision.goodput import format_goodput

        lines.append(format_goodput(st.goodput))
    for warning in st.warnings:
        lines.append(f"warning    {warning}")
    lines.append(f"run dir    {st.run_dir}")
    return "\n".join(lines)
