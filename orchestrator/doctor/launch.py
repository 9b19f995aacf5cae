"""The config, resolved: what the launch will be (world size, ranks per node, devices)."""

from __future__ import annotations

from orchestrator.doctor.check import Check, ok
from orchestrator.spec.config import ClusterConfig

AREA = "config"


def config_checks(config: ClusterConfig) -> list[Check]:
    res = config.resources
    if res.gpus_per_node:
        devices = f"{res.gpus_per_node} GPU(s) per node, {config.distributed.backend} (nccl on GPUs)"
    else:
        devices = "CPU, gloo"
    limit = f", time limit {res.time_limit}" if res.time_limit else ""
    return [
        ok(
            AREA,
            "launch",
            f"{config.backend}: world size {res.world_size} = {res.nodes} node(s) x {res.ranks_per_node}"
            f" rank(s), {devices}, {res.cpus_per_rank} CPU(s) per rank{limit}",
        )
    ]
