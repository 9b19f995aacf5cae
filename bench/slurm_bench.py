"""Launch and restart under Slurm, on a real Slurm cluster, three ways:
  persistent   launch.mode auto (the default): one step of node agents for the allocation,
               each attempt a message to them, ranks forked from fork servers that stay warm;
  per-attempt  launch.mode auto, slurm.persistent_agents false: a new step of node agents for
               every attempt, whose fork servers import torch again (the launcher before
               issue 15);
  task         launch.mode subprocess: one srun task per rank, each a fresh interpreter (what
               DESIGN.md describes and torchrun-style launchers do).

Uses the cluster named by SLURM_CONF if `sinfo` answers, else starts one with
scripts/slurm/start.sh (root; scripts/slurm/install.sh first) and stops it at the end.

Each run submits bench/jobs/allreduce.py with BENCH_CRASH=1: attempt 0 joins the group,
all-reduces, and rank 1 crashes a few steps later; the supervisor starts attempt 1
(restart.backoff_s 0), whose ranks join and all-reduce again. Measured from the run's own
records:
  launch   attempt 0 started -> every rank past init_process_group + all_reduce
  restart  rank 1 crashed -> attempt 1's ranks past init_process_group + all_reduce
The three take turns, so load on the machine hits them alike. Ratios read ours / baseline:
lower is better.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
JOB = REPO / "bench" / "jobs" / "allreduce.py"
LAUNCHERS = {
    "persistent": {"launch": {"mode": "auto"}, "slurm": {"persistent_agents": True}},
    "per-attempt": {"launch": {"mode": "auto"}, "slurm": {"persistent_agents": False}},
    "task": {"launch": {"mode": "subprocess"}, "slurm": {}},
}


def cluster_up() -> bool:
    if not os.environ.get("SLURM_CONF"):
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0


def start_cluster(state: Path, nodes: int) -> None:
    env = {**os.environ, "SLURMLAB_NODES": str(nodes), "SLURMLAB_CTLD_PORT": "19817", "SLURMLAB_CPUS": "16"}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "slurm" / "start.sh"), str(state)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        sys.exit(f"scripts/slurm/start.sh failed: {proc.stderr[-2000:]}")
    os.environ["SLURM_CONF"] = str(state / "etc" / "slurm.conf")


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


def one_run(
    work: Path, launcher: str, nodes: int, ranks_per_node: int, index: int, timeout: float
) -> dict[str, float] | None:
    run_id = f"{launcher}-{ranks_per_node}-{index}"
    out = work / "out" / run_id
    out.mkdir(parents=True)
    config = {
        "backend": "slurm",
        "job": {"script": str(JOB), "env": {"BENCH_OUT": str(out), "BENCH_CRASH": "1"}},
        "resources": {
            "nodes": nodes,
            "ranks_per_node": ranks_per_node,
            "cpus_per_rank": 1,
            "time_limit": "10",
        },
        "storage": {"root": str(work / "runs")},
        "restart": {"max_restarts": 1, "backoff_s": 0, "crash_loop_attempts": 0},
        "launch": LAUNCHERS[launcher]["launch"],
        "slurm": {"partition": "debug", **LAUNCHERS[launcher]["slurm"]},
    }
    path = work / f"{run_id}.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "submit", str(path), "--run-id", run_id, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        sys.exit(f"orch submit failed: {proc.stderr.strip()}")
    run_dir = work / "runs" / run_id
    deadline = time.monotonic() + timeout
    while not any(e["event"] == "run_finished" for e in events(run_dir)):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", json.loads(proc.stdout)["job_id"]], capture_output=True)
            return None
        time.sleep(0.5)
    started = {e["attempt"]: e["time"] for e in events(run_dir) if e["event"] == "attempt_started"}
    try:
        reduced = [float((out / f"allreduced-{a}").read_text()) for a in (0, 1)]
        crashed = float((out / "crashed").read_text())
    except (OSError, ValueError):
        return None
    return {"launch": reduced[0] - started[0], "restart": reduced[1] - crashed}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--ranks-per-node", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=240, help="seconds per run")
    args = parser.parse_args()

    state = None
    if not cluster_up():
        state = Path(tempfile.mkdtemp(prefix="orch-bench-slurm-"))
        start_cluster(state, args.nodes)
    work = Path(tempfile.mkdtemp(prefix="orch-slurm-bench-"))
    try:
        results: dict[tuple[str, int], list[dict[str, float] | None]] = {}
        for rpn in args.ranks_per_node:
            for index in range(args.repeats):
                for launcher in LAUNCHERS:
                    result = one_run(work, launcher, args.nodes, rpn, index, args.timeout)
                    results.setdefault((launcher, rpn), []).append(result)
                    shown = (
                        "failed or timed out"
                        if result is None
                        else f"launch {result['launch']:.2f} s, restart {result['restart']:.2f} s"
                    )
                    print(
                        f"  {args.nodes} nodes x {rpn} ranks, {launcher:11s} run {index}: {shown}", flush=True
                    )
        print()
        print(
            f"Slurm, {args.nodes} nodes (slurmd on this machine), median of {args.repeats};"
            " ratios are ours / baseline (lower is better)"
        )
        print()
        print(
            "| ranks | what | persistent agents | agents per attempt | task per rank"
            " | persistent / per attempt | persistent / task | failed (p, a, t) |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        fmt = lambda v: "-" if v is None else f"{v:.2f} s"  # noqa: E731
        ratio = lambda a, b: "-" if a is None or b is None else f"{a / b:.2f}x"  # noqa: E731
        for rpn in args.ranks_per_node:
            for what in ("launch", "restart"):
                cells, failed = {}, []
                for launcher in LAUNCHERS:
                    ok = [r[what] for r in results[(launcher, rpn)] if r is not None]
                    cells[launcher] = statistics.median(ok) if ok else None
                    failed.append(str(sum(r is None for r in results[(launcher, rpn)])))
                print(
                    f"| {args.nodes} x {rpn} = {args.nodes * rpn} | {what} | {fmt(cells['persistent'])}"
                    f" | {fmt(cells['per-attempt'])} | {fmt(cells['task'])}"
                    f" | {ratio(cells['persistent'], cells['per-attempt'])}"
                    f" | {ratio(cells['persistent'], cells['task'])} | {', '.join(failed)} |"
                )
        persistent = [r["restart"] for r in results[("persistent", args.ranks_per_node[0])] if r]
        before = [r["restart"] for r in results[("per-attempt", args.ranks_per_node[0])] if r]
        if persistent and before:
            p, b = statistics.median(persistent), statistics.median(before)
            met = p <= 1.0 and p <= 0.25 * b
            print(
                f"\ngoal (issue 15): restart <= 1.0 s and <= 0.25x a step per attempt, "
                f"{args.nodes} x {args.ranks_per_node[0]}: {p:.2f} s, {p / b:.2f}x"
                f" -> {'met' if met else 'NOT met'}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if state is not None:
            subprocess.run(
                ["bash", str(REPO / "scripts" / "slurm" / "stop.sh"), str(state), "--wipe"],
                capture_output=True,
                timeout=180,
            )


if __name__ == "__main__":
    main()
