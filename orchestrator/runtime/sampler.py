"""A distributed sampler that can resume mid-epoch, on the same or a different world size.

The epoch's order comes from (seed, epoch) alone, never from the world size. The epoch's stream
is that order followed by the order again (what padding is taken from). A world of W ranks reads
the stream a step at a time, W positions a step: from position c, position c + k*W + r goes to
rank r. The sampler counts the positions the whole world has consumed (c), so after k steps of
batch B on W ranks the world has consumed exactly the first k*B*W positions, and a resumed run
continues with the next ones.

Every rank must get as many samples as the others (DDP steps together), so a world stops at a
whole step: with drop_last=False (the default) at the first one that covers the whole order,
padding fewer than W positions with the epoch's FIRST indices, as torch's DistributedSampler
pads; every sample of the epoch is seen, a few twice. With drop_last=True at the last one inside
the order: fewer than W samples at the end of the order are not seen in that epoch.

Where a world stops depends on c only through c mod W (layout_end), which is what makes resume
exact:
- On the same world size, c is a whole number of steps (c mod W == 0, as from the epoch's
  start), so a resumed rank's samples are the suffix of its uninterrupted ones, padding
  included; uninterrupted, the layout is torch's DistributedSampler's.
- On another world size W', the new world reads from c: every sample not yet seen exactly once,
  then (drop_last=False) padding from the epoch's first indices, never the resume point's: only
  how many are padded (fewer than W') depends on where it resumed. Its later resumes on W' are
  suffixes of that layout in turn.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import Sampler


def epoch_order(dataset_len: int, *, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The epoch's order of sample indices: a pure function of these, never of the world."""
    if not shuffle:
        return torch.arange(dataset_len)
    gen = torch.Generator()
    gen.manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(dataset_len, generator=gen)


def layout_end(dataset_len: int, world_size: int, consumed: int, drop_last: bool) -> int:
    """The stream position where a world of `world_size` ranks at position `consumed` stops: a
    whole number of steps from `consumed`, covering the order (drop_last=False) or within it."""
    left = max(0, dataset_len - consumed)
    steps = left // world_size if drop_last else -(-left // world_size)
    return consumed + steps * world_size


def rank_indices(
    order: torch.Tensor, *, rank: int, world_size: int, consumed: int, drop_last: bool
) -> list[int]:
    """The sample indices `rank` reads from position `consumed` of the epoch whose order is
    `order`: positions consumed + rank, + world_size, ... up to layout_end; positions past the
    order wrap to its start (the padding: the epoch's first indices)."""
    n = len(order)
    span = range(consumed + rank, layout_end(n, world_size, consumed, drop_last), world_size)
    positions = torch.arange(len(span)) * world_size + span.start  # empty where the rank is done
    return order[positions % n].tolist()


class ResumableDistributedSampler(Sampler[int]):
    def __init__(
        self,
        dataset_len: int,
        *,
        rank: int,
        world_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        if dataset_len <= 0:
            raise ValueError("dataset_len must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        self.dataset_len = dataset_len
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.consumed = 0  # positions of this epoch's stream the whole world consumed (padding too)

    def global_order(self, epoch: int | None = None) -> torch.Tensor:
        epoch = self.epoch if epoch is None else epoch
        return epoch_order(self.dataset_len, seed=self.seed, epoch=epoch, shuffle=self.shuffle)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch`; keeps the position when it is the epoch being resumed."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.consumed = 0

    def _remainder_len(self) -> int:
        """Samples per rank left in this epoch."""
        end = layout_end(self.dataset_len, self.world_size, self.consumed, self.drop_last)
        return (end - self.consumed) // self.world_size

    def __len__(self) -> int:
        return self._remainder_len()

    def __iter__(self) -> Iterator[int]:
        return iter(
            rank_indices(
                self.global_order(),
                rank=self.rank,
                world_size=self.world_size,
                consumed=self.consumed,
                drop_last=self.drop_last,
            )
        )

    def advance(self, samples_per_rank: int) -> None:
        """Record one step: every rank consumed `samples_per_rank` samples."""
        self.consumed += samples_per_rank * self.world_size

    @property
    def epoch_done(self) -> bool:
        return self._remainder_len() == 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "dataset_len": self.dataset_len,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["dataset_len"]) != self.dataset_len:
            raise ValueError(
                f"checkpoint sampler saw {state['dataset_len']} samples, this data set has {self.dataset_len}"
            )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.consumed = int(state["consumed"])
        # The position counts into the saved epoch's order, which depends on these. (Checkpoints
        # from before they were saved: shuffled, and the tail dropped.)
        self.shuffle = bool(state.get("shuffle", True))
        self.drop_last = bool(state.get("drop_last", True))
