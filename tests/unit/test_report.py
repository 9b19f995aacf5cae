"""`orch report`'s parts without processes: event files read whatever way a scalar is stored,
the fold of a synthetic ledger (attempts, replayed steps, moments, checkpoints), hostile text
escaped on the page and in the figures, the missing extra in one line, and whole reports of a
hand-made run directory on disk and on an fsspec URL."""

from __future__ import annotations

import json
import struct
import sys
import uuid
from pathlib import Path

import fsspec
import pytest

from orchestrator import api, cli
from orchestrator.errors import OrchError
from orchestrator.report import ReportResult, write_report
from orchestrator.report.collect import Mark, Series, SweepReport, collect_run, effective_series, thin
from orchestrator.report.figures import PLOTLY_MISSING, run_curves, run_timeline, to_fragment
from orchestrator.report.page import run_page, sweep_page
from orchestrator.report.scalars import Scalar, parse_event_file
from orchestrator.storage.rundir import RunDir

T0 = 1_800_000_000.0
ROOT_CAUSE = {
    "rank": 1,
    "node_rank": 0,
    "exitcode": 1,
    "error_type": "RuntimeError",
    "message": "boom\n  at step 23",
}


def write_event_file(folder: Path, values: list) -> None:
    """A real TensorBoard event file (TensorBoard's own writer: framing and CRCs) holding
    `values`: (tag, step, wall_time, Summary.Value fields)."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(str(folder), filename_suffix=f".{uuid.uuid4().hex[:6]}")
    for tag, step, wall_time, fields in values:
        writer.add_event(
            Event(step=step, wall_time=wall_time, summary=Summary(value=[Summary.Value(tag=tag, **fields)]))
        )
    writer.close()


def scalar_file(folder: Path, rows: list[tuple[str, int, float, float]]) -> bytes:
    """An event file of plain scalars (tag, step, value, time); its bytes."""
    before = set(folder.iterdir()) if folder.exists() else set()
    folder.mkdir(parents=True, exist_ok=True)
    write_event_file(folder, [(tag, step, t, {"simple_value": v}) for tag, step, v, t in rows])
    (new,) = set(folder.iterdir()) - before
    return new.read_bytes()


def test_event_files_are_read_whatever_way_a_scalar_is_stored(tmp_path):
    from tensorboard.compat.proto.summary_pb2 import SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto

    scalars = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="scalars"))
    other = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="hparams"))
    write_event_file(
        tmp_path,
        [
            ("a", 1, T0, {"simple_value": 0.5}),
            ("b", 2, T0 + 1, {"tensor": TensorProto(dtype=1, float_val=[1.5]), "metadata": scalars}),
            ("c", 3, T0 + 2, {"tensor": TensorProto(dtype=2, tensor_content=struct.pack("<d", 2.25))}),
            ("h", 4, T0 + 3, {"tensor": TensorProto(dtype=7, string_val=[b"x"]), "metadata": other}),
        ],
    )
    (path,) = tmp_path.iterdir()
    data = path.read_bytes()
    assert parse_event_file(data) == [
        Scalar("a", 1, 0.5, T0),
        Scalar("b", 2, 1.5, T0 + 1),
        Scalar("c", 3, 2.25, T0 + 2),
    ]
    # A writer still at work leaves a record cut short: what came before it counts.
    cut = parse_event_file(data[: len(data) - 60])
    assert cut == parse_event_file(data)[: len(cut)] and len(cut) < 3
    assert parse_event_file(b"") == []


# ---------------------------------------------------------------------------- the fold


def ledger() -> list[dict]:
    """Three attempts: a failure after step 20's commit (restart), a preemption at 30, success."""

    def ev(dt: float, event: str, **fields) -> dict:
        return {"time": T0 + dt, "event": event, **fields}

    return [
        ev(
            0,
            "run_started",
            backend="local",
            world_size=4,
            nnodes=2,
            ranks_per_node=2,
            pid=1,
            host="elsewhere",
        ),
        ev(1, "attempt_started", attempt=0),
        ev(1.5, "training_started", attempt=0, step=0),
        ev(2, "checkpoint_committed", attempt=0, step=10, write_s=0.1, block_s=0.05),
        ev(3, "checkpoint_committed", attempt=0, step=20, write_s=0.1, block_s=0.05),
        ev(4, "attempt_ended", attempt=0, status="failed", root_cause=ROOT_CAUSE),
        ev(4.1, "restart_scheduled", attempt=1, backoff_s=0.1),
        ev(5, "attempt_started", attempt=1),
        ev(5.2, "restored", attempt=1, step=20, restore_s=0.1),
        ev(5.3, "training_started", attempt=1, step=20),
        ev(6, "checkpoint_committed", attempt=1, step=30, write_s=0.1, block_s=0.05),
        ev(7, "attempt_ended", attempt=1, status="preempted", root_cause=None),
        ev(7.01, "requeued", attempt=2, reason="preempted"),
        ev(7.1, "attempt_started", attempt=2),
        ev(7.2, "restored", attempt=2, step=30, restore_s=0.1),
        ev(7.3, "training_started", attempt=2, step=30),
        ev(8, "checkpoint_committed", attempt=2, step=40, write_s=0.1, block_s=0.05),
        ev(9, "attempt_ended", attempt=2, status="succeeded", root_cause=None),
        ev(9.1, "run_finished", status="succeeded"),
    ]


