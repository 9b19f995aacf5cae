"""The masker: ranks' output to their log files with every job.pass_env value replaced by
`<redacted>`, as CI systems mask secrets in a job's log.

    python -m orchestrator.launch.masking NAMES IN:OUT [IN:OUT ...]

NAMES are job.pass_env's names, comma-separated; the values come from this process's own
environment (never its command line, which every user can read). Each IN is the read end of a
pipe that is one rank's stdout and stderr, OUT that rank's log file, both inherited. One
masker serves an attempt's ranks (processes.MaskedOutput starts it, only when there is a value
to mask); it leaves once every pipe has reached its end, which is when the rank and everything
it started have exited, however they ended: a killed rank's last output is still written.

Its stdin is a pipe from the launcher, which closes it once the attempt's ranks are reaped
(or dies). What the ranks wrote is in the pipes by then: the masker reads until they are
quiet, then leaves. A pipe still open is held by a process that escaped the attempt's group (a
rank's child in a session of its own, as wandb's service is): a copy of the masker (a fork)
stays on for it and writes its output as before until it ends, while the launcher goes on.

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
# Once the launcher has reaped the ranks (CONTROL_FD ends), the masker reads on until no pipe
# has had data for DRAIN_QUIET_S, DRAIN_MAX_S at most (a straggler that writes without pause):
# the ranks' own output is in the pipes already, so this is all an attempt's end waits for one.
DRAIN_QUIET_S = 0.1
DRAIN_MAX_S = 0.5
CONTROL_FD = 0  # stdin: the launcher's end of it closes when the ranks are reaped


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


Streams = dict[int, tuple[int, StreamMasker]]


def copy_once(pipe: int, streams: Streams, selector: selectors.BaseSelector) -> bool:
    """Copy what `pipe` holds to its file through its masker; at its end, write what the masker
    held and forget the pipe. True when the read was a busy one (see BUSY_READ_BYTES)."""
    out, masker = streams[pipe]
    try:
        data = os.read(pipe, READ_BYTES)
    except InterruptedError:
        return False
    if data:
        write_all(out, masker.feed(data))
        return len(data) >= BUSY_READ_BYTES
    write_all(out, masker.end())
    selector.unregister(pipe)
    os.close(pipe)
    os.close(out)
    del streams[pipe]
    return False


def serve(streams: Streams, control: int | None = None) -> None:
    """Copy each pipe (key) to its file through its masker until every pipe has ended, or, once
    `control` has ended, until the pipes are drained (see DRAIN_QUIET_S): `streams` then holds
    the pipes that stragglers keep open."""
    with selectors.DefaultSelector() as selector:
        for pipe in streams:
            selector.register(pipe, selectors.EVENT_READ)
        if control is not None:
            selector.register(control, selectors.EVENT_READ)
        drain_end: float | None = None
        while streams:
            timeout = None if drain_end is None else min(DRAIN_QUIET_S, drain_end - time.monotonic())
            if timeout is not None and timeout <= 0:
                return
            events = selector.select(timeout)
            if not events and drain_end is not None:
                return  # quiet: everything the ranks wrote is in their files
            busy = False
            for key, _ in events:
                if key.fd == control:
                    selector.unregister(control)
                    drain_end = time.monotonic() + DRAIN_MAX_S
                    continue
                busy = copy_once(int(key.fd), streams, selector) or busy
            if not busy:
                # What was read is written; the next lines gather in the pipe meanwhile. Read at
                # once, a rank that prints line by line woke the masker for every line.
                time.sleep(GATHER_S)


def stay_for_stragglers(streams: Streams) -> None:
    """Serve the pipes that processes outside the attempt hold, in a fork of this process, so
    that this one can leave now (the launcher waits for it) and they are not cut off (their
    next write would fail with EPIPE, which kills a Go program such as wandb's service). What
    a stream holds back (a possible secret's start) stays held: the straggler's next write
    tells whether it is one."""
    if os.fork() != 0:
        return
    # Not the launcher's stderr: whoever reads that pipe (a caller of `orch run`) waits for
    # its end, which must not depend on a straggler.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    serve(streams)


def parse_streams(pairs: Sequence[str], secrets: Sequence[bytes]) -> Streams:
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
    streams = parse_streams(pairs, secrets)
    serve(streams, CONTROL_FD)
    if streams:
        stay_for_stragglers(streams)


if __name__ == "__main__":
    main()
