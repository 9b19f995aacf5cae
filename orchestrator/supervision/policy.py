"""The restart policy, pure: after each attempt, what to do next and why.

Both supervisors (local and Slurm) feed every attempt's outcome through `decide`; nothing else
decides whether a run restarts, resumes, or gives up, so the two backends cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

from orchestrator.contract import Phase
from orchestrator.spec.config import RestartSpec
from orchestrator.supervision.failures import FailureClass, RankFailure


class AttemptState(StrEnum):
    """How one attempt (one launch of every rank) ended."""

    SUCCEEDED = "succeeded"  # every rank exited 0
    FAILED = "failed"  # a rank failed or hung
    PREEMPTED = "preempted"  # every rank checkpointed on request and exited 75
    STOPPED = "stopped"  # the supervisor itself was asked to stop (Ctrl-C, orch cancel)


class Action(StrEnum):
    FINISH = "finish"  # the run is over (succeeded, or stopped on request)
    RESTART = "restart"  # a failed attempt: start again from the newest checkpoint after a backoff
    ROLLBACK = "rollback"  # diverged: restart from the newest checkpoint, past the data since it
    RESUME = "resume"  # a preempted attempt: continue at once (locally) or requeue (Slurm)
    GIVE_UP = "give_up"  # the run failed for good
    LEAVE = "leave"  # this supervisor stops; a newer incarnation of the run goes on elsewhere


@dataclass(frozen=True)
class PolicyState:
    """What the policy remembers between attempts."""

    restarts: int = 0  # restarts used after failures (preemptions do not count)
    without_progress: int = 0  # attempts in a row that ended without a new committed checkpoint
    last_checkpoint: int | None = None  # the newest committed step when the last attempt ended


Beat = tuple[int, float, str, float]  # contract.read_heartbeat: step, time, phase, step-time EMA

# After a rank fails in the run's first attempt before any step, the other ranks get this long to
# fail on their own before they are stopped: the start-up rule (cannot_start) needs to see an
# error on every rank, or on more than one rank and every node, and a stop that came first would
# hide it (the job would be retried): an error that every rank meets (an import) reaches them at
# slightly different moments, and stopped at once a rank is killed before its error or while
# writing its record (seen in 1 run of 5 with 2 ranks, in 6 of 15 with fresh interpreters; on
# Slurm, the first node's failure stopped the other node's ranks). Over as soon as no rank runs;
# a rank that waits for the failed one (a rendezvous) costs the whole wait, once.
START_FAILURE_SETTLE_S = 2.0


def past_first_step(beats: Mapping[int, Beat | None]) -> bool:
    """Whether a heartbeat shows a rank past its first step: a step counted, or a phase only
    training reaches. Until then the runtime beats `init` at step 0, and a job that does not
    use the runtime never beats. `exit` at step 0 says nothing: the runtime's shutdown beats it
    whatever the step (Checkpointer.close beats its last saved step or 0), so a watcher keeps
    what it saw while the attempt ran."""
    training = (Phase.TRAIN, Phase.SYNC, Phase.SAVE)
    return any(b is not None and (b[0] > 0 or b[2] in training) for b in beats.values())


def settle_before_stop(attempt: int, reached_step: bool) -> float:
    """Seconds to leave the other ranks running after a rank's failure before stopping them:
    START_FAILURE_SETTLE_S in the run's first attempt before any step, else none (no checkpoint
    can complete without the failed rank; the restart should begin at once). Every place that
    stops ranks after a failure asks this: the local loop, the Slurm supervisor's STOP to the
    other nodes, and each node agent's stop of its node's other ranks."""
    return START_FAILURE_SETTLE_S if attempt == 0 and not reached_step else 0.0


@dataclass(frozen=True)
class AttemptFacts:
    """What tells a job that cannot start from one that failed on the way (the loop gathers
    them from the attempt's number, its ranks' heartbeats and every failed rank)."""

    attempt: int  # the attempt's number in the run: 0 is the run's first
    reached_step: bool  # a rank's heartbeat got past its first step
    # failures.one_failure_everywhere: the ranks that failed on their own failed alike, and they
    # are every rank, or more than one with one on every node (not one rank's or one node's error)
    one_failure_everywhere: bool


@dataclass(frozen=True)
class Decision:
    action: Action
    state: PolicyState
    reason: str | None = None
    backoff_s: float = 0.0


def backoff_delay(restart: RestartSpec, restart_number: int) -> float:
    """Seconds to wait before restart number `restart_number` (1-based): doubling, capped."""
    return min(restart.backoff_max_s, restart.backoff_s * (2 ** (restart_number - 1)))


def cannot_start(root: RankFailure, facts: AttemptFacts, progressed: bool) -> bool:
    """The start-up rule: the run's first attempt failed before any step, alike everywhere (on
    every rank, or on more than one rank and every node: AttemptFacts.one_failure_everywhere),
    and with an error no retry cures at start (Classified.fatal_at_start: a missing module, a
    syntax error, a known start-up error...). A user error: not retried. One rank's or one
    node's failure is retried however fatal it looks: a missing node-local file, a node without
    GPUs, are not the job's.

    Only the first attempt: a later one (a restart after progress, a resumed or requeued run)
    ran before, so a module or file missing now may be a flaky shared filesystem, and a retry
    may find it (failures.MISSING_TYPES)."""
    return (
        facts.attempt == 0
        and not facts.reached_step
        and not progressed
        and facts.one_failure_everywhere
        and root.classified.fatal_at_start
    )


def decide(
    restart: RestartSpec,
    state: PolicyState,
    outcome: AttemptState,
    root: RankFailure | None,
    newest_checkpoint: int | None,
    facts: AttemptFacts | None = None,
) -> Decision:
    """What to do after an attempt that ended `outcome`, with the run's newest committed
    checkpoint now `newest_checkpoint`; `facts` (None: unknown) say how far it got.

    An attempt made progress when it committed a checkpoint: then the no-progress count starts
    again at 0; otherwise it grows by one, and at `restart.crash_loop_attempts` the run stops (a
    crash loop, or preemptions that never get far enough to save).
    """
    progressed = newest_checkpoint != state.last_checkpoint
    streak = 0 if progressed else state.without_progress + 1
    state = replace(state, without_progress=streak, last_checkpoint=newest_checkpoint)
    looping = 0 < restart.crash_loop_attempts <= streak
    if outcome in (AttemptState.SUCCEEDED, AttemptState.STOPPED):
        return Decision(Action.FINISH, state)
    if outcome is AttemptState.PREEMPTED:
        if looping:
            return Decision(Action.GIVE_UP, state, "preempted repeatedly without a new checkpoint")
        return Decision(Action.RESUME, state, "preempted")
    if root is not None and root.classified.kind is FailureClass.STALE:
        # Terminal for this incarnation, never retried: a restart would take a higher number
        # and fence the live one. Not the run's end either: the live incarnation writes that.
        return Decision(
            Action.LEAVE, state, "a newer incarnation of this run has started; leaving it the run"
        )
    if root is not None and facts is not None and cannot_start(root, facts, progressed):
        return Decision(
            Action.GIVE_UP,
            state,
            "not restarting: the job cannot start (it failed alike on every node before its first step,"
            " with an error no retry cures)",
        )
    diverged = root is not None and root.classified.kind is FailureClass.DIVERGED
    if diverged and restart.on_divergence == "fail":
        return Decision(
            Action.GIVE_UP,
            state,
            "not restarting: training diverged, and a restart from the same checkpoint and data would"
            " diverge again (restart.on_divergence: rollback skips the data)",
        )
    if root is not None and not root.classified.retryable and not diverged:
        return Decision(
            Action.GIVE_UP,
            state,
            # The hint is said with the failure (loop.py), once.
            f"not restarting: {root.error_type or f'exit code {root.exitcode}'} fails the same way on every"
            " attempt",
        )
    if looping:
        return Decision(
            Action.GIVE_UP,
            state,
            f"not restarting: crash loop ({streak} failed attempts in a row without a new checkpoint)",
        )
    if state.restarts >= restart.max_restarts:
        return Decision(Action.GIVE_UP, state, f"no restarts left ({restart.max_restarts} allowed)")
    state = replace(state, restarts=state.restarts + 1)
    return Decision(
        Action.ROLLBACK if diverged else Action.RESTART,
        state,
        f"{'rollback' if diverged else 'restart'} {state.restarts}/{restart.max_restarts}",
        backoff_delay(restart, state.restarts),
    )
