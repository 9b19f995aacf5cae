"""The divergence guard: a NaN or infinite loss or gradient norm stops training before it is
trained on, or saved.

Checking a GPU value on the host every step would make each step wait for the GPU. Instead the
guard ORs "not finite" into a flag on the values' own device (two tiny kernels a step; one flag
per device, since moving a flag between devices would be a copy, and a GPU-to-host one a sync)
and reads them where the Checkpointer synchronises anyway: at its stop vote (every ~0.2 s of
steps), where the verdict travels in the same all-reduce, and before every save, so that no
checkpoint ever holds a diverged state. Every rank learns of a divergence at the same step and
raises DivergenceError; the supervisor treats it as its own failure class (never retried
blindly), and with `restart.on_divergence: rollback` the next attempt restores the newest
checkpoint and skips the data consumed since it (Checkpointer.restore).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from orchestrator.contract import DIVERGED_TYPE


class DivergenceError(RuntimeError):
    """The loss or the gradient norm was not finite: training diverged."""


assert DivergenceError.__name__ == DIVERGED_TYPE  # supervisors classify the record by this name


class DivergenceGuard:
    """Whether any value observed since the last read was not finite."""

    def __init__(self) -> None:
        # One pending bool flag per device that values were observed on. A flag is only ever
        # ORed into, never replaced: a NaN on the GPU followed by a finite CPU tensor before
        # the read must still be found (issue 27).
        self._flags: dict[torch.device, torch.Tensor] = {}
        self._host_flag = False  # python floats and CPU scalars observed

    def observe(self, *values: Any) -> None:
        """Note `values` (tensors of any shape, or numbers; None is ignored) without a sync."""
        for value in values:
            if value is None:
                continue
            if not torch.is_tensor(value):
                self._host_flag |= not math.isfinite(float(value))
                continue
            if value.device.type == "cpu" and value.numel() == 1:
                # A CPU scalar is read without any wait: one call instead of three tiny ops.
                self._host_flag |= not math.isfinite(value.item())
                continue
            bad = torch.logical_not(torch.isfinite(value.detach()).all())
            pending = self._flags.get(bad.device)
            self._flags[bad.device] = bad if pending is None else pending | bad

    def read(self) -> bool:
        """Whether anything observed since the last read was not finite (a host sync per device
        observed on); resets."""
        flags, host = self._flags, self._host_flag
        self._flags, self._host_flag = {}, False
        return host or any(bool(flag.item()) for flag in flags.values())


def message(first_step: int, last_step: int) -> str:
    where = (
        f"at step {last_step}" if first_step >= last_step else f"between steps {first_step} and {last_step}"
    )
    return f"training diverged: the loss or the gradient norm was not finite {where}"
