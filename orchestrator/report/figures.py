"""Plotly figures from a report's collected view: curves over steps, the timeline of attempts,
where the wall time went. Plotly is the optional `report` extra: require_plotly() says how to
get it, in one line.

Every text that comes from the run (outcomes, root causes, warnings, tags, a point's values,
ids) goes into a figure through `escaped`: plotly renders a subset of HTML in titles, legends,
axis labels and hover text, links included. Numbers are numbers (collect.py). The figure's JSON
in its <script> is plotly's own to write safely (it writes <, > and / as JSON escapes).
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from orchestrator.errors import UsageError

from .collect import Attempt, Checkpoint, Mark, Marker, RunReport, Series, SweepReport, effective_series

PLOTLY_MISSING = "orch report needs the report extra: pip install 'orchestrator[report]'"
# One colour per attempt (plotly's own qualitative palette), the same in every figure.
PALETTE = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880",
           "#ff97ff", "#fecb52")  # fmt: skip
OUTCOME_COLOURS = {
    "succeeded": "#2ca02c",
    "running": "#1f77b4",
    "preempted": "#ff7f0e",
    "stopped": "#7f7f7f",
    "failed": "#d62728",
    "lost": "#8c564b",
}
# How each moment looks on the timeline: (plotly marker symbol, colour).
MARK_STYLE = {
    Mark.FAILURE: ("x", "#d62728"),
    Mark.HANG: ("hourglass", "#d62728"),
    Mark.PREEMPTION: ("triangle-down", "#ff7f0e"),
    Mark.STOP: ("square", "#7f7f7f"),
    Mark.RESTART: ("circle-open", "#1f3b73"),
    Mark.REQUEUE: ("triangle-right", "#ff7f0e"),
    Mark.RESUME: ("star", "#9467bd"),
    Mark.GIVE_UP: ("x-open", "#000000"),
    Mark.CANCEL: ("square-x", "#7f7f7f"),
    Mark.WARNING: ("diamond-tall", "#bcbd22"),
    Mark.DIVERGED: ("asterisk-open", "#d62728"),
    Mark.ROLLBACK: ("arrow-left", "#9467bd"),
}
CHECKPOINT_STYLE = ("diamond", "#2f6f3e")
# Where the wall time went, in the goodput ledger's words; productive first.
GOODPUT_PARTS = (
    ("productive", "productive", "#2ca02c"),
    ("startup", "start-up", "#9ecae1"),
    ("restore", "restore", "#6baed6"),
    ("checkpoint", "checkpoint stall", "#fdae6b"),
    ("lost_work", "lost work", "#d62728"),
    ("backoff", "backoff", "#bcbddc"),
    ("queue", "queue", "#c7c7c7"),
    ("stopped", "stopped", "#7f7f7f"),
    ("other", "other", "#e7e7e7"),
)
LAYOUT = {"template": "plotly_white", "margin": {"l": 70, "r": 20, "t": 50, "b": 40}}


def require_plotly() -> Any:
    """plotly.graph_objects, or the one line that says how to install it (a UsageError: the
    CLI prints it as it is, without its own prefix)."""
    try:
        import plotly.graph_objects as go
        import plotly.io  # noqa: F401 - to_fragment needs it; missing means a broken install
        import plotly.subplots  # noqa: F401
    except ImportError:
        raise UsageError(PLOTLY_MISSING) from None
    return go


def to_fragment(fig: Any, div_id: str, with_library: bool) -> str:
    """A figure as a <div> and its script; plotly.js itself inlined only `with_library`."""
    import plotly.io

    return plotly.io.to_html(
        fig,
        full_html=False,
        include_plotlyjs=with_library,
        config={"displaylogo": False, "responsive": True},
        default_height=f"{fig.layout.height}px",
        div_id=div_id,
    )


def escaped(value: Any) -> str:
    """Run-provided text as plotly must get it: shown as written, never read as markup. With no
    `<` left no tag can open, so quotes are inert; and plotly.js shows `&quot;` as it is (it
    decodes only a few named entities), so they stay quotes."""
    return html.escape(str(value), quote=False)


def attempt_colour(number: int | None) -> str:
    return PALETTE[(number or 0) % len(PALETTE)]


def _clock(t: float) -> str:
    """A time for plotly's date axis (it has no time zones): UTC, to the millisecond."""
    return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _array(values: Sequence[float]) -> Any:
    import numpy as np

    return np.asarray(values, dtype=float)  # sent as compact binary, NaN (a gap) included


