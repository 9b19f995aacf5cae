"""runtime/prefault.py: the pages of a model's untouched CPU tensors are mapped beside the
restore's verification read, and what the tensors hold never changes."""

from __future__ import annotations

import psutil
import pytest
import torch

from orchestrator.runtime import prefault

MIB = 1 << 20


class Untouched(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.big = torch.nn.Parameter(torch.empty(64 * MIB // 4))  # never written: no pages yet
        self.small = torch.nn.Parameter(torch.full((10,), 3.0))
        self.register_buffer("kept", torch.arange(MIB, dtype=torch.float32))  # 4 MiB, written


def test_untouched_pages_are_mapped_and_nothing_is_written() -> None:
    model = Untouched()
    kept = model.kept.clone()
    before = psutil.Process().memory_info().rss
    thread = prefault.start(model)
    assert thread is not None
    thread.join(timeout=30)
    grown = psutil.Process().memory_info().rss - before
    if grown < 32 * MIB:
        pytest.skip(f"madvise(MADV_POPULATE_WRITE) not supported here (RSS grew {grown >> 20} MiB)")
    assert grown >= 60 * MIB, grown  # the 64 MiB parameter's pages now exist
    assert torch.equal(model.kept, kept) and torch.equal(model.small, torch.full((10,), 3.0))


def test_a_model_of_small_tensors_needs_no_thread() -> None:
    assert prefault.start(torch.nn.Linear(4, 4)) is None
