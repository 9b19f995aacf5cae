"""Merged, rank-prefixed console stream of the per-rank log files.

Ranks write straight into their own log file (so nothing is lost if the supervisor dies); this
thread tails those files and prints complete lines as `[rank R] ...`.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, Iterable, TextIO


class LogStreamer:
    """Ranks' lines to `out` (stdout: `orch run ... | grep loss` finds them); the
    orchestrator's own lines (`note`) to `notes` (stderr), in the order they happened."""

    def __init__(
        self,
        out: TextIO,
        ranks: Iterable[int] | None = None,
        interval_s: float = 0.1,
        notes: TextIO | None = None,
        status: Callable[[], str | None] | None = None,
    ) -> None:
        self._out = out
        self._notes = notes if notes is not None else out
        # Progress: on a terminal, one line kept at the bottom and redrawn each second; elsewhere
        # (a pipe, a log file) a plain line now and then.
        self._status = status
        self._live = _is_terminal(self._notes)
        self._status_every_s = 1.0 if self._live else 60.0
        self._status_due = time.monotonic() + (2.0 if self._live else 60.0)
        self._status_shown = ""
        self._show = None if ranks is None else set(ranks)
        self._interval = interval_s
        self._files: dict[int, tuple[str, int, bytes]] = {}  # rank -> (path, offset, partial line)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.write: Callable[[str], None] = self._write

    def _write(self, text: str) -> None:
        with self._lock:
            self._clear_status()
            self._out.write(text)
            self._out.flush()
            self._draw_status()

    def note(self, text: str) -> None:
        """One of the orchestrator's own lines."""
        with self._lock:
            self._clear_status()
            self._out.flush()
            self._notes.write(text)
            self._notes.flush()
            self._draw_status()

    def _clear_status(self) -> None:
        if self._live and self._status_shown:
            self._notes.write("\r\x1b[K")

    def _draw_status(self) -> None:
        if self._live and self._status_shown:
            self._notes.write(self._status_shown)
            self._notes.flush()

    def _refresh_status(self) -> None:
        if self._status is None or time.monotonic() < self._status_due:
            return
        self._status_due = time.monotonic() + self._status_every_s
        try:
            text = self._status()
        except Exception:  # noqa: BLE001 - progress is a courtesy: never stop the stream for it
            text = None
        if not text:
            return
        if self._live:
            with self._lock:
                self._clear_status()
                self._status_shown = f"[orch] {text}"
                self._draw_status()
        else:
            self.note(f"[orch] {text}\n")

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
            self._refresh_status()

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
                text = "".join(rank_line(rank, line) + "\n" for line in lines)
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
        with self._lock:
            self._clear_status()  # the summary lines follow on a clean line
            self._status_shown = ""
            self._notes.flush()


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


def rank_line(rank: int, line: bytes) -> str:
    """A rank's log line as the console shows it: `[rank R] ...`, without torch's own
    `[rankR]:` prefix (it adds one to its messages once the process group is up): one prefix
    per line is enough."""
    text = line.decode("utf-8", "replace")
    own = f"[rank{rank}]:"
    if text.startswith(own):
        text = text[len(own) :]
        text = text[1:] if text.startswith(" ") else text
    return f"[rank {rank}] {text}"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