def scalars() -> dict[str, list[Scalar]]:
    """Rank 0's files: attempt 0 logged steps 5-25 (25 after its last commit: replayed),
    attempt 1 steps 25-30, attempt 2 steps 35-40."""

    def file(start: float, steps: list[int], loss: float) -> list[Scalar]:
        out = []
        for i, step in enumerate(steps):
            t = T0 + start + 0.1 * i
            out += [Scalar("loss", step, loss - step / 100, t), Scalar("samples_per_s", step, 100.0, t)]
        return out

    return {"e.attempt0": file(1.6, [5, 10, 15, 20, 25], 3.0), "e.attempt1": file(5.4, [25, 30], 2.9),
            "e.attempt2": file(7.4, [35, 40], 2.8), "e.hparams": []}  # fmt: skip


def test_the_ledger_folds_into_attempts_series_moments_and_checkpoints():
    r = collect_run("r", "/runs/r", ledger(), scalars(), kept_steps=[30, 40], now=T0 + 100)
    assert r.state == "succeeded" and r.backend == "local" and r.world_size == 4
    assert [
        (a.number, a.outcome, a.restored_step, a.first_step, a.last_step, a.checkpoints) for a in r.attempts
    ] == [
        (0, "failed", None, 5, 25, 2),
        (1, "preempted", 20, 25, 30, 1),
        (2, "succeeded", 30, 35, 40, 1),
    ]
    assert r.attempts[0].root_cause == "rank 1 (node 0): exit 1: RuntimeError: boom at step 23"
    assert r.attempts[0].steps_per_s == pytest.approx(20 / 0.4)
    # One series per attempt and tag: the replayed step 25 is in both attempt 0's and 1's.
    loss = [s for s in r.series if s.tag == "loss"]
    assert [(s.attempt, s.steps) for s in loss] == [(0, (5, 10, 15, 20, 25)), (1, (25, 30)), (2, (35, 40))]
    assert (r.loss_tag, r.throughput_tag, r.last_step) == ("loss", "samples_per_s", 40)
    # The run's curve as it stands takes each step from the last attempt that logged it.
    curve = effective_series(r, "loss")
    assert curve.steps == (5, 10, 15, 20, 25, 30, 35, 40) and curve.values[4] == pytest.approx(2.9 - 0.25)
    assert [(m.kind, m.attempt) for m in r.markers] == [
        (Mark.FAILURE, 0),
        (Mark.RESTART, 1),
        (Mark.PREEMPTION, 1),
        (Mark.REQUEUE, 2),
    ]
    assert [(c.step, c.attempt, c.kept) for c in r.checkpoints] == [
        (10, 0, False), (20, 0, False), (30, 1, True), (40, 2, True)
    ]  # fmt: skip
    assert r.goodput["wall_s"] == pytest.approx(9.1) and r.root_cause is None


