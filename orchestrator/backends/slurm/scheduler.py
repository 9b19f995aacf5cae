"""The slurm backend's scheduler calls: submit (sbatch through submitit), state (sacct, squeue,
scontrol), cancel (scancel). What is submitted is rendered by render.py.

A job id read back from a run directory (its `submitted` events) is checked before it reaches a
command (`checked_job_id`): a run directory may be written by others, and `--user=root` given
to scancel would cancel every job of that user. It then goes after `--`, or attached to its
option (`--jobs=ID`), so that not even a checked value could be read as an option."""

from __future__ import annotations

import os
import re
import subprocess
from typing import Mapping

from orchestrator.backends.slurm.render import submitit_parameters
from orchestrator.errors import OrchError
from orchestrator.spec.config import ClusterConfig

# ---------------------------------------------------------------------------- job ids

# What orch records: submitit's job id, a job's (`4242`) or a job array task's (`4242_3`). ASCII
# digits only: Python's \d and str.isdecimal() also take other scripts' digits.
JOB_ID = re.compile(r"[0-9]+(?:_[0-9]+)?")


def is_job_id(value: object) -> bool:
    """Whether `value`, read from a run's events, has the form orch records job ids in."""
    text = str(value) if type(value) is int else value
    return isinstance(text, str) and JOB_ID.fullmatch(text) is not None


def checked_job_id(value: object) -> str:
    """`value`, a job id read from a run's events, as a string: OrchError (one line, naming the
    field) unless it has the form orch records job ids in."""
    if not is_job_id(value):
        raise OrchError(
            f"events.jsonl: job_id {value!r} is not a Slurm job id (digits, or ARRAY_TASK as 4242_3);"
            " not passing it to Slurm"
        )
    return str(value)


# ---------------------------------------------------------------------------- scheduler calls


def _run(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise OrchError(f"{argv[0]} not found: is this a Slurm login node (is SLURM_CONF set)?") from None
    except subprocess.TimeoutExpired:
        raise OrchError(f"{argv[0]} did not answer within {timeout:g}s: is slurmctld reachable?") from None


def submit(
    config: ClusterConfig, *, run_url: str, folder: str, python: str, env: Mapping[str, str] | None = None
) -> str:
    """Submit the supervisor of `run_url` with submitit; returns the Slurm job id."""
    import submitit

    from orchestrator.backends.slurm.supervisor import supervise

    executor = submitit.SlurmExecutor(folder=folder, python=python, max_num_timeout=config.slurm.max_requeues)
    executor.update_parameters(**submitit_parameters(config))
    try:
        job = executor.submit(supervise, run_url)
    except subprocess.CalledProcessError as exc:
        raise OrchError(f"sbatch refused the job: {_stderr_line(exc)}") from None
    return str(job.job_id)


def submit_array(
    config: ClusterConfig, *, run_urls: list[str], folder: str, python: str, parallelism: int
) -> list[str]:
    """One job array (`--array=0-N%parallelism`) whose task i supervises run_urls[i]: every task
    is a whole run with the allocation of `config` (the same for all). Its task job ids."""
    import submitit

    from orchestrator.backends.slurm.supervisor import supervise

    executor = submitit.SlurmExecutor(folder=folder, python=python, max_num_timeout=config.slurm.max_requeues)
    executor.update_parameters(**submitit_parameters(config), array_parallelism=parallelism)
    try:
        jobs = executor.map_array(supervise, run_urls)
    except subprocess.CalledProcessError as exc:
        raise OrchError(f"sbatch refused the job array: {_stderr_line(exc)}") from None
    return [str(job.job_id) for job in jobs]


def _stderr_line(exc: subprocess.CalledProcessError) -> str:
    raw = exc.stderr or b""
    lines = (raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)).strip().splitlines()
    return lines[-1] if lines else str(exc)


_STATE_MAP = {
    "PENDING": "pending",
    "CONFIGURING": "pending",
    "REQUEUED": "preempted-requeued",
    "REQUEUE_HOLD": "preempted-requeued",
    "REQUEUE_FED": "preempted-requeued",
    "PREEMPTED": "preempted-requeued",
    "RUNNING": "running",
    "COMPLETING": "running",
    "SUSPENDED": "running",
    "RESIZING": "running",
    "COMPLETED": "succeeded",
    "CANCELLED": "cancelled",
}


