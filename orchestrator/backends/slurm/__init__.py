"""The slurm backend: `orch submit` hands the supervisor to sbatch through submitit
(scheduler.py); inside the allocation it runs each attempt as one srun step (supervisor.py),
with one node agent per node forking that node's ranks (node_agent.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from orchestrator.backends.api import RunOptions, Submission
from orchestrator.contract import Event
from orchestrator.errors import OrchError
from orchestrator.spec.config import ClusterConfig
from orchestrator.storage.rundir import RunDir
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
