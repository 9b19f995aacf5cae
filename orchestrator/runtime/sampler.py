"""A distributed sampler that can resume mid-epoch, on the same or a different world size.

The global order of an epoch comes from (seed, epoch) alone, never from the world size. The
sampler counts how many samples the whole world has consumed; a rank's share of what is left
is every world_size-th index of the remainder, starting at its rank. So after k steps of batch
B on W ranks the world has consumed exactly the first k*B*W indices of the order, and a resumed
run (on W or on W' ranks) continues with the next unseen ones.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import Sampler


class ResumableDistributedSampler(Sampler[int]):
    def __init__(
        self, dataset_len: int, *, rank: int, world_size: int, seed: int = 0, shuffle: bool = True
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
        return max(0, self.dataset_len - self.consumed) // self.world_size

    def __len__(self) -> int:
        return self._remainder_len()

    def __iter__(self) -> Iterator[int]:
        per_rank = self._remainder_len()
        remainder = self.global_order()[self.consumed : self.consumed + per_rank * self.world_size]
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
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["dataset_len"]) != self.dataset_len:
            raise ValueError(
                f"checkpoint sampler saw {state['dataset_len']} samples, this data set has {self.dataset_len}"
            )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.consumed = int(state["consumed"])
