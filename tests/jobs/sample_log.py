"""Records which samples each rank trains on, step by step, so a test can check that a run
resumed (on the same or another world size) sees every sample of the epoch exactly once.

One epoch of --dataset-size samples in batches of --batch per rank; checkpoints through the
runtime (storage.checkpoint_interval), which also saves on a stop request (orch cancel)."""

import argparse
import json
import os
import time

import torch

from orchestrator import runtime

p = argparse.ArgumentParser()
p.add_argument("--dataset-size", type=int, default=101)
p.add_argument("--batch", type=int, default=2)
p.add_argument("--step-sleep", type=float, default=0.05)
args = p.parse_args()

ctx = runtime.init()
sampler = runtime.ResumableDistributedSampler(
    args.dataset_size, rank=ctx.rank, world_size=ctx.world_size, seed=1
)
model = torch.nn.Linear(1, 1)
ckpt = runtime.Checkpointer(ctx, model=model, sampler=sampler)
progress = ckpt.restore()
step = progress.step if progress else 0
path = os.path.join(os.environ["ORCH_RUN_DIR"], f"samples-a{ctx.attempt}-r{ctx.rank}.jsonl")
with open(path, "a") as out:

    def train_on(batch: list[int]) -> None:
        global step
        step += 1
        sampler.advance(len(batch))
        out.write(json.dumps({"step": step, "idx": batch}) + "\n")
        out.flush()
        time.sleep(args.step_sleep)
        ckpt.step_end(step)

    batch: list[int] = []
    for index in sampler:
        batch.append(int(index))
        if len(batch) == args.batch:
            train_on(batch)
            batch = []
    if batch:
        train_on(batch)
ckpt.save(step)  # a no-op if step_end saved it; made again if that save was skipped
ckpt.close()
runtime.shutdown()
