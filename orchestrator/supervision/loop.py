"""The supervisor loop, shared by every backend: attempts until the run succeeds, fails for good,
or is stopped.

    start attempt -> watch (exits, heartbeats) -> stop what is left -> root cause -> decide
        succeeded / stopped           -> finish
        failed, restarts left         -> backoff, next attempt from the newest checkpoint
        preempted                     -> resume (locally a new attempt; Slurm: requeue the job)
        not retryable, cannot start, crash loop, no restarts left -> give up

A backend supplies only the hooks of `AttemptDriver`: how an attempt's processes start, are
polled, signalled and stopped, and what each failed rank left behind. Every decision (root
cause, restart, backoff, crash loop, hang handling, the ledger's events) is made here, once.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from orchestrator.contract import HANG_TYPE, Event, read_heartbeat, secret_values
from orchestrator.spec.config import ClusterConfig
from orchestrator.storage.ckpt_store import newest_committed
from orchestrator.storage.rundir import RunDir
from orchestrator.supervision.failures import RankFailure, one_failure_everywhere, root_cause
from orchestrator.supervision.policy import (
    Action,
    AttemptFacts,
    AttemptState,
    Beat,
    Decision,
    PolicyState,
    decide,
    past_first_step,
    settle_before_stop,
)
from orchestrator.supervision.watchdog import Silence, silent_ranks, stopped_ranks

# How often the watchdog reads heartbeats, and how long stacks get to reach the logs.
WATCHDOG_PERIOD_S = 0.5
STACK_DUMP_WAIT_S = 1.0
# Process states of a rank that is not running any more (a zombie not yet reaped).
ENDED_STATES = frozenset({None, "Z", "X"})


def next_attempt(events: list[dict[str, Any]]) -> int:
    """The number the run's next attempt takes: one past every attempt it has had, so a
    requeued job or a resumed run continues the count (attempt numbers are also checkpoint
    incarnations: they must only grow)."""
    return 1 + max(
        (int(e.get("attempt", 0)) for e in events if e.get("event") == Event.ATTEMPT_STARTED), default=-1
    )


@dataclass(frozen=True)
class Started:
    """What a driver reports once an attempt's processes exist."""

    fields: Mapping[str, Any]  # for the attempt_started event (launcher, pids, job id...)
    heartbeats: Mapping[int, str]  # rank -> heartbeat file
    notice: str | None = None  # something the launcher wants said (why it could not fork...)


@dataclass(frozen=True)
class Ended:
    """How an attempt's processes ended, once nothing of it runs any more."""

    failed: bool  # some process exited non-zero
    first_seen: int | None = None  # the rank whose failure was seen first, where known
    fields: Mapping[str, Any] = field(default_factory=dict)  # for attempt_ended (exit codes...)


class AttemptDriver(Protocol):
    """A backend's part of supervision: start, poll, signal and stop one attempt's processes."""

    def start(self, attempt: int, master_port: int) -> Started: ...

    def poll(self) -> Ended | None:
        """None while every process runs or has exited 0; how it ended once it is over on its
        own (all exited, or one failed: the loop then stops the rest)."""

    def signal_ranks(self, signum: int) -> None:
        """Deliver a signal to every running rank (stack dumps, waking a stopped rank)."""

    def process_state(self, rank: int) -> str | None:
        """The rank's one-letter process state (T: stopped) where this backend can see it."""

    def stop(self, grace_s: float) -> Ended:
        """Stop what is left (SIGTERM, grace, SIGKILL), release the attempt, and report how it
        ended. Called once per attempt, also when everything has exited already."""

    def failures(self, ended: Ended) -> list[RankFailure]:
        """Every failed rank of the finished attempt, from exit codes and error records."""


class RunHooks(Protocol):
    """The backend's part around attempts: what it says, when it must stop, and how a
    preempted run goes on."""

    def say(self, text: str) -> None: ...

    def stop_requested(self) -> bool:
        """The supervisor itself was asked to stop (Ctrl-C, orch cancel): stop the ranks now."""

    def wait_backoff(self, seconds: float) -> bool:
        """Sleep before a restart; False when the wait was cut short by a stop."""

    def resume(self, attempt: int, newest_checkpoint: int | None) -> bool:
        """After a preemption: True to run the next attempt here, False when this process
        leaves and the run continues elsewhere (Slurm: the job was requeued)."""


@dataclass(frozen=True)
class AttemptOutcome:
    attempt: int
    state: AttemptState
    root_cause: RankFailure | None
    duration_s: float
    facts: AttemptFacts | None = None  # how far it got, for the policy's start-up rule


@dataclass(frozen=True)
class LoopResult:
    """How a supervisor loop ended: its last attempt and decision."""

    outcome: AttemptOutcome
    decision: Decision
    attempts: int  # attempts run so far in this run (all incarnations)
    newest_checkpoint: int | None


def newest_checkpoint(run: RunDir) -> int | None:
    """The newest committed step of the run, or None (also when the listing fails: a storage
    error must not hide the run's own outcome)."""
    try:
        info = newest_committed(run.child("ckpt"))
    except Exception:  # noqa: BLE001 - see the docstring
        return None
    return info.step if info else None


