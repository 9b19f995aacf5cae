"""`orch report`: a run's (or a sweep's) record -> one HTML file on its storage, and what the
file holds, in a line for the console."""

from __future__ import annotations

import os
import secrets
from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.errors import OrchError
from orchestrator.storage.rundir import is_local_url, url_to_fs

from . import figures, page
from .collect import Mark, RunReport, SweepReport, as_text, collect_run, mapping
from .scalars import read_event_files

REPORT_FILE = "report.html"


@dataclass(frozen=True)
class ReportResult:
    """The file written and what it shows."""

    kind: str  # run | sweep
    id: str
    url: str
    size: int  # bytes
    state: str  # the run's state; a sweep's counts ("2 succeeded")
    attempts: int
    steps: int | None  # the last step logged or checkpointed
    series: tuple[str, ...]  # the scalars plotted over steps
    checkpoints: int  # commits over the run's life (retention may have removed some since)
    failures: int
    preemptions: int
    goodput: float | None  # a sweep: the lowest of its points'
    points: int | None = None

    def lines(self) -> list[str]:
        what = [f"{self.kind} {self.id} {self.state}"]
        if self.points is not None:
            what.append(f"{self.points} point(s)")
        events = [f"{n} {w}" for n, w in ((self.failures, "failed"), (self.preemptions, "preempted")) if n]
        what.append(f"{self.attempts} attempt(s)" + (f" ({', '.join(events)})" if events else ""))
        if self.series:
            what.append(f"{' and '.join(self.series)} over {self.steps} steps")
        else:
            what.append("no scalars over steps")
        what.append(f"{self.checkpoints} checkpoint(s)")
        if self.goodput is not None:
            what.append(f"goodput {'at least ' if self.points is not None else ''}{self.goodput * 100:.0f}%")
        return [f"wrote {self.url} ({_size(self.size)}): {', '.join(what)}"]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


def write_report(target: Any, out: str | None = None) -> ReportResult:
    """Write the report of `target` (an api.Run or api.Sweep) to `out` (default: its
    directory's report.html; a path, a folder or any fsspec URL)."""
    figures.require_plotly()  # before reading anything: the one line that says what is missing
    from orchestrator.api import Sweep

    if isinstance(target, Sweep):
        sweep = gather_sweep(target)
        made = _fragments(
            curves=figures.sweep_curves(sweep),
            timeline=figures.sweep_timeline(sweep),
            goodput=figures.sweep_goodput(sweep),
        )
        html = page.sweep_page(sweep, made)
        result = _sweep_result(sweep)
    else:
        run = gather_run(target)
        made = _fragments(
            curves=figures.run_curves(run),
            timeline=figures.run_timeline(run),
            goodput=figures.run_goodput(run),
        )
        html = page.run_page(run, made)
        result = _run_result(run)
    url = _destination(out, target.dir.child(REPORT_FILE))
    data = html.encode("utf-8")
    _write(url, data, "--out" if out else "the run directory")
    return ReportResult(**{**result, "url": url, "size": len(data)})


def _fragments(**figs: Any) -> dict[str, str | None]:
    """Each figure's HTML; plotly.js inlined once, in the first figure there is."""
    out: dict[str, str | None] = {}
    library = True
    for name, fig in figs.items():
        if fig is None:
            out[name] = None
            continue
        out[name] = figures.to_fragment(fig, f"orch-{name}", with_library=library)
        library = False
    return out


# ---------------------------------------------------------------------------- reading


def gather_run(run: Any, point: int | None = None, values: dict[str, Any] | None = None) -> RunReport:
    """Everything a run's report shows, read from its directory (local or any fsspec URL)."""
    from orchestrator.storage.ckpt_store import CheckpointStore

    events = run.events()
    status = run.status()
    try:
        config = run.dir.read_run_config()
    except Exception:  # noqa: BLE001 - any storage's error or a damaged run.yaml: the world size goes
        config = {}
    try:
        kept: list[int] | None = list(CheckpointStore(run.dir.child("ckpt")).committed_steps())
    except OSError:
        kept = None  # the timeline then does not say which checkpoints retention kept
    return collect_run(
        run.run_id,
        run.url,
        events,
        read_event_files(run.dir),
        config=config,
        state=status.state,
        goodput=status.goodput,
        kept_steps=kept,
        last_scalars=(run.metrics().get("scalars") or {}),
        point=point,
        values=values,
    )


def gather_sweep(sweep: Any) -> SweepReport:
    from orchestrator.api import Run

    record = sweep.record()
    points = tuple(
        gather_run(Run(run_dir), point=int(p["index"]), values=dict(mapping(p.get("values"))))
        for p, run_dir in sweep.dir.points(record)
    )
    names = record.get("names")
    return SweepReport(
        sweep_id=sweep.sweep_id,
        sweep_dir=sweep.url,
        backend=as_text(record.get("backend")),
        # sweep.yaml's axes, as text (a list of names; anything else names nothing)
        names=tuple(str(n) for n in names) if isinstance(names, list) else (),
        points=points,
    )


def _run_result(r: RunReport) -> dict[str, Any]:
    return {
        "kind": "run",
        "id": r.run_id,
        "state": r.state,
        "attempts": len(r.attempts),
        "steps": r.last_step,
        "series": tuple(t for t in (r.loss_tag, r.throughput_tag) if t),
        "checkpoints": len(r.checkpoints),
        "failures": r.count(Mark.FAILURE),
        "preemptions": r.count(Mark.PREEMPTION),
        "goodput": (r.goodput or {}).get("goodput"),
    }


def _sweep_result(s: SweepReport) -> dict[str, Any]:
    shares = [p.goodput["goodput"] for p in s.points if p.goodput and p.goodput.get("goodput") is not None]
    steps = [p.last_step for p in s.points if p.last_step is not None]
    return {
        "kind": "sweep",
        "id": s.sweep_id,
        "state": ", ".join(f"{n} {state}" for state, n in sorted(s.counts.items())) or "empty",
        "attempts": sum(len(p.attempts) for p in s.points),
        "steps": max(steps) if steps else None,
        "series": tuple(dict.fromkeys(t for p in s.points for t in (p.loss_tag, p.throughput_tag) if t)),
        "checkpoints": sum(len(p.checkpoints) for p in s.points),
        "failures": sum(p.count(Mark.FAILURE) for p in s.points),
        "preemptions": sum(p.count(Mark.PREEMPTION) for p in s.points),
        "goodput": min(shares) if shares else None,
        "points": len(s.points),
    }


# ---------------------------------------------------------------------------- writing


def _destination(out: str | None, default: str) -> str:
    if out is None:
        return default
    if not is_local_url(out):
        return out
    path = os.path.abspath(out.removeprefix("file://"))
    return os.path.join(path, REPORT_FILE) if os.path.isdir(path) else path


def _write(url: str, data: bytes, where: str) -> None:
    """Whole or not at all: a temporary file renamed into place locally, one PUT elsewhere."""
    from orchestrator.storage.causes import storage_cause

    try:
        if is_local_url(url):
            path = url.removeprefix("file://")
            tmp = f"{path}.tmp-{secrets.token_hex(4)}"
            try:
                with open(tmp, "xb") as fh:
                    fh.write(data)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            fs, path = url_to_fs(url)
            fs.pipe_file(path, data)
    except Exception as exc:  # noqa: BLE001 - any storage's error (OSError, botocore's own): one line
        raise OrchError(f"{where}: cannot write the report to {url}: {storage_cause(exc)}") from None
