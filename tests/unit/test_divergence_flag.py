"""Issue 27, point 6: a pending divergence flag is never lost when the next observed value lives
on another device (a NaN loss on the GPU, then a finite multi-element CPU tensor before the read).

There is no GPU here. `OnAnotherDevice` stands in for one: a tensor that reports the device it
is given (cuda:0) while its data and every operation stay on the CPU (a wrapper subclass, as
torch's own FakeTensor and DTensor are), so the guard's real code runs its real cross-device
path, in both orders.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_map

from orchestrator.runtime.divergence import DivergenceGuard


class OnAnotherDevice(torch.Tensor):
    """A CPU tensor that says it lives on `device`; results of its operations say so too."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor, device: str) -> OnAnotherDevice:
        wrapper = torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=device)
        wrapper.inner = inner
        return wrapper

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        device = next(a.device for a in args if isinstance(a, OnAnotherDevice))

        def unwrap(a: Any) -> Any:
            return a.inner if isinstance(a, OnAnotherDevice) else a

        def wrap(a: Any) -> Any:
            return OnAnotherDevice(a, str(device)) if isinstance(a, torch.Tensor) else a

        return tree_map(wrap, func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {})))


def gpu(*values: float) -> torch.Tensor:
    value = OnAnotherDevice(torch.tensor(values), "cuda:0")
    assert value.device.type == "cuda"  # the fault: the guard sees two devices
    return value


def test_the_stand_in_computes_on_its_own_device() -> None:
    bad = torch.logical_not(torch.isfinite(gpu(1.0, float("nan"))).all())
    assert bad.device.type == "cuda" and bad.item() is True


def test_a_non_finite_gpu_value_is_not_lost_to_a_later_cpu_value() -> None:
    guard = DivergenceGuard()
    guard.observe(gpu(float("nan")))  # the loss, on the GPU
    guard.observe(torch.tensor([1.0, 2.0]))  # then a finite multi-element CPU tensor
    assert guard.read() is True
    assert guard.read() is False  # read resets every device's flag


def test_a_non_finite_cpu_value_is_not_lost_to_a_later_gpu_value() -> None:
    guard = DivergenceGuard()
    guard.observe(torch.tensor([1.0, float("inf")]), gpu(0.5))
    guard.observe(gpu(2.0), torch.tensor([3.0, 4.0]))  # back and forth: still pending
    assert guard.read() is True
    guard.observe(gpu(1.0), torch.tensor([1.0, 2.0]))
    assert guard.read() is False