def hang_failure(silence: Silence, node_rank: int | None) -> RankFailure:
    return RankFailure(
        rank=silence.rank,
        node_rank=node_rank,
        exitcode=0,
        time=time.time(),
        error_type=HANG_TYPE,
        message=silence.message,
    )


def without_secrets(failure: RankFailure, pass_env: tuple[str, ...]) -> RankFailure:
    """The failure with every job.pass_env value redacted from its whole message
    (RankFailure.without_secrets): a job that puts its token in an exception must not put it
    in events.jsonl."""
    return failure.without_secrets(secret_values(pass_env, os.environ))


@dataclass
class Supervision:
    """One run's (or one Slurm incarnation's) loop over attempts."""

    config: ClusterConfig
    run: RunDir
    driver: AttemptDriver
    hooks: RunHooks
    # launch.ports.lease_port, passed in: supervision does not import launch (docs/design.md).
    lease_port: Callable[[int | None], AbstractContextManager[Any]]
    poll_s: float = 0.05
    first_attempt: int = 0
    # Whether a heartbeat of the running attempt has shown a rank past its first step.
    _reached_step: bool = field(default=False, init=False)

    def node_of(self, rank: int | None) -> int | None:
        return None if rank is None else rank // self.config.resources.ranks_per_node

    def run_attempts(self) -> LoopResult:
        cfg = self.config
        attempt = self.first_attempt
        newest = newest_checkpoint(self.run)
        state = PolicyState(last_checkpoint=newest)
        while True:
            outcome = self.run_attempt(attempt, newest)
            newest = newest_checkpoint(self.run)
            decision = decide(cfg.restart, state, outcome.state, outcome.root_cause, newest, outcome.facts)
            state = decision.state
            if outcome.state is AttemptState.FAILED and outcome.root_cause is not None:
                hint = outcome.root_cause.classified.hint
                self.hooks.say(f"attempt {attempt} failed: {outcome.root_cause.describe}")
                if hint:
                    self.hooks.say(f"  hint: {hint}")
            if decision.action is Action.LEAVE:
                self.hooks.say(decision.reason or "leaving")
                self.run.append_event(Event.INCARNATION_ENDED, attempt=attempt, reason=decision.reason)
            elif decision.action is Action.GIVE_UP:
                self.hooks.say(decision.reason or "giving up")
                self.run.append_event(Event.GIVING_UP, attempt=attempt, reason=decision.reason)
            elif decision.action is Action.RESUME and not self.hooks.stop_requested():
                self.hooks.say(f"attempt {attempt} checkpointed and stopped (preemption); resuming")
                if self.hooks.resume(attempt, newest):
                    attempt += 1
                    continue
            elif decision.action in (Action.RESTART, Action.ROLLBACK) and not self.hooks.stop_requested():
                if decision.action is Action.ROLLBACK:
                    # The next attempt's runtime reads this (Checkpointer.restore) and skips the
                    # data the diverged attempt consumed since that checkpoint.
                    self.run.append_event(Event.ROLLBACK_SCHEDULED, attempt=attempt + 1, to_step=newest)
                self.run.append_event(
                    Event.RESTART_SCHEDULED,
                    attempt=attempt + 1,
                    backoff_s=decision.backoff_s,
                    restarts_used=state.restarts,
                )
                self.hooks.say(
                    f"{decision.reason} in {decision.backoff_s:.1f}s from the newest committed checkpoint"
                    + (", skipping the data since it" if decision.action is Action.ROLLBACK else "")
                )
                if self.hooks.wait_backoff(decision.backoff_s):
                    attempt += 1
                    continue
            return LoopResult(
                outcome=outcome, decision=decision, attempts=attempt + 1, newest_checkpoint=newest
            )

    def run_attempt(self, attempt: int, checkpoint: int | None) -> AttemptOutcome:
        """One attempt, which resumes from `checkpoint` (the newest committed step, or None)."""
        cfg = self.config
        self._reached_step = False
        fixed = cfg.distributed.master_port if isinstance(cfg.distributed.master_port, int) else None
        started_at = time.time()
        with self.lease_port(fixed) as lease:
            started = self.driver.start(attempt, lease.port)
            if started.notice:
                self.run.append_event(
                    Event.LAUNCHER_NOTICE,
                    attempt=attempt,
                    message=started.notice,
                    **{k: v for k, v in started.fields.items() if k == "launcher"},
                )
                self.hooks.say(started.notice)
            self.run.append_event(
                Event.ATTEMPT_STARTED,
                attempt=attempt,
                master_port=lease.port,
                newest_checkpoint=checkpoint,
                **started.fields,
            )
            how = "forked" if started.fields.get("launcher") == "fork" else "started"
            self.hooks.say(
                f"attempt {attempt}: {how} {len(started.heartbeats)} rank(s), MASTER_PORT={lease.port}"
            )
            seen, hang = self._watch(started, attempt)
            reached = self._reached_step or past_first_step(self._beats(started.heartbeats))
            settle_s = settle_before_stop(attempt, reached)
            if seen is not None and seen.failed and settle_s > 0:
                self._let_the_rest_fail(started, settle_s)
            stopped = self.hooks.stop_requested()
            if stopped:
                self.hooks.say("stopping every rank")
            # Whatever still runs (the rest after a failure, all after a hang or a stop request)
            # is stopped; after a success this only releases the attempt's resources.
            ended = self.driver.stop(cfg.restart.stop_grace_s)
        first_seen = seen.first_seen if seen is not None else None
        failures = self.driver.failures(ended) if ended.failed else []
        root = hang or root_cause(failures, first_seen)
        res = cfg.resources
        facts = AttemptFacts(
            attempt=attempt,
            reached_step=reached or past_first_step(self._beats(started.heartbeats)),
            one_failure_everywhere=hang is None
            and one_failure_everywhere(failures, nodes=res.nodes, ranks_per_node=res.ranks_per_node),
        )
        if root is not None:
            root = without_secrets(root, self.config.job.pass_env)
        if stopped:
            state = AttemptState.STOPPED
        elif root is not None and root.is_stop_on_request:
            state = AttemptState.PREEMPTED
        elif ended.failed or hang is not None:
            state = AttemptState.FAILED
        else:
            state = AttemptState.SUCCEEDED
        duration = time.time() - started_at
        self.run.append_event(
            Event.ATTEMPT_ENDED,
            attempt=attempt,
            status=state.value,
            duration_s=round(duration, 3),
            # A stop on request is not a cause: `orch status` must not show one for it.
            root_cause=root.to_json() if root and not root.is_stop_on_request else None,
            **ended.fields,
        )
        self.run.publish_logs(attempt)  # a run directory on an object store gets the staged logs
        return AttemptOutcome(attempt=attempt, state=state, root_cause=root, duration_s=duration, facts=facts)

    def _watch(self, started: Started, attempt: int) -> tuple[Ended | None, RankFailure | None]:
        """Until the attempt ends on its own (its Ended), a rank hangs (its failure), or a stop
        is asked (neither)."""
        next_check = time.monotonic() + WATCHDOG_PERIOD_S
        while not self.hooks.stop_requested():
            ended = self.driver.poll()
            if ended is not None:
                return ended, None
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + WATCHDOG_PERIOD_S
                hang = self._check_hang(started.heartbeats, attempt)
                if hang is not None:
                    return None, hang
            time.sleep(self.poll_s)
        return None, None

    def _let_the_rest_fail(self, started: Started, settle_s: float) -> None:
        """Before the ranks left after a start-up failure are stopped (policy.settle_before_stop):
        until none runs, for `settle_s` at most, or until a stop is asked. A backend that does not
        see its ranks' processes (process_state None: Slurm) holds its own stop instead."""
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline and not self.hooks.stop_requested():
            if all(self.driver.process_state(rank) in ENDED_STATES for rank in started.heartbeats):
                return
            time.sleep(self.poll_s)

    @staticmethod
    def _beats(heartbeats: Mapping[int, str]) -> dict[int, Beat | None]:
        return {r: read_heartbeat(p) for r, p in heartbeats.items()}

    def _check_hang(self, heartbeats: Mapping[int, str], attempt: int) -> RankFailure | None:
        beats = self._beats(heartbeats)
        # Remembered: a rank's last beat may say less than it did (the runtime's shutdown).
        self._reached_step = self._reached_step or past_first_step(beats)
        now = time.time()
        silent = silent_ranks(self.config.watchdog, beats, now)
        # A stopped process (state T) is certainly the culprit, in any phase: a rank stopped
        # while saving or starting has a long allowance (save_timeout_s, startup_timeout_s)
        # meant for slow work, not for a process that cannot run at all. Otherwise the ranks'
        # own order (one not waiting in a collective, then the longest silent).
        stopped = [
            x
            for x in stopped_ranks(self.config.watchdog, beats, now)
            if self.driver.process_state(x.rank) == "T"
        ]
        named = {x.rank for x in silent}
        silent += [x for x in stopped if x.rank not in named]
        if not silent:
            return None
        culprit = (stopped or silent)[0]
        self.run.append_event(Event.HANG_DETECTED, attempt=attempt, **culprit.event(silent))
        self.hooks.say(
            f"rank {culprit.rank} silent for {culprit.silent_s:.1f}s at step {culprit.step} "
            f"({culprit.phase}; limit {culprit.limit_s:.1f}s): dumping stacks, restarting"
        )
        # Stacks of every rank (who waits in which collective tells the story): faulthandler
        # on SIGUSR1; SIGCONT first wakes a stopped rank so it can dump.
        self.driver.signal_ranks(signal.SIGCONT)
        self.driver.signal_ranks(signal.SIGUSR1)
        time.sleep(STACK_DUMP_WAIT_S)
        return hang_failure(culprit, self.node_of(culprit.rank))
