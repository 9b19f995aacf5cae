"""The slurm backend: `orch submit` hands the supervisor to sbatch through submitit
(scheduler.py); inside the allocation it runs each attempt as one srun step (supervisor.py),
with one node agent per node forking that node's ranks (node_agent.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from orchestrator.backends.api import RunOptions, Submission
from orchestrator.backends.slurm.batch_guard import guarded_python
from orchestrator.contract import Event
from orchestrator.errors import OrchError, UsageError
from orchestrator.spec.config import ClusterConfig
from orchestrator.storage.root_safety import check_storage_root
from orchestrator.storage.rundir import RunDir
from orchestrator.storage.runid import point_index_of_path
from orchestrator.storage.sweepdir import SweepDir
from orchestrator.supervision.status import LiveState


def _job_id(events: Sequence[dict[str, Any]]) -> str | None:
    jobs = [e["job_id"] for e in events if e.get("event") == Event.SUBMITTED and e.get("job_id")]
    return str(jobs[-1]) if jobs else None


def _cancelled_before_it_ran(events: Sequence[dict[str, Any]], job_id: str) -> bool:
    """Whether `orch cancel` reached this job (the latest submission) before it started. Pure.
    A `job_started` belongs to the latest submission before it, or, with none since the run's
    last resume, to the next one: sbatch answers once the job is queued, and the job may start
    (and write `job_started`) before `orch submit` appends `submitted`."""
    cancelled = started = submitted = False
    for e in events:
        kind = e.get("event")
        if kind == Event.RESUMED:
            cancelled = started = submitted = False  # an earlier submission's story is not this job's
        elif kind == Event.SUBMITTED:
            if submitted:  # a later submission: the earlier one's start is not this job's
                cancelled = started = False
            submitted = True
        elif kind == Event.JOB_STARTED:
            started = True
        elif kind == Event.CANCEL_REQUESTED and str(e.get("job_id")) == job_id:
            cancelled = True
    return cancelled and not started


def check_one_allocation(configs: Sequence[tuple[int, ClusterConfig]]) -> None:
    """Refuse points that ask Slurm for different allocations: a job array has one."""
    from orchestrator.backends.slurm.render import submitit_parameters

    first_index, first = configs[0]
    wanted = submitit_parameters(first)
    for index, config in configs[1:]:
        params = submitit_parameters(config)
        differs = sorted(k for k in set(wanted) | set(params) if wanted.get(k) != params.get(k))
        if not differs and config.slurm.max_requeues != first.slurm.max_requeues:
            differs = ["max_requeues"]
        if not differs and config.job.python != first.job.python:
            differs = ["job.python"]
        if differs:
            raise UsageError(
                f"sweep: point {index} asks Slurm for another allocation ({differs[0]}) than point"
                f" {first_index}; a Slurm sweep is one job array, whose tasks share resources.* and slurm.*"
            )


class SlurmBackend:
    name: ClassVar[str] = "slurm"
    foreground_hint: ClassVar[str | None] = (
        "run: runs the local backend; for Slurm use `orch submit`, or pass --backend local"
    )
    submit_hint: ClassVar[str | None] = None

    def render(self, config: ClusterConfig, *, run_id: str, run_dir: str, python: str) -> str:
        from orchestrator.backends.slurm.render import render_slurm

        return render_slurm(config, run_id=run_id, run_dir=run_dir, folder=f"{run_dir}/slurm", python=python)

    def check_storage(self, storage_root: str) -> None:
        """A shared filesystem path (submitit's files live there) under which no other user can
        swap a run directory: its batch step unpickles what it finds in the run's `slurm/`."""
        from orchestrator.backends.slurm.scheduler import submitit_folder

        submitit_folder(storage_root)  # refuses object-store roots before anything is created
        check_storage_root(storage_root)

    def check_host(self, config: ClusterConfig) -> None:
        """Nothing to check here: the GPUs are the compute nodes', and Slurm itself refuses a
        gres request that no node can satisfy."""

    def run(self, config: ClusterConfig, run: RunDir, options: RunOptions) -> Any:
        raise OrchError(self.foreground_hint or "run: not offered by the slurm backend")

    def submit(self, config: ClusterConfig, run: RunDir, python: str) -> Submission:
        from orchestrator.backends.slurm import scheduler

        folder = scheduler.submitit_folder(run.url)
        # The batch step checks the pickle before submitit loads it (batch_guard.py).
        job_id = scheduler.submit(
            config, run_url=run.url, folder=folder, python=guarded_python(python, folder)
        )
        return Submission(job_id=job_id)

    def check_sweep(self, spec: Any) -> None:
        """A sweep is one job array: every task gets the same allocation, so the points may
        differ in anything but what the batch script asks Slurm for."""
        check_one_allocation(list(zip((p.index for p in spec.points), spec.configs, strict=True)))

    def run_sweep(
        self, sweep: SweepDir, record: dict[str, Any], points: Sequence[RunDir], console: Any
    ) -> Any:
        raise OrchError(self.foreground_hint or "run: not offered by the slurm backend")

    def submit_sweep(self, sweep: SweepDir, record: dict[str, Any], points: Sequence[RunDir]) -> list[str]:
        """The points as one job array (at most max_parallel tasks at once); each task supervises
        its point as `orch submit` would, requeues itself on preemption and resumes alone."""
        import sys

        from orchestrator.backends.slurm import scheduler
        from orchestrator.spec.config import config_from_run_record

        configs = [(point_index_of_path(p.url), config_from_run_record(p.read_run_config())) for p in points]
        check_one_allocation(configs)  # again: a point resumed alone may have changed its resources
        config = configs[0][1]
        parallelism = record.get("max_parallel") or len(points)
        folder = scheduler.submitit_folder(sweep.url)
        job_ids = scheduler.submit_array(
            config,
            run_urls=[p.url for p in points],
            folder=folder,
            python=guarded_python(config.job.python or sys.executable, folder),
            parallelism=parallelism,
        )
        array_id = job_ids[0].partition("_")[0]
        for point, job_id in zip(points, job_ids, strict=True):
            point.append_event(
                Event.SUBMITTED,
                backend=self.name,
                job_id=job_id,
                array_job_id=array_id,
                nodes=config.resources.nodes,
                ranks_per_node=config.resources.ranks_per_node,
            )
        sweep.append_event(
            Event.SUBMITTED, backend=self.name, array_job_id=array_id, points=[p.run_id for p in points]
        )
        return job_ids

    def sweep_active(self, sweep: SweepDir) -> bool:
        """Nothing runs a Slurm sweep but its tasks, whose states say it all."""
        return False

    def cancel_sweep(self, sweep: SweepDir, points: Sequence[Any]) -> str:
        """scancel every point's latest job (its array task, or the job of a point resumed on its
        own); each cancel is recorded first, so that no task's supervisor mistakes it for a
        preemption. Jobs that already ended are skipped."""
        from orchestrator.backends.slurm.scheduler import cancel_jobs
        from orchestrator.supervision.status import summarize

        if not any(e.get("event") == Event.SUBMITTED for e in sweep.events()):
            raise OrchError(f"sweep {sweep.sweep_id} was never submitted to Slurm")
        to_cancel = []
        for point in points:
            events = point.events()
            job_id = _job_id(events)
            if job_id is not None and summarize(events)["state"] not in ("succeeded", "failed", "cancelled"):
                # Every point's job id checked before any cancel is recorded: a crafted one
                # refuses the whole cancel, and leaves no point half-cancelled.
                to_cancel.append((point, _recorded_job_id(job_id, point.run_id)))
        if not to_cancel:
            raise OrchError(f"sweep {sweep.sweep_id} has no point left to cancel")
        for point, job_id in to_cancel:
            point.dir.append_event(Event.CANCEL_REQUESTED, job_id=job_id)
        job_ids = [job_id for _, job_id in to_cancel]
        cancel_jobs(job_ids)
        return f"cancelled {len(job_ids)} Slurm job(s) of sweep {sweep.sweep_id}: {' '.join(job_ids)}"

    def live_state(self, run: RunDir, events: Sequence[dict[str, Any]]) -> LiveState:
        """What Slurm says of the run's latest job. A job id not in Slurm's form (a crafted
        record) is never passed to a command: its state is unknown, and the other runs of a
        sweep or a listing still get theirs (cancel still refuses it, in one line)."""
        from orchestrator.backends.slurm.scheduler import is_job_id, map_state, scheduler_state

        job_id = _job_id(events)
        if job_id is None or not is_job_id(job_id):
            return LiveState()
        raw = scheduler_state(job_id)
        if raw is None and _cancelled_before_it_ran(events, job_id):
            # A job array's task cancelled while still pending leaves no record at all.
            raw = "CANCELLED"
        return LiveState(scheduler_state=map_state(raw), scheduler_raw=raw)

    def cancel(self, run: RunDir, events: Sequence[dict[str, Any]]) -> str:
        from orchestrator.backends.slurm.scheduler import cancel

        job_id = _job_id(events)
        if job_id is None:
            raise OrchError(f"run {run.run_id} was never submitted to Slurm")
        job_id = _recorded_job_id(job_id, run.run_id)
        # Recorded first: the supervisor reads it when the SIGTERM arrives, to tell a cancel
        # from a preemption (which it would requeue).
        run.append_event(Event.CANCEL_REQUESTED, job_id=job_id)
        cancel(job_id)
        return f"cancelled Slurm job {job_id} of run {run.run_id}"


def _recorded_job_id(job_id: str, run_id: str) -> str:
    """A job id from a run's events, checked before anything acts on it (scheduler.py); the
    one-line refusal names the run."""
    from orchestrator.backends.slurm.scheduler import checked_job_id

    try:
        return checked_job_id(job_id)
    except OrchError as exc:
        raise OrchError(f"run {run_id}: {exc}") from None


BACKEND = SlurmBackend()
