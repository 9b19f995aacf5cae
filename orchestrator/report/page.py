"""One self-contained HTML page: a title, the summary numbers, the figures' fragments (made by
figures.py, plotly.js inlined in the first), and the tables. Pure string work.

Every text that comes from the run is escaped here: run ids, root causes, warnings, paths and a
sweep's values are the user's or the job's, and the page must show them, never run them.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from orchestrator.storage.rundir import is_local_url

from .collect import Attempt, Checkpoint, Mark, RunReport, SweepReport

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       margin: 0 auto; max-width: 1200px; padding: 24px; }
h1 { font-size: 22px; margin: 0 0 4px; word-break: break-all; }
h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.sub { color: #555; margin-bottom: 16px; word-break: break-all; }
.state { display: inline-block; padding: 1px 8px; border-radius: 10px; color: white; font-size: 13px;
         vertical-align: middle; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px 14px; min-width: 110px; }
.card b { display: block; font-size: 20px; }
.card span { color: #666; font-size: 12px; }
.cause { background: #fdecea; border-left: 4px solid #d62728; padding: 8px 12px; margin: 14px 0;
         word-break: break-word; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #eee; vertical-align: top; }
th { background: #f6f6f6; }
td.cause-cell { max-width: 480px; word-break: break-word; }
.note { color: #666; font-style: italic; }
footer { color: #888; font-size: 12px; margin-top: 32px; }
"""
STATE_COLOURS = {
    "succeeded": "#2ca02c",
    "running": "#1f77b4",
    "failed": "#d62728",
    "lost": "#8c564b",
    "preempted-requeued": "#ff7f0e",
}


def e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def clock(t: float | None) -> str:
    return "-" if t is None else datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, s = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{s:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def number(value: float | None, fmt: str = ".4g") -> str:
    return "-" if value is None else format(value, fmt)


def percent(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.1f}%"


def state_badge(state: str) -> str:
    return f'<span class="state" style="background:{STATE_COLOURS.get(state, "#7f7f7f")}">{e(state)}</span>'


def cards(items: Sequence[tuple[str, str]]) -> str:
    return '<div class="cards">' + "".join(f'<div class="card"><b>{e(v)}</b><span>{e(k)}</span></div>'
                                           for k, v in items) + "</div>"  # fmt: skip


def table(
    header: Sequence[str], rows: Sequence[Sequence[str]], cell_classes: Mapping[int, str] | None = None
) -> str:
    """Cells arrive escaped (or built from escaped parts)."""
    cell_classes = cell_classes or {}
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="{cell_classes[i]}">{cell}</td>' if i in cell_classes else f"<td>{cell}</td>"
            for i, cell in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def section(title: str, fragment: str | None, missing: str) -> str:
    inner = fragment if fragment is not None else f'<p class="note">{e(missing)}</p>'
    return f"<section><h2>{e(title)}</h2>{inner}</section>"


def document(title: str, body: str, generated: float | None = None) -> str:
    generated = time.time() if generated is None else generated
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)}</title><style>{STYLE}</style></head><body>{body}"
        f"<footer>written by orch report, {clock(generated)}; plotly.js is inlined: the file opens"
        " offline.</footer></body></html>\n"
    )


# ---------------------------------------------------------------------------- a run


def world_text(r: RunReport) -> str:
    if r.world_size is None:
        return "world size unknown"
    return f"world size {r.world_size} ({r.nodes} node(s) x {r.ranks_per_node} rank(s))"


def attempts_text(r: RunReport) -> str:
    outcomes: dict[str, int] = {}
    for a in r.attempts:
        outcomes[a.outcome] = outcomes.get(a.outcome, 0) + 1
    detail = ", ".join(f"{n} {o}" for o, n in outcomes.items())
    return f"{len(r.attempts)}" + (f" ({detail})" if detail else "")


def run_cards(r: RunReport) -> str:
    steps = number(r.last_step, "d") if r.last_step is not None else "-"
    if r.total_steps:
        steps += f" / {r.total_steps}"
    kept = [c for c in r.checkpoints if c.kept]
    return cards(
        [
            ("attempts", attempts_text(r)),
            ("steps", steps),
            ("checkpoints committed" + (f" ({len(kept)} kept)" if kept else ""), str(len(r.checkpoints))),
            ("failures", str(r.count(Mark.FAILURE))),
            ("preemptions", str(r.count(Mark.PREEMPTION))),
            ("restarts", str(r.count(Mark.RESTART) + r.count(Mark.REQUEUE) + r.count(Mark.RESUME))),
            ("goodput", percent((r.goodput or {}).get("goodput"))),
            ("last " + (r.loss_tag or "loss"), number(r.last_loss)),
            ("steps/s (latest attempt)", number(r.steps_per_s, ".3g")),
            ("wall time", duration(r.wall_s)),
        ]
    )


def attempt_row(a: Attempt) -> list[str]:
    steps = "-" if a.first_step is None else f"{a.first_step}-{a.last_step}"
    return [
        e(a.number),
        e(clock(a.start)),
        e(duration(a.duration_s)),
        state_badge(a.outcome),
        e("-" if a.restored_step is None else a.restored_step),
        e(steps),
        e(a.checkpoints),
        e(number(a.steps_per_s, ".3g")),
        e(a.root_cause or ""),
    ]


def checkpoint_row(c: Checkpoint) -> list[str]:
    kept = "-" if c.kept is None else ("yes" if c.kept else "removed by retention")
    return [
        e(c.step),
        e(c.attempt),
        e(clock(c.time)),
        e(number(c.write_s, ".3f")),
        e(number(c.block_s, ".3f")),
        e(kept),
    ]


