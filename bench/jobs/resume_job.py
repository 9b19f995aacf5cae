"""A model of BENCH_MIB MiB (float32, 32 MiB tensors) that checkpoints at step 2 and, on its
first attempt, dies at step 3 after dropping the page cache (root), so the restart reads its
checkpoint from disk. Each attempt writes the wall time of its first trained step into
BENCH_OUT/first-step-<attempt>. Used by bench/resume_bench.py."""

from __future__ import annotations

import os
import time

import torch

from orchestrator import runtime

MIB = int(os.environ.get("BENCH_MIB", "1024"))


class Blob(torch.nn.Module):
    def __init__(self, mib: int) -> None:
        super().__init__()
        chunk, total = 32 * 1024 * 1024 // 4, mib * 1024 * 1024 // 4
        self.params = torch.nn.ParameterList()
        while total > 0:
            # empty, not random: a resumed job's weights come from the checkpoint, and the
            # baseline loads into an untouched model too
            self.params.append(torch.nn.Parameter(torch.empty(min(chunk, total))))
            total -= chunk


def drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
    except OSError:
        pass


def main() -> None:
    ctx = runtime.init()
    model = Blob(MIB)
    ckpt = runtime.Checkpointer(ctx, model=model, interval=2, keep=1)
    progress = ckpt.restore()
    first = progress.step + 1 if progress else 1
    if progress is None:
        with torch.no_grad():
            for p in model.params:
                p.fill_(1.0)
    for step in range(first, 5):
        with torch.no_grad():
            model.params[0].add_(1.0)  # the "trained step"
        if step == first:
            with open(os.path.join(os.environ["BENCH_OUT"], f"first-step-{ctx.attempt}"), "w") as fh:
                fh.write(repr(time.time()))
        ckpt.step_end(step)
        if step == 3 and ctx.attempt == 0:
            ckpt.close()
            drop_caches()
            os._exit(1)
    ckpt.close()
    runtime.shutdown()


if __name__ == "__main__":  # bench/resume_bench.py imports Blob
    main()
