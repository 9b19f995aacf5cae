"""A torchrun-style script that knows nothing of the orchestrator: it reads the env contract,
joins the group with init_process_group("gloo"), all-reduces once and records what it saw."""

import json
import os
import sys

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
t = torch.ones(1) * (dist.get_rank() + 1)
dist.all_reduce(t)
out: dict = dict(os.environ)  # everything the launcher set; the tests pick the contract out
out["all_reduce"] = t.item()
out["torchelastic_launched"] = dist.is_torchelastic_launched()
out["dist_rank"] = dist.get_rank()
out["dist_world"] = dist.get_world_size()
out["argv"] = sys.argv[1:]
out["slurm"] = {k: v for k, v in os.environ.items() if k.startswith("SLURM")}
with open(os.path.join(os.environ["ORCH_RUN_DIR"], f"env-{out['RANK']}.json"), "w") as fh:
    json.dump(out, fh)
dist.destroy_process_group()
