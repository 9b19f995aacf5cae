"""Reliability under load (issue 13): hundreds of ranks through the fork server, no I/O deadlock
between the supervisor and the server."""

from __future__ import annotations

import pytest

from ..conftest import TEST_JOBS, read_events, run_orch, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("live_s", ["0", "3"], ids=["exit-at-once", "live-a-while"])
def test_512_forked_ranks_finish(tmp_path, live_s):
    # 512 spawn requests go out while 512 exits come back: with blocking sends on both sides the
    # supervisor and the fork server each waited, forever, for the other to read (256 ranks
    # that exit at once were enough).
    cfg = write_config(
        tmp_path,
        TEST_JOBS / "brief.py",
        args=["--live-s", live_s],
        resources={"nodes": 2, "ranks_per_node": 256, "cpus_per_rank": 1},
        restart={"max_restarts": 0},
    )
    proc = run_orch("run", str(cfg), "--run-id", "many", "--quiet", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = read_events(tmp_path / "runs" / "many")
    started = [e for e in events if e["event"] == "attempt_started"]
    assert len(started) == 1 and started[0]["launcher"] == "fork" and len(started[0]["pids"]) == 512
    logs = tmp_path / "runs" / "many" / "logs" / "attempt-0"
    assert sorted(int(p.stem.split("-")[1]) for p in logs.glob("rank-*.log")) == list(range(512))
    assert (logs / "rank-511.log").read_text() == "rank 511 of 512\n"
