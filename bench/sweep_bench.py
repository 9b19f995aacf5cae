"""Sweeps (issue 16): listing and status over many points, and a local sweep against the same
points run one after the other.

    .venv/bin/python bench/sweep_bench.py [--points 8] [--steps 40]

1. `orch ls` (a fresh process, as a user runs it) over 1000 runs that are points of 10 sweeps,
   against `orch ls` over 1000 runs of their own in the same run (ratio ours / baseline: lower
   is better), and against its goal of 1 s.
2. `orch status SWEEP` of a 100-point sweep (goal 1 s).
3. A local sweep of N one-rank points of the example job (default max_parallel: as many as the
   cores hold) against the same N points as `orch run`, one after the other (ratio: lower is
   better; each point is a whole supervised run in both).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from controller_bench import median_time  # bench/ is the script's own directory on sys.path

REPO = Path(__file__).resolve().parent.parent


def orch(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True, check=True, cwd=cwd
    )


def fake_run(path: str, run_id: str, i: int) -> None:
    os.makedirs(path)
    with open(os.path.join(path, "run.yaml"), "w") as fh:
        yaml.safe_dump({"run_id": run_id, "backend": "local"}, fh)
    with open(os.path.join(path, "events.jsonl"), "w") as fh:
        for kind in ("run_started", "attempt_started", "attempt_ended", "run_finished"):
            fh.write(json.dumps({"time": 1.0 + i, "event": kind, "status": "succeeded", "attempt": 0}) + "\n")


def listing(root: str, sweeps: int, per_sweep: int) -> tuple[float, float, float]:
    """(orch ls over runs in sweeps, orch ls over as many plain runs, orch status of one sweep)."""
    in_sweeps, plain = os.path.join(root, "swept"), os.path.join(root, "plain")
    for s in range(sweeps):
        sweep = os.path.join(in_sweeps, f"sweep-{s:02d}")
        os.makedirs(sweep)
        points = [{"index": i, "values": {"lr": 10.0**-i, "seed": i % 3}} for i in range(per_sweep)]
        with open(os.path.join(sweep, "sweep.yaml"), "w") as fh:
            yaml.safe_dump(
                {"sweep_id": f"sweep-{s:02d}", "backend": "local", "names": ["lr", "seed"], "points": points},
                fh,
            )
        for i in range(per_sweep):
            fake_run(os.path.join(sweep, str(i)), f"sweep-{s:02d}/{i}", i)
    for i in range(sweeps * per_sweep):
        fake_run(os.path.join(plain, f"run-{i:04d}"), f"run-{i:04d}", i)
    configs = {}
    for name, folder in (("swept", in_sweeps), ("plain", plain)):
        configs[name] = os.path.join(root, f"{name}.yaml")
        with open(configs[name], "w") as fh:
            yaml.safe_dump({"job": {"module": "pkg.train"}, "storage": {"root": folder}}, fh)
    lines = orch("ls", "--config", configs["swept"]).stdout.count("\n")
    assert lines == 1 + sweeps * (per_sweep + 1), lines  # header, a line per sweep and per point
    swept_s = median_time(lambda: orch("ls", "--config", configs["swept"]), repeats=3)
    plain_s = median_time(lambda: orch("ls", "--config", configs["plain"]), repeats=3)
    status_s = median_time(lambda: orch("status", "sweep-00", "--config", configs["swept"]), repeats=3)
    return swept_s, plain_s, status_s


def local_sweep(root: str, points: int, steps: int) -> tuple[float, float]:
    """(a local sweep of `points` one-rank points, the same points one after the other)."""
    work = Path(root) / "work"
    shutil.copytree(REPO / "jobs", work / "jobs", ignore=shutil.ignore_patterns("__pycache__"))
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["resources"]["ranks_per_node"] = 1
    args = ["--steps", str(steps), "--log-every", str(steps), "--dataset-size", "512"]
    config["job"]["args"] = [*args, "--seed", "{seed}"]
    (work / "cluster.yaml").write_text(yaml.safe_dump(config))
    seeds = ",".join(str(i) for i in range(points))
    t0 = time.perf_counter()
    out = orch("sweep", "--grid", f"seed={seeds}", "--json", cwd=str(work)).stdout
    sweep_s = time.perf_counter() - t0
    assert all(r["state"] == "succeeded" for r in json.loads(out)["rows"])
    t0 = time.perf_counter()
    for i in range(points):
        orch(
            "run",
            "--set",
            "sweep=null",
            "--set",
            f"job.args={json.dumps([*args, '--seed', str(i)])}",
            "--quiet",
            cwd=str(work),
        )
    serial_s = time.perf_counter() - t0
    return sweep_s, serial_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        swept_s, plain_s, status_s = listing(root, sweeps=10, per_sweep=100)
        sweep_s, serial_s = local_sweep(root, args.points, args.steps)
    cores = len(os.sched_getaffinity(0))
    print(f"sweep benchmark ({cores} cores; medians of 3 for the listings)")
    print(f"{'what':58} {'ours':>9} {'baseline':>9} {'ratio':>6} {'goal':>6}")
    rows = (
        ("orch ls, 1000 runs in 10 sweeps vs 1000 plain runs", swept_s, plain_s, "< 1 s"),
        ("orch status SWEEP, 100 points (vs the 1 s goal)", status_s, 1.0, "< 1 s"),
        (f"local sweep of {args.points} 1-rank points vs one after the other", sweep_s, serial_s, "< 1"),
    )
    for what, ours, base, goal in rows:
        print(f"{what:58} {ours:>8.2f}s {base:>8.2f}s {ours / base:>6.2f} {goal:>6}")


if __name__ == "__main__":
    main()
