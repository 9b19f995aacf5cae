"""Waiting for descriptors to be ready, with poll(2) instead of select(2): select cannot watch a
descriptor numbered 1024 or more (FD_SETSIZE), and a supervisor of a large step raises its
descriptor limit and holds one connection per node (backends/slurm/agent_step.py), so any
descriptor it opens later may be numbered past 1024."""

from __future__ import annotations

import math
import select
from collections.abc import Sequence
from typing import Protocol, TypeVar


class HasFileno(Protocol):
    def fileno(self) -> int: ...


T = TypeVar("T", bound="HasFileno | int")

_READABLE = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR | select.POLLNVAL
_WRITABLE = select.POLLOUT | select.POLLHUP | select.POLLERR | select.POLLNVAL


def _fd(obj: HasFileno | int) -> int:
    return obj if isinstance(obj, int) else obj.fileno()


def wait_ready(
    read: Sequence[T], write: Sequence[T] = (), timeout: float | None = None
) -> tuple[list[T], list[T]]:
    """The objects of `read` and of `write` that are ready (as select.select's first two lists;
    an end of file or an error counts as readable, so the caller reads and learns it), waiting up
    to `timeout` seconds (None: until one is)."""
    poller = select.poll()
    masks: dict[int, int] = {}
    for obj in read:
        masks[_fd(obj)] = masks.get(_fd(obj), 0) | select.POLLIN | select.POLLPRI
    for obj in write:
        masks[_fd(obj)] = masks.get(_fd(obj), 0) | select.POLLOUT
    for fd, mask in masks.items():
        poller.register(fd, mask)
    # Milliseconds, rounded up: a timeout below 1 ms must not turn into a busy loop of 0s.
    events = dict(poller.poll(None if timeout is None else math.ceil(max(0.0, timeout) * 1000)))
    readable = [obj for obj in read if events.get(_fd(obj), 0) & _READABLE]
    writable = [obj for obj in write if events.get(_fd(obj), 0) & _WRITABLE]
    return readable, writable
