"""Load (issue 13, point 8): 20 runs of 8 ranks each, started within one second on this machine,
all finish with the model an unloaded run computes, each on its own port and in its own run
directory."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from ..conftest import TEST_JOBS, orch_cmd, read_events, run_orch, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUNS = 20
ARGS = ["--steps", "12"]
DIGEST = re.compile(r"done: 12 steps, model digest ([0-9a-f]{16})")


def _digests(run_dir) -> set[str]:
    found = set()
    for log in (run_dir / "logs").glob("attempt-*/rank-*.log"):
        found.update(DIGEST.findall(log.read_text()))
    return found


@pytest.mark.timeout(900)
def test_twenty_concurrent_runs_of_eight_ranks(tmp_path):
    cfg = write_config(
        tmp_path,
        TEST_JOBS / "small_train.py",
        args=ARGS,
        resources={"nodes": 2, "ranks_per_node": 4, "cpus_per_rank": 1},
        restart={"max_restarts": 0},
    )
    reference = run_orch("run", str(cfg), "--run-id", "alone", "--quiet", timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]
    expected = _digests(tmp_path / "runs" / "alone")
    assert len(expected) == 1, expected

    t0 = time.monotonic()
    procs = {
        f"load-{i:02d}": subprocess.Popen(
            orch_cmd("run", str(cfg), "--run-id", f"load-{i:02d}", "--quiet", "--json"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(RUNS)
    }
    assert time.monotonic() - t0 < 1.0, "the runs were not started within one second"
    outcomes = {run_id: proc.communicate(timeout=900) for run_id, proc in procs.items()}
    failed = {r: err[-1500:] for r, (_, err) in outcomes.items() if procs[r].returncode != 0}
    assert not failed, failed

    ports = []
    for run_id in procs:
        run_dir = tmp_path / "runs" / run_id
        events = read_events(run_dir)
        # one attempt each: a port collision or a mixed-up directory would have failed one
        started = [e for e in events if e["event"] == "attempt_started"]
        assert len(started) == 1 and len(started[0]["pids"]) == 8, (run_id, started)
        ports.append(started[0]["master_port"])
        assert {e.get("run_id") for e in events if e["event"] == "run_started"} == {run_id}
        ranks = sorted(p.name for p in (run_dir / "logs" / "attempt-0").glob("rank-*.log"))
        assert ranks == [f"rank-{r}.log" for r in range(8)], (run_id, ranks)
        assert _digests(run_dir) == expected, run_id
    assert len(set(ports)) == RUNS, f"port collisions: {sorted(ports)}"
