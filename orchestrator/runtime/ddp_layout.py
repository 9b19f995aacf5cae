"""DDP's gradient-bucket layout, carried across restarts: a resumed run sums each gradient in the
same order as an uninterrupted run, without `find_unused_parameters=True`'s per-step tax.

How DDP (torch 2.13, find_unused_parameters=False) buckets: its first step reduces every
gradient in one bucket in registration order (torch/nn/parallel/distributed.py,
compute_bucket_size_limits: `[sys.maxsize]`); meanwhile the reducer records the order in which
gradients become ready, and at the second forward it rebuilds its buckets in that order (1 MiB
first bucket, 25 MiB after), once per process. A resumed process does the same from its own
first step, so that step sums gradients in another layout than the uninterrupted run used at
that step; with more than two ranks the sums differ in the last bits.

So a checkpoint records the rebuilt layout (parameter names per bucket) in its manifest, and
`wrap_ddp` on a resumed run builds DDP with that layout as its initial one: its first step
reduces like the uninterrupted run's, and its own rebuild, from the same gradient order, lands
on the same layout. This reaches into DDP's private parts (`_compute_bucket_assignment_by_size`,
the reducer's `_rebuild_buckets` and `_get_zeros_like_grad_buckets`); the 4- and 6-rank
bitwise-resume tests guard them across torch versions.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

MANIFEST_KEY = "ddp_bucket_layout"  # in a checkpoint's manifest: [[parameter name, ...], ...]

# The DDP that wrap_ddp built around a module: a job hands the Checkpointer either.
_WRAPPED: weakref.WeakKeyDictionary[torch.nn.Module, Any] = weakref.WeakKeyDictionary()


def remember(ddp: Any) -> None:
    _WRAPPED[ddp.module] = weakref.ref(ddp)


def _is_ddp(model: Any) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


def _trainable_names(module: torch.nn.Module, ignored: set[str]) -> list[tuple[str, torch.nn.Parameter]]:
    """What DDP buckets, in its order: parameters that require grad and are not ignored."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad and n not in ignored]


def current_layout(model: Any) -> list[list[str]] | None:
    """Collective (every rank, between steps): the buckets DDP reduces with from now on, as
    parameter names per bucket; None for a model that is not DDP, a DDP that keeps its initial
    layout (find_unused_parameters), or one that has not run a backward yet. A rebuild still
    pending (a save right after the first step) is done now, as the next forward would."""
    if not _is_ddp(model):
        ref = _WRAPPED.get(model)
        model = ref() if ref is not None else None
    if model is None or model.find_unused_parameters:
        return None
    if not model._has_rebuilt_buckets and model.reducer._rebuild_buckets():
        model._has_rebuilt_buckets = True
    if not model._has_rebuilt_buckets:
        return None
    names = {id(p): n for n, p in _trainable_names(model.module, set(model.parameters_to_ignore))}
    return [
        [names[id(p)] for p in bucket.parameters()] for bucket in model.reducer._get_zeros_like_grad_buckets()
    ]


@contextlib.contextmanager
def initial_layout(module: torch.nn.Module, layout: list[list[str]] | None) -> Iterator[bool]:
    """While DDP is constructed: make `layout` its initial buckets. Yields whether it applies
    (the names are exactly this module's trainable parameters); otherwise DDP's own."""
    trainable = [
        n for n, _ in _trainable_names(module, set(getattr(module, "_ddp_params_and_buffers_to_ignore", ())))
    ]
    if layout is None or sorted(n for bucket in layout for n in bucket) != sorted(trainable):
        yield False
        return
    index = {n: i for i, n in enumerate(trainable)}
    buckets = [[index[n] for n in bucket] for bucket in layout]
    original = dist._compute_bucket_assignment_by_size

    def assignment(
        _params: Any, limits: Any, *_args: Any, **_kwargs: Any
    ) -> tuple[list[list[int]], list[int]]:
        # DDP reverses what this returns (it expects registration order, first layer first)
        return list(reversed(buckets)), [max(limits)] * len(buckets)

    dist._compute_bucket_assignment_by_size = assignment
    try:
        yield True
    finally:
        dist._compute_bucket_assignment_by_size = original


def newest_layout(checkpoint_url: str) -> list[list[str]] | None:
    """The layout recorded by the newest committed checkpoint under `checkpoint_url`, if any."""
    from orchestrator.storage.ckpt_store import CheckpointStore

    try:
        store = CheckpointStore(checkpoint_url)
        steps = store.committed_steps()
        if not steps:
            return None
        layout = store.info(max(steps)).manifest.get(MANIFEST_KEY)
    except Exception:  # noqa: BLE001 - a hint for speed and exactness: never fail the job for it
        return None
    if isinstance(layout, list) and all(
        isinstance(b, list) and all(isinstance(n, str) for n in b) for b in layout
    ):
        return layout
    return None
