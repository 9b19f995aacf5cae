"""Populate the pages of a model's CPU tensors ahead of a restore, beside the checkpoint's
verification read.

A model built for resuming is often untouched memory (`torch.empty`, or weights about to be
overwritten): the restore's `load_state_dict` then takes a page fault per 4 KiB of the
destination, ~0.45 s per GiB on this machine, after the verification pass that reads the file
(mostly waiting on the disk). `madvise(MADV_POPULATE_WRITE)` (Linux 5.14+) maps those pages
without changing what they hold, so a thread can do it while the verification waits on I/O, and
the copy is then only a copy. Content is never written: a restore that fails leaves the model as
it was. Anything unsupported (another OS, an older kernel, CUDA tensors) is skipped silently.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import threading

import torch

MADV_POPULATE_WRITE = 23  # linux/mman.h
_MIN_BYTES = 1 << 20  # small tensors fault in no time; not worth a system call


def _regions(module: torch.nn.Module) -> list[tuple[int, int]]:
    """(page-aligned address, length) of each large CPU parameter's and buffer's storage."""
    page = mmap.PAGESIZE
    seen: set[int] = set()
    regions = []
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type != "cpu":
            continue
        storage = tensor.untyped_storage()
        start, size = storage.data_ptr(), storage.nbytes()
        if size < _MIN_BYTES or start in seen:
            continue
        seen.add(start)
        first = start - start % page
        last = start + size
        regions.append((first, last - first))
    return regions


def _populate(regions: list[tuple[int, int]]) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    for address, length in regions:
        # ctypes drops the GIL for the call: the verification's reads and hashing go on.
        if madvise(address, length, MADV_POPULATE_WRITE) != 0:
            return  # EINVAL before Linux 5.14: nothing else will work either


def start(module: torch.nn.Module) -> threading.Thread | None:
    """Begin populating `module`'s CPU tensors on a thread; join it before loading into them."""
    if not sys.platform.startswith("linux"):
        return None
    regions = _regions(module)
    if not regions:
        return None
    thread = threading.Thread(target=_populate, args=(regions,), name="orch-prefault", daemon=True)
    thread.start()
    return thread
