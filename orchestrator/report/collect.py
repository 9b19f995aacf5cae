"""A run's record -> what its report shows: attempts, checkpoints, the moments that mattered,
series over steps per attempt, goodput. Pure: everything comes in already read (events,
scalars, the frozen config), so the fold tests in milliseconds.

A resumed attempt logs again the steps after its checkpoint: each attempt keeps a series of its
own, so the replayed steps show as a second curve over the same steps instead of a zig-zag.

A run directory may be written by others, and a job puts what it likes in its error file: every
value is read back as the type orch writes it, or not at all (storage/recorded.py: `whole`,
`real`, `moment`), so a crafted record is never a traceback and a number is never text. Text
stays text here; the page and the figures escape it where they show it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from orchestrator.contract import Event
from orchestrator.storage.goodput import ledger
from orchestrator.storage.recorded import mapping, moment, real, whole
from orchestrator.supervision.status import summarize

from .scalars import Scalar

# A series longer than this is thinned to every k-th point (first and last kept): a run that
# logs every step for a million steps must still make a file a browser opens.
MAX_POINTS = 2000
# The scalars plotted, by the names jobs commonly log them under (the example job's first).
LOSS_TAGS = ("loss", "train/loss", "train_loss", "Loss/train")
THROUGHPUT_TAGS = ("samples_per_s", "tokens_per_s", "throughput", "steps_per_s")
ROOT_CAUSE_CHARS = 300


class Mark(StrEnum):
    """A moment on the timeline."""

    FAILURE = "failure"
    HANG = "hang"
    PREEMPTION = "preemption"
    STOP = "stop"
    RESTART = "restart"  # a failed attempt's restart, after its backoff
    REQUEUE = "requeue"  # a preempted attempt goes on (locally at once; Slurm: requeued)
    RESUME = "resume"  # `orch resume`
    GIVE_UP = "give up"
    CANCEL = "cancel"
    WARNING = "warning"
    DIVERGED = "diverged"  # the divergence guard found a NaN/inf loss or gradient norm
    ROLLBACK = "rollback"  # a rollback past the data window that diverged


@dataclass(frozen=True)
class Marker:
    kind: Mark
    time: float
    attempt: int | None  # the row it belongs on (None: before any attempt)
    text: str


@dataclass(frozen=True)
class Series:
    """One scalar as one attempt logged it."""

    tag: str
    attempt: int | None
    steps: tuple[int, ...]
    values: tuple[float, ...]
    times: tuple[float, ...]
    thinned: bool = False


@dataclass(frozen=True)
class Checkpoint:
    step: int
    time: float
    attempt: int | None
    write_s: float | None
    block_s: float | None
    kept: bool | None  # still committed now (retention removes older ones); None: not known


@dataclass(frozen=True)
class Attempt:
    number: int
    start: float
    end: float  # a running attempt's: now
    outcome: str  # succeeded | failed | preempted | stopped | running | lost
    restored_step: int | None
    first_step: int | None
    last_step: int | None
    checkpoints: int
    root_cause: str | None
    steps_per_s: float | None

    @property
    def duration_s(self) -> float:
        return max(0.0, self.end - self.start)


@dataclass(frozen=True)
class RunReport:
    run_id: str
    run_dir: str
    state: str
    backend: str | None
    nodes: int | None
    ranks_per_node: int | None
    started: float | None
    wall_s: float | None
    total_steps: int | None
    attempts: tuple[Attempt, ...]
    checkpoints: tuple[Checkpoint, ...]
    markers: tuple[Marker, ...]
    series: tuple[Series, ...]
    goodput: dict[str, Any] | None
    root_cause: str | None
    last_scalars: dict[str, float] = field(default_factory=dict)  # metrics.json: no tb/ needed
    point: int | None = None  # a sweep's point: its index and values
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def world_size(self) -> int | None:
        return self.nodes * self.ranks_per_node if self.nodes and self.ranks_per_node else None

    @property
    def tags(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.tag for s in self.series))

    @property
    def loss_tag(self) -> str | None:
        return pick_tag(self.tags, LOSS_TAGS, "loss")

    @property
    def throughput_tag(self) -> str | None:
        return pick_tag(self.tags, THROUGHPUT_TAGS, "per_s")

    @property
    def last_step(self) -> int | None:
        steps = [s.steps[-1] for s in self.series if s.steps]
        steps += [c.step for c in self.checkpoints]
        return max(steps) if steps else None

    @property
    def steps_per_s(self) -> float | None:
        """The latest attempt's training rate that its logged steps tell."""
        rates = [a.steps_per_s for a in self.attempts if a.steps_per_s is not None]
        return rates[-1] if rates else None

    @property
    def last_loss(self) -> float | None:
        curve = effective_series(self, self.loss_tag) if self.loss_tag else None
        if curve is not None and curve.values:
            return curve.values[-1]
        return self.last_scalars.get(self.loss_tag or "loss")

    def count(self, kind: Mark) -> int:
        return sum(1 for m in self.markers if m.kind == kind)

    @property
    def label(self) -> str:
        """A sweep point's name in legends: its values (`lr=0.001`), else its run id."""
        if self.values:
            return ", ".join(f"{k}={v}" for k, v in self.values.items())
        return self.run_id


