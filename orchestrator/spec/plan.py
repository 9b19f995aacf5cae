"""The launch plan and the env contract: which process runs where, with which environment.

Pure: no clock, no subprocess, no network. The contract's names live in orchestrator.contract;
its values are computed here, once, for every backend (locally the launcher sets them, under
Slurm the node agent or templates/slurm_task.sh maps SLURM_* onto the per-rank part).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from orchestrator.contract import (
    CONTRACT_VARS,
    ENV_ATTEMPT,
    ENV_CKPT_ASYNC,
    ENV_CKPT_INTERVAL,
    ENV_CKPT_KEEP,
    ENV_COLLECTIVE_TIMEOUT,
    ENV_DETERMINISTIC,
    ENV_DIST_BACKEND,
    ENV_PASS_ENV,
    ENV_PROFILE,
    ENV_RUN_DIR,
    ENV_RUN_ID,
    ENV_VISIBLE_GPUS,
    PER_RANK_VARS,
    REDACTED,
    ROLE_NAME,
    encode_profile,
)
from orchestrator.spec.config import ClusterConfig, is_secret_name

# REDACTED (contract.py: one marker for renders, logs and records) is what renders show in place
# of a secret-looking or passed-through value. The config refuses secret-looking names in job.env;
# redact() still hides them wherever else they come from.


def shared_contract_env(
    *,
    nnodes: int,
    ranks_per_node: int,
    master_addr: str,
    master_port: int | str,
    attempt: int | str,
    run_id: str,
    run_dir: str,
    max_restarts: int,
) -> dict[str, str]:
    """The part of the env contract that every rank of an attempt shares."""
    values = {
        "WORLD_SIZE": nnodes * ranks_per_node,
        "LOCAL_WORLD_SIZE": ranks_per_node,
        "NNODES": nnodes,
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": master_port,
        "TORCHELASTIC_RESTART_COUNT": attempt,
        # One role, so a role's ranks are the world's; a group is a node, as in torchrun.
        "ROLE_NAME": ROLE_NAME,
        "ROLE_WORLD_SIZE": nnodes * ranks_per_node,
        "GROUP_WORLD_SIZE": nnodes,
        "TORCHELASTIC_RUN_ID": run_id,
        "TORCHELASTIC_MAX_RESTARTS": max_restarts,
        "TORCHELASTIC_USE_AGENT_STORE": "False",  # ranks rendezvous through MASTER_ADDR:PORT
        ENV_RUN_ID: run_id,
        ENV_RUN_DIR: run_dir,
        ENV_ATTEMPT: attempt,
    }
    return {k: str(v) for k, v in values.items()}


def own_contract_env(*, rank: int, local_rank: int, node_rank: int) -> dict[str, str]:
    """The part of the env contract that differs from rank to rank (PER_RANK_VARS, in order)."""
    node = str(node_rank)
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(local_rank),
        "NODE_RANK": node,
        "GROUP_RANK": node,
        "ROLE_RANK": str(rank),
    }


def contract_env(*, rank: int, local_rank: int, node_rank: int, **shared: object) -> dict[str, str]:
    """The env contract of one rank, as strings, in CONTRACT_VARS order."""
    values = {
        **own_contract_env(rank=rank, local_rank=local_rank, node_rank=node_rank),
        **shared_contract_env(**shared),  # type: ignore[arg-type]
    }
    ordered = {k: values[k] for k in CONTRACT_VARS}
    assert len(ordered) == len(values)
    return ordered


def runtime_env(config: ClusterConfig) -> dict[str, str]:
    """Settings from cluster.yaml that the runtime inside each rank needs."""
    return {
        ENV_CKPT_INTERVAL: str(config.storage.checkpoint_interval),
        ENV_CKPT_KEEP: str(config.storage.keep),
        ENV_CKPT_ASYNC: "1" if config.storage.async_save else "0",
        ENV_DIST_BACKEND: config.distributed.backend,
        ENV_COLLECTIVE_TIMEOUT: f"{config.distributed.timeout_s:g}",
        ENV_DETERMINISTIC: "1" if config.job.deterministic else "0",
        "OMP_NUM_THREADS": str(config.resources.cpus_per_rank),
        "PYTHONUNBUFFERED": "1",
        **({ENV_PROFILE: profile_setting(config)} if config.profile.enabled else {}),
        # The names (never the values) whose values a rank's error record redacts.
        **({ENV_PASS_ENV: ",".join(config.job.pass_env)} if config.job.pass_env else {}),
    }


def profile_setting(config: ClusterConfig) -> str:
    p = config.profile
    return encode_profile(
        {
            "wait": p.wait,
            "warmup": p.warmup,
            "active": p.active,
            "repeat": p.repeat,
            "ranks": p.ranks,
            "memory": p.memory,
            "shapes": p.record_shapes,
            "stack": p.with_stack,
        }
    )


def attempt_shared_env(
    config: ClusterConfig,
    *,
    run_id: str,
    run_dir: str,
    attempt: int | str,
    master_addr: str,
    master_port: int | str,
    extra_env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """What every rank of an attempt gets alike: job.env, the runtime settings, extra_env and the
    contract's shared part, last so that nothing overrides it."""
    res = config.resources
    contract = shared_contract_env(
        nnodes=res.nodes,
        ranks_per_node=res.ranks_per_node,
        master_addr=master_addr,
        master_port=master_port,
        attempt=attempt,
        run_id=run_id,
        run_dir=run_dir,
        max_restarts=config.restart.max_restarts,
    )
    return {**config.job.env, **runtime_env(config), **(extra_env or {}), **contract}


