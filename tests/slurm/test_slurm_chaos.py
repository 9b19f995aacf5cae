"""Chaos on the real Slurm cluster (bench/chaos.py's driver, a short schedule): the example job
on one node under Slurm's own interruptions and rank faults, each fired for real and seen in
the ledger, ending in the uninterrupted run's weights with nothing left behind."""

from __future__ import annotations

import pytest

from bench import chaos

from ..integration.test_chaos import assert_every_fault_survived

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("slurm_cluster")]

SEED = 5
# Small, for a CI budget of 2 minutes: every attempt on Slurm waits for its node agents to
# import torch (10-20 s on 2 busy cores) and a requeue for Slurm's requeue delay besides. So
# one node, and two faults: Slurm's warning (checkpoint, requeue, resume) and a rank crash (a
# new srun step). The bench runs two nodes and every kind (bench/chaos.py --backend slurm).
SHAPE = chaos.JobShape(steps=100, nodes=1, ranks_per_node=2)
KINDS = ("preempt_signal", "rank_kill")


@pytest.mark.timeout(300)
def test_slurm_faults_are_survived_and_end_in_the_uninterrupted_weights(tmp_path):
    reference = chaos.reference_digest(tmp_path / "reference", SHAPE)
    faults = chaos.plan(SEED, KINDS, len(KINDS), SHAPE)
    ep = chaos.episode("slurm", SEED, faults, SHAPE, tmp_path / "chaos", reference, timeout=240)
    assert_every_fault_survived(ep, faults)
