"""Fails on purpose: rank FAIL_RANK raises FAIL_TYPE(FAIL_WITH) after joining the group; the
others wait. With FAIL_ONLY_ATTEMPT=N it fails only in attempt N and otherwise succeeds."""

import builtins
import os
import time

import torch.distributed as dist

from orchestrator import runtime

ctx = runtime.init()
only = os.environ.get("FAIL_ONLY_ATTEMPT")
if only is None or int(only) == ctx.attempt:
    if ctx.rank == int(os.environ.get("FAIL_RANK", "1")):
        raise getattr(builtins, os.environ.get("FAIL_TYPE", "ValueError"))(
            os.environ.get("FAIL_WITH", "deliberate failure for the test")
        )
    dist.barrier()  # the healthy ranks block here until the supervisor stops them
    time.sleep(60)
dist.barrier()
print(f"rank {ctx.rank}: attempt {ctx.attempt} succeeded", flush=True)
runtime.shutdown()