def test_an_attempt_whose_supervisor_died_ends_at_the_last_sign_of_life():
    events = ledger()[:5]  # attempt 0 committed steps 10 and 20, then nothing
    r = collect_run("r", "/runs/r", events, {}, state="lost", now=T0 + 100)
    (a,) = r.attempts
    assert (a.outcome, a.end, a.first_step, a.last_step) == ("lost", T0 + 3, 10, 20)


def test_a_long_series_is_thinned_to_a_size_a_browser_opens():
    n = 100_001
    s = thin(Series("loss", 0, tuple(range(n)), tuple(float(i) for i in range(n)), tuple(range(n))), 2000)
    assert s.thinned and len(s.steps) <= 2001 and s.steps[0] == 0 and s.steps[-1] == n - 1


# ---------------------------------------------------------------------------- escaping

HOSTILE_ID = "<script>alert(1)</script>"
HOSTILE_CAUSE = {**ROOT_CAUSE, "message": '<img src=x onerror="alert(2)"> %{x}'}


def hostile_report():
    events = ledger()
    events[5] = {**events[5], "root_cause": HOSTILE_CAUSE}
    events[-1] = {**events[-1], "status": "failed", "root_cause": HOSTILE_CAUSE}
    events.append({"time": T0 + 10, "event": "warning", "message": "<b>slow</b>"})
    return collect_run(
        HOSTILE_ID, '/runs/"><svg onload=alert(3)>', events, scalars(), values={"name": "<i>x</i>"}
    )


def test_run_provided_text_is_escaped_on_the_page_and_in_the_figures():
    r = hostile_report()
    page = run_page(r, {})
    for raw in ("<script>alert", "<img", "<svg", "<b>slow", "<i>x"):
        assert raw not in page, raw
    assert (
        "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        and "&lt;img src=x onerror=&quot;alert(2)&quot;&gt;" in page
    )
    assert "&lt;b&gt;slow&lt;/b&gt;" in page
    sweep = sweep_page(SweepReport("s<x>", "/runs/s", "local", ("name",), (r,)), {})
    assert "<i>x" not in sweep and "&lt;i&gt;x&lt;/i&gt;" in sweep and "s&lt;x&gt;" in sweep
    for fig in (run_curves(r), run_timeline(r)):
        fragment = to_fragment(fig, "f", with_library=False)
        assert "<img" not in fragment and "<svg" not in fragment and "<b>slow" not in fragment


def test_a_missing_plotly_is_one_line_that_says_what_to_install(tmp_path, monkeypatch, capsys):
    run_dir = make_run(tmp_path / "runs" / "r")
    monkeypatch.setitem(sys.modules, "plotly", None)  # import plotly... raises ImportError
    monkeypatch.setitem(sys.modules, "plotly.graph_objects", None)
    with pytest.raises(OrchError) as raised:
        write_report(api.get_run(str(run_dir)))
    assert (
        str(raised.value)
        == PLOTLY_MISSING
        == "orch report needs the report extra: pip install 'orchestrator[report]'"
    )
    assert cli.main(["report", str(run_dir)]) == 2
    assert capsys.readouterr().err == PLOTLY_MISSING + "\n"
    assert not (run_dir / "report.html").exists()


# ---------------------------------------------------------------------------- whole reports


def run_record(run_id: str) -> dict:
    return {"run_id": run_id, "backend": "local", "config": {"resources": {"nodes": 2, "ranks_per_node": 2}}}


def make_run(path: Path) -> Path:
    """A finished run's directory, made by hand: run.yaml, the ledger, rank 0's event files."""
    RunDir(str(path)).create(run_record(path.name))
    (path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ledger()))
    for points in scalars().values():
        if points:
            scalar_file(path / "tb", [(s.tag, s.step, s.value, s.time) for s in points])
    (path / "metrics.json").write_text(json.dumps({"step": 40, "scalars": {"loss": 2.4}}))
    return path