@dataclass(frozen=True)
class SweepReport:
    sweep_id: str
    sweep_dir: str
    backend: str | None
    names: tuple[str, ...]
    points: tuple[RunReport, ...]

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.points:
            out[p.state] = out.get(p.state, 0) + 1
        return out


# ---------------------------------------------------------------------------- a run


def collect_run(
    run_id: str,
    run_dir: str,
    events: Sequence[Mapping[str, Any]],
    scalars: Mapping[str, Sequence[Scalar]] | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    state: str | None = None,
    goodput: dict[str, Any] | None = None,
    kept_steps: Iterable[int] | None = None,
    last_scalars: Mapping[str, float] | None = None,
    point: int | None = None,
    values: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> RunReport:
    """The report's view of one run. `scalars`: {event file name: its scalars}; `state` and
    `goodput` as `orch status` has them (else folded from `events`, without liveness);
    `kept_steps`: the checkpoints still committed."""
    now = time.time() if now is None else now
    fields = summarize(list(events), now=now)
    state = str(state or fields["state"])
    if goodput is None:
        goodput = ledger(events, now=now if state == "running" else None)
    series = build_series(scalars or {}, events)
    kept = None if kept_steps is None else set(kept_steps)
    checkpoints = tuple(
        Checkpoint(
            step=step,
            time=t,
            attempt=whole(e.get("attempt")),
            write_s=real(e.get("write_s")),
            block_s=real(e.get("block_s")),
            kept=None if kept is None else step in kept,
        )
        for e in events
        if e.get("event") == Event.CHECKPOINT_COMMITTED
        and (step := whole(e.get("step"))) is not None
        and (t := moment(e)) is not None
    )
    attempts = build_attempts(events, series, checkpoints, state, now)
    nodes, ranks = world_of(events, mapping(config))
    rc = fields["root_cause"] if state not in ("stopped", "cancelled") else None
    return RunReport(
        run_id=run_id,
        run_dir=run_dir,
        state=state,
        backend=as_text(fields["backend"] or mapping(config).get("backend")),
        nodes=nodes,
        ranks_per_node=ranks,
        started=fields["started"],
        wall_s=fields["wall_s"],
        total_steps=whole(_last_value(events, Event.TOTAL_STEPS, "total_steps")),
        attempts=attempts,
        checkpoints=checkpoints,
        markers=build_markers(events, attempts),
        series=series,
        goodput=goodput,
        root_cause=cause_line(rc) if rc else None,
        last_scalars=scalars_of(last_scalars),
        point=point,
        values=dict(mapping(values)),
    )


def world_of(events: Sequence[Mapping[str, Any]], config: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """(nodes, ranks per node): the latest start's (a resume may change them), else run.yaml's."""
    resources = mapping(mapping(config.get("config")).get("resources"))
    nodes, ranks = whole(resources.get("nodes")), whole(resources.get("ranks_per_node"))
    for e in events:
        if e.get("event") in (Event.RUN_STARTED, Event.SUBMITTED) and whole(e.get("ranks_per_node")):
            nodes, ranks = whole(e.get("nnodes", e.get("nodes", nodes))), whole(e["ranks_per_node"])
    return nodes, ranks


def _last_value(events: Sequence[Mapping[str, Any]], kind: Event, key: str) -> Any:
    found = [e.get(key) for e in events if e.get("event") == kind and e.get(key) is not None]
    return found[-1] if found else None


# ---------------------------------------------------------------------------- reading values


def as_text(value: Any) -> str | None:
    return None if value is None else str(value)


def scalars_of(values: Any) -> dict[str, float]:
    """metrics.json's last scalars: names to numbers, anything else left out."""
    return {str(k): v for k, v in ((k, real(v)) for k, v in mapping(values).items()) if v is not None}


# ---------------------------------------------------------------------------- series


def attempt_starts(events: Sequence[Mapping[str, Any]]) -> list[tuple[float, int]]:
    """(when, attempt) each attempt began training, oldest first: rank 0's `training_started`
    (the clock its scalars carry too), else the supervisor's `attempt_started`."""
    starts: dict[int, float] = {}
    trained: dict[int, float] = {}
    for e in events:
        attempt, t = whole(e.get("attempt")), moment(e)
        if attempt is None or t is None:
            continue
        if e.get("event") == Event.ATTEMPT_STARTED:
            starts.setdefault(attempt, t)
        elif e.get("event") == Event.TRAINING_STARTED:
            trained.setdefault(attempt, t)
    merged = {**starts, **trained}
    return sorted((t, a) for a, t in merged.items())


def attempt_at(starts: Sequence[tuple[float, int]], when: float) -> int | None:
    """The attempt that was running at `when` (the first one for anything earlier)."""
    found = None
    for t, attempt in starts:
        if t <= when:
            found = attempt
    if found is None and starts:
        return starts[0][1]
    return found


def build_series(
    scalars: Mapping[str, Sequence[Scalar]], events: Sequence[Mapping[str, Any]]
) -> tuple[Series, ...]:
    """One Series per (attempt, tag). Each attempt's rank 0 writes event files of its own, so a
    file belongs to the attempt running when it logged its first scalar."""
    starts = attempt_starts(events)
    grouped: dict[tuple[int | None, str], list[Scalar]] = {}
    for name in sorted(scalars):
        points = scalars[name]
        if not points:
            continue  # hparams, or a writer that logged nothing yet
        attempt = attempt_at(starts, min(p.time for p in points))
        for p in points:
            grouped.setdefault((attempt, p.tag), []).append(p)
    out = []
    for (attempt, tag), points in sorted(grouped.items(), key=lambda kv: (_order(kv[0][0]), kv[0][1])):
        points.sort(key=lambda p: (p.time, p.step))
        out.append(thin(Series(tag, attempt, *_columns(points))))
    return tuple(out)


def _order(attempt: int | None) -> int:
    return -1 if attempt is None else attempt


def _columns(points: list[Scalar]) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]]:
    return (
        tuple(p.step for p in points),
        tuple(_finite_or_nan(p.value) for p in points),
        tuple(p.time for p in points),
    )


