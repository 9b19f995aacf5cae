"""The config, resolved: what the launch will be (world size, ranks per node, devices)."""

from __future__ import annotations

from orchestrator.doctor.check import Check, fail, ok
from orchestrator.spec.config import ClusterConfig

AREA = "config"


def config_checks(config: ClusterConfig, *, storage_usable: bool = True) -> list[Check]:
    return [_launch(config), *_refusals(config, storage_usable)]


def _refusals(config: ClusterConfig, storage_usable: bool) -> list[Check]:
    """What `orch run` / `orch submit` would refuse before creating anything: a job.pass_env
    variable not set here, a storage root the backend cannot use."""
    import os

    from orchestrator.backends import get_backend
    from orchestrator.errors import OrchError

    found = []
    missing = [n for n in config.job.pass_env if n not in os.environ]
    if missing:
        found.append(
            fail(
                AREA,
                "job.pass_env",
                f"{', '.join(missing)} not set here",
                "export them before `orch submit`/`run`",
            )
        )
    try:
        if storage_usable:
            get_backend(config.backend).check_storage(config.storage_root)
    except OrchError as exc:
        verb = "submit" if config.backend == "slurm" else "run"
        found.append(fail(AREA, "storage.root", str(exc), f"`orch {verb}` would refuse it: see the message"))
    return found


def _launch(config: ClusterConfig) -> Check:
    res = config.resources
    if res.gpus_per_node:
        devices = f"{res.gpus_per_node} GPU(s) per node, {config.distributed.backend} (nccl on GPUs)"
    else:
        devices = "CPU, gloo"
    limit = f", time limit {res.time_limit}" if res.time_limit else ""
    return ok(
        AREA,
        "launch",
        f"{config.backend}: world size {res.world_size} = {res.nodes} node(s) x {res.ranks_per_node}"
        f" rank(s), {devices}, {res.cpus_per_rank} CPU(s) per rank{limit}",
    )
