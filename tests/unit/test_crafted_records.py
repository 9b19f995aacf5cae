"""A run directory may be written by others (a shared folder, a team's object store), so every
number orch reads back from a run's events or a sweep's record may be anything JSON or YAML can
hold. The folds behind `orch status`, `orch report`, `orch ls` and the goodput ledger read a value
of the wrong type as absent (never a traceback, never text taken for a number), and a sweep's
record yields only the points whose index is one orch could have written."""

from __future__ import annotations

import math
from typing import Any

import pytest

from orchestrator.report.collect import collect_run
from orchestrator.storage.goodput import ledger
from orchestrator.storage.rundir import RunDir
from orchestrator.storage.sweepdir import SweepDir
from orchestrator.supervision.status import LiveState, declared_total_steps, run_status, summarize

T0 = 1_800_000_000.0
NOW = T0 + 100.0
ROOT_CAUSE = {"rank": 1, "node_rank": 0, "exitcode": 1, "message": "boom"}

# Every number orch writes in these events, and so every one a fold may read.
NUMERIC = (
    "time", "attempt", "restore_s", "block_s", "write_s", "step", "total_steps", "first_step",
    "last_step", "skipped", "backoff_s", "exitcode", "nodes", "nnodes", "ranks_per_node",
)  # fmt: skip

# No reading of these is a number orch wrote: each must fold as if the field were not there.
NOT_NUMBERS = ["abc", "12", None, True, [1], {"a": 1}, math.nan, math.inf, -math.inf]
# Numbers, but not ones orch writes for every field (no clock shows them as a time).
OUT_OF_RANGE = [1e308, -1e308, 10**30, -3, 2**63]


def honest_ledger() -> list[dict[str, Any]]:
    """A run's events as orch writes them: a failure, a restart, a restore, a divergence."""
    return [
        {"time": T0, "event": "run_started", "backend": "local", "nodes": 1, "ranks_per_node": 2},
        {"time": T0 + 1, "event": "attempt_started", "attempt": 0},
        {"time": T0 + 2, "event": "total_steps", "total_steps": 100},
        {"time": T0 + 3, "event": "training_started", "attempt": 0},
        {"time": T0 + 5, "event": "checkpoint_committed", "attempt": 0, "step": 10, "write_s": 0.5,
         "block_s": 0.25},
        {"time": T0 + 6, "event": "diverged", "attempt": 0, "first_step": 11, "last_step": 12},
        {"time": T0 + 7, "event": "attempt_ended", "attempt": 0, "status": "failed",
         "root_cause": ROOT_CAUSE},
        {"time": T0 + 8, "event": "restart_scheduled", "attempt": 1, "backoff_s": 0.5},
        {"time": T0 + 9, "event": "attempt_started", "attempt": 1},
        {"time": T0 + 10, "event": "restored", "attempt": 1, "step": 10, "restore_s": 0.75},
        {"time": T0 + 10, "event": "rolled_back", "attempt": 1, "step": 10, "skipped": 4},
        {"time": T0 + 11, "event": "training_started", "attempt": 1},
        {"time": T0 + 20, "event": "checkpoint_committed", "attempt": 1, "step": 20, "write_s": 0.5,
         "block_s": 0.25},
        {"time": T0 + 21, "event": "attempt_ended", "attempt": 1, "status": "succeeded"},
        {"time": T0 + 22, "event": "run_finished", "status": "succeeded"},
    ]  # fmt: skip


def with_every_number(value: Any) -> list[dict[str, Any]]:
    return [{k: (value if k in NUMERIC else v) for k, v in e.items()} for e in honest_ledger()]


def without_numbers() -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if k not in NUMERIC} for e in honest_ledger()]


def fold(events: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any], int | None]:
    return summarize(events, now=NOW), ledger(events, now=None), declared_total_steps(events)


@pytest.mark.parametrize("value", NOT_NUMBERS, ids=repr)
def test_a_value_that_is_no_number_folds_as_if_absent(value):
    # Before: summarize raised TypeError (int("abc"), round(None - float)), ledger ValueError.
    assert fold(with_every_number(value)) == fold(without_numbers())


