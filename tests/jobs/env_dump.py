"""A torchrun-style script that knows nothing of the orchestrator: it reads the env contract,
joins the group with init_process_group("gloo"), all-reduces once and records what it saw."""

import json
import os
import sys

import torch
import torch.distributed as dist

NAMES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "NNODES",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RESTART_COUNT",
    "ORCH_RUN_ID",
    "ORCH_RUN_DIR",
    "ORCH_ATTEMPT",
)

dist.init_process_group("gloo")
t = torch.ones(1) * (dist.get_rank() + 1)
dist.all_reduce(t)
out = {name: os.environ.get(name) for name in NAMES}
out["all_reduce"] = t.item()
out["dist_rank"] = dist.get_rank()
out["dist_world"] = dist.get_world_size()
out["argv"] = sys.argv[1:]
out["slurm"] = {k: v for k, v in os.environ.items() if k.startswith("SLURM")}
with open(os.path.join(os.environ["ORCH_RUN_DIR"], f"env-{out['RANK']}.json"), "w") as fh:
    json.dump(out, fh)
dist.destroy_process_group()
