"""Run and sweep directories with crafted numbers in their records, read as a user reads them:
`orch status`, `orch status --json`, `orch report`, `orch ls`, and on a sweep `orch status`,
`orch report` and `orch cancel`. A run directory may be written by others (a shared folder, a
team's object store); whatever its events.jsonl or sweep.yaml hold, each verb gives a normal
answer or a one-line error, never a traceback (the folds themselves: tests/unit/
test_crafted_records.py)."""

from __future__ import annotations

import itertools
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from ..conftest import run_orch, write_config

T0 = time.time() - 600
NUMERIC = ("time", "attempt", "restore_s", "block_s", "write_s", "step", "total_steps", "first_step",
           "last_step", "skipped", "backoff_s", "nodes", "ranks_per_node")  # fmt: skip
CRAFTED = {
    "text": ["abc", None, True, [1], {"a": 1}, "12"],
    "non-finite": [float("nan"), float("inf"), float("-inf")],
    "huge": [1e308, -1e308, 10**30, -3],
}


def honest_events() -> list[dict[str, Any]]:
    return [
        {"time": T0, "event": "run_started", "backend": "local", "nodes": 1, "ranks_per_node": 2},
        {"time": T0 + 1, "event": "attempt_started", "attempt": 0},
        {"time": T0 + 2, "event": "total_steps", "total_steps": 100},
        {"time": T0 + 3, "event": "training_started", "attempt": 0},
        {"time": T0 + 5, "event": "checkpoint_committed", "attempt": 0, "step": 10, "write_s": 0.5,
         "block_s": 0.25},
        {"time": T0 + 6, "event": "diverged", "attempt": 0, "first_step": 11, "last_step": 12},
        {"time": T0 + 7, "event": "attempt_ended", "attempt": 0, "status": "failed",
         "root_cause": {"rank": 1, "exitcode": 1, "message": "boom"}},
        {"time": T0 + 8, "event": "restart_scheduled", "attempt": 1, "backoff_s": 0.5},
        {"time": T0 + 9, "event": "attempt_started", "attempt": 1},
        {"time": T0 + 10, "event": "restored", "attempt": 1, "step": 10, "restore_s": 0.75},
        {"time": T0 + 10, "event": "rolled_back", "attempt": 1, "step": 10, "skipped": 4},
        {"time": T0 + 20, "event": "attempt_ended", "attempt": 1, "status": "failed"},
        {"time": T0 + 21, "event": "run_finished", "status": "failed"},
    ]  # fmt: skip


def crafted_events(values: list[Any]) -> list[dict[str, Any]]:
    """The honest events with every number replaced, in turn, by one of `values`."""
    turn = itertools.cycle(values)
    return [{k: (next(turn) if k in NUMERIC else v) for k, v in e.items()} for e in honest_events()]


def write_run(folder: Path, run_id: str, events: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, mode=0o700)
    (folder / "run.yaml").write_text(yaml.safe_dump({"run_id": run_id, "backend": "local"}))
    # json.dumps writes NaN and Infinity as JavaScript does, and json.loads reads them back.
    (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return folder


@pytest.fixture
def crafted_root(tmp_path: Path) -> tuple[Path, Path]:
    """(cluster.yaml, its storage root): a run per kind of crafted number, and a sweep whose
    sweep.yaml names crafted points beside a point with crafted events and an honest one."""
    root = tmp_path / "runs"
    root.mkdir(mode=0o700)
    for kind, values in CRAFTED.items():
        write_run(root / kind, kind, crafted_events(values))
    sweep = root / "sw"
    sweep.mkdir(mode=0o700)
    points = [{"index": 0, "values": {"lr": 0.1}}, {"index": 1, "values": "lr=1"}, {"index": "abc"},
              {"index": -1}, {"index": "../huge"}, {"index": None}, "a point?"]  # fmt: skip
    record = {"sweep_id": "sw", "backend": "local", "names": ["lr"], "points": points}
    (sweep / "sweep.yaml").write_text(yaml.safe_dump(record))
    write_run(sweep / "0", "sw/0", crafted_events(CRAFTED["text"] + CRAFTED["non-finite"]))
    write_run(sweep / "1", "sw/1", honest_events())
    return write_config(tmp_path, "train.py", storage={"root": str(root)}), root


def normal_answer(proc: subprocess.CompletedProcess) -> str:
    """An answer on stdout, or an error in one line on stderr; never a traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    if proc.returncode != 0:
        assert proc.returncode in (1, 2) and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    else:
        assert proc.stdout.strip(), proc.stderr
    return proc.stdout


@pytest.mark.parametrize("kind", list(CRAFTED))
def test_a_run_with_crafted_numbers_gets_a_status_and_a_report(crafted_root, kind):
    # Before: TypeError/ValueError/OverflowError from summarize (status.py) or ledger (goodput.py).
    cfg, root = crafted_root
    run = str(root / kind)
    shown = run_orch("status", run)
    assert shown.returncode == 0, shown.stderr
    assert "state      failed" in normal_answer(shown)
    as_json = run_orch("status", run, "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(normal_answer(as_json))["state"] == "failed"
    report = run_orch("report", run, "--out", str(root.parent / f"{kind}.html"))
    assert report.returncode == 0, report.stderr
    assert (root.parent / f"{kind}.html").is_file()


def test_orch_ls_lists_runs_and_sweep_points_with_crafted_numbers(crafted_root):
    cfg, root = crafted_root
    listed = run_orch("ls", "--config", str(cfg))
    assert listed.returncode == 0, listed.stderr
    out = normal_answer(listed)
    for name in ("text", "non-finite", "huge"):
        assert f"\n{name} " in out, out
    assert "sweep of 2 point(s)" in out and "  sw/0 " in out and "  sw/1 " in out, out
    as_json = run_orch("ls", "--config", str(cfg), "--json")
    assert as_json.returncode == 0, as_json.stderr
    rows = json.loads(normal_answer(as_json))
    assert sorted(r["run_id"] for r in rows) == ["huge", "non-finite", "sw/0", "sw/1", "text"]


def test_a_sweep_with_crafted_points_gets_a_status_a_report_and_a_cancel_answer(crafted_root):
    # Before: int(p["index"]) in sweepdir.points raised ValueError for every verb on the sweep.
    cfg, root = crafted_root
    sweep = str(root / "sw")
    shown = run_orch("status", sweep)
    assert shown.returncode == 0, shown.stderr
    table = normal_answer(shown)
    assert table.startswith("sweep sw (local): 2 points, 2 failed"), table
    as_json = run_orch("status", sweep, "--json")
    assert as_json.returncode == 0, as_json.stderr
    rows = json.loads(normal_answer(as_json))["rows"]
    shown_rows = [(r["point"], r["values"], r["state"]) for r in rows]
    assert shown_rows == [(0, {"lr": 0.1}, "failed"), (1, {}, "failed")]
    report = run_orch("report", sweep, "--out", str(root.parent / "sw.html"))
    assert report.returncode == 0, report.stderr
    normal_answer(run_orch("cancel", sweep))
