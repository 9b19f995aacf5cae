"""Checkpoint throughput and training stall, as ratios against baselines measured in this run.

    .venv/bin/python bench/ckpt_bench.py [--sizes-mib 100,1024] [--repeats 3] [--dir DIR]

- save: orchestrator Checkpointer.save (sha256 manifest, fsync, atomic commit) vs torch.save of
  the same state to the same disk (and vs torch.save + fsync, the durable equivalent);
- load: Checkpointer.restore (verifies every checksum, weights_only=True) vs
  torch.load(weights_only=True); the page cache is dropped before each load when this process
  may (root), so both read from disk;
- stall: how long save() blocks a training loop, async vs sync, for the same state. The async
  side is a training step: save(), then a step's worth of CPU work (matmuls, ~0.3 s), then the
  optimizer's step (which waits for copies still running); "async stall" is the time training
  waited (save() plus that wait) and "delay" the step's extra wall time against the same step
  without a save (the copies' competition for the cores included). Both against the copy limit:
  copying the same tensors into buffers that already exist, per GiB (goal: async stall <= 0.08 s
  per GiB).
A ratio < 1 means the orchestrator is faster.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from orchestrator import runtime


class Blob(torch.nn.Module):
    """A model-shaped state of `mib` MiB of float32 in 32 MiB tensors."""

    def __init__(self, mib: int) -> None:
        super().__init__()
        chunk = 32 * 1024 * 1024 // 4
        total = mib * 1024 * 1024 // 4
        self.params = torch.nn.ParameterList()
        while total > 0:
            n = min(chunk, total)
            self.params.append(torch.nn.Parameter(torch.randn(n)))
            total -= n


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


_WORK = (torch.randn(384, 384), torch.randn(384, 384))


def step_work(repeats: int = 100) -> None:
    """A training step's CPU work between a save and the optimizer's step (~0.3 s here)."""
    a, b = _WORK
    for _ in range(repeats):
        a = torch.tanh(a @ b)


def bench_size(ctx: runtime.DistContext, mib: int, repeats: int, base: str) -> dict[str, float]:
    model = Blob(mib)
    state = {"model": model.state_dict()}
    out: dict[str, list[float]] = {
        k: []
        for k in (
            "torch_save",
            "torch_save_fsync",
            "orch_save",
            "torch_load",
            "orch_load",
            "sync_block",
            "async_block",
            "async_delay",
            "copy",
        )
    }
    for i in range(repeats):
        path = os.path.join(base, f"baseline-{mib}-{i}.pt")
        out["torch_save"].append(timed(lambda path=path: torch.save(state, path)))
        os.unlink(path)
        out["torch_save_fsync"].append(timed(lambda path=path: (torch.save(state, path), fsync_path(path))))
        url = os.path.join(base, f"orch-{mib}-{i}")
        ckpt = runtime.Checkpointer(ctx, model=model, url=url, keep=2)
        out["orch_save"].append(timed(lambda ckpt=ckpt: ckpt.save(1)))
        out["sync_block"].append(ckpt.last_block_s or 0.0)
        drop_caches()
        out["torch_load"].append(timed(lambda path=path: torch.load(path, weights_only=True)))
        drop_caches()
        reader = runtime.Checkpointer(ctx, model=Blob(1), url=url)
        reader.model = model  # same shapes: load into the real one
        out["orch_load"].append(timed(reader.restore))
        # async: training waits only for what it would change before the copies are done
        opt = torch.optim.SGD(model.parameters(), lr=0.1)  # no grads: its step changes nothing
        actx = runtime.Checkpointer(ctx, model=model, optimizer=opt, url=url + "-async", async_save=True)
        actx.save(1)  # warm the snapshot buffers, as every save after the first is
        actx.wait()
        plain = timed(lambda opt=opt: (step_work(), opt.step()))
        with_save = timed(lambda opt=opt, actx=actx: (actx.save(2), step_work(), opt.step()))
        out["async_block"].append(actx.last_block_s or 0.0)
        out["async_delay"].append(max(0.0, with_save - plain))
        actx.close()
        # the copy limit: the same tensors into buffers that exist already (warmed once)
        tensors = list(state["model"].values())
        buffers = [torch.empty_like(t) for t in tensors]
        for _ in range(2):
            t0 = time.perf_counter()
            for buf, t in zip(buffers, tensors, strict=True):
                buf.copy_(t)
            copy_s = time.perf_counter() - t0
        out["copy"].append(copy_s)
        del buffers
        os.unlink(path)
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", default="100,1024")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--dir", default=None, help="where to write (default: a temp dir on the disk of this checkout)"
    )
    args = parser.parse_args()
    ctx = runtime.init(backend="gloo")
    base = tempfile.mkdtemp(
        prefix="ckpt-bench-",
        dir=args.dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir),
    )
    cache_note = (
        "page cache dropped before loads"
        if drop_caches()
        else "page cache NOT dropped (not root): loads may read from memory"
    )
    print(
        f"checkpoint benchmark: torch {torch.__version__}, {os.cpu_count()} cpus, dir {base};"
        f" {cache_note}; median of {args.repeats}"
    )
    print(
        f"{'state':>8} | {'torch.save':>10} {'+fsync':>8} {'orch save':>10} {'ratio':>6} {'vs+fsync':>8}"
        f" | {'torch.load':>10} {'orch load':>10} {'ratio':>6}"
        f" | {'sync stall':>10} {'async stall':>11} {'ratio':>6}"
        f" | {'delay':>7} {'copy limit':>10} {'stall/copy':>10} {'stall s/GiB':>11}"
    )
    try:
        for mib in (int(x) for x in args.sizes_mib.split(",")):
            r = bench_size(ctx, mib, args.repeats, base)
            gib = mib / 1024
            print(
                f"{mib:>5} MiB | {gib / r['torch_save']:>6.2f}GB/s"
                f" {gib / r['torch_save_fsync']:>6.2f}GB/s {gib / r['orch_save']:>6.2f}GB/s"
                f" {r['orch_save'] / r['torch_save']:>6.2f} {r['orch_save'] / r['torch_save_fsync']:>8.2f} |"
                f" {gib / r['torch_load']:>6.2f}GB/s {gib / r['orch_load']:>6.2f}GB/s"
                f" {r['orch_load'] / r['torch_load']:>6.2f} |"
                f" {r['sync_block']:>9.3f}s {r['async_block']:>10.3f}s"
                f" {r['async_block'] / r['sync_block']:>6.2f} |"
                f" {r['async_delay']:>6.3f}s {r['copy']:>9.3f}s {r['async_block'] / r['copy']:>10.2f}"
                f" {r['async_block'] / gib:>10.3f}s",
                flush=True,
            )
        print("ratios are orchestrator time / baseline time (GiB/s shown as GB/s columns: GiB per second)")
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    runtime.shutdown()


if __name__ == "__main__":
    sys.exit(main())