# ---------------------------------------------------------------------------- curves


@dataclass(frozen=True)
class Curve:
    """One line on the curves figure: an attempt of a run, or a sweep's point."""

    name: str
    colour: str
    series: Mapping[str, Series]  # tag -> series


def curves_figure(
    curves: Sequence[Curve],
    tags: Sequence[tuple[str, str]],
    title: str,
    restarts: Sequence[tuple[int, str]] = (),
) -> Any | None:
    """Stacked panels sharing the step axis, one per (tag, panel title); None with no data.
    `restarts`: (step, colour) where an attempt resumed, drawn as dotted lines."""
    go = require_plotly()
    from plotly.subplots import make_subplots

    tags = [(tag, label) for tag, label in tags if any(tag in c.series for c in curves)]
    if not tags:
        return None
    fig = make_subplots(
        rows=len(tags), cols=1, shared_xaxes=True, vertical_spacing=0.08, subplot_titles=[t[1] for t in tags]
    )
    for row, (tag, _) in enumerate(tags, start=1):
        for curve in curves:
            s = curve.series.get(tag)
            if s is None:
                continue
            fig.add_trace(
                go.Scatter(
                    x=_array(s.steps),
                    y=_array(s.values),
                    mode="lines+markers" if len(s.steps) <= 60 else "lines",
                    marker={"size": 4},
                    line={"color": curve.colour, "width": 2},
                    name=escaped(curve.name),
                    legendgroup=escaped(curve.name),
                    showlegend=row == 1,
                    # The names go in as data (meta, the trace's name), never into the template
                    # itself: a `%{...}` in a run's text stays text.
                    meta=escaped(tag),
                    hovertemplate="%{fullData.name}<br>step %{x}<br>%{meta} %{y:.4g}<extra></extra>",
                ),
                row=row,
                col=1,
            )
        fig.update_yaxes(title_text=escaped(tag), row=row, col=1)
    for step, colour in restarts:
        fig.add_vline(x=step, line={"color": colour, "dash": "dot", "width": 1})
    fig.update_xaxes(title_text="step", row=len(tags), col=1)
    fig.update_layout(
        **LAYOUT, title=escaped(title), height=140 + 260 * len(tags), hovermode="closest",
        legend={"orientation": "h", "y": -0.12},
    )  # fmt: skip
    return fig


def run_curves(report: RunReport) -> Any | None:
    """Loss and throughput over steps, one colour per attempt."""
    tags = [
        (t, label) for t, label in ((report.loss_tag, "loss"), (report.throughput_tag, "throughput")) if t
    ]
    curves = []
    for a in report.attempts:
        own = {s.tag: s for s in report.series if s.attempt == a.number}
        if own:
            curves.append(Curve(f"attempt {a.number} ({a.outcome})", attempt_colour(a.number), own))
    restarts = [(a.restored_step, attempt_colour(a.number)) for a in report.attempts if a.restored_step]
    return curves_figure(curves, tags, "loss and throughput over steps, per attempt", restarts)


def sweep_curves(report: SweepReport) -> Any | None:
    """Every point's loss (and throughput) curve overlaid, one colour per point."""
    curves, tags = [], {}
    for i, point in enumerate(report.points):
        series = {}
        for tag, label in ((point.loss_tag, "loss"), (point.throughput_tag, "throughput")):
            curve = effective_series(point, tag)
            if curve is not None:
                series[curve.tag] = curve
                tags.setdefault(curve.tag, label)
        if series:
            curves.append(Curve(f"{point.point}: {point.label}", PALETTE[i % len(PALETTE)], series))
    return curves_figure(curves, list(tags.items()), "loss and throughput over steps, per point")


# ---------------------------------------------------------------------------- timeline


@dataclass(frozen=True)
class Row:
    """One row of the timeline: a run's attempt, or a sweep's point (all its attempts)."""

    label: str
    attempts: tuple[Attempt, ...]
    checkpoints: tuple[Checkpoint, ...]
    markers: tuple[Marker, ...]


