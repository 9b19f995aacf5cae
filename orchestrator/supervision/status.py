"""A run's state, derived from its events (the source of truth) plus its checkpoints."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.contract import (
    FLIGHT_RECORDER_PREFIX,
    Event,
    rank_heartbeat_name,
    rank_of_file,
    read_heartbeat,
)
from orchestrator.storage.ckpt_store import newest_committed
from orchestrator.storage.goodput import format_goodput, ledger
from orchestrator.storage.recorded import label, moment, ordinal, whole
from orchestrator.storage.rundir import RunDir, safe_listdir

FINAL_STATES = ("succeeded", "failed", "stopped", "cancelled")


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    run_dir: str
    state: str  # created | pending | running | preempted-requeued | lost | one of FINAL_STATES
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
    progress: dict[str, Any] | None = None  # a running attempt: each rank's heartbeat, rate, ETA
    # The flight recorder's dumps (a collective timed out, or the watchdog found a hang).
    flight_recorder_dumps: tuple[str, ...] = ()
    # The divergence guard's findings, oldest first: {attempt, first_step, last_step} and, after
    # a rollback, {rolled_back_to, skipped_samples, rollback_attempt}.
    divergences: tuple[dict[str, Any], ...] = ()

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
    """Fold the event ledger into state fields. Pure: liveness is passed in. A value not of the
    type orch writes (a run directory others can write) is read as absent (storage/recorded.py)."""
    state = "created"
    attempts = 0
    current = None
    started = finished = None
    root = None
    backend = None
    job_id = None
    warnings: list[str] = []
    divergences: list[dict[str, Any]] = []
    cancel_requested = False
    # A `job_started` belongs to the latest submission before it, or, with none since the last
    # resume, to the next one: sbatch answers once the job is queued, and the job may start (and
    # write job_started, even run_finished) before `submitted` lands. Its late `submitted` does
    # not make the run pending again.
    submitted = job_started = False
    last_event_time = None
    for ev in events:
        kind, t = ev.get("event"), moment(ev)
        last_event_time = t if t is not None else last_event_time
        if kind == Event.RESUMED:  # the run goes on: its earlier end no longer stands
            finished, root, cancel_requested = None, None, False
            submitted = job_started = False
            state = "created"  # until the next attempt is submitted or started
        elif kind == Event.SUBMITTED:
            job_started = job_started and not submitted  # a later submission starts afresh
            submitted = True
            backend, job_id = label(ev.get("backend")), ev.get("job_id")
            started = started if started is not None else t
            if not job_started:
                state = "pending"
        elif kind == Event.CANCEL_REQUESTED:
            cancel_requested = True
        elif kind == Event.JOB_STARTED:
            state, job_started = "running", True
            backend = label(ev.get("backend")) or backend
        elif kind in (Event.PREEMPTED, Event.REQUEUED):  # until the next attempt starts
            state = "preempted-requeued"
        elif kind == Event.WARNING:
            warnings.append(str(ev.get("message")))
        elif kind == Event.DIVERGED:
            divergences.append(
                {
                    "attempt": ordinal(ev.get("attempt")),
                    "first_step": whole(ev.get("first_step")),
                    "last_step": whole(ev.get("last_step")),
                }
            )
        elif kind == Event.ROLLED_BACK and divergences:
            divergences[-1] = {
                **divergences[-1],
                "rolled_back_to": whole(ev.get("step")),
                "skipped_samples": ordinal(ev.get("skipped")),
                "rollback_attempt": ordinal(ev.get("attempt")),
            }
        elif kind == Event.RUN_STARTED:
            state, backend = "running", label(ev.get("backend"))
            started = started if started is not None else t
        elif kind == Event.ATTEMPT_STARTED:
            current = attempt_number(ev)
            attempts = max(attempts, current + 1)
            if state != "pending":
                state = "running"
        elif kind == Event.ATTEMPT_ENDED:
            root = root_cause_of(ev) or root
        elif kind == Event.RUN_FINISHED:
            state = outcome_of(ev)
            if state == "stopped" and cancel_requested:
                state = "cancelled"
            finished = t
            root = root_cause_of(ev) or (root if state == "failed" else None)
            current = None
    if state in ("running", "preempted-requeued") and supervisor_alive is False:
        state = "lost"  # the supervisor died without writing run_finished
    if state == "lost" or (state in FINAL_STATES and finished is None):
        end = last_event_time  # nothing runs: the clock stops at the last sign of life
    else:
        end = finished if finished is not None else (now if now is not None else time.time())
    return {
        "state": state,
        "attempts": attempts,
        "current_attempt": current,
        "started": started,
        "finished": finished,
        "wall_s": wall_time(started, end),
        "root_cause": root,
        "backend": backend,
        "job_id": job_id,
        "warnings": tuple(dict.fromkeys(warnings)),
        "divergences": tuple(divergences),
    }


def attempt_number(ev: Mapping[str, Any]) -> int:
    """An `attempt_started`'s attempt; 0 when it names none orch could have written."""
    number = ordinal(ev.get("attempt"))
    return 0 if number is None else number