@pytest.mark.parametrize("value", NOT_NUMBERS + OUT_OF_RANGE, ids=repr)
def test_a_crafted_number_gives_typed_fields_and_a_report(value):
    events = with_every_number(value)
    fields, goodput, total = fold(events)
    assert fields["started"] is None or T0 <= fields["started"] < 1e12
    assert fields["wall_s"] is None or math.isfinite(fields["wall_s"])
    assert isinstance(fields["attempts"], int) and fields["attempts"] >= 0
    assert fields["current_attempt"] is None
    assert fields["state"] == "succeeded" and fields["root_cause"] is None
    assert math.isfinite(goodput["wall_s"]) and all(math.isfinite(v) for v in goodput["lost_s"].values())
    assert total is None or isinstance(total, int)
    report = collect_run("r", "/runs/r", events, now=NOW)
    assert report.state == "succeeded"


@pytest.mark.parametrize("field", NUMERIC)
def test_one_crafted_field_leaves_the_rest_of_the_ledger_read(field):
    events = [{k: ("abc" if k == field else v) for k, v in e.items()} for e in honest_ledger()]
    fields, goodput, _ = fold(events)
    assert fields["state"] == "succeeded"
    if field != "time":
        assert fields["started"] == T0 and fields["wall_s"] == 22.0
        assert goodput["wall_s"] == 22.0


def test_an_event_without_a_readable_time_is_left_off_the_goodput_timeline():
    events = honest_ledger()
    events.insert(3, {"time": "abc", "event": "restart_scheduled"})
    events.insert(5, {"time": None, "event": "submitted"})
    assert ledger(events) == ledger(honest_ledger())


def test_a_root_cause_that_is_not_a_record_is_no_root_cause():
    events = honest_ledger()[:7]
    events[-1] = {**events[-1], "root_cause": "rank 0 did it"}
    assert summarize(events, supervisor_alive=False, now=NOW)["root_cause"] is None
    events.append({"time": T0 + 8, "event": "run_finished", "status": ["failed"], "root_cause": [1]})
    fields = summarize(events, now=NOW)
    assert fields["state"] == "failed" and fields["root_cause"] is None


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("attempt", "attempts"),
    [(2**62, 2**62 + 1), (2.0**62, 2**62 + 1), (10**30, 1), (1e308, 1)],
    ids=["int64", "int64-as-float", "past-int64", "huge-float"],
)
def test_a_huge_attempt_number_does_not_make_status_look_at_that_many_attempts(tmp_path, attempt, attempts):
    # Before: flight_recorder_dumps listed the logs of attempts 0 .. attempt, one at a time.
    # Past int64 it is no attempt orch writes: read as absent (attempt 0).
    run = RunDir(str(tmp_path / "r"))
    events = [*honest_ledger()[:2], {"time": T0 + 3, "event": "attempt_started", "attempt": attempt}]
    st = run_status(run, events, LiveState(supervisor_alive=False))
    assert st.state == "lost" and st.attempts == attempts
    assert st.flight_recorder_dumps == ()


def test_a_sweeps_points_are_those_whose_index_orch_could_have_written(tmp_path):
    sweep = SweepDir(str(tmp_path / "sw"))
    crafted = [
        {"index": "abc"}, {"index": -1}, {"index": None}, {"values": {"lr": 1}}, "not a point",
        {"index": 1.5}, {"index": "../../victim"}, {"index": True}, {"index": math.nan},
        {"index": 0, "values": "lr=1"}, {"index": 2.0, "values": {"lr": 0.1}},
    ]  # fmt: skip
    points = sweep.points({"points": crafted})
    assert [(p, run.url) for p, run in points] == [
        ({"index": 0, "values": {}}, sweep.point(0).url),
        ({"index": 2, "values": {"lr": 0.1}}, sweep.point(2).url),
    ]
    assert sweep.points({"points": "0,1"}) == [] and sweep.points(["points"]) == []  # type: ignore[arg-type]