def is_redacted(name: str, pass_env: tuple[str, ...] = ()) -> bool:
    """Whether redact() hides this variable's value: it decides by the name alone."""
    return name in pass_env or is_secret_name(name)


def redact(env: Mapping[str, str], pass_env: tuple[str, ...] = ()) -> dict[str, str]:
    """A copy safe to print or store: secret-looking and passed-through values are hidden."""
    return {k: (REDACTED if is_redacted(k, pass_env) else v) for k, v in env.items()}


def entrypoint_argv(config: ClusterConfig, python: str) -> tuple[str, ...]:
    job = config.job
    if job.module is not None:
        return (python, "-m", job.module, *job.args)
    assert config.script_path is not None
    return (python, config.script_path, *job.args)


class RankEnv(Mapping[str, str]):
    """One rank's environment additions, read-only: the plan's shared env with the rank's own
    variables on top.

    A view rather than a merged copy, so that a plan of 8000 ranks holds the shared variables
    once (building 8000 full dicts was most of the cost of planning). It behaves as the full
    Mapping the launchers expect; equality is Mapping equality, whatever the split. A plain
    class with slots, not a frozen dataclass: it is built once per rank, and a frozen
    dataclass costs 3x as much to build; read-only properties keep it immutable all the same.
    """

    __slots__ = ("_shared", "_own")

    def __init__(self, shared: Mapping[str, str], own: Mapping[str, str]) -> None:
        # Not copied: build_local_plan hands over dicts that nothing else holds.
        self._shared = shared
        self._own = own

    @property
    def shared(self) -> Mapping[str, str]:
        return self._shared

    @property
    def own(self) -> Mapping[str, str]:
        # Wrapped when asked for rather than when built: one object less per rank in the plan.
        return MappingProxyType(self._own)

    def __getitem__(self, name: str) -> str:
        own = self._own
        return own[name] if name in own else self._shared[name]

    def __contains__(self, name: object) -> bool:
        return name in self._own or name in self._shared

    def __iter__(self) -> Iterator[str]:
        own = self._own
        yield from (name for name in self._shared if name not in own)
        yield from own

    def __len__(self) -> int:
        own = self._own
        return len(own) + sum(1 for name in self._shared if name not in own)

    def __repr__(self) -> str:
        return f"RankEnv({dict(self)!r})"