def test_a_run_report_is_written_whole_into_its_directory_or_where_asked(tmp_path):
    run_dir = make_run(tmp_path / "runs" / "r")
    result = write_report(api.get_run(str(run_dir)))
    path = run_dir / "report.html"
    assert result.url == str(path) and result.size == path.stat().st_size
    assert (result.kind, result.state, result.attempts, result.steps, result.series, result.checkpoints) == (
        "run", "succeeded", 3, 40, ("loss", "samples_per_s"), 4
    )  # fmt: skip
    assert result.lines() == [
        f"wrote {path} ({result.size / 1e6:.1f} MB): run r succeeded, 3 attempt(s) (1 failed, 1 preempted),"
        " loss and samples_per_s over 40 steps, 4 checkpoint(s), goodput "
        f"{result.goodput * 100:.0f}%"
    ]
    html = path.read_text()
    assert html.startswith("<!DOCTYPE html>") and html.count("Plotly.newPlot(") == 3
    assert html.count("* plotly.js v") == 1, "plotly.js inlined once"
    assert [p.name for p in run_dir.iterdir() if ".tmp-" in p.name] == []
    # --out: a file, or a folder to put report.html in.
    out = write_report(api.get_run(str(run_dir)), out=str(tmp_path))
    assert out.url == str(tmp_path / "report.html") and (tmp_path / "report.html").is_file()
    assert json.loads(json.dumps(out.to_json()))["series"] == ["loss", "samples_per_s"]


def test_a_run_on_an_fsspec_url_is_read_and_reported_through_fsspec(tmp_path):
    url = f"memory://runs-{uuid.uuid4().hex}/r"
    fs, root = fsspec.core.url_to_fs(url)
    RunDir(url).create(run_record("r"))
    for i, e in enumerate(ledger()):  # object stores: one object per event, in name order
        fs.pipe_file(f"{root}/events/{i:020d}-0.json", json.dumps(e).encode())
    for n, points in enumerate(scalars().values()):
        if points:
            data = scalar_file(tmp_path / f"tb{n}", [(s.tag, s.step, s.value, s.time) for s in points])
            fs.pipe_file(f"{root}/tb/events.out.tfevents.{n}.host", data)
    result = write_report(api.get_run(url))
    assert (
        result.url == f"{url}/report.html"
        and result.attempts == 3
        and result.series == ("loss", "samples_per_s")
    )
    assert fs.cat_file(f"{root}/report.html").startswith(b"<!DOCTYPE html>")


def test_result_lines_say_what_a_sweep_report_holds():
    result = ReportResult(
        kind="sweep", id="s", url="/runs/s/report.html", size=4_900_000, state="2 succeeded", attempts=3,
        steps=30, series=("loss",), checkpoints=6, failures=1, preemptions=0, goodput=0.612, points=2,
    )  # fmt: skip
    assert result.lines() == [
        "wrote /runs/s/report.html (4.9 MB): sweep s 2 succeeded, 2 point(s), 3 attempt(s) (1 failed),"
        " loss over 30 steps, 6 checkpoint(s), goodput at least 61%"
    ]


def test_a_divergence_and_its_rollback_are_moments_on_the_timeline():
    events = ledger()
    at = next(i for i, e in enumerate(events) if e["event"] == "attempt_ended")
    diverged = {"time": T0 + 3.9, "event": "diverged", "attempt": 0, "first_step": 21, "last_step": 23}
    rolled = {"time": T0 + 5.25, "event": "rolled_back", "attempt": 1, "step": 20, "skipped": 96}
    events.insert(at, diverged)
    events.insert(at + 5, rolled)
    r = collect_run("r", "/runs/r", events, scalars(), kept_steps=[30, 40], now=T0 + 100)
    marks = {m.kind: (m.attempt, m.text) for m in r.markers}
    assert marks[Mark.DIVERGED] == (0, "diverged: non-finite loss or gradient norm, steps 21-23")
    assert marks[Mark.ROLLBACK] == (1, "rolled back to step 20, skipped 96 samples")
