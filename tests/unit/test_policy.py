"""The restart policy and the root cause, pure: the decisions both supervisors share."""

from __future__ import annotations

import signal
from dataclasses import replace

import pytest

from orchestrator.spec.config import RestartSpec
from orchestrator.supervision.failures import (
    FailureClass,
    RankFailure,
    exception_line,
    one_failure_everywhere,
    root_cause,
)
from orchestrator.supervision.policy import (
    START_FAILURE_SETTLE_S,
    Action,
    AttemptFacts,
    AttemptState,
    PolicyState,
    decide,
    past_first_step,
    settle_before_stop,
)

RESTART = RestartSpec(max_restarts=3, backoff_s=1.0, backoff_max_s=3.0, crash_loop_attempts=2)


def failure(
    rank: int, t: float, kind: str | None = "ValueError", message: str = "bad", code: int = 1
) -> RankFailure:
    text = f"{kind}: {message}" if kind else message
    return RankFailure(rank=rank, node_rank=rank // 2, exitcode=code, time=t, error_type=kind, message=text)


def preempted(rank: int, t: float) -> RankFailure:
    return RankFailure(
        rank=rank,
        node_rank=0,
        exitcode=75,
        time=t,
        error_type="Preempted",
        message="Preempted: checkpointed step 7",
    )


def run_timeline(
    outcomes: list[tuple[AttemptState, RankFailure | None, int | None]],
) -> list[tuple[Action, float]]:
    state, out = PolicyState(), []
    for outcome, root, newest in outcomes:
        decision = decide(RESTART, state, outcome, root, newest)
        state = decision.state
        out.append((decision.action, decision.backoff_s))
    return out


def test_failures_restart_with_doubling_backoff_until_none_are_left() -> None:
    err = failure(1, 1.0)
    # Each attempt commits a newer checkpoint, so no crash loop: only max_restarts stops it.
    timeline = [(AttemptState.FAILED, err, step) for step in (10, 20, 30, 40)]
    assert run_timeline(timeline) == [
        (Action.RESTART, 1.0),
        (Action.RESTART, 2.0),
        (Action.RESTART, 3.0),
        (Action.GIVE_UP, 0.0),
    ]


def test_crash_loop_counts_only_attempts_without_a_new_checkpoint() -> None:
    err = failure(1, 1.0)
    # Attempt 0 committed step 10 before failing: progress, the count stays 0. Attempts 1 and 2
    # commit nothing: 1, 2 -> give up at 2 (crash_loop_attempts).
    timeline = [
        (AttemptState.FAILED, err, 10),
        (AttemptState.FAILED, err, 10),
        (AttemptState.FAILED, err, 10),
    ]
    actions = [a for a, _ in run_timeline(timeline)]
    assert actions == [Action.RESTART, Action.RESTART, Action.GIVE_UP]
    last = decide(
        RESTART, PolicyState(restarts=2, without_progress=1, last_checkpoint=10), AttemptState.FAILED, err, 10
    )
    assert "crash loop (2 failed attempts in a row" in (last.reason or "")


def test_a_user_error_is_not_retried() -> None:
    decision = decide(
        RESTART,
        PolicyState(),
        AttemptState.FAILED,
        failure(0, 1.0, "NameError", "name 'lr' is not defined"),
        None,
    )
    assert decision.action is Action.GIVE_UP and "NameError fails the same way" in (decision.reason or "")


def test_preemption_resumes_without_using_a_restart_until_it_loops() -> None:
    timeline = [
        (AttemptState.PREEMPTED, None, 10),
        (AttemptState.PREEMPTED, None, 20),
        (AttemptState.PREEMPTED, None, 20),
        (AttemptState.PREEMPTED, None, 20),
    ]
    assert [a for a, _ in run_timeline(timeline)] == [
        Action.RESUME,
        Action.RESUME,
        Action.RESUME,
        Action.GIVE_UP,
    ]


@pytest.mark.parametrize("outcome", [AttemptState.SUCCEEDED, AttemptState.STOPPED])
def test_success_and_stop_finish(outcome: AttemptState) -> None:
    assert decide(RESTART, PolicyState(restarts=3), outcome, None, None).action is Action.FINISH


def test_a_crash_outranks_the_stops_around_it() -> None:
    crash = failure(2, 5.0)
    assert root_cause([preempted(0, 4.0), preempted(1, 4.1), crash]) is crash
    assert root_cause([preempted(0, 4.0), preempted(1, 4.1)]).rank == 0
    # Locally, with the stop seen first: ranks we then stopped (no record) are not causes.
    stopped_by_us = failure(3, 6.0, None, "", code=-signal.SIGTERM)
    assert root_cause([preempted(0, 4.0), stopped_by_us], first_seen=0).is_stop_on_request
    assert root_cause([preempted(0, 4.0), crash, stopped_by_us], first_seen=0) is crash


def test_a_peer_loss_seen_first_does_not_hide_the_killed_rank() -> None:
    peer = failure(0, 1.0, "RuntimeError", "Connection closed by peer")
    killed = failure(1, 1.2, None, "", code=-signal.SIGKILL)
    cause = root_cause([peer, killed], first_seen=0)
    assert cause is killed and cause.classified.kind is FailureClass.SIGNAL


def test_describe_names_the_node_and_the_step() -> None:
    assert failure(3, 1.0).describe == "rank 3 (node 1) exit code 1: ValueError: bad"
    step = RankFailure(
        rank=None, node_rank=None, exitcode=143, time=0.0, error_type=None, message="srun step exit code 143"
    )
    assert step.describe == "the step exit code 143: srun step exit code 143"
    assert step.to_json()["node_rank"] is None


def test_exception_line_is_the_last_tracebacks_exception() -> None:
    lines = [
        "step 1",
        "Traceback (most recent call last):",
        '  File "x.py", line 3, in <module>',
        "    f()",
        "KeyError: 'lr'",
        "[orch] bye",
    ]
    assert exception_line(lines) == "KeyError: 'lr'"
    assert exception_line(["all good", "ValueError: no traceback here"]) == "ValueError: no traceback here"


def test_a_fenced_incarnation_leaves_instead_of_restarting() -> None:
    stale = failure(0, 1.0, "StaleIncarnationError", "incarnation 0 is stale")
    assert stale.classified.kind is FailureClass.STALE and not stale.classified.retryable
    decision = decide(RESTART, PolicyState(), AttemptState.FAILED, stale, None)
    assert decision.action is Action.LEAVE and decision.state.restarts == 0


def diverged(rank: int, t: float) -> RankFailure:
    return failure(rank, t, "DivergenceError", "training diverged: ... not finite between steps 21 and 23")


def test_a_divergence_is_its_own_class_with_the_guides_hints() -> None:
    c = diverged(0, 1.0).classified
    assert c.kind is FailureClass.DIVERGED and not c.retryable
    assert "learning rate" in c.hint and "clip" in c.hint and "data" in c.hint


def test_a_divergence_fails_the_run_unless_rollback_is_asked_for() -> None:
    decision = decide(RESTART, PolicyState(), AttemptState.FAILED, diverged(0, 1.0), 20)
    assert decision.action is Action.GIVE_UP and "diverged" in decision.reason
    rollback = RestartSpec(max_restarts=3, backoff_s=1.0, crash_loop_attempts=2, on_divergence="rollback")
    decision = decide(rollback, PolicyState(), AttemptState.FAILED, diverged(0, 1.0), 20)
    assert decision.action is Action.ROLLBACK and decision.state.restarts == 1


def test_rollbacks_count_as_restarts_and_stop_in_a_crash_loop() -> None:
    rollback = RestartSpec(max_restarts=5, backoff_s=1.0, crash_loop_attempts=2, on_divergence="rollback")
    state, actions = PolicyState(last_checkpoint=20), []
    # Diverging again and again before any new checkpoint: a rollback cannot help; stop.
    for _ in range(3):
        decision = decide(rollback, state, AttemptState.FAILED, diverged(0, 1.0), 20)
        state = decision.state
        actions.append(decision.action)
    assert actions == [Action.ROLLBACK, Action.GIVE_UP, Action.GIVE_UP]
    # Other failures still restart as before under on_divergence: rollback.
    assert decide(rollback, PolicyState(), AttemptState.FAILED, failure(1, 1.0), 10).action is Action.RESTART


# ---------------------------------------------------------------------------- start-up rule
# Issue 27, point 9: a job that cannot start is a user error, said once and not retried.

START = AttemptFacts(attempt=0, reached_step=False, one_failure_everywhere=True)
MISSING = failure(0, 1.0, "ModuleNotFoundError", "No module named 'safetensors'")


def test_a_job_that_cannot_start_is_not_retried() -> None:
    decision = decide(RESTART, PolicyState(), AttemptState.FAILED, MISSING, None, START)
    assert decision.action is Action.GIVE_UP and "cannot start" in (decision.reason or "")
    assert decision.state.restarts == 0


@pytest.mark.parametrize(
    "facts, newest",
    [
        (replace(START, attempt=1), None),  # a later attempt: a flaky filesystem may come back
        (replace(START, reached_step=True), None),  # mid-run
        (replace(START, one_failure_everywhere=False), None),  # the ranks disagree
        (START, 10),  # it committed a checkpoint: it did start
        (None, None),  # nothing known of how far it got
    ],
)
def test_a_missing_module_later_or_on_some_ranks_is_retried(facts: AttemptFacts | None, newest) -> None:
    decision = decide(RESTART, PolicyState(), AttemptState.FAILED, MISSING, newest, facts)
    assert decision.action is Action.RESTART, decision


def test_an_ordinary_error_at_start_is_retried() -> None:
    err = failure(0, 1.0, "RuntimeError", "connection to the data server failed")
    assert decide(RESTART, PolicyState(), AttemptState.FAILED, err, None, START).action is Action.RESTART


def test_known_start_up_errors_carry_their_fix() -> None:
    # The PyTorch guide's snippet with rank=os.environ['RANK']: each rank's message names its
    # own value, and still they failed alike.
    ranks = [failure(r, 1.0, "RuntimeError", f"`rank` must be an integer. {r}") for r in (0, 1)]
    c = ranks[0].classified
    # Its class is its type's (a RuntimeError); its entry names it, adds the fix and, as data,
    # makes it fatal at start.
    assert c.kind is FailureClass.ERROR and c.known == "int_env" and c.fatal_at_start
    assert "int(os.environ['RANK'])" in (c.hint or "")
    assert one_failure_everywhere(ranks, nodes=1, ranks_per_node=2)
    assert decide(RESTART, PolicyState(), AttemptState.FAILED, ranks[0], None, START).action is Action.GIVE_UP
    nccl = failure(0, 1.0, "RuntimeError", "Distributed package doesn't have NCCL built in").classified
    assert (
        nccl.kind is FailureClass.ERROR and nccl.known == "nccl_without_gpu" and "gloo" in (nccl.hint or "")
    )
    oom = failure(0, 1.0, "OutOfMemoryError", "CUDA out of memory. Tried to allocate 2 GiB").classified
    assert oom.kind is FailureClass.OOM and oom.retryable and "batch size" in (oom.hint or "")


def test_the_class_comes_from_the_exception_type_not_the_words() -> None:
    # The same words under a type the table does not name, or in a log line (no type): not the
    # known error, no fix, not fatal at start. A missing file is MISSING whatever it says.
    for kind in ("ValueError", None):
        words = failure(0, 1.0, kind, "`rank` must be an integer. 0").classified
        assert words.known is None and words.hint is None and not words.fatal_at_start, kind
    missing = failure(0, 1.0, "FileNotFoundError", "No CUDA GPUs are available").classified
    assert missing.kind is FailureClass.MISSING and missing.hint == MISSING.classified.hint


# Issue 27, follow-up 10: "failed alike on every rank" must mean every rank (or every node),
# not the one rank that failed before the supervisor stopped the others.


def stopped_rank(rank: int) -> RankFailure:
    return failure(rank, 1.2, None, "", code=-signal.SIGTERM)  # our stop, before it could fail


def test_one_rank_of_four_failing_at_start_is_restarted() -> None:
    # A missing node-local shard: rank 2 of one node's four fails, the supervisor stops the rest.
    shard = failure(2, 1.0, "FileNotFoundError", "[Errno 2] No such file or directory: '/local/shard-2'")
    failures = [replace(f, node_rank=0) for f in (stopped_rank(0), stopped_rank(1), shard, stopped_rank(3))]
    alike = one_failure_everywhere(failures, nodes=1, ranks_per_node=4)
    decision = decide(
        RESTART, PolicyState(), AttemptState.FAILED, shard, None, replace(START, one_failure_everywhere=alike)
    )
    assert decision.action is Action.RESTART, decision


def test_one_node_without_gpus_at_start_is_restarted() -> None:
    # Two nodes of two ranks: node 1 has no GPU; node 0's ranks were stopped.
    no_gpu = [failure(r, 1.0, "RuntimeError", "No CUDA GPUs are available") for r in (2, 3)]
    assert no_gpu[0].classified.fatal_at_start  # fatal, were it everywhere
    assert not one_failure_everywhere([stopped_rank(0), stopped_rank(1), *no_gpu], nodes=2, ranks_per_node=2)


def test_every_rank_failing_with_the_same_import_error_gives_up() -> None:
    failures = [
        replace(failure(r, 1.0, "ImportError", "cannot import name 'x' from 'y'"), node_rank=0)
        for r in range(4)
    ]
    alike = one_failure_everywhere(failures, nodes=1, ranks_per_node=4)
    decision = decide(
        RESTART,
        PolicyState(),
        AttemptState.FAILED,
        failures[0],
        None,
        replace(START, one_failure_everywhere=alike),
    )
    assert decision.action is Action.GIVE_UP, decision


def test_one_failure_everywhere_needs_every_rank_or_every_node() -> None:
    def imp(rank: int) -> RankFailure:
        return failure(rank, 1.0, "ImportError", "No module named 'x'")

    # Across nodes each node's first failure stops its others: one on every node is enough.
    assert one_failure_everywhere(
        [imp(0), stopped_rank(1), imp(2), stopped_rank(3)], nodes=2, ranks_per_node=2
    )
    assert not one_failure_everywhere([imp(0), stopped_rank(1), stopped_rank(2)], nodes=2, ranks_per_node=2)
    # One rank of a world of one is the whole world.
    assert one_failure_everywhere([imp(0)], nodes=1, ranks_per_node=1)
    assert not one_failure_everywhere([imp(0), stopped_rank(1)], nodes=1, ranks_per_node=2)


def test_one_failure_everywhere_counts_only_ranks_that_failed_of_their_own() -> None:
    world = {"nodes": 1, "ranks_per_node": 2}
    b = failure(1, 1.1, "ModuleNotFoundError", "No module named 'b'")
    peer = failure(1, 1.2, "RuntimeError", "Connection closed by peer")
    assert one_failure_everywhere([MISSING, replace(MISSING, rank=1)], **world)
    assert not one_failure_everywhere([MISSING, stopped_rank(1)], **world)  # one rank is not all
    assert not one_failure_everywhere([MISSING, peer], **world)
    assert not one_failure_everywhere([MISSING, b], **world)
    assert not one_failure_everywhere([stopped_rank(1)], **world)


def test_a_missing_module_is_its_own_class() -> None:
    c = MISSING.classified
    assert c.kind is FailureClass.MISSING and c.retryable and c.fatal_at_start
    assert failure(0, 1.0, "SyntaxError", "invalid syntax").classified.fatal_at_start


def test_the_error_is_said_with_its_line() -> None:
    located = replace(MISSING, where="/job/train.py:3")
    assert located.describe.endswith("No module named 'safetensors' (at /job/train.py:3)")
    assert located.to_json()["where"] == "/job/train.py:3"
    record = {"type": "ModuleNotFoundError", "message": "No module named 'x'", "where": "/job/t.py:2"}
    assert RankFailure.from_record(record, rank=0, node_rank=0, exitcode=1, time=0.0).where == "/job/t.py:2"


def test_past_first_step_reads_the_heartbeats() -> None:
    assert not past_first_step({0: None, 1: (0, 1.0, "init", 0.0)})
    assert not past_first_step({0: (0, 1.0, "exit", 0.0)})  # shutdown beats exit at step 0
    assert past_first_step({0: (0, 1.0, "init", 0.0), 1: (1, 1.0, "train", 0.01)})
    assert past_first_step({0: (0, 1.0, "save", 0.0)})


def test_the_ranks_left_after_a_failure_settle_only_before_the_first_step_of_the_first_attempt() -> None:
    # The local loop, the Slurm supervisor and each node agent ask this before stopping the
    # ranks left after a failure; only the start-up rule's case waits.
    assert settle_before_stop(0, reached_step=False) == START_FAILURE_SETTLE_S > 0
    assert settle_before_stop(0, reached_step=True) == 0
    assert settle_before_stop(1, reached_step=False) == 0