def outcome_of(ev: Mapping[str, Any]) -> str:
    """A `run_finished`'s status (one of FINAL_STATES, as orch writes it); failed when it has none
    that is text (a crafted list would be a state no table could hold)."""
    return label(ev.get("status")) or "failed"


def root_cause_of(ev: Mapping[str, Any]) -> dict[str, Any] | None:
    """The event's root cause, when it is a record (what `orch status` prints its fields of)."""
    cause = ev.get("root_cause")
    return dict(cause) if isinstance(cause, Mapping) and cause else None


def wall_time(started: float | None, end: float | None) -> float | None:
    if started is None or end is None:
        return None
    wall = end - started
    return round(wall, 3) if math.isfinite(wall) else None


def merge_scheduler_state(fields: dict[str, Any], mapped: str | None, raw: str | None) -> dict[str, Any]:
    """Events are the truth for what the supervisor saw; the scheduler for what it could not
    write (still queued, requeued, or killed before it could record its end). Pure."""
    fields = dict(fields)
    if fields["state"] in FINAL_STATES or mapped is None:
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


def live_progress(
    beats: dict[int, tuple[int, float, str, float]], total_steps: int | None, now: float
) -> dict[str, Any] | None:
    """Progress from the ranks' heartbeats (rank -> (step, time, phase, step-time EMA)). Pure.

    The rate is rank 0's recent steps per second (its step-time average); the ETA counts the
    steps rank 0 has left at that rate."""
    if not beats:
        return None
    ranks = [
        {"rank": r, "step": step, "phase": phase, "beat_age_s": round(max(0.0, now - t), 1)}
        for r, (step, t, phase, _ema) in sorted(beats.items())
    ]
    lead = beats.get(0) or beats[min(beats)]
    step, ema = lead[0], lead[3]
    rate = round(1.0 / ema, 3) if ema > 0 else None
    eta = None
    if total_steps and rate:
        eta = round(max(0, total_steps - step) / rate, 1)
    return {"step": step, "total_steps": total_steps, "steps_per_s": rate, "eta_s": eta, "ranks": ranks}


def declared_total_steps(events: list[dict[str, Any]]) -> int | None:
    """What the job last declared with runtime.declare_total_steps, if anything."""
    totals = [
        total
        for e in events
        if e.get("event") == Event.TOTAL_STEPS and (total := whole(e.get("total_steps")) or 0) > 0
    ]
    return totals[-1] if totals else None


def attempt_beats(run: RunDir, attempt: int) -> dict[int, tuple[int, float, str, float]]:
    """The heartbeats of an attempt's ranks, where this machine can read them (a local or
    shared run directory; for a remote one, the supervisor host's staging folder)."""
    folder = run.logs_path(attempt)
    beats = {}
    for name in safe_listdir(folder):
        rank = rank_of_file(name)
        if rank is not None and name == rank_heartbeat_name(rank):
            beat = read_heartbeat(os.path.join(folder, name))
            if beat is not None:
                beats[rank] = beat
    return beats


def started_attempts(events: Iterable[Mapping[str, Any]]) -> list[int]:
    """The numbers of the attempts the events say were started, in order. Not range(attempts):
    one crafted number (2**62) would have status look through that many attempts' folders."""
    return sorted({attempt_number(e) for e in events if e.get("event") == Event.ATTEMPT_STARTED})


