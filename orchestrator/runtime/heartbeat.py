"""Heartbeats: each rank tells its supervisor, cheaply, that it is still making progress.

One fixed-size record rewritten in place (one pwrite, no fsync: the supervisor reads the page
cache on the same node): `step wall_time phase step_time_ema`. Phases: `init` until the first
step, `train`, `sync` once backward (and with it DDP's gradient all-reduce) starts, `save`
while a checkpoint is written (a longer allowance), `exit` once the job shuts down (no limit).
A change of phase is written at once; while training, at most one record per WRITE_EVERY_S
(a pwrite right after a step costs ~30-50 us on a busy CPU, ~0.4% of a 10 ms step when every
step wrote), so a record is never older than WRITE_EVERY_S plus one step, far below any hang
limit (>= 1 s). With `wrap_ddp` a step writes twice (train -> sync -> train): the price of
naming the right rank when one hangs and the others wait for it inside the all-reduce. The
supervisor's watchdog reads these files; see orchestrator/supervision/watchdog.py; the record's
format is in orchestrator/contract.py.

SIGUSR1 dumps every thread's Python stack into the rank's log (faulthandler works from C, so
it also reaches a rank stuck inside a collective).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time

from orchestrator.contract import ENV_HEARTBEAT_FILE, Phase, encode_heartbeat

_fd: int | None = None
_last_step: int | None = None
_last_time: float | None = None
_ema: float = 0.0
_written_at: float = 0.0  # wall time of the last record written
_written_phase: str | None = None
WRITE_EVERY_S = 0.1


def install() -> None:
    global _fd
    if _fd is None:
        path = os.environ.get(ENV_HEARTBEAT_FILE)
        if path:
            _fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True, chain=False)
    except (AttributeError, ValueError, RuntimeError):  # pragma: no cover - not the main thread
        pass
    beat(0, Phase.INIT)


def beat(step: int, phase: str = Phase.TRAIN) -> None:
    """Record progress: called at every step end (by Checkpointer.step_end) and around saves."""
    global _last_step, _last_time, _ema, _written_at, _written_phase
    now = time.time()
    if phase == Phase.TRAIN and _last_time is not None and _last_step is not None and step > _last_step:
        per_step = (now - _last_time) / (step - _last_step)
        _ema = per_step if _ema == 0.0 else 0.9 * _ema + 0.1 * per_step
    if phase == Phase.TRAIN:
        _last_step, _last_time = step, now
    if _fd is None or (phase == _written_phase and 0.0 <= now - _written_at < WRITE_EVERY_S):
        return
    os.pwrite(_fd, encode_heartbeat(step, now, phase, _ema), 0)
    _written_at, _written_phase = now, phase


def waiting_for_peers() -> None:
    """Record that this rank entered a collective (DDP's backward): silent from here, it waits
    for a peer, and the watchdog blames a silent rank that is not waiting. Not before the first
    step: the first backward (lazy communicator set-up, slow peers) keeps start-up's allowance."""
    if _last_step is not None:
        beat(_last_step, Phase.SYNC)