def _bar_hover(a: Attempt) -> str:
    """An attempt's hover text: lines (<br>) of escaped parts."""
    lines = [f"attempt {a.number}: {escaped(a.outcome)}", f"{_clock(a.start)} UTC, {a.duration_s:.1f}s"]
    if a.restored_step is not None:
        lines.append(f"restored step {escaped(a.restored_step)}")
    if a.first_step is not None:
        lines.append(f"steps {escaped(a.first_step)}-{escaped(a.last_step)}")
    lines.append(f"{a.checkpoints} checkpoint(s)")
    if a.root_cause:
        lines.append(escaped(a.root_cause))
    return "<br>".join(lines)


def timeline_figure(rows: Sequence[Row], title: str, colour_by_outcome: bool) -> Any | None:
    """Attempts as bars over wall-clock time; checkpoints and events as marks on their row."""
    go = require_plotly()
    if not any(r.attempts or r.markers for r in rows):
        return None
    labels = [escaped(r.label) for r in rows]
    fig = go.Figure()
    legend_seen: set[str] = set()
    for row, label in zip(rows, labels, strict=True):
        for a in row.attempts:
            key = escaped(a.outcome) if colour_by_outcome else f"attempt {a.number}"
            colour = (
                OUTCOME_COLOURS.get(a.outcome, "#7f7f7f") if colour_by_outcome else attempt_colour(a.number)
            )
            fig.add_trace(
                go.Bar(
                    x=[max(a.duration_s, 0.001) * 1000.0],  # a date axis measures bars in ms
                    base=[_clock(a.start)],
                    y=[label],
                    orientation="h",
                    marker={
                        "color": colour,
                        "line": {"color": OUTCOME_COLOURS.get(a.outcome, "#333"), "width": 2},
                    },
                    name=key if colour_by_outcome else f"{key} ({escaped(a.outcome)})",
                    legendgroup=key,
                    showlegend=key not in legend_seen,
                    hovertext=[_bar_hover(a)],
                    hoverinfo="text",
                    width=0.6,
                )
            )
            legend_seen.add(key)
    _add_checkpoints(fig, go, rows, labels)
    _add_markers(fig, go, rows, labels)
    fig.update_xaxes(type="date", title_text="time (UTC)")
    fig.update_yaxes(type="category", categoryorder="array", categoryarray=labels, autorange="reversed")
    fig.update_layout(
        **LAYOUT, title=escaped(title), barmode="overlay", height=190 + 45 * len(rows),
        legend={"orientation": "h", "yanchor": "top", "y": -0.3}, hovermode="closest",
    )  # fmt: skip
    return fig


def _add_checkpoints(fig: Any, go: Any, rows: Sequence[Row], labels: Sequence[str]) -> None:
    x, y, text = [], [], []
    for row, label in zip(rows, labels, strict=True):
        for c in row.checkpoints:
            x.append(_clock(c.time))
            y.append(label)
            stall = "" if c.block_s is None else f", training blocked {c.block_s:.3f}s"
            kept = "" if c.kept is None else (", kept" if c.kept else ", since removed by retention")
            text.append(escaped(f"checkpoint step {c.step} (attempt {c.attempt}){stall}{kept}"))
    if x:
        symbol, colour = CHECKPOINT_STYLE
        fig.add_trace(
            go.Scatter(
                x=x, y=y, mode="markers", name="checkpoint", hovertext=text, hoverinfo="text",
                marker={"symbol": symbol, "color": colour, "size": 9, "line": {"color": "white", "width": 1}},
            )
        )  # fmt: skip


def _add_markers(fig: Any, go: Any, rows: Sequence[Row], labels: Sequence[str]) -> None:
    by_kind: dict[Mark, tuple[list[str], list[str], list[str]]] = {}
    for row, label in zip(rows, labels, strict=True):
        for m in row.markers:
            x, y, text = by_kind.setdefault(m.kind, ([], [], []))
            x.append(_clock(m.time))
            y.append(label)
            text.append(f"{m.kind.value}: {escaped(m.text)}")
    for kind, (x, y, text) in by_kind.items():
        symbol, colour = MARK_STYLE[kind]
        fig.add_trace(
            go.Scatter(
                x=x, y=y, mode="markers", name=kind.value, hovertext=text, hoverinfo="text",
                marker={"symbol": symbol, "color": colour, "size": 13, "line": {"color": colour, "width": 2}},
            )
        )  # fmt: skip


