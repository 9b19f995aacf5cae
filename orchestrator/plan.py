"""The launch plan and the env contract: which process runs where, with which environment.

Pure: no clock, no subprocess, no network. The env contract is defined here and only here;
every backend produces it (locally the supervisor sets it, under Slurm the step launcher maps
SLURM_* onto `contract_env`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from .config import ClusterConfig

# The torchrun contract plus the orchestrator's own three. A script written for torchrun runs
# unchanged: it reads these and calls init_process_group with init_method="env://".
CONTRACT_VARS: tuple[str, ...] = (
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

# Settings the runtime reads (orchestrator.runtime); not part of the torchrun contract.
RUNTIME_VARS: tuple[str, ...] = (
    "ORCH_CKPT_INTERVAL",
    "ORCH_CKPT_KEEP",
    "ORCH_CKPT_ASYNC",
    "ORCH_DIST_BACKEND",
    "ORCH_ERROR_FILE",
    "ORCH_INCARNATION",
    "ORCH_HEARTBEAT_FILE",
    "TORCHELASTIC_ERROR_FILE",
    "OMP_NUM_THREADS",
    "PYTHONUNBUFFERED",
)

# Anywhere in the name (WANDB_API_KEY, HF_TOKEN...), or as a whole `_`-separated word (OPENAI_KEY,
# DB_PASS, BASIC_AUTH): hiding a harmless value costs little, printing a secret cannot be undone.
_SECRET_NAME = re.compile(
    r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|API_?KEY|ACCESS_?KEY|PRIVATE)"
    r"|(?<![A-Z0-9])(KEY|PASS|PWD|AUTH)(?![A-Z0-9])",
    re.IGNORECASE,
)
REDACTED = "<redacted>"


PER_RANK_VARS: tuple[str, ...] = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


def shared_contract_env(
    *,
    nnodes: int,
    ranks_per_node: int,
    master_addr: str,
    master_port: int | str,
    attempt: int | str,
    run_id: str,
    run_dir: str,
) -> dict[str, str]:
    """The part of the env contract that every rank of an attempt shares."""
    values = {
        "WORLD_SIZE": nnodes * ranks_per_node,
        "LOCAL_WORLD_SIZE": ranks_per_node,
        "NNODES": nnodes,
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": master_port,
        "TORCHELASTIC_RESTART_COUNT": attempt,
        "ORCH_RUN_ID": run_id,
        "ORCH_RUN_DIR": run_dir,
        "ORCH_ATTEMPT": attempt,
    }
    return {k: str(v) for k, v in values.items()}


def contract_env(*, rank: int, local_rank: int, node_rank: int, **shared: object) -> dict[str, str]:
    """The env contract of one rank, as strings, in CONTRACT_VARS order."""
    values = {
        "RANK": str(rank),
        "LOCAL_RANK": str(local_rank),
        "NODE_RANK": str(node_rank),
        "GROUP_RANK": str(node_rank),
        **shared_contract_env(**shared),  # type: ignore[arg-type]
    }
    ordered = {k: values[k] for k in CONTRACT_VARS}
    assert len(ordered) == len(values)
    return ordered


def runtime_env(config: ClusterConfig) -> dict[str, str]:
    """Settings from cluster.yaml that the runtime inside each rank needs."""
    return {
        "ORCH_CKPT_INTERVAL": str(config.storage.checkpoint_interval),
        "ORCH_CKPT_KEEP": str(config.storage.keep),
        "ORCH_CKPT_ASYNC": "1" if config.storage.async_save else "0",
        "ORCH_DIST_BACKEND": config.distributed.backend,
        "OMP_NUM_THREADS": str(config.resources.cpus_per_rank),
        "PYTHONUNBUFFERED": "1",
    }


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def redact(env: Mapping[str, str], pass_env: tuple[str, ...] = ()) -> dict[str, str]:
    """A copy safe to print or store: secret-looking and passed-through values are hidden."""
    return {k: (REDACTED if k in pass_env or is_secret_name(k) else v) for k, v in env.items()}


def entrypoint_argv(config: ClusterConfig, python: str) -> tuple[str, ...]:
    job = config.job
    if job.module is not None:
        return (python, "-m", job.module, *job.args)
    assert config.script_path is not None
    return (python, config.script_path, *job.args)


@dataclass(frozen=True, kw_only=True)
class RankSpec:
    rank: int
    local_rank: int
    node_rank: int
    argv: tuple[str, ...]
    # The full environment the orchestrator adds for this rank, except pass_env values, which
    # the launcher copies from its own environment at spawn time so they are never stored.
    env: Mapping[str, str]


@dataclass(frozen=True, kw_only=True)
class LaunchPlan:
    run_id: str
    run_dir: str
    attempt: int
    nnodes: int
    ranks_per_node: int
    master_addr: str
    master_port: int | str
    pass_env: tuple[str, ...]
    ranks: tuple[RankSpec, ...]

    @property
    def world_size(self) -> int:
        return self.nnodes * self.ranks_per_node


def build_local_plan(
    config: ClusterConfig,
    *,
    run_id: str,
    run_dir: str,
    attempt: int,
    master_port: int | str,
    python: str,
    master_addr: str = "127.0.0.1",
    extra_env: Mapping[str, str] | None = None,
) -> LaunchPlan:
    """Every rank of every simulated node on this machine."""
    res = config.resources
    argv = entrypoint_argv(config, config.job.python or python)
    shared = {**config.job.env, **runtime_env(config), **(extra_env or {})}
    ranks = []
    for node in range(res.nodes):
        for local in range(res.ranks_per_node):
            rank = node * res.ranks_per_node + local
            env = {
                **shared,
                **contract_env(
                    rank=rank,
                    local_rank=local,
                    node_rank=node,
                    nnodes=res.nodes,
                    ranks_per_node=res.ranks_per_node,
                    master_addr=master_addr,
                    master_port=master_port,
                    attempt=attempt,
                    run_id=run_id,
                    run_dir=run_dir,
                ),
            }
            ranks.append(RankSpec(rank=rank, local_rank=local, node_rank=node, argv=argv, env=MappingProxyType(env)))
    return LaunchPlan(
        run_id=run_id,
        run_dir=run_dir,
        attempt=attempt,
        nnodes=res.nodes,
        ranks_per_node=res.ranks_per_node,
        master_addr=master_addr,
        master_port=master_port,
        pass_env=config.job.pass_env,
        ranks=tuple(ranks),
    )
