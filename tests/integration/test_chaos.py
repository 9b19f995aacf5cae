"""Chaos on the local backend (bench/chaos.py's driver, a short schedule): the example job under
one fault of every local kind, each fault fired for real and seen in the ledger, ending in the
uninterrupted run's weights with no process, port lease or checkpoint leftover behind."""

from __future__ import annotations

import pytest

from bench import chaos

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED = 13
SHAPE = chaos.JobShape(steps=150)
# The fork server's SIGKILL too (recovered by starting a fresh server: ~10-18 s of imports here).
KINDS = chaos.LOCAL_KINDS + chaos.AGENT_KINDS["local"]


def test_the_fault_schedule_is_seeded():
    faults = chaos.plan(SEED, KINDS, len(KINDS), SHAPE)
    assert faults == chaos.plan(SEED, KINDS, len(KINDS), SHAPE)
    assert faults != chaos.plan(SEED + 1, KINDS, len(KINDS), SHAPE)
    assert sorted(f.kind for f in faults) == sorted(KINDS), "every kind once before any twice"
    steps = [f.at_step for f in faults]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert SHAPE.checkpoint_interval < steps[0] and steps[-1] < SHAPE.steps - SHAPE.checkpoint_interval


@pytest.mark.timeout(240)
def test_every_local_fault_is_survived_and_ends_in_the_uninterrupted_weights(tmp_path):
    reference = chaos.reference_digest(tmp_path / "reference", SHAPE)
    faults = chaos.plan(SEED, KINDS, len(KINDS), SHAPE)
    ep = chaos.episode("local", SEED, faults, SHAPE, tmp_path / "chaos", reference, timeout=180)
    assert_every_fault_survived(ep, faults)


def assert_every_fault_survived(ep, faults) -> None:
    """The episode's verdict, shared with the Slurm chaos test."""
    report = chaos.table([ep])
    print(report)
    assert [i.fault for i in ep.injections] == list(faults), report
    previous_recovery = 0.0
    for inj in ep.injections:
        # Fired for real: a live process was signalled, or the armed failpoint was passed.
        assert inj.fired, (inj.fault, inj.target)
        # The ledger tells it in order: injection -> its effect -> a later attempt training.
        assert inj.effect is not None and inj.effect_time >= inj.time > previous_recovery, (inj, report)
        assert inj.recovered_attempt is not None and inj.recovered_attempt > inj.attempt, (inj, report)
        previous_recovery = inj.time + inj.restart_s
        assert not inj.problems, (inj, report)
    assert ep.digest_ok, report
    assert not ep.problems, report  # no process, lease, TMPDIR file or checkpoint leftover
    assert ep.ok