def flight_recorder_dumps(run: RunDir, attempts: Iterable[int]) -> tuple[str, ...]:
    """The flight recorder dumps of `attempts` that this machine can read, in that order."""
    found = []
    for attempt in attempts:
        folder = run.logs_path(attempt)
        for name in sorted(safe_listdir(folder)):
            if name.startswith(FLIGHT_RECORDER_PREFIX) and name[len(FLIGHT_RECORDER_PREFIX) :].isdecimal():
                found.append(os.path.join(folder, name))
    return tuple(found)


def run_status(run: RunDir, events: list[dict[str, Any]], live: LiveState) -> RunStatus:
    fields = summarize(events, supervisor_alive=live.supervisor_alive)
    if live.scheduler_raw is not None or fields.get("job_id"):
        fields = merge_scheduler_state(fields, live.scheduler_state, live.scheduler_raw)
    if fields["state"] in ("stopped", "cancelled"):
        fields["root_cause"] = None  # stopped on request: no rank is to blame
    newest = newest_committed(run.child("ckpt"))
    finished = fields["state"] in FINAL_STATES + ("lost",)
    progress = None
    if fields["state"] == "running" and fields["current_attempt"] is not None:
        progress = live_progress(
            attempt_beats(run, fields["current_attempt"]), declared_total_steps(events), time.time()
        )
    return RunStatus(
        goodput=ledger(events, now=None if finished else time.time()),
        run_id=run.run_id,
        run_dir=run.url,
        newest_checkpoint=newest.step if newest else None,
        newest_checkpoint_digest=newest.model_digest if newest else None,
        slurm_state=live.scheduler_raw,
        progress=progress,
        flight_recorder_dumps=flight_recorder_dumps(run, started_attempts(events)),
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
    if st.progress is not None:
        lines.extend(format_progress(st.progress))
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
        if rc.get("where"):
            lines.append(f"           at {rc['where']}")
        if rc.get("hint"):
            lines.append(f"hint       {rc['hint']}")
    for path in st.flight_recorder_dumps:
        lines.append(f"nccl trace {path}")
    for d in st.divergences:
        first, last = d.get("first_step"), d.get("last_step")
        steps = f"step {last}" if first == last else f"steps {first}-{last}"
        line = f"diverged   {steps} (attempt {d.get('attempt')})"
        if d.get("rolled_back_to") is not None:
            skipped = d.get("skipped_samples")
            line += f"; rolled back to step {d['rolled_back_to']}" + (
                f", skipped {skipped} samples" if skipped is not None else ""
            )
        lines.append(line)
    if st.goodput is not None:
        lines.append(format_goodput(st.goodput))
    for warning in st.warnings:
        lines.append(f"warning    {warning}")
    lines.append(f"run dir    {st.run_dir}")
    return "\n".join(lines)


def _step_text(progress: dict[str, Any]) -> str:
    """`step 120/300 (40%), 10.00 steps/s, ETA 18s`, as far as the progress knows."""
    total = progress["total_steps"]
    text = f"step {progress['step']}" + (f"/{total} ({100 * progress['step'] / total:.0f}%)" if total else "")
    if progress["steps_per_s"]:
        text += f", {progress['steps_per_s']:.2f} steps/s"
    if progress["eta_s"] is not None:
        text += f", ETA {_duration(progress['eta_s'])}"
    return text


def progress_line(progress: dict[str, Any]) -> str:
    """One line for a console: step, share, rate, ETA, ranks."""
    return f"{_step_text(progress)}, {len(progress['ranks'])} rank(s) beating"


def format_progress(progress: dict[str, Any]) -> list[str]:
    line = f"progress   {_step_text(progress)}"
    ranks = progress["ranks"]
    stalest = max(ranks, key=lambda r: r["beat_age_s"])
    steps = sorted({r["step"] for r in ranks})
    span = str(steps[0]) if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"
    return [
        line,
        f"ranks      {len(ranks)} beating at step {span}; oldest beat {stalest['beat_age_s']:.1f}s ago"
        f" (rank {stalest['rank']}, {stalest['phase']})",
    ]


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
