"""Resume cost (issue 15): after a restart, the time from the attempt's start to its first
trained step, for a checkpoint of 1 GiB, against `torch.load` + `load_state_dict` of the same
file, measured in the same run.

    .venv/bin/python bench/resume_bench.py [--mib 1024] [--repeats 3]

- orch: `orch run` of bench/jobs/resume_job.py (1 rank) that checkpoints at step 2 and dies at
  step 3 after dropping the page cache; the restarted attempt's `attempt_started` event to the
  wall time of its first trained step: the fork, init_process_group, picking the checkpoint,
  verifying every byte (CRC-32) and loading it into the model, then one step.
- baseline: page cache dropped, then `torch.load(state.pt, weights_only=True)` and
  `load_state_dict` into a fresh model of the same shapes (no verification, no launch).
Ratio: orch / baseline, time over time (lower is better; goal <= 1.2). Needs root to drop the
page cache (else both sides may read from memory, and the table says so).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench" / "jobs"))


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def orch_resume(work: Path, mib: int) -> dict[str, float]:
    out = work / "out"
    out.mkdir()
    config = {
        "job": {"script": str(REPO / "bench" / "jobs" / "resume_job.py")},
        "resources": {"nodes": 1, "ranks_per_node": 1, "cpus_per_rank": 2},
        "storage": {"root": str(work / "runs")},
        "restart": {"max_restarts": 1, "backoff_s": 0, "stop_grace_s": 5},
    }
    cfg = work / "cluster.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = {**os.environ, "BENCH_OUT": str(out), "BENCH_MIB": str(mib)}
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", str(cfg), "--run-id", "r", "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise SystemExit(f"orch run failed: {proc.stderr[-2000:]}")
    ev = events(work / "runs" / "r")
    started = next(e for e in ev if e["event"] == "attempt_started" and e["attempt"] == 1)
    restored = next(e for e in ev if e["event"] == "restored" and e["attempt"] == 1)
    assert restored["step"] == 2, restored
    first_step = float((out / "first-step-1").read_text())
    return {
        "orch": first_step - started["time"],
        "to_restore": restored["time"] - restored["restore_s"] - started["time"],
        "restore": restored["restore_s"],
    }


def baseline(work: Path, mib: int) -> float:
    from resume_job import Blob  # the job's own model, built the same way

    state_file = sorted((work / "runs" / "r" / "ckpt").glob("*/state.pt"))[0]  # step 2's: the one resumed
    model = Blob(mib)
    drop_caches()
    t0 = time.perf_counter()
    state = torch.load(state_file, weights_only=True)
    model.load_state_dict(state["model"])
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cache = "page cache dropped" if drop_caches() else "page cache NOT dropped (not root)"
    print(f"resume benchmark: {args.mib} MiB, torch {torch.__version__}, {os.cpu_count()} cpus; {cache}")
    rows: dict[str, list[float]] = {"orch": [], "to_restore": [], "restore": [], "baseline": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="resume-bench-", dir=REPO) as tmp:
            work = Path(tmp)
            for key, value in orch_resume(work, args.mib).items():
                rows[key].append(value)
            rows["baseline"].append(baseline(work, args.mib))
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(
        "| state | attempt start -> restore | restore (verify + load) | orch: start -> first step"
        " | torch.load + load_state_dict | orch / baseline |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    print(
        f"| {args.mib} MiB | {med['to_restore']:.3f} s | {med['restore']:.3f} s | {med['orch']:.3f} s"
        f" | {med['baseline']:.3f} s | {med['orch'] / med['baseline']:.2f} |"
    )
    print(f"median of {args.repeats}; orch / baseline reads time over time (lower is better; goal <= 1.2)")


if __name__ == "__main__":
    main()
