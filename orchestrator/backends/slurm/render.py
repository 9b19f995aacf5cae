"""What the slurm backend submits, rendered: pure (no subprocess, no clock).

submitit is the Slurm client: it writes the batch script, submits it, and carries the
supervisor function to the allocation. With `use_srun=False` the batch step runs one
supervisor process on the first node; the supervisor runs each attempt as one `srun` step: one
node agent per node (`templates/slurm_node.sh` starts orchestrator/backends/slurm/node_agent.py,
which forks the node's ranks), or with `launch.mode: subprocess` one task per rank
(`templates/slurm_task.sh` maps SLURM_* onto the env contract). Every value from cluster.yaml
was validated by orchestrator/spec/config.py (no control characters; names and flags match
strict patterns; no backslash, which sbatch's own #SBATCH parser reads as an escape even inside
quotes) before it gets here, and submitit quotes each #SBATCH value, so sbatch reads each as one
word. No secret is rendered: job.env refuses secret-looking names, and job.pass_env values reach
the batch step through sbatch's environment, never through this script.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any

from orchestrator.contract import ENV_ATTEMPT, ENV_GPUS_PER_RANK, ENV_INCARNATION, ENV_LOG_DIR
from orchestrator.spec.config import ClusterConfig
from orchestrator.spec.plan import REDACTED, attempt_shared_env, entrypoint_argv, redact

# The step scripts ship inside the package (templates/ at the top of the source tree is the
# package orchestrator.templates), so an installed wheel has them too.
TEMPLATES = Path(str(files("orchestrator.templates")))
TASK_SCRIPT = TEMPLATES / "slurm_task.sh"
NODE_SCRIPT = TEMPLATES / "slurm_node.sh"


def submitit_parameters(config: ClusterConfig) -> dict[str, Any]:
    """SlurmExecutor parameters: the allocation and the batch step, nothing per attempt."""
    res, slurm = config.resources, config.slurm
    params: dict[str, Any] = {
        "job_name": config.job_name,
        "nodes": res.nodes,
        "ntasks_per_node": res.ranks_per_node,
        "cpus_per_task": res.cpus_per_rank,
        # USR2 without `B:` goes to the step's tasks (the ranks), not to the batch shell.
        "signal_delay_s": slurm.signal_lead_s,
        "use_srun": False,
        "stderr_to_stdout": True,
        "wckey": None,  # no --wckey line (submitit would add "submitit")
        "additional_parameters": {"requeue": True},
    }
    if res.time_limit_minutes is not None:
        params["time"] = res.time_limit_minutes
    if res.gpus_per_node:
        params["gres"] = f"gpu:{res.gpus_per_node}"
    if res.memory:
        params["mem"] = res.memory
    for key in ("partition", "account", "qos"):
        value = getattr(slurm, key)
        if value:
            params[key] = value
    for flag in slurm.extra_flags:
        name, _, value = flag[2:].partition("=")
        params["additional_parameters"][name.replace("-", "_")] = value if value else True
    if slurm.setup:
        params["setup"] = list(slurm.setup)
    return params


def submitit_command(python: str, folder: str) -> str:
    """The batch step's command, as submitit's SlurmExecutor writes it from the `python` orch
    gives it (batch_guard.guarded_python: the pickle is checked before submitit loads it)."""
    from orchestrator.backends.slurm.batch_guard import guarded_python

    return " ".join([guarded_python(python, folder), "-u -m submitit.core._submit", shlex.quote(folder)])


def batch_script(config: ClusterConfig, folder: str, python: str) -> str:
    """The complete batch script that `orch submit` hands to sbatch, byte for byte."""
    from submitit.slurm.slurm import _make_sbatch_string  # the function submitit submits with

    params = submitit_parameters(config)
    return _make_sbatch_string(command=submitit_command(python, folder), folder=folder, **params)


def uses_node_agent(config: ClusterConfig) -> bool:
    """One agent per node forks that node's ranks (launch.mode auto), or one srun task per rank
    runs as a fresh interpreter (launch.mode subprocess)."""
    return config.launch.mode != "subprocess"


def uses_persistent_agents(config: ClusterConfig) -> bool:
    """The node agents' step lives for the allocation and runs every attempt (slurm.persistent_agents)."""
    return uses_node_agent(config) and config.slurm.persistent_agents


