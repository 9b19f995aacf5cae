"""A run's state, derived from its events (the source of truth) plus its checkpoints."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.contract import Event
from orchestrator.storage.ckpt_store import newest_committed
from orchestrator.storage.goodput import format_goodput, ledger
from orchestrator.storage.rundir import RunDir


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


@dataclass(frozen=True)
class LiveState:
    """What a backend knows of a run beyond its events (Backend.live_state)."""

    supervisor_alive: bool | None = None  # None: cannot tell from here
    scheduler_state: str | None = None  # a RunState value the scheduler's state maps to
    scheduler_raw: str | None = None  # the scheduler's own word for it (Slurm: RUNNING...)


def summarize(
    events: list[dict[str, Any]], *, supervisor_alive: bool | None = None, now: float | None = None
) -> dict[str, Any]:
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
        if kind == Event.SUBMITTED:
            state, started, backend, job_id = "pending", ev.get("time"), ev.get("backend"), ev.get("job_id")
        elif kind == Event.JOB_STARTED:
            state = "running"
            backend = ev.get("backend", backend)
        elif kind in (Event.PREEMPTED, Event.REQUEUED):  # until the next attempt starts
            state = "preempted-requeued"
        elif kind == Event.WARNING:
            warnings.append(str(ev.get("message")))
        elif kind == Event.RUN_STARTED:
            state, started, backend = "running", ev.get("time"), ev.get("backend")
        elif kind == Event.ATTEMPT_STARTED:
            attempts = max(attempts, int(ev.get("attempt", 0)) + 1)
            current = int(ev.get("attempt", 0))
            if state != "pending":
                state = "running"
        elif kind == Event.ATTEMPT_ENDED:
            if ev.get("root_cause"):
                root = ev["root_cause"]
        elif kind == Event.RUN_FINISHED:
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
        fields["root_cause"] = fields.get("root_cause") or {
            "rank": None,
            "message": f"Slurm job ended {raw} before the supervisor recorded an outcome",
        }
    return fields


def run_status(run: RunDir, events: list[dict[str, Any]], live: LiveState) -> RunStatus:
    fields = summarize(events, supervisor_alive=live.supervisor_alive)
    if live.scheduler_raw is not None or fields.get("job_id"):
        fields = merge_scheduler_state(fields, live.scheduler_state, live.scheduler_raw)
    newest = newest_committed(run.child("ckpt"))
    finished = fields["state"] in ("succeeded", "failed", "stopped", "cancelled")
    return RunStatus(
        goodput=ledger(events, now=None if finished else time.time()),
        run_id=run.run_id,
        run_dir=run.url,
        newest_checkpoint=newest.step if newest else None,
        newest_checkpoint_digest=newest.model_digest if newest else None,
        slurm_state=live.scheduler_raw,
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
        lines.append(
            f"checkpoint step {st.newest_checkpoint}" + (f" (model digest {digest})" if digest else "")
        )
    else:
        lines.append("checkpoint none committed")
    if st.root_cause and st.state != "succeeded":
        rc = st.root_cause
        who = "the step" if rc.get("rank") is None else f"rank {rc.get('rank')}"
        if rc.get("node_rank") is not None:
            who += f" (node {rc['node_rank']})"
        lines.append(f"root cause {who}: exit {rc.get('exitcode')} {rc.get('message') or ''}".rstrip())
    if st.goodput is not None:
        lines.append(format_goodput(st.goodput))
    for warning in st.warnings:
        lines.append(f"warning    {warning}")
    lines.append(f"run dir    {st.run_dir}")
    return "\n".join(lines)
