"""Preemption: a signal only sets a flag; ranks agree on it at a step boundary.

SIGUSR2 (Slurm's `--signal` warning) and SIGTERM (Slurm preemption, `scontrol requeue`,
`scancel`, a supervisor stopping the attempt) set a flag and nothing else: no I/O in a signal
handler. `Checkpointer.step_end` all-reduces the flag, so all ranks stop at the same step,
even when the signal reached only one of them; they save that step and exit with
PREEMPTED_EXIT_CODE, which the supervisor reads as "checkpointed, start me again".
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from orchestrator.contract import PREEMPTED_EXIT_CODE, PREEMPTED_TYPE

from .errorfile import write_record

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

_requested: int | None = None
_installed = False


def _handler(signum: int, _frame: Any) -> None:
    global _requested
    _requested = signum


def install() -> None:
    """Route SIGUSR2 and SIGTERM to the flag (main thread only, once)."""
    global _installed
    if _installed:
        return
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler)
    # Both launchers start ranks with SIGUSR2 blocked, so a warning sent while the job was
    # still importing is pending, not lost: unblocking delivers it to the handler now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    _installed = True


def requested() -> int | None:
    """The signal that asked this rank to stop, or None."""
    return _requested


def request(signum: int = signal.SIGUSR2) -> None:
    """Ask for a coordinated stop from code (what the handler does)."""
    _handler(signum, None)


def exit_preempted(step: int) -> None:
    """Record why this rank stops (the error file the supervisor reads), then exit 75.

    The record matters under `srun --kill-on-bad-exit`: the first rank to exit 75 makes srun
    terminate the others, so the step's exit code alone cannot tell a preemption from a crash.
    """
    name = signal.Signals(_requested).name if _requested else "a request"
    write_record(PREEMPTED_TYPE, f"checkpointed step {step} after {name}", step=step)
    print(
        f"[orch] stopping at step {step} after {name}: checkpoint committed,"
        f" exiting {PREEMPTED_EXIT_CODE} to be resumed",
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(PREEMPTED_EXIT_CODE)