def _finite_or_nan(value: float) -> float:
    return value if math.isfinite(value) else math.nan  # an infinite loss plots as a gap


def thin(series: Series, limit: int = MAX_POINTS) -> Series:
    """Every k-th point of a long series, its last one kept."""
    n = len(series.steps)
    if n <= limit:
        return series
    stride = math.ceil(n / limit)
    keep = list(range(0, n, stride))
    if keep[-1] != n - 1:
        keep.append(n - 1)
    return Series(
        series.tag,
        series.attempt,
        tuple(series.steps[i] for i in keep),
        tuple(series.values[i] for i in keep),
        tuple(series.times[i] for i in keep),
        thinned=True,
    )


def effective_series(report: RunReport, tag: str | None) -> Series | None:
    """The run's curve as it stands: each step's value from the last attempt that logged it
    (a sweep plots one curve per point)."""
    if tag is None:
        return None
    by_step: dict[int, tuple[float, float]] = {}
    for s in report.series:
        if s.tag == tag:
            for step, value, t in zip(s.steps, s.values, s.times, strict=True):
                by_step[step] = (value, t)
    if not by_step:
        return None
    steps = sorted(by_step)
    return Series(
        tag, None, tuple(steps), tuple(by_step[s][0] for s in steps), tuple(by_step[s][1] for s in steps)
    )


