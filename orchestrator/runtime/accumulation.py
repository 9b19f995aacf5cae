"""Gradient accumulation: k micro-batches per optimizer step, one all-reduce per step.

DDP all-reduces gradients in every backward. With accumulation only the last micro-batch's
backward needs to: the others run under `no_sync()`, and their gradients simply add up in
`.grad` until the last one's backward reduces the sum. The Checkpointer refuses to save or stop
between micro-batches (`boundary` is False there), so every checkpoint and every preemption
stop falls on an optimizer step: the sampler's position then counts whole optimizer steps and
a resumed run replays exactly the micro-batches an uninterrupted one would.

    accum = runtime.GradientAccumulation(ddp, steps=4)
    for x, y in loader:
        with accum.micro_step():
            loss = F.cross_entropy(ddp(x), y) / accum.steps
            loss.backward()
        sampler.advance(len(x))
        if not accum.boundary:
            continue
        optimizer.step(); optimizer.zero_grad(set_to_none=True)
        step += 1
        ckpt.step_end(step, epoch=epoch)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class GradientAccumulation:
    def __init__(self, model: torch.nn.Module, steps: int = 1) -> None:
        if steps < 1:
            raise ValueError(f"gradient accumulation steps must be >= 1, not {steps}")
        self.model = model  # a DDP module (no_sync), or any module (then nothing to skip)
        self.steps = steps
        self._done = 0  # micro-batches of the current optimizer step done so far

    @property
    def boundary(self) -> bool:
        """True after the last micro-batch of an optimizer step (and before the first)."""
        return self._done == 0

    @contextlib.contextmanager
    def micro_step(self) -> Iterator[None]:
        """One micro-batch's forward and backward; skips DDP's all-reduce unless it is the last."""
        last = self._done + 1 == self.steps
        no_sync = getattr(self.model, "no_sync", None)
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            yield
        self._done = 0 if last else self._done + 1
