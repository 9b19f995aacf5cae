"""A sweep's table: one row per point, from each point's RunStatus and last scalars. Pure."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.errors import UsageError

# Columns every row has; any other --sort key is a value's name or a scalar the job logged.
FIXED_COLUMNS = ("point", "state", "attempts", "step", "goodput")


@dataclass(frozen=True)
class SweepStatus:
    sweep_id: str
    sweep_dir: str
    backend: str | None
    names: tuple[str, ...]  # the swept values' names, in the sweep's order
    scalars: tuple[str, ...]  # every scalar any point logged, sorted
    rows: tuple[dict[str, Any], ...]  # point, run_id, values, state, attempts, step, scalars, goodput

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.rows:
            out[row["state"]] = out.get(row["state"], 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "counts": self.counts}


def sweep_status(
    sweep_id: str,
    sweep_dir: str,
    record: Mapping[str, Any],
    statuses: Sequence[Any],
    metrics: Sequence[Mapping[str, Any]],
) -> SweepStatus:
    """The table of a sweep whose points' statuses and metrics.json are given in point order."""
    rows = []
    scalar_names: set[str] = set()
    for point, st, last in zip(record.get("points", []), statuses, metrics, strict=True):
        scalars = dict(last.get("scalars") or {})
        scalar_names.update(scalars)
        step = last.get("step")
        if step is None:
            step = st.newest_checkpoint
        goodput = (st.goodput or {}).get("goodput")
        rows.append(
            {
                "point": int(point["index"]),
                "run_id": st.run_id,
                "values": dict(point.get("values") or {}),
                "state": st.state,
                "attempts": st.attempts,
                "step": step,
                "scalars": scalars,
                "goodput": goodput,
                "job_id": st.job_id,
                "run_dir": st.run_dir,
            }
        )
    return SweepStatus(
        sweep_id=sweep_id,
        sweep_dir=sweep_dir,
        backend=record.get("backend"),
        names=tuple(record.get("names") or ()),
        scalars=tuple(sorted(scalar_names)),
        rows=tuple(rows),
    )


def sort_rows(status: SweepStatus, key: str | None, descending: bool = False) -> SweepStatus:
    """Rows ordered by a column, a value or a scalar; rows without it last."""
    if key is None:
        return status
    known = (*FIXED_COLUMNS, *status.names, *status.scalars)
    if key not in known:
        raise UsageError(f"--sort: {key!r} is not a column ({', '.join(known)})")

    def value(row: Mapping[str, Any]) -> Any:
        if key in FIXED_COLUMNS:
            return row[key]
        if key in row["values"]:
            return row["values"][key]
        return row["scalars"].get(key)

    def missing(row: Mapping[str, Any]) -> bool:
        v = value(row)
        return v is None or isinstance(v, float) and math.isnan(v)

    present = [r for r in status.rows if not missing(r)]
    numeric = all(isinstance(value(r), (int, float)) for r in present)
    present.sort(key=lambda r: value(r) if numeric else str(value(r)), reverse=descending)
    rows = present + [r for r in status.rows if missing(r)]
    return SweepStatus(**{**asdict(status), "rows": tuple(rows)})


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_sweep_status(status: SweepStatus, max_scalars: int = 4) -> str:
    """The table `orch status SWEEP` prints: point, values, state, attempts, step, scalars
    (loss first when logged), goodput; then the counts per state."""
    shown = sorted(status.scalars, key=lambda n: (n != "loss", n))[:max_scalars]
    # A scalar named like a swept value (a scheduled lr) is the job's own reading of it.
    scalar_headers = [f"LOGGED_{n.upper()}" if n in status.names else n.upper() for n in shown]
    header = [
        "POINT",
        *[n.upper() for n in status.names],
        "STATE",
        "ATTEMPTS",
        "STEP",
        *scalar_headers,
        "GOODPUT",
    ]
    table = [header]
    for row in status.rows:
        goodput = f"{row['goodput'] * 100:.1f}%" if row["goodput"] is not None else "-"
        table.append(
            [
                str(row["point"]),
                *[_cell(row["values"].get(n)) for n in status.names],
                row["state"],
                str(row["attempts"]),
                _cell(row["step"]),
                *[_cell(row["scalars"].get(n)) for n in shown],
                goodput,
            ]
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = [
        f"sweep {status.sweep_id} ({status.backend or 'local'}): {len(status.rows)} points, "
        + ", ".join(f"{n} {s}" for s, n in sorted(status.counts.items()))
    ]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lines.append(f"sweep dir {status.sweep_dir}")
    return "\n".join(lines)
