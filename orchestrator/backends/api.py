"""The Backend protocol: what `orch` needs of a place where ranks run.

`cli.py` and `orch status` reach a backend only through this interface (orchestrator.backends.
get_backend); each backend is one folder under orchestrator/backends/ whose package exports
`BACKEND`. Rendering is pure (a dry run of exactly what `run` or `submit` would start); the
other methods do the I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from orchestrator.spec.config import ClusterConfig
from orchestrator.storage.rundir import RunDir
from orchestrator.storage.sweepdir import SweepDir
from orchestrator.supervision.status import LiveState


@dataclass(frozen=True)
class RunOptions:
    """How `orch run` shows a run in the foreground."""

    show_ranks: tuple[int, ...] | None = None  # None: every rank's output on the console
    ranks_to_stdout: bool = True  # False: stdout is kept for a JSON summary (`--json`)


@dataclass(frozen=True)
class Submission:
    job_id: str


class Backend(Protocol):
    name: ClassVar[str]
    # What `orch run` / `orch submit` say when the backend does not offer them.
    foreground_hint: ClassVar[str | None]  # None: `orch run` works here
    submit_hint: ClassVar[str | None]  # None: `orch submit` works here

    def render(self, config: ClusterConfig, *, run_id: str, run_dir: str, python: str) -> str:
        """The exact launch, as text; nothing is started."""

    def check_storage(self, storage_root: str) -> None:
        """Refuse (OrchError) a storage root this backend cannot use, before a run dir exists."""

    def check_host(self, config: ClusterConfig) -> None:
        """Refuse (OrchError) what this machine cannot give the run (GPUs), before anything starts."""

    def run(self, config: ClusterConfig, run: RunDir, options: RunOptions) -> Any:
        """Supervise the run in the foreground until it ends (`orch run`); its RunResult."""

    def submit(self, config: ClusterConfig, run: RunDir, python: str) -> Submission:
        """Hand the run to the scheduler (`orch submit`)."""

    def check_sweep(self, spec: Any) -> None:
        """Refuse (OrchError) a sweep this backend cannot run as one (Slurm: points that ask for
        different allocations cannot share a job array)."""

    def run_sweep(
        self, sweep: SweepDir, record: dict[str, Any], points: Sequence[RunDir], console: Any
    ) -> dict[int, str]:
        """Run these points of a sweep in the foreground (`orch sweep`); point index -> state."""

    def submit_sweep(self, sweep: SweepDir, record: dict[str, Any], points: Sequence[RunDir]) -> list[str]:
        """Hand these points of a sweep to the scheduler as one job array; their job ids."""

    def sweep_active(self, sweep: SweepDir) -> bool:
        """Whether something of this backend still works on the sweep beyond what its points'
        states show (a local sweep's runner, with points queued)."""

    def cancel_sweep(self, sweep: SweepDir, points: Sequence[Any]) -> str:
        """Stop a running sweep (`orch cancel SWEEP`); what was done, one line."""

    def live_state(self, run: RunDir, events: Sequence[dict[str, Any]]) -> LiveState:
        """What the run's events cannot say: is its supervisor alive, what does the scheduler
        report (`orch status`)."""

    def cancel(self, run: RunDir, events: Sequence[dict[str, Any]]) -> str:
        """Stop a running run (`orch cancel`); what was done, one line."""