def goodput_line(goodput: Mapping[str, Any] | None) -> str:
    if not goodput or goodput.get("goodput") is None:
        return ""
    lost = ", ".join(
        f"{k.replace('_', ' ')} {v:.1f}s" for k, v in (goodput.get("lost_s") or {}).items() if v >= 0.05
    )
    return (
        f"<p>{percent(goodput['goodput'])} of {goodput['wall_s']:.1f}s was productive training"
        f" ({goodput['productive_s']:.1f}s)" + (f"; lost: {e(lost)}" if lost else "") + ".</p>"
    )


def run_page(r: RunReport, fragments: Mapping[str, str | None], generated: float | None = None) -> str:
    """`fragments`: the figures' HTML by name (curves, timeline, goodput); None where there is
    nothing to plot."""
    sub = " · ".join(
        [
            f"backend {e(r.backend or 'unknown')}",
            e(world_text(r)),
            f"started {e(clock(r.started))}",
            f"run dir {e(r.run_dir)}",
        ]
    )
    parts = [
        f'<header><h1>run {e(r.run_id)} {state_badge(r.state)}</h1><div class="sub">{sub}</div></header>',
        run_cards(r),
    ]
    if r.root_cause and r.state != "succeeded":
        parts.append(f'<div class="cause"><b>root cause</b> {e(r.root_cause)}</div>')
    no_curves = (
        "no scalars over steps in the run directory's tb/ folder"
        + (
            ""
            if is_local_url(r.run_dir)
            else " (a run on object storage gets them when rank 0's attempt ends: a running one has none yet)"
        )
        + (
            f"; the last logged: {', '.join(f'{k} {v:.4g}' for k, v in r.last_scalars.items())}"
            if r.last_scalars
            else ""
        )
    )
    parts.append(section("Loss and throughput", fragments.get("curves"), no_curves))
    parts.append(section("Timeline", fragments.get("timeline"), "no attempt has started"))
    parts.append(
        section("Goodput", fragments.get("goodput"), "no time recorded yet") + goodput_line(r.goodput)
    )
    parts.append(
        "<section><h2>Attempts</h2>"
        + table(
            [
                "attempt",
                "started",
                "duration",
                "outcome",
                "restored step",
                "steps",
                "checkpoints",
                "steps/s",
                "root cause",
            ],
            [attempt_row(a) for a in r.attempts],
            {8: "cause-cell"},
        )  # fmt: skip
        + "</section>"
    )
    if r.checkpoints:
        parts.append(
            "<section><h2>Checkpoints</h2>"
            + table(
                ["step", "attempt", "committed", "write s", "training blocked s", "kept"],
                [checkpoint_row(c) for c in r.checkpoints],
            )
            + "</section>"
        )
    warnings = list(dict.fromkeys(m.text for m in r.markers if m.kind == Mark.WARNING))
    if warnings:
        parts.append(
            "<section><h2>Warnings</h2><ul>"
            + "".join(f"<li>{e(w)}</li>" for w in warnings)
            + "</ul></section>"
        )
    return document(f"orch report: run {r.run_id}", "\n".join(parts), generated)


# ---------------------------------------------------------------------------- a sweep


def point_row(p: RunReport, names: Sequence[str]) -> list[str]:
    return [
        e(p.point),
        e(p.run_id),
        *[e(p.values.get(n, "-")) for n in names],
        state_badge(p.state),
        e(attempts_text(p)),
        e(number(p.last_step, "d") if p.last_step is not None else "-"),
        e(number(p.last_loss)),
        e(number(p.steps_per_s, ".3g")),
        e(percent((p.goodput or {}).get("goodput"))),
        e(p.root_cause or ""),
    ]


def sweep_page(s: SweepReport, fragments: Mapping[str, str | None], generated: float | None = None) -> str:
    counts = ", ".join(f"{n} {state}" for state, n in sorted(s.counts.items()))
    names = list(s.names) or sorted({k for p in s.points for k in p.values})
    sub = " · ".join(
        [
            f"backend {e(s.backend or 'local')}",
            f"{len(s.points)} point(s): {e(counts)}",
            f"sweep dir {e(s.sweep_dir)}",
        ]
    )
    attempts = sum(len(p.attempts) for p in s.points)
    shares = [p.goodput["goodput"] for p in s.points if p.goodput and p.goodput.get("goodput") is not None]
    # A diverged point's last loss is NaN: min() would return it whatever its place.
    losses = [p.last_loss for p in s.points if p.last_loss is not None and math.isfinite(p.last_loss)]
    parts = [
        f'<header><h1>sweep {e(s.sweep_id)}</h1><div class="sub">{sub}</div></header>',
        cards(
            [
                ("points", str(len(s.points))),
                ("attempts", str(attempts)),
                ("best last loss", number(min(losses)) if losses else "-"),
                ("goodput", f"{percent(min(shares))}-{percent(max(shares))}" if shares else "-"),
            ]
        ),
        section("Loss and throughput", fragments.get("curves"), "no point has logged scalars over steps"),
        "<section><h2>Points</h2>"
        + table(
            [
                "point",
                "run",
                *names,
                "state",
                "attempts",
                "step",
                "last loss",
                "steps/s",
                "goodput",
                "root cause",
            ],
            [point_row(p, names) for p in s.points],
            {len(names) + 8: "cause-cell"},
        )
        + "</section>",
        section("Timeline", fragments.get("timeline"), "no point has started"),
        section("Goodput", fragments.get("goodput"), "no time recorded yet"),
    ]
    return document(f"orch report: sweep {s.sweep_id}", "\n".join(parts), generated)
