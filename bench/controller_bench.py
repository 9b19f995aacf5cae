"""Controller cost (issue 6): plan + render for 1000 nodes x 8 ranks, and `orch ls` over 1000 runs.

    .venv/bin/python bench/controller_bench.py

Goals: plan+render < 100 ms; `orch ls` (a fresh process, as a user runs it) < 1 s. Each figure
is also printed as a ratio of its goal (< 1 meets it).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

from orchestrator.spec.config import parse_config
from orchestrator.spec.plan import build_local_plan
from orchestrator.spec.render import render_local


def median_time(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    config = parse_config(
        {"job": {"module": "pkg.train"}, "resources": {"nodes": 1000, "ranks_per_node": 8}}, check_files=False
    )
    plan_s = median_time(
        lambda: build_local_plan(
            config, run_id="r", run_dir="/runs/r", attempt=0, master_port=29500, python=sys.executable
        )
    )
    plan = build_local_plan(
        config, run_id="r", run_dir="/runs/r", attempt=0, master_port=29500, python=sys.executable
    )
    render_s = median_time(lambda: render_local(plan), repeats=3)
    # Baseline: what a launcher's dry run usually prints, every rank's full environment as YAML
    # (this project's own render did that until issue 6).
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    naive_s = median_time(
        lambda: yaml.dump(
            {"ranks": [{"rank": s.rank, "argv": list(s.argv), "env": dict(s.env)} for s in plan.ranks]},
            Dumper=dumper,
            sort_keys=False,
        ),
        repeats=1,
    )
    with tempfile.TemporaryDirectory() as root:
        for i in range(1000):
            run = os.path.join(root, f"run-{i:04d}")
            os.makedirs(run)
            with open(os.path.join(run, "run.yaml"), "w") as fh:
                yaml.safe_dump({"run_id": f"run-{i:04d}"}, fh)
            with open(os.path.join(run, "events.jsonl"), "w") as fh:
                for kind in ("run_started", "attempt_started", "attempt_ended", "run_finished"):
                    fh.write(
                        json.dumps({"time": 1.0 + i, "event": kind, "status": "succeeded", "attempt": 0})
                        + "\n"
                    )
        cfg = os.path.join(root, "cluster.yaml")
        with open(cfg, "w") as fh:
            yaml.safe_dump({"job": {"module": "pkg.train"}, "storage": {"root": root}}, fh)
        ls_s = median_time(
            lambda: subprocess.run(
                [sys.executable, "-m", "orchestrator.cli", "ls", "--config", cfg],
                check=True,
                capture_output=True,
            ),
            repeats=3,
        )
    print("controller benchmark (median)")
    print(
        f"render 1000 x 8: {render_s * 1000:.1f}ms vs full per-rank env as YAML {naive_s * 1000:.0f}ms:"
        f" ratio {render_s / naive_s:.3f}"
    )
    print(f"{'what':42} {'time':>10} {'goal':>8} {'ratio':>6}")
    for what, seconds, goal in (
        ("plan 1000 nodes x 8 ranks", plan_s, None),
        ("plan + render 1000 nodes x 8 ranks", plan_s + render_s, 0.1),
        ("orch ls over 1000 runs (fresh process)", ls_s, 1.0),
    ):
        print(
            f"{what:42} {seconds * 1000:>8.1f}ms"
            f" {('-' if goal is None else f'{goal * 1000:.0f}ms'):>8}"
            f" {('-' if goal is None else f'{seconds / goal:.2f}'):>6}"
        )


if __name__ == "__main__":
    main()
