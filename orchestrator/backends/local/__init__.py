"""The local backend: every simulated node's ranks on this machine, supervised in the foreground
by `orch run` (supervisor.py); rendered by orchestrator.spec.render."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, ClassVar

from orchestrator.backends.api import RunOptions, Submission
from orchestrator.contract import Event
from orchestrator.errors import OrchError, UsageError
from orchestrator.spec.config import ClusterConfig
from orchestrator.storage.rundir import RunDir, this_host
from orchestrator.supervision.status import LiveState

from .liveness import supervisor_alive


def _supervisor_start(events: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    starts = [e for e in events if e.get("event") == Event.RUN_STARTED]
    return starts[-1] if starts else None


def _finished_since_start(events: Sequence[dict[str, Any]]) -> bool:
    """Whether the run's latest supervisor recorded its end (a resumed run starts anew)."""
    finished = False
    for e in events:
        if e.get("event") == Event.RUN_STARTED:
            finished = False
        elif e.get("event") == Event.RUN_FINISHED:
            finished = True
    return finished


class LocalBackend:
    name: ClassVar[str] = "local"
    foreground_hint: ClassVar[str | None] = None
    submit_hint: ClassVar[str | None] = (
        "submit: needs the slurm backend (set `backend: slurm` or pass --backend slurm);"
        " `orch run` runs locally"
    )

    def render(self, config: ClusterConfig, *, run_id: str, run_dir: str, python: str) -> str:
        from orchestrator.spec.plan import build_local_plan
        from orchestrator.spec.render import render_local

        port = config.distributed.master_port if isinstance(config.distributed.master_port, int) else "<auto>"
        plan = build_local_plan(
            config, run_id=run_id, run_dir=run_dir, attempt=0, master_port=port, python=python
        )
        return render_local(plan)

    def check_storage(self, storage_root: str) -> None:
        pass  # any fsspec URL: logs are staged locally and uploaded per attempt

    def run(self, config: ClusterConfig, run: RunDir, options: RunOptions) -> Any:
        from orchestrator.backends.local.supervisor import Supervisor
        from orchestrator.launch.fork_launcher import ForkServerLauncher

        supervisor = Supervisor(
            config=config,
            run=run,
            console=sys.stderr,
            rank_console=sys.stdout if options.ranks_to_stdout else sys.stderr,
            show_ranks=options.show_ranks,
            launcher=ForkServerLauncher(config),
        )
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, _frame: supervisor.request_stop(signum))
        # SIGUSR2: a preemption drill; ranks checkpoint and exit 75, and a new attempt resumes.
        signal.signal(signal.SIGUSR2, lambda signum, _frame: supervisor.request_preemption(signum))
        return supervisor.run_all()

    def submit(self, config: ClusterConfig, run: RunDir, python: str) -> Submission:
        raise UsageError(self.submit_hint or "submit: not offered by the local backend")

    def live_state(self, run: RunDir, events: Sequence[dict[str, Any]]) -> LiveState:
        start = _supervisor_start(events)
        if start is None or start.get("host") != this_host() or not start.get("pid"):
            return LiveState()  # not started yet, or supervised on another machine
        return LiveState(supervisor_alive=supervisor_alive(start))

    def cancel(self, run: RunDir, events: Sequence[dict[str, Any]]) -> str:
        start = _supervisor_start(events)
        if start is None or _finished_since_start(events):
            raise OrchError(f"run {run.run_id} is not running")
        if start.get("host") != this_host():
            raise OrchError(f"run {run.run_id} is supervised on {start.get('host')}; cancel it there")
        gone = (
            f"run {run.run_id} is not running: its supervisor (pid {start['pid']}) is gone;"
            f" `orch resume {run.run_id}` continues it"
        )
        if not supervisor_alive(start):
            raise OrchError(gone)  # never signal a pid that may now be someone else's process
        try:
            os.kill(int(start["pid"]), signal.SIGTERM)
        except ProcessLookupError:
            raise OrchError(gone) from None
        run.append_event(Event.CANCEL_REQUESTED, pid=start["pid"])
        return f"asked the supervisor of run {run.run_id} (pid {start['pid']}) to stop"


BACKEND = LocalBackend()

__all__ = ["BACKEND", "LocalBackend"]
