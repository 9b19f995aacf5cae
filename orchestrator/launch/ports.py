"""MASTER_PORT leases: two concurrent runs on one machine never get the same port.

A port is ours while we hold an exclusive flock on `<lock dir>/<port>.lock` and nothing else has
it bound. Candidates come from below the kernel's ephemeral range, so outgoing connections of
other programs do not take the port between the check and rank 0 binding it. The lease is held
for one attempt; each attempt takes a fresh one, so no rendezvous state outlives an attempt.
"""

from __future__ import annotations

import fcntl
import os
import random
import socket
from dataclasses import dataclass

from orchestrator.storage.private import NotPrivate, open_private_file, private_dir, user_temp_dir

PORT_RANGE = (20000, 32000)


def _lock_dir() -> str:
    """ORCH_PORT_LOCK_DIR, else `<tmp>/orch-$UID/ports`: either checked private to this user
    (storage/private.py). Anyone can compute the default's path; a folder another user made
    there could hold every lock forever or see our leases."""
    chosen = os.environ.get("ORCH_PORT_LOCK_DIR")
    return private_dir(chosen) if chosen else user_temp_dir("ports")


@dataclass
class PortLease:
    port: int
    _fd: int

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1

    def __enter__(self) -> "PortLease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # TCPStore binds with SO_REUSEADDR; do the same so a port in TIME_WAIT counts as free
        # exactly when rank 0 could bind it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def lease_port(fixed: int | None = None, *, rng: random.Random | None = None) -> PortLease:
    """Lease `fixed`, or a free port from PORT_RANGE. Raises OSError when none is free."""
    lock_dir = _lock_dir()
    if fixed is not None:
        candidates = [fixed]
    else:
        lo, hi = PORT_RANGE
        start = (rng or random.SystemRandom()).randrange(lo, hi)
        candidates = [lo + (start - lo + i) % (hi - lo) for i in range(hi - lo)]
    for port in candidates:
        try:
            # Never a link, nor a file someone else made (ours is private: only we could).
            fd = open_private_file(os.path.join(lock_dir, f"{port}.lock"), os.O_RDWR)
        except NotPrivate:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        if _bindable(port):
            return PortLease(port, fd)
        os.close(fd)
    raise OSError(f"no free port for MASTER_PORT (tried {len(candidates)})")