def attempt_step_name(config: ClusterConfig, attempt: int | str) -> str:
    """A step per attempt is named after it (`squeue -s` shows which attempt runs), and its tasks
    see that name as SLURM_JOB_NAME; persistent agents give each attempt's ranks the same."""
    return f"{config.job_name}-attempt{attempt}"


def step_argv(
    config: ClusterConfig, *, log_dir: str, attempt: int, python: str, persistent: bool = False
) -> list[str]:
    """The srun command of one attempt, or (`persistent`) of the node agents' step that runs
    attempts from `attempt` on. With the node agent: one task per node, which starts the node's
    ranks (orchestrator/backends/slurm/node_agent.py); else one task per rank. Either way every
    rank's output goes to its own file, rank-R.log."""
    res = config.resources
    name = f"{config.job_name}-agents" if persistent else attempt_step_name(config, attempt)
    argv = ["srun", f"--job-name={name}", f"--nodes={res.nodes}"]
    if uses_node_agent(config):
        argv += [
            f"--ntasks={res.nodes}",
            "--ntasks-per-node=1",
            f"--cpus-per-task={res.ranks_per_node * res.cpus_per_rank}",
            "--distribution=block",
            f"--output={log_dir}/node-%n.log",
            f"--error={log_dir}/node-%n.log",
        ]
    else:
        argv += [
            f"--ntasks={res.world_size}",
            f"--ntasks-per-node={res.ranks_per_node}",
            f"--cpus-per-task={res.cpus_per_rank}",
            f"--output={log_dir}/rank-%t.log",
            f"--error={log_dir}/rank-%t.log",
        ]
    argv += ["--kill-on-bad-exit=1", "--open-mode=append", "--export=ALL"]
    if res.gpus_per_node:
        argv.append(f"--gres=gpu:{res.gpus_per_node}")
    job_argv = entrypoint_argv(config, config.job.python or python)
    if uses_node_agent(config):
        return [*argv, "/bin/bash", str(NODE_SCRIPT), python, "--", *job_argv]
    if config.job.python in (None, python):
        # Through orchestrator.launch.entry, as the local launchers and the node agents' fork
        # servers run a job: an exception from the job's first line (a failed import) is an
        # error record, so a job that cannot start is not retried. Only with orch's own
        # interpreter: a job.python of its own may not have this package.
        job_argv = (job_argv[0], "-m", "orchestrator.launch.entry", *job_argv[1:])
    return [*argv, "/bin/bash", str(TASK_SCRIPT), *job_argv]


# srun must not inherit the batch step's own task layout: each attempt's step states its own.
BATCH_LAYOUT_VARS = (
    "SLURM_NTASKS",
    "SLURM_NPROCS",
    "SLURM_TASKS_PER_NODE",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_CPUS_PER_TASK",
)
# What sbatch's --gpus-per-task and --gpu-bind leave in the batch step's environment, where srun
# reads them as its own options. A one-task-per-rank step keeps them (each task gets its GPUs).
# A node agent's step is one task per node holding all the node's GPUs, which srun refuses
# alongside a per-task GPU count; the agent applies the binding to its ranks instead
# (ENV_GPUS_PER_RANK). SLURM_TRES_PER_TASK (Slurm 23.11+) carries the same request.
GPU_BINDING_VARS = ("SLURM_GPUS_PER_TASK", "SLURM_GPU_BIND", "SLURM_TRES_PER_TASK")


def gpus_per_rank(environ: Mapping[str, str], config: ClusterConfig) -> int | None:
    """How many GPUs each rank gets when the batch step binds GPUs per task, else None (every
    rank sees all of its node's GPUs). Pure."""
    per_task = environ.get("SLURM_GPUS_PER_TASK", "").rpartition(":")[2]  # `[type:]count`
    if per_task.isdecimal() and int(per_task) > 0:
        return int(per_task)
    bind = environ.get("SLURM_GPU_BIND", "")
    res = config.resources
    if bind and "none" not in bind.split(",") and res.gpus_per_node >= res.ranks_per_node:
        return res.gpus_per_node // res.ranks_per_node  # srun's binding: an equal share per task
    return None