# Set once a state query timed out: the controller is unreachable, and every later query in
# this process would wait as long again (`orch status SWEEP` asks once per point).
_unreachable: list[str] = []
STATE_QUERY_S = 10.0


def scheduler_state(job_id: str) -> str | None:
    """The job's Slurm state (sacct when accounting works, else squeue -t all, else scontrol);
    None when the scheduler does not know it, or does not answer (`orch status` then says so
    and shows what the run's events know)."""
    job_id = checked_job_id(job_id)
    if _unreachable:
        return None
    try:
        return _scheduler_state(job_id)
    except OrchError as exc:
        if "did not answer" not in str(exc):
            raise
        _unreachable.append(str(exc))
        return None


def _scheduler_state(job_id: str) -> str | None:
    proc = _run(["sacct", "-n", "-X", "-P", f"--jobs={job_id}", "-o", "State"], STATE_QUERY_S)
    if proc.returncode == 0 and proc.stdout.strip():
        return proc.stdout.strip().splitlines()[-1].split()[0]
    proc = _run(["squeue", "-h", "-t", "all", f"--jobs={job_id}", "-o", "%T"], STATE_QUERY_S)
    if proc.returncode == 0 and proc.stdout.strip():
        return proc.stdout.strip().splitlines()[0]
    proc = _run(["scontrol", "show", "job", "--", job_id], STATE_QUERY_S)
    if proc.returncode == 0:
        for token in proc.stdout.split():
            if token.startswith("JobState="):
                return token.split("=", 1)[1]
    array, sep, task = job_id.partition("_")
    if sep and task.isdecimal():
        # A task cancelled (or ended) while still pending never got a record of its own: the
        # array's record of its unsplit tasks (`ARRAY`, or `ARRAY_[1-3%1]`) holds its state.
        proc = _run(["sacct", "-n", "-X", "-P", f"--jobs={array}", "-o", "JobID,State"], STATE_QUERY_S)
        if proc.returncode == 0:
            return array_record_state(proc.stdout, array, int(task))
    return None


def array_record_state(sacct_lines: str, array: str, task: int) -> str | None:
    """The state of task `task` of job array `array` from `sacct -o JobID,State` lines: its own
    record, else the record of the unsplit tasks that covers it. Pure."""
    own = covering = None
    for line in sacct_lines.splitlines():
        job, _, state = line.partition("|")
        state = state.split()[0] if state.split() else ""
        if job == f"{array}_{task}":
            own = state
        elif job == array or job.startswith(f"{array}_[") and task in _task_range(job[len(array) + 2 : -1]):
            covering = state
    return own or covering


def _task_range(spec: str) -> set[int]:
    """`1-3,7%2` -> {1, 2, 3, 7}."""
    tasks: set[int] = set()
    for part in spec.partition("%")[0].split(","):
        low, _, high = part.partition("-")
        if low.isdecimal() and (not high or high.isdecimal()):
            tasks.update(range(int(low), int(high or low) + 1))
    return tasks


def map_state(slurm_state: str | None) -> str | None:
    if slurm_state is None:
        return None
    return _STATE_MAP.get(slurm_state, "failed")


def cancel(job_id: str) -> None:
    """scancel a job, an array (its id cancels every task) or one task (`ARRAY_TASK`)."""
    proc = _run(["scancel", "--", checked_job_id(job_id)])
    if proc.returncode != 0:
        raise OrchError(f"scancel {job_id}: {proc.stderr.strip() or 'failed'}")


# What scancel says of a job that has already ended (or was purged): nothing left to cancel.
_ALREADY_ENDED = ("Invalid job id", "already completing or completed", "Job/step already completing")


def cancel_jobs(job_ids: list[str]) -> None:
    """scancel several jobs or array tasks at once; one that already ended is not an error."""
    proc = _run(["scancel", "--", *(checked_job_id(j) for j in job_ids)])
    problems = [
        line
        for line in proc.stderr.strip().splitlines()
        if line and not any(p in line for p in _ALREADY_ENDED)
    ]
    if proc.returncode != 0 and problems:
        raise OrchError(f"scancel: {problems[0]}")


def submitit_folder(run_dir: str) -> str:
    """Where submitit keeps its pickles and the batch log: a shared filesystem path."""
    if "://" not in run_dir or run_dir.startswith("file://"):
        return os.path.join(run_dir.removeprefix("file://"), "slurm")
    raise OrchError(
        "storage.root: the slurm backend needs a shared filesystem path (submitit's files live there)"
    )