def pick_tag(tags: Sequence[str], preferred: Sequence[str], word: str) -> str | None:
    for name in preferred:
        if name in tags:
            return name
    return next((t for t in tags if word in t.lower() and not t.startswith("orch/")), None)


def rate(series: Series | None) -> float | None:
    """Steps per second between a series' first and last point."""
    if series is None or len(series.steps) < 2:
        return None
    dt = series.times[-1] - series.times[0]
    return (series.steps[-1] - series.steps[0]) / dt if dt > 0 else None


# ---------------------------------------------------------------------------- attempts


def build_attempts(
    events: Sequence[Mapping[str, Any]],
    series: Sequence[Series],
    checkpoints: Sequence[Checkpoint],
    state: str,
    now: float,
) -> tuple[Attempt, ...]:
    started: dict[int, float] = {}
    ended: dict[int, tuple[float, Mapping[str, Any]]] = {}
    restored: dict[int, int | None] = {}
    closed_at: dict[int, float] = {}  # an attempt without an end: where the next start closes it
    open_attempt: int | None = None
    for e in events:
        kind, attempt, t = e.get("event"), whole(e.get("attempt")), moment(e)
        if t is None:
            continue  # no time: nowhere on the timeline
        if kind == Event.ATTEMPT_STARTED and attempt is not None:
            if open_attempt is not None:
                closed_at.setdefault(open_attempt, t)
            started.setdefault(attempt, t)
            open_attempt = attempt
        elif kind == Event.ATTEMPT_ENDED and attempt is not None:
            ended[attempt] = (t, e)
            open_attempt = None
        elif kind == Event.RESTORED and attempt is not None:
            restored[attempt] = whole(e.get("step"))
        elif kind == Event.RESUMED and open_attempt is not None:
            closed_at.setdefault(open_attempt, t)
            open_attempt = None
    last_time = max((t for e in events if (t := moment(e)) is not None), default=now)
    out = []
    for number in sorted(started):
        if number in ended:
            end, end_event = ended[number]
            outcome, rc = str(end_event.get("status") or "failed"), end_event.get("root_cause")
        elif number == open_attempt and state == "running":
            end, outcome, rc = now, "running", None
        else:  # its supervisor died: the attempt ended at the last sign of life
            end, outcome, rc = closed_at.get(number, last_time), "lost", None
        own = [s for s in series if s.attempt == number and s.steps]
        steps = [st for s in own for st in (s.steps[0], s.steps[-1])]
        commits = [c for c in checkpoints if c.attempt == number]
        if not steps:
            steps = [c.step for c in commits]
        main = max(own, key=lambda s: len(s.steps), default=None)
        out.append(
            Attempt(
                number=number,
                start=started[number],
                end=end,
                outcome=outcome,
                restored_step=restored.get(number),
                first_step=min(steps) if steps else None,
                last_step=max(steps) if steps else None,
                checkpoints=len(commits),
                root_cause=cause_line(rc) if rc else None,
                steps_per_s=rate(main),
            )
        )
    return tuple(out)


