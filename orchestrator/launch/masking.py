"""The masker: ranks' output to their log files with every job.pass_env value replaced by
`<redacted>`, as CI systems mask secrets in a job's log.

    python -m orchestrator.launch.masking NAMES IN:OUT [IN:OUT ...]

NAMES are job.pass_env's names, comma-separated; the values come from this process's own
environment (never its command line, which every user can read). Each IN is the read end of a
pipe that is one rank's stdout and stderr, OUT that rank's log file, both inherited. One
masker serves an attempt's ranks (processes.MaskedOutput starts it, only when there is a value
to mask); it leaves once every pipe has reached its end, which is when the rank and everything
it started have exited, however they ended: a killed rank's last output is still written.

Nothing waits for a line to end: what a rank wrote reaches its file as soon as it is read,
except an end that may begin a secret (StreamMasker), held until the next write shows whether
it is one. A secret written in two pieces is therefore still caught.

Stdlib and orchestrator.contract only: this is its own small process.
"""

from __future__ import annotations

import os
import selectors
import sys
import time
from collections.abc import Sequence

from orchestrator.contract import (
    MIN_SECRET_CHARS,
    REDACTED,
    replace_secrets,
    secret_start_at_end,
    secret_values,
)

REDACTED_BYTES = REDACTED.encode()
# One read takes what a full pipe holds (processes.PIPE_BYTES): a busy rank costs one pass per
# chunk, not one per line.
READ_BYTES = 1 << 20
# After reads smaller than this, the masker waits GATHER_S before reading again: the most a
# line waits on its way to the file (a full pipe is read again at once).
BUSY_READ_BYTES = 1 << 16
GATHER_S = 0.002


class StreamMasker:
    """One stream's masking: bytes in, bytes out, and no secret ever in the output, wherever
    the stream was split. The end of each piece that begins a secret (at most its length - 1
    bytes) is held back until the next piece; at the stream's end, a held start of
    MIN_SECRET_CHARS or more counts as the secret (the rank died writing it)."""

    def __init__(self, secrets: Sequence[bytes]) -> None:
        self._secrets = sorted(secrets, key=len, reverse=True)
        self._held = b""

    def feed(self, data: bytes) -> bytes:
        text = replace_secrets(self._held + data, self._secrets, REDACTED_BYTES)
        held = secret_start_at_end(text, self._secrets, 1)
        self._held = text[len(text) - held :] if held else b""
        return text[: len(text) - held]

    def end(self) -> bytes:
        held, self._held = self._held, b""
        return REDACTED_BYTES if len(held) >= MIN_SECRET_CHARS else held


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data`; on a write error (a full disk) the rest is dropped: the pipe must
    still be read, or the rank would block on its next print."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except InterruptedError:
            continue
        except OSError:
            return


def serve(streams: dict[int, tuple[int, StreamMasker]]) -> None:
    """Copy each pipe (key) to its file through its masker until every pipe has ended."""
    with selectors.DefaultSelector() as selector:
        for pipe in streams:
            selector.register(pipe, selectors.EVENT_READ)
        while streams:
            busy = False
            for key, _ in selector.select():
                pipe = int(key.fd)
                out, masker = streams[pipe]
                try:
                    data = os.read(pipe, READ_BYTES)
                except InterruptedError:
                    continue
                if data:
                    write_all(out, masker.feed(data))
                    busy = busy or len(data) >= BUSY_READ_BYTES
                    continue
                write_all(out, masker.end())
                selector.unregister(pipe)
                os.close(pipe)
                os.close(out)
                del streams[pipe]
            if not busy:
                # What was read is written; the next lines gather in the pipe meanwhile. Read at
                # once, a rank that prints line by line woke the masker for every line.
                time.sleep(GATHER_S)


def parse_streams(pairs: Sequence[str], secrets: Sequence[bytes]) -> dict[int, tuple[int, StreamMasker]]:
    streams = {}
    for pair in pairs:
        pipe, _, out = pair.partition(":")
        streams[int(pipe)] = (int(out), StreamMasker(secrets))
    return streams


def main() -> None:
    # The stop signals arrive ignored (processes.MaskedOutput, before exec), which Python keeps:
    # the masker outlives a stop, to write what the ranks print while they stop.
    names, *pairs = sys.argv[1:]
    secrets = [os.fsencode(v) for v in secret_values(names.split(","), os.environ)]
    serve(parse_streams(pairs, secrets))


if __name__ == "__main__":
    main()
