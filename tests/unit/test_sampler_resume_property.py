"""Issue 27, point 3: a resumed sampler continues exactly where the uninterrupted run would be,
padded tail included, for every resume point of an epoch.

The oracle is torch's own DistributedSampler (the layout ours promises to match on an
uninterrupted epoch: the same permutation for seed * 1_000_003, the same padding or truncation),
so these properties do not check the sampler against itself. A resume point is any number of
whole world-steps: every rank consumed the same `per_rank` samples, `per_rank * world_size` in
all (a step of batch b after k steps is per_rank = k * b; a short last batch is a legal step too).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DistributedSampler

from orchestrator.runtime.sampler import ResumableDistributedSampler

SETTINGS = settings(max_examples=300, deadline=None)


def torch_layout(n: int, world: int, rank: int, seed: int, epoch: int, shuffle: bool, drop_last: bool):
    """The rank's share of an uninterrupted epoch, as torch's DistributedSampler lays it out."""
    ref = DistributedSampler(
        range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=seed * 1_000_003, drop_last=drop_last
    )
    ref.set_epoch(epoch)
    return list(ref)


def resumed_at(n, world, rank, seed, epoch, shuffle, drop_last, per_rank) -> ResumableDistributedSampler:
    """A rank's sampler restored from a checkpoint taken after `per_rank` samples a rank."""
    before = ResumableDistributedSampler(
        n, rank=rank, world_size=world, seed=seed, shuffle=shuffle, drop_last=drop_last
    )
    before.set_epoch(epoch)
    before.advance(per_rank)
    after = ResumableDistributedSampler(n, rank=rank, world_size=world, seed=99)  # other defaults
    after.load_state_dict(before.state_dict())
    after.set_epoch(epoch)  # the training loop's call on resume: keeps the position
    return after


def world_reading(parts: list[list[int]]) -> list[int]:
    """The ranks' shares interleaved into the order the world consumes them (a step at a time)."""
    assert len({len(p) for p in parts}) == 1, [len(p) for p in parts]  # DDP steps together
    return [p[i] for i in range(len(parts[0])) for p in parts]


epochs = st.fixed_dictionaries(
    {
        "n": st.integers(1, 60),
        "seed": st.integers(0, 5),
        "epoch": st.integers(0, 3),
        "shuffle": st.booleans(),
        "drop_last": st.booleans(),
    }
)


@SETTINGS
@given(epochs, st.integers(1, 9), st.data())
def test_property_a_resume_on_the_same_world_is_the_uninterrupted_suffix(e, world, data) -> None:
    full = [torch_layout(world=world, rank=r, **e) for r in range(world)]
    per_rank = data.draw(st.integers(0, len(full[0])), label="per_rank consumed")
    for rank in range(world):
        resumed = resumed_at(world=world, rank=rank, per_rank=per_rank, **e)
        assert list(resumed) == full[rank][per_rank:], (rank, per_rank)
        assert len(resumed) == len(full[rank]) - per_rank
        assert resumed.epoch_done == (per_rank == len(full[rank]))


@SETTINGS
@given(epochs, st.integers(1, 9), st.integers(1, 9), st.data())
def test_property_a_resume_on_another_world_reads_the_epochs_order_then_its_first_indices(
    e, world, new_world, data
) -> None:
    """What is promised across a world-size change: the world of `new_world` ranks reads the
    epoch's order from the resume point on, each unseen sample once, then pads with the epoch's
    FIRST indices (never the resume point's) until every rank has as many (drop_last=False), or
    leaves out the last fewer-than-new_world samples of the order (drop_last=True). A further
    resume on `new_world` ranks is the suffix of that layout."""
    n = e["n"]
    order = torch_layout(world=1, rank=0, **e)  # the epoch's order itself
    per_rank = data.draw(st.integers(0, len(torch_layout(world=world, rank=0, **e))), label="per_rank")
    consumed = per_rank * world
    checkpoint = resumed_at(world=world, rank=0, per_rank=per_rank, **e).state_dict()
    after = [ResumableDistributedSampler(n, rank=r, world_size=new_world) for r in range(new_world)]
    for s in after:
        s.load_state_dict(checkpoint)
    parts = [list(s) for s in after]
    left = max(0, n - consumed)
    if e["drop_last"]:
        expected = order[consumed : consumed + left // new_world * new_world]
    else:
        pad = -left % new_world
        expected = order[consumed:n] + [order[i % n] for i in range(pad)]
    assert world_reading(parts) == expected
    assert {len(s) for s in after} == {len(expected) // new_world}

    again = data.draw(st.integers(0, len(parts[0])), label="per_rank consumed on the new world")
    for rank, s in enumerate(after):
        s.advance(again)
        restored = ResumableDistributedSampler(n, rank=rank, world_size=new_world, seed=0)
        restored.load_state_dict(s.state_dict())
        assert list(restored) == parts[rank][again:], (rank, again)