def cause_line(rc: Any) -> str:
    """A root cause in one line, as `orch status` words it: `rank 1 (node 0): exit 86: ...`."""
    if not isinstance(rc, Mapping):  # not what orch records: shown as the text it is
        rc = {"rank": None, "message": str(rc)}
    who = "the step" if rc.get("rank") is None else f"rank {rc.get('rank')}"
    if rc.get("node_rank") is not None:
        who += f" (node {rc['node_rank']})"
    parts = [who]
    if rc.get("exitcode") is not None:
        parts.append(f"exit {rc['exitcode']}")
    if rc.get("error_type"):
        parts.append(str(rc["error_type"]))
    message = " ".join(str(rc.get("message") or "").split())
    if message:
        parts.append(message[:ROOT_CAUSE_CHARS] + ("..." if len(message) > ROOT_CAUSE_CHARS else ""))
    return ": ".join(parts)


# ---------------------------------------------------------------------------- markers


def build_markers(events: Sequence[Mapping[str, Any]], attempts: Sequence[Attempt]) -> tuple[Marker, ...]:
    starts = sorted((a.start, a.number) for a in attempts)
    placed = []
    for e in events:
        attempt, t = whole(e.get("attempt")), moment(e)
        if t is not None:
            placed.append((e, t, attempt if attempt is not None else attempt_at(starts, t)))
    # Slurm tells a preemption twice (the attempt's end, then the job's `preempted`): once is enough.
    ended_preempted = {
        row
        for e, _, row in placed
        if e.get("event") == Event.ATTEMPT_ENDED and e.get("status") == "preempted"
    }
    out = []
    for e, t, row in placed:
        if e.get("event") == Event.PREEMPTED and row in ended_preempted:
            continue
        marker = _marker(e, e.get("event"), t, row)
        if marker is not None:
            out.append(marker)
    return tuple(out)


def _marker(e: Mapping[str, Any], kind: Any, t: float, row: int | None) -> Marker | None:
    if kind == Event.ATTEMPT_ENDED:
        status = e.get("status")
        if status == "failed":
            rc = e.get("root_cause")
            return Marker(Mark.FAILURE, t, row, cause_line(rc) if rc else "failed")
        if status == "preempted":
            return Marker(Mark.PREEMPTION, t, row, "checkpointed and stopped on request")
        if status == "stopped":
            return Marker(Mark.STOP, t, row, "stopped")
        return None
    if kind == Event.PREEMPTED:
        return Marker(Mark.PREEMPTION, t, row, "preempted")
    if kind == Event.HANG_DETECTED:
        return Marker(
            Mark.HANG, t, row, f"rank {e.get('rank')} silent {e.get('silent_s')}s at step {e.get('step')}"
        )
    if kind == Event.DIVERGED:
        first, last = e.get("first_step"), e.get("last_step")
        steps = f"step {last}" if first == last else f"steps {first}-{last}"
        return Marker(Mark.DIVERGED, t, row, f"diverged: non-finite loss or gradient norm, {steps}")
    if kind == Event.ROLLED_BACK:
        skipped = e.get("skipped")
        return Marker(
            Mark.ROLLBACK,
            t,
            row,
            f"rolled back to step {e.get('step')}" + (f", skipped {skipped} samples" if skipped else ""),
        )
    if kind == Event.RESTART_SCHEDULED:
        return Marker(Mark.RESTART, t, row, f"restart after {e.get('backoff_s')}s backoff")
    if kind == Event.REQUEUED:
        return Marker(Mark.REQUEUE, t, row, f"goes on ({e.get('reason') or 'requeued'})")
    if kind == Event.RESUMED:
        return Marker(Mark.RESUME, t, row, f"orch resume (was {e.get('from_state')})")
    if kind == Event.GIVING_UP:
        return Marker(Mark.GIVE_UP, t, row, str(e.get("reason") or "gave up"))
    if kind == Event.CANCEL_REQUESTED:
        return Marker(Mark.CANCEL, t, row, "cancel requested")
    if kind == Event.WARNING:
        return Marker(Mark.WARNING, t, row, str(e.get("message")))
    return None
