"""The benchmarks' rank: a torchrun-style script (knows nothing of the orchestrator) that joins
the group, all-reduces, and writes timestamps for bench/launch_bench.py.

BENCH_OUT     directory for the timestamp files
BENCH_CRASH   "1": in the first attempt rank 1 crashes after a few steps (the restart bench)
BENCH_MEMORY  "1": every rank records its memory after the all-reduce (the scale bench)
"""

import os
import time

import torch
import torch.distributed as dist

out = os.environ["BENCH_OUT"]
attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
dist.init_process_group("gloo")
rank = dist.get_rank()
tensor = torch.ones(1)
dist.all_reduce(tensor)
assert tensor.item() == dist.get_world_size()
if rank == 0:
    with open(os.path.join(out, f"allreduced-{attempt}"), "w") as fh:
        fh.write(repr(time.time()))
if os.environ.get("BENCH_MEMORY") == "1":
    import psutil

    info = psutil.Process().memory_full_info()
    with open(os.path.join(out, f"memory-{rank}"), "w") as fh:
        fh.write(f"{info.rss} {info.pss} {info.uss}")
    dist.barrier()
if os.environ.get("BENCH_CRASH") == "1" and attempt == 0:
    for _ in range(5):  # training
        dist.all_reduce(tensor)
        time.sleep(0.01)
    if rank == 1:
        with open(os.path.join(out, "crashed"), "w") as fh:
            fh.write(repr(time.time()))
        os._exit(1)
    time.sleep(120)  # the others wait for the launcher to stop them
dist.destroy_process_group()
