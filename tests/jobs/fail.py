"""Fails on purpose: rank FAIL_RANK raises FAIL_WITH after joining the group; others wait."""

import os
import time

import torch.distributed as dist

from orchestrator import runtime

ctx = runtime.init()
if ctx.rank == int(os.environ.get("FAIL_RANK", "1")):
    raise ValueError(os.environ.get("FAIL_WITH", "deliberate failure for the test"))
dist.barrier()  # the healthy ranks block here until the supervisor stops them
time.sleep(60)
