"""Merged, rank-prefixed console stream of the per-rank log files.

Ranks write straight into their own log file (so nothing is lost if the supervisor dies); this
thread tails those files and prints complete lines as `[rank R] ...`.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Iterable, TextIO


class LogStreamer:
    def __init__(self, out: TextIO, ranks: Iterable[int] | None = None, interval_s: float = 0.1) -> None:
        self._out = out
        self._show = None if ranks is None else set(ranks)
        self._interval = interval_s
        self._files: dict[int, tuple[str, int, bytes]] = {}  # rank -> (path, offset, partial line)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.write: Callable[[str], None] = self._write

    def _write(self, text: str) -> None:
        with self._lock:
            self._out.write(text)
            self._out.flush()

    def follow(self, rank: int, path: str) -> None:
        """Stream this file (a new attempt replaces the rank's previous file)."""
        if self._show is not None and rank not in self._show:
            return
        with self._lock:
            self._files[rank] = (path, 0, b"")

    def follow_if_new(self, rank: int, path: str) -> None:
        """Follow `path` unless this rank's current file is already it."""
        with self._lock:
            current = self._files.get(rank)
        if current is None or current[0] != path:
            self.follow(rank, path)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="orch-logstream", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.pump()

    def pump(self, final: bool = False) -> None:
        with self._lock:
            items = list(self._files.items())
        for rank, (path, offset, partial) in items:
            try:
                with open(path, "rb") as fh:
                    fh.seek(offset)
                    data = fh.read()
            except FileNotFoundError:
                continue
            if not data and not (final and partial):
                continue
            buf = partial + data
            lines = buf.split(b"\n")
            rest = lines.pop()
            if final and rest:
                lines.append(rest)
                rest = b""
            if lines:
                text = "".join(f"[rank {rank}] {line.decode('utf-8', 'replace')}\n" for line in lines)
                self._write(text)
            with self._lock:
                if self._files.get(rank, (None,))[0] == path:
                    self._files[rank] = (path, offset + len(data), rest)

    def flush(self) -> None:
        """Print everything written so far, including a last line without a newline."""
        self.pump(final=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.flush()


def tail_lines(path: str, n: int = 40, max_bytes: int = 65536) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except FileNotFoundError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-n:]
