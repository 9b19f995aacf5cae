"""Launch and restart under Slurm: the node agent (launch.mode auto: one task per node, ranks
forked from a fork server) against one srun task per rank (launch.mode subprocess, what
DESIGN.md describes and torchrun-style launchers do), on a real Slurm cluster.

Uses the cluster named by SLURM_CONF if `sinfo` answers, else starts one with
scripts/slurm/start.sh (root; scripts/slurm/install.sh first) and stops it at the end.

Each run submits bench/jobs/allreduce.py with BENCH_CRASH=1: attempt 0 joins the group,
all-reduces, and rank 1 crashes a few steps later; the supervisor starts a new srun step
(restart.backoff_s 0), whose ranks join and all-reduce again. Measured from the run's own
records:
  launch   the attempt's srun step started -> every rank past init_process_group + all_reduce
  restart  rank 1 crashed -> the new step's ranks past init_process_group + all_reduce
Both modes take turns, so load on the machine hits them alike.
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
MODES = ("auto", "subprocess")


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
    work: Path, mode: str, nodes: int, ranks_per_node: int, index: int, timeout: float
) -> dict[str, float] | None:
    run_id = f"{mode}-{ranks_per_node}-{index}"
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
        "launch": {"mode": mode},
        "slurm": {"partition": "debug"},
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
                for mode in MODES:
                    result = one_run(work, mode, args.nodes, rpn, index, args.timeout)
                    results.setdefault((mode, rpn), []).append(result)
                    shown = (
                        "failed or timed out"
                        if result is None
                        else f"launch {result['launch']:.2f} s, restart {result['restart']:.2f} s"
                    )
                    print(f"  {args.nodes} nodes x {rpn} ranks, {mode:10s} run {index}: {shown}", flush=True)
        print()
        print(
            f"Slurm, {args.nodes} nodes (slurmd on this machine), median of {args.repeats};"
            " node agent = launch.mode auto, task per rank = subprocess"
        )
        print()
        print(
            "| ranks | what | node agent (fork) | task per rank (fresh) | agent / task"
            " | failed (agent, task) |"
        )
        print("| --- | --- | --- | --- | --- | --- |")
        for rpn in args.ranks_per_node:
            for what in ("launch", "restart"):
                cells, failed = [], []
                for mode in MODES:
                    ok = [r[what] for r in results[(mode, rpn)] if r is not None]
                    cells.append(statistics.median(ok) if ok else None)
                    failed.append(sum(r is None for r in results[(mode, rpn)]))
                fmt = lambda v: "-" if v is None else f"{v:.2f} s"  # noqa: E731
                ratio = f"{cells[0] / cells[1]:.2f}x" if None not in cells else "-"
                print(
                    f"| {args.nodes} x {rpn} = {args.nodes * rpn} | {what} | {fmt(cells[0])}"
                    f" | {fmt(cells[1])} | {ratio} | {failed[0]}, {failed[1]} |"
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
