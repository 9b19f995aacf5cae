"""The slurm backend: `orch submit` hands the supervisor to sbatch through submitit
(scheduler.py); inside the allocation it runs each attempt as one srun step (supervisor.py),
with one node agent per node forking that node's ranks (node_agent.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from orchestrator.backends.api import RunOptions, Submission
from orchestrator.contract import Event
from orchestrator.errors import OrchError, UsageError
from orchestrator.spec.config import ClusterConfig
from orchestrator.storage.rundir import RunDir
from orchestrator.storage.sweepdir import SweepDir
from orchestrator.supervision.status import LiveState


def _job_id(events: Sequence[dict[str, Any]]) -> str | None:
    jobs = [e["job_id"] for e in events if e.get("event") == Event.SUBMITTED and e.get("job_id")]
    return str(jobs[-1]) if jobs else None


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
        from orchestrator.backends.slurm.scheduler import submitit_folder

        submitit_folder(storage_root)  # refuses object-store roots before anything is created

    def check_host(self, config: ClusterConfig) -> None:
        """Nothing to check here: the GPUs are the compute nodes', and Slurm itself refuses a
        gres request that no node can satisfy."""

    def run(self, config: ClusterConfig, run: RunDir, options: RunOptions) -> Any:
        raise OrchError(self.foreground_hint or "run: not offered by the slurm backend")

    def submit(self, config: ClusterConfig, run: RunDir, python: str) -> Submission:
        from orchestrator.backends.slurm import scheduler

        job_id = scheduler.submit(
            config, run_url=run.url, folder=scheduler.submitit_folder(run.url), python=python
        )
        return Submission(job_id=job_id)

    def check_sweep(self, spec: Any) -> None:
        """A sweep is one job array: every task gets the same allocation, so the points may
        differ in anything but what the batch script asks Slurm for."""
        from orchestrator.backends.slurm.render import submitit_parameters

        first = submitit_parameters(spec.configs[0])
        for point, config in zip(spec.points, spec.configs, strict=True):
            params = submitit_parameters(config)
            differs = sorted(k for k in set(first) | set(params) if first.get(k) != params.get(k))
            if differs or config.slurm.max_requeues != spec.configs[0].slurm.max_requeues:
                what = differs[0] if differs else "max_requeues"
                raise UsageError(
                    f"sweep: point {point.index} asks Slurm for another allocation ({what}) than point 0;"
                    " a Slurm sweep is one job array, whose tasks share resources.* and slurm.*"
                )

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

        config = config_from_run_record(points[0].read_run_config())
        parallelism = record.get("max_parallel") or len(points)
        job_ids = scheduler.submit_array(
            config,
            run_urls=[p.url for p in points],
            folder=scheduler.submitit_folder(sweep.url),
            python=config.job.python or sys.executable,
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

    def cancel_sweep(self, sweep: SweepDir, points: Sequence[Any]) -> str:
        """scancel every job array of the sweep (a resumed sweep may have several); each point's
        cancel is recorded first, so that no task's supervisor mistakes it for a preemption."""
        from orchestrator.backends.slurm.scheduler import cancel

        arrays = sorted(
            {
                str(e["array_job_id"])
                for e in sweep.events()
                if e.get("event") == Event.SUBMITTED and e.get("array_job_id")
            }
        )
        if not arrays:
            raise OrchError(f"sweep {sweep.sweep_id} was never submitted to Slurm")
        for point in points:
            job_id = _job_id(point.events())
            if job_id is not None:
                point.dir.append_event(Event.CANCEL_REQUESTED, job_id=job_id)
        for array_id in arrays:
            cancel(array_id)
        return f"cancelled Slurm job array(s) {', '.join(arrays)} of sweep {sweep.sweep_id}"

    def live_state(self, run: RunDir, events: Sequence[dict[str, Any]]) -> LiveState:
        from orchestrator.backends.slurm.scheduler import map_state, scheduler_state

        job_id = _job_id(events)
        if job_id is None:
            return LiveState()
        raw = scheduler_state(job_id)
        return LiveState(scheduler_state=map_state(raw), scheduler_raw=raw)

    def cancel(self, run: RunDir, events: Sequence[dict[str, Any]]) -> str:
        from orchestrator.backends.slurm.scheduler import cancel

        job_id = _job_id(events)
        if job_id is None:
            raise OrchError(f"run {run.run_id} was never submitted to Slurm")
        # Recorded first: the supervisor reads it when the SIGTERM arrives, to tell a cancel
        # from a preemption (which it would requeue).
        run.append_event(Event.CANCEL_REQUESTED, job_id=job_id)
        cancel(job_id)
        return f"cancelled Slurm job {job_id} of run {run.run_id}"


BACKEND = SlurmBackend()
