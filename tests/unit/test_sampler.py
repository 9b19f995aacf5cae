import torch

from orchestrator.runtime.sampler import ResumableDistributedSampler


def consume(samplers, steps, batch):
    seen = []
    for _ in range(steps):
        for s in samplers:
            it = list(s)[:batch]
            seen.extend(it)
        for s in samplers:
            s.advance(batch)
    return seen


def test_global_order_does_not_depend_on_world_size():
    a = ResumableDistributedSampler(100, rank=0, world_size=2, seed=3)
    b = ResumableDistributedSampler(100, rank=0, world_size=4, seed=3)
    assert torch.equal(a.global_order(1), b.global_order(1))
    assert not torch.equal(a.global_order(1), a.global_order(2))


def test_ranks_partition_the_epoch():
    world = [ResumableDistributedSampler(103, rank=r, world_size=4, seed=1, drop_last=True) for r in range(4)]
    parts = [list(s) for s in world]
    assert len({len(p) for p in parts}) == 1
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)) == 100  # 3 left over: drop the tail, never duplicate


def test_resume_mid_epoch_on_another_world_size_sees_every_sample_once():
    before = [ResumableDistributedSampler(96, rank=r, world_size=4, seed=7) for r in range(4)]
    first = consume(before, steps=3, batch=4)  # 48 samples
    state = before[0].state_dict()
    after = [ResumableDistributedSampler(96, rank=r, world_size=2, seed=7) for r in range(2)]
    for s in after:
        s.load_state_dict(state)
    rest = [i for s in after for i in s]
    assert sorted(first + rest) == list(range(96))


def test_same_world_resume_continues_exactly():
    full = ResumableDistributedSampler(64, rank=1, world_size=2, seed=5)
    order = list(full)
    resumed = ResumableDistributedSampler(64, rank=1, world_size=2, seed=5)
    resumed.advance(8)  # 8 per rank consumed
    resumed2 = ResumableDistributedSampler(64, rank=1, world_size=2, seed=5)
    resumed2.load_state_dict(resumed.state_dict())
    assert list(resumed2) == order[8:]


def test_set_epoch_keeps_position_of_the_resumed_epoch_only():
    s = ResumableDistributedSampler(10, rank=0, world_size=1)
    s.set_epoch(2)
    s.advance(4)
    s.set_epoch(2)
    assert s.consumed == 4
    s.set_epoch(3)
    assert s.consumed == 0


def test_padding_keeps_every_sample_of_an_uneven_epoch_across_a_world_size_change():
    # 101 samples: 4 ranks consume 2 steps of 5 (40), then 3 ranks finish the remaining 61,
    # which does not divide by 3: padded with the remainder's first indices, as torch's
    # DistributedSampler pads. Every sample is seen; the extras are the padding alone.
    before = [ResumableDistributedSampler(101, rank=r, world_size=4, seed=9) for r in range(4)]
    first = consume(before, steps=2, batch=5)
    state = before[0].state_dict()
    after = [ResumableDistributedSampler(101, rank=r, world_size=3, seed=9) for r in range(3)]
    for s in after:
        s.load_state_dict(state)
    parts = [list(s) for s in after]
    assert {len(p) for p in parts} == {21}  # ceil(61 / 3): every rank steps alike
    seen = first + [i for p in parts for i in p]
    assert set(seen) == set(range(101)) and len(seen) == 101 + 2  # 2 padded, none lost
    # The padding is the epoch's first indices, not the resumed remainder's: what a world of 3
    # pads with is a property of the epoch, wherever it resumed (issue 27).
    order = before[0].global_order().tolist()
    assert sorted(i for i in seen if seen.count(i) > 1) == sorted(order[:2] * 2)
    assert [p[-1] for p in parts[1:]] == order[:2]


def test_a_resume_in_an_uneven_epoch_pads_as_the_uninterrupted_run_does():
    # Issue 27: 10 samples on 4 ranks pad with 2 (ceil(10 / 4) = 3 a rank). Resumed after one
    # step of 1 a rank, ranks 2 and 3 used to pad with the remainder's first indices ([5,3],
    # [7,9]) instead of the epoch's ([5,4], [7,1]).
    def world(consumed_per_rank):
        ranks = [ResumableDistributedSampler(10, rank=r, world_size=4, seed=1) for r in range(4)]
        for s in ranks:
            s.advance(consumed_per_rank)
        return [list(s) for s in ranks]

    uninterrupted = world(0)
    assert uninterrupted[2][1:] == [5, 4] and uninterrupted[3][1:] == [7, 1]
    assert world(1) == [part[1:] for part in uninterrupted]


def test_drop_last_and_shuffle_are_saved_with_the_position():
    s = ResumableDistributedSampler(50, rank=0, world_size=2, seed=1, shuffle=False, drop_last=True)
    s.advance(3)
    restored = ResumableDistributedSampler(50, rank=0, world_size=2, seed=1)  # defaults differ
    restored.load_state_dict(s.state_dict())
    assert (restored.shuffle, restored.drop_last, restored.consumed) == (False, True, 6)
    assert list(restored) == list(s)


def test_a_checkpoint_from_before_shuffle_and_drop_last_were_saved_still_resumes():
    old = {"epoch": 1, "consumed": 6, "seed": 4, "dataset_len": 11}  # such files exist
    restored = ResumableDistributedSampler(11, rank=1, world_size=2, seed=0, drop_last=False)
    restored.load_state_dict(old)
    full = ResumableDistributedSampler(11, rank=1, world_size=2, seed=4, drop_last=True)
    full.set_epoch(1)
    assert (restored.shuffle, restored.drop_last) == (True, True)
    assert list(restored) == list(full)[3:] and len(restored) == 2
