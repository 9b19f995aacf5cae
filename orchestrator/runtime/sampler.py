"""A distributed sampler that can resume mid-epoch, on the same or a different world size.

The global order of an epoch comes from (seed, epoch) alone, never from the world size. The
sampler counts how many samples the whole world has consumed; a rank's share of what is left
is every world_size-th index of the remainder, starting at its rank. So after k steps of batch
B on W ranks the world has consumed exactly the first k*B*W indices of the order, and a resumed
run (on W or on W' ranks) continues with the next unseen ones.

Every rank must get as many samples as the others (DDP steps together). When the remainder does
not divide by the world size, it is padded, as torch's DistributedSampler pads, with its own
first indices (drop_last=False, the default): every sample of the epoch is still seen, a few
twice. With drop_last=True the last (remainder mod world size) are skipped instead, at each
resume: those samples are not seen in that epoch.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import Sampler


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
        self.consumed = 0  # samples of this epoch consumed by the whole world

    def global_order(self, epoch: int | None = None) -> torch.Tensor:
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return torch.arange(self.dataset_len)
        gen = torch.Generator()
        gen.manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.dataset_len, generator=gen)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch`; keeps the position when it is the epoch being resumed."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.consumed = 0

    def _remainder_len(self) -> int:
        """Samples per rank left in this epoch."""
        left = max(0, self.dataset_len - self.consumed)
        if self.drop_last:
            return left // self.world_size
        return -(-left // self.world_size)  # ceil: padded

    def __len__(self) -> int:
        return self._remainder_len()

    def __iter__(self) -> Iterator[int]:
        per_rank = self._remainder_len()
        remainder = self.global_order()[self.consumed :]
        wanted = per_rank * self.world_size
        if len(remainder) < wanted:  # pad with the remainder's own first indices
            repeats = -(-wanted // max(len(remainder), 1))
            remainder = remainder.repeat(repeats)
        remainder = remainder[:wanted]
        return iter(remainder[self.rank :: self.world_size].tolist())

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