def run_timeline(report: RunReport) -> Any | None:
    rows = []
    numbers = [a.number for a in report.attempts]
    extra = sorted({m.attempt for m in report.markers if m.attempt is not None} - set(numbers))
    for number in numbers + extra:  # a restart or resume whose attempt has not started yet
        rows.append(
            Row(
                f"attempt {number}",
                tuple(a for a in report.attempts if a.number == number),
                tuple(c for c in report.checkpoints if c.attempt == number),
                tuple(
                    m for m in report.markers if m.attempt == number or (m.attempt is None and number == 0)
                ),
            )
        )
    return timeline_figure(rows, "timeline: attempts, checkpoints, failures, preemptions, restarts", False)


def sweep_timeline(report: SweepReport) -> Any | None:
    # Compact: one row per point; the moments that end or start attempts, not every warning.
    shown = (
        Mark.FAILURE,
        Mark.HANG,
        Mark.DIVERGED,
        Mark.PREEMPTION,
        Mark.RESTART,
        Mark.ROLLBACK,
        Mark.RESUME,
        Mark.STOP,
    )
    rows = [
        Row(
            f"{p.point}: {p.label}",
            p.attempts,
            p.checkpoints,
            tuple(m for m in p.markers if m.kind in shown),
        )
        for p in report.points
    ]
    return timeline_figure(rows, "timeline: each point's attempts (coloured by outcome)", True)


# ---------------------------------------------------------------------------- goodput


def goodput_figure(rows: Sequence[tuple[str, Mapping[str, float]]], title: str) -> Any | None:
    """Stacked bars of seconds per part (GOODPUT_PARTS), one bar per row."""
    go = require_plotly()
    rows = [(label, parts) for label, parts in rows if any(v > 0 for v in parts.values())]
    if not rows:
        return None
    labels = [escaped(label) for label, _ in rows]
    fig = go.Figure()
    for key, name, colour in GOODPUT_PARTS:
        seconds = [float(parts.get(key, 0.0)) for _, parts in rows]
        if not any(s > 0 for s in seconds):
            continue
        totals = [sum(parts.values()) or 1.0 for _, parts in rows]
        fig.add_trace(
            go.Bar(
                x=seconds, y=labels, orientation="h", name=name, marker={"color": colour},
                customdata=[100.0 * s / t for s, t in zip(seconds, totals, strict=True)],
                hovertemplate=f"{name}: %{{x:.2f}}s (%{{customdata:.1f}}%)<extra>%{{y}}</extra>",
            )
        )  # fmt: skip
    fig.update_xaxes(title_text="seconds")
    fig.update_yaxes(type="category", categoryorder="array", categoryarray=labels, autorange="reversed")
    fig.update_layout(
        **LAYOUT, title=escaped(title), barmode="stack", height=190 + 40 * len(rows),
        legend={"orientation": "h", "yanchor": "top", "y": -0.3, "traceorder": "normal"},
    )  # fmt: skip
    return fig


def run_parts(goodput: Mapping[str, Any]) -> dict[str, float]:
    """The run's wall time by part: productive, then every cause of loss."""
    return {"productive": float(goodput.get("productive_s") or 0.0), **(goodput.get("lost_s") or {})}


def attempt_parts(a: Mapping[str, Any]) -> dict[str, float]:
    return {
        "productive": a.get("productive_s", 0.0),
        "startup": a.get("startup_s", 0.0),
        "restore": a.get("restore_s", 0.0),
        "checkpoint": a.get("checkpoint_stall_s", 0.0),
        "lost_work": a.get("lost_work_s", 0.0),
    }


def run_goodput(report: RunReport) -> Any | None:
    g = report.goodput
    if not g or not g.get("wall_s"):
        return None
    rows = [("whole run", run_parts(g))]
    rows += [
        (f"attempt {a.get('attempt')} ({a.get('status')})", attempt_parts(a)) for a in g.get("attempts", [])
    ]
    share = f"goodput {g['goodput'] * 100:.1f}%" if g.get("goodput") is not None else "goodput -"
    return goodput_figure(rows, f"where the wall time went: {share} of {g['wall_s']:.1f}s")


def sweep_goodput(report: SweepReport) -> Any | None:
    rows = [(f"{p.point}: {p.label}", run_parts(p.goodput)) for p in report.points if p.goodput]
    return goodput_figure(rows, "where each point's wall time went")
