"""What a job tells `orch status` about its progress beyond the heartbeats: its total steps."""

from __future__ import annotations

import os

from orchestrator.contract import ENV_ATTEMPT, ENV_RUN_DIR, Event


def declare_total_steps(total: int) -> None:
    """Say how many steps the run trains in all, so `orch status` can show an ETA. Any rank may
    call it; rank 0's call is recorded (in the run's events), once per attempt. Outside
    `orch run`/`orch submit` it does nothing."""
    run_dir = os.environ.get(ENV_RUN_DIR)
    if not run_dir or os.environ.get("RANK", "0") != "0":
        return
    from orchestrator.storage.rundir import RunDir

    try:
        RunDir(run_dir).append_event(
            Event.TOTAL_STEPS, total_steps=int(total), attempt=int(os.environ.get(ENV_ATTEMPT, "0"))
        )
    except OSError:
        pass  # bookkeeping: never fail training for it
