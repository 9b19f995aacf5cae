"""Durable checkpoint save at disk speed: the runtime's Checkpointer.save against its baselines,
all measured in this run on the same disk.

    .venv/bin/python bench/ckpt_save_bench.py [--sizes-mib 1024,4096] [--rounds 3] [--dir DIR]

Sides, each writing the same state durably:
- orch: `Checkpointer.save` (checksums, fsync of every file and directory, manifest, commit);
- torch.save + fsync: `torch.save` to a file, then fsync it;
- dd: `dd if=/dev/zero bs=64M conv=fsync` of the same size (what the disk does with no CPU work).
One warm-up pass of every side first; then rounds with the sides alternating (A B C, C B A, ...);
the page cache is flushed (sync; drop_caches, as root) before each side. Reported: the median
of each side, `orch / torch.save+fsync` (lower is better; goal <= 1.0), `orch / dd` throughput
(higher is better; goal >= 0.6), and the preemption lead time a save needs per GiB (what
`slurm.signal_lead_s` must leave).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time

import torch
from ckpt_bench import Blob, drop_caches, fsync_path  # this folder: the same state and helpers

from orchestrator import runtime


def flush_page_cache() -> bool:
    os.sync()
    return drop_caches()


def bench_size(ctx: runtime.DistContext, base: str, mib: int, rounds: int) -> dict[str, float]:
    """Median seconds of each side for a state of `mib` MiB."""
    model = Blob(mib)
    state = {"model": model.state_dict()}
    saves = [0]

    def orch() -> float:
        saves[0] += 1
        url = os.path.join(base, f"orch-{mib}-{saves[0]}")
        ckpt = runtime.Checkpointer(ctx, model=model, url=url, keep=2)
        t0 = time.perf_counter()
        ckpt.save(1)
        elapsed = time.perf_counter() - t0
        shutil.rmtree(url)
        return elapsed

    def torch_fsync() -> float:
        path = os.path.join(base, f"torch-{mib}.pt")
        t0 = time.perf_counter()
        torch.save(state, path)
        fsync_path(path)
        elapsed = time.perf_counter() - t0
        os.unlink(path)
        return elapsed

    def dd() -> float:
        path = os.path.join(base, f"dd-{mib}")
        count = max(1, mib // 64)
        t0 = time.perf_counter()
        cmd = ["dd", "if=/dev/zero", f"of={path}", "bs=64M", f"count={count}", "conv=fsync"]
        subprocess.run(cmd, check=True, capture_output=True)
        elapsed = (time.perf_counter() - t0) * mib / (count * 64)
        os.unlink(path)
        return elapsed

    sides = {"orch": orch, "torch": torch_fsync, "dd": dd}
    for fn in sides.values():  # warm-up
        flush_page_cache()
        fn()
    times: dict[str, list[float]] = {k: [] for k in sides}
    order = list(sides)
    for r in range(rounds):
        for name in order if r % 2 == 0 else list(reversed(order)):
            flush_page_cache()
            times[name].append(sides[name]())
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", default="1024,4096")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: beside this checkout)")
    args = parser.parse_args()
    ctx = runtime.init(backend="gloo")
    here = os.path.dirname(os.path.abspath(__file__))
    base = tempfile.mkdtemp(prefix="ckpt-save-bench-", dir=args.dir or os.path.join(here, ".."))
    flushed = flush_page_cache()
    print(
        f"durable save: torch {torch.__version__}, {os.cpu_count()} cpus, dir {base};"
        f" page cache {'flushed' if flushed else 'NOT flushed (not root)'} before each side;"
        f" warm-up, then {args.rounds} rounds, sides alternating; medians"
    )
    print(
        f"{'state':>8} | {'orch':>8} {'torch+fsync':>11} {'dd fsync':>9} | {'orch GB/s':>9}"
        f" {'torch GB/s':>10} {'dd GB/s':>8} | {'orch/torch':>10} {'orch/dd thr':>11} | {'lead s/GiB':>10}"
    )
    try:
        for mib in (int(x) for x in args.sizes_mib.split(",")):
            med = bench_size(ctx, base, mib, args.rounds)
            nbytes = mib << 20
            gbs = {k: nbytes / v / 1e9 for k, v in med.items()}
            print(
                f"{mib:>5}MiB | {med['orch']:>7.3f}s {med['torch']:>10.3f}s {med['dd']:>8.3f}s |"
                f" {gbs['orch']:>9.2f} {gbs['torch']:>10.2f} {gbs['dd']:>8.2f} |"
                f" {med['orch'] / med['torch']:>10.2f} {gbs['orch'] / gbs['dd']:>11.2f} |"
                f" {med['orch'] / (nbytes / (1 << 30)):>10.2f}",
                flush=True,
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