def srun_environ(environ: Mapping[str, str], config: ClusterConfig) -> dict[str, str]:
    """The batch step's environment as an attempt's srun gets it, before step_env is added. Pure."""
    env = {k: v for k, v in environ.items() if k not in BATCH_LAYOUT_VARS}
    if uses_node_agent(config):
        per_rank = gpus_per_rank(environ, config)
        env = {k: v for k, v in env.items() if k not in GPU_BINDING_VARS}
        if per_rank is not None:
            env[ENV_GPUS_PER_RANK] = str(per_rank)
    return env


def step_env(
    config: ClusterConfig,
    *,
    run_id: str,
    run_dir: str,
    attempt: int,
    master_addr: str,
    master_port: int | str,
    log_dir: str,
) -> dict[str, str]:
    """What the supervisor adds to srun's environment: job.env, the runtime settings and the
    contract's shared part. The per-rank part comes from the node agent or templates/slurm_task.sh."""
    extra = {ENV_INCARNATION: str(attempt), ENV_LOG_DIR: log_dir}
    return attempt_shared_env(
        config,
        run_id=run_id,
        run_dir=run_dir,
        attempt=attempt,
        master_addr=master_addr,
        master_port=master_port,
        extra_env=extra,
    )


def render_slurm(config: ClusterConfig, *, run_id: str, run_dir: str, folder: str, python: str) -> str:
    """`orch render --backend slurm`: the batch script, then each attempt's step, as submitted."""
    log_dir = f"{run_dir}/logs/attempt-<N>"
    persistent = uses_persistent_agents(config)
    env = step_env(
        config,
        run_id=run_id,
        run_dir=run_dir,
        attempt="<N>",
        master_addr="<first host of SLURM_JOB_NODELIST>",
        master_port="<leased on that host>",
        log_dir=log_dir,
    )  # type: ignore[arg-type]
    env[ENV_INCARNATION] = "<N>"
    env["TORCHELASTIC_RESTART_COUNT"] = env[ENV_ATTEMPT] = "<N>"
    lines = [
        "# orch render --backend slurm; nothing was submitted",
        f"# ---- batch script (sbatch), as submitit writes it into {folder}",
        batch_script(config, folder, python).rstrip("\n"),
        "",
        *(
            [
                "# ---- the node agents' srun step, started by the supervisor in the batch step with the"
                " allocation's first attempt N",
                "#      (and again after a node or agent failure); every later attempt is a message to"
                " its agents (slurm.persistent_agents)",
            ]
            if persistent
            else ["# ---- each attempt N: one srun step run by the supervisor in the batch step"]
        ),
        "# step environment (secrets redacted; the agents' channel address and token are added):"
        if persistent
        else "# step environment (secrets redacted):",
    ]
    for key, value in sorted(redact(env, config.job.pass_env).items()):
        lines.append(f"#   {key}={value}")
    for name in config.job.pass_env:
        lines.append(f"#   {name}={REDACTED} (pass_env: taken from the environment at submission)")
    lines.append(
        shlex.join(
            step_argv(config, log_dir=log_dir, attempt=0, python=python, persistent=persistent)
        ).replace("attempt0", "attempt<N>")
    )
    lines.append("")
    if uses_node_agent(config):
        lines.append(
            "# ---- per node, the agent (orchestrator/backends/slurm/node_agent.py)"
            " forks its ranks from one fork server:"
        )
        lines.append(
            "#      RANK=ROLE_RANK=SLURM_NODEID*LOCAL_WORLD_SIZE+LOCAL_RANK"
            " NODE_RANK=GROUP_RANK=SLURM_NODEID, SLURM_PROCID=RANK, SLURM_LOCALID=LOCAL_RANK"
        )
    else:
        lines.append(
            "# ---- per rank (templates/slurm_task.sh):"
            " RANK=ROLE_RANK=SLURM_PROCID LOCAL_RANK=SLURM_LOCALID NODE_RANK=GROUP_RANK=SLURM_NODEID"
        )
    res = config.resources
    for node in range(res.nodes):
        ranks = ", ".join(str(node * res.ranks_per_node + r) for r in range(res.ranks_per_node))
        lines.append(f"#   node {node}: ranks {ranks}")
    return "\n".join(lines) + "\n"