# Slots: a plan holds one per rank, and they make building 8000 of them ~10% cheaper.
@dataclass(frozen=True, kw_only=True, slots=True)
class RankSpec:
    rank: int
    local_rank: int
    node_rank: int
    argv: tuple[str, ...]
    # The full environment the orchestrator adds for this rank, except pass_env values, which
    # the launcher copies from its own environment at spawn time so they are never stored.
    # In plans from build_local_plan, a RankEnv over the plan's shared_env.
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
    # The variables every rank gets with the same value: job.env, the runtime settings and the
    # shared part of the contract. Each rank's env is this plus its own PER_RANK_VARS.
    shared_env: Mapping[str, str]
    ranks: tuple[RankSpec, ...]

    @property
    def world_size(self) -> int:
        return self.nnodes * self.ranks_per_node


def gpu_slices(ids: Sequence[str], *, parts: int, each: int) -> list[str]:
    """CUDA_VISIBLE_DEVICES values for `parts` consumers of `each` GPUs: consecutive slices of
    `ids`. A slice past the end is empty (that consumer sees no GPU and says so). Pure."""
    return [",".join(ids[k * each : (k + 1) * each]) for k in range(parts)]


def node_gpus(host_gpus: tuple[str, ...], *, nodes: int, gpus_per_node: int) -> list[str] | None:
    """Each simulated node's CUDA_VISIBLE_DEVICES: consecutive slices of the host's GPUs, or
    None when nodes have no GPUs. The caller checked that the host has enough."""
    if gpus_per_node == 0:
        return None
    assert len(host_gpus) >= nodes * gpus_per_node, "checked by LocalBackend.check_host"
    return gpu_slices(host_gpus, parts=nodes, each=gpus_per_node)


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
    host_gpus: tuple[str, ...] = (),
) -> LaunchPlan:
    """Every rank of every simulated node on this machine. `host_gpus` (the host's GPU ids, as
    CUDA_VISIBLE_DEVICES names them) is sliced among the nodes, resources.gpus_per_node each:
    every rank of node k sees node k's GPUs, as on a cluster; with gpus_per_node 0 no rank sees
    any (a CPU node)."""
    res = config.resources
    argv = entrypoint_argv(config, config.job.python or python)
    merged = attempt_shared_env(
        config,
        run_id=run_id,
        run_dir=run_dir,
        attempt=attempt,
        master_addr=master_addr,
        master_port=master_port,
        extra_env=extra_env,
    )
    per_node_gpus = node_gpus(host_gpus, nodes=res.nodes, gpus_per_node=res.gpus_per_node)
    if per_node_gpus is None:
        merged[ENV_VISIBLE_GPUS] = ""  # the same on every rank: stays in the shared part
    # extra_env may name a per-rank variable; each rank's own value replaces it.
    shared = MappingProxyType({k: v for k, v in merged.items() if k not in PER_RANK_VARS})
    ranks = []
    for node in range(res.nodes):
        for local in range(res.ranks_per_node):
            rank = node * res.ranks_per_node + local
            own = own_contract_env(rank=rank, local_rank=local, node_rank=node)
            if per_node_gpus is not None:
                own[ENV_VISIBLE_GPUS] = per_node_gpus[node]
            ranks.append(
                RankSpec(rank=rank, local_rank=local, node_rank=node, argv=argv, env=RankEnv(shared, own))
            )
    return LaunchPlan(
        run_id=run_id,
        run_dir=run_dir,
        attempt=attempt,
        nnodes=res.nodes,
        ranks_per_node=res.ranks_per_node,
        master_addr=master_addr,
        master_port=master_port,
        pass_env=config.job.pass_env,
        shared_env=shared,
        ranks=tuple(ranks),
    )
