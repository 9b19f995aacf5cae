"""NCCL set up as production clusters need it, and the flight recorder's dumps on a hang.

Set before the process group exists, each only where neither job.env nor the launching
environment chose otherwise (os.environ.setdefault, per group of alias names):
- TORCH_NCCL_ASYNC_ERROR_HANDLING=1: a failed or timed-out collective aborts the communicator
  and ends the process, instead of leaving peers blocked in it until the job's time runs out;
  the supervisor then restarts the attempt.
- the flight recorder (TORCH_FR_BUFFER_SIZE=2000 collectives) with TORCH_NCCL_DUMP_ON_TIMEOUT=1,
  dumping into the rank's log folder (TORCH_FR_DUMP_TEMP_FILE = LOGS/nccl-trace-rank-, to which
  torch appends the rank): which collective each rank was in when one timed out.
- NCCL_DEBUG=WARN: NCCL's own reason for an error lands in the rank's log.
The collective timeout is `distributed.timeout_s` (ORCH_COLLECTIVE_TIMEOUT_S), passed to
init_process_group.

A hang the supervisor's watchdog finds (long before a 10-minute collective timeout) is a hang
NCCL has not noticed: the watchdog's SIGUSR1, besides faulthandler's Python stacks, makes a
thread of this module write the flight recorder's buffer to the same file. The thread wakes on
the signal itself (signal.set_wakeup_fd), so it dumps while the main thread is stuck inside a
collective or a CUDA synchronize, where no Python signal handler would run.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
from collections.abc import Mapping, MutableMapping

from orchestrator.contract import flight_recorder_prefix

# Each setting with the names torch reads it under (newer first): a value the user gave under
# any of them is kept; otherwise only the first is set (torch 2.11 warns on every rank about a
# deprecated alias such as TORCH_NCCL_TRACE_BUFFER_SIZE).
ASYNC_ERROR_HANDLING = ("TORCH_NCCL_ASYNC_ERROR_HANDLING",)
TRACE_BUFFER = ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE")
DUMP_ON_TIMEOUT = ("TORCH_NCCL_DUMP_ON_TIMEOUT",)
DUMP_FILE = ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE")
NCCL_DEBUG = ("NCCL_DEBUG",)
TRACE_ENTRIES = 2000  # collectives kept: minutes of a typical step's all-reduces, ~MBs


def nccl_defaults(log_dir: str | None) -> dict[tuple[str, ...], str]:
    """What this module sets for an NCCL rank, by alias group. Pure."""
    settings = {
        ASYNC_ERROR_HANDLING: "1",
        TRACE_BUFFER: str(TRACE_ENTRIES),
        DUMP_ON_TIMEOUT: "1",
        NCCL_DEBUG: "WARN",
    }
    if log_dir:
        settings[DUMP_FILE] = flight_recorder_prefix(log_dir)
    return settings


def apply_defaults(env: MutableMapping[str, str], settings: Mapping[tuple[str, ...], str]) -> None:
    """Set the first name of a group to its value, unless one of the group's names is set."""
    for names, value in settings.items():
        if not any(name in env for name in names):
            env[names[0]] = value


def trace_enabled(env: Mapping[str, str]) -> bool:
    for name in TRACE_BUFFER:
        try:
            if int(env.get(name) or 0) > 0:
                return True
        except ValueError:
            continue
    return False


def dump_path(env: Mapping[str, str], rank: int) -> str | None:
    for name in DUMP_FILE:
        if env.get(name):
            return f"{env[name]}{rank}"
    return None


def configure(*, backend: str, log_dir: str | None, rank: int) -> None:
    """Call before init_process_group. NCCL ranks get the settings above; any rank whose flight
    recorder is on (set by this, or by the user for gloo) dumps it on the watchdog's SIGUSR1."""
    if backend == "nccl":
        apply_defaults(os.environ, nccl_defaults(log_dir))
    elif log_dir:  # a flight recorder the user turned on (gloo records too) dumps there as well
        apply_defaults(os.environ, {DUMP_FILE: flight_recorder_prefix(log_dir)})
    path = dump_path(os.environ, rank)
    if path and trace_enabled(os.environ):
        _dump_on_sigusr1(path)


def dump_flight_recorder(path: str) -> int | None:
    """Write the flight recorder's buffer (torch's pickle, read by `python -m
    torch.distributed.flight_recorder.fr_trace`) to `path`; its size, or None if unavailable."""
    try:
        from torch._C import _distributed_c10d as c10d
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    dump = getattr(c10d, "_dump_fr_trace", None) or getattr(c10d, "_dump_nccl_trace", None)
    if dump is None:
        return None
    data = dump(True, True, False)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
    return len(data)


_installed = False


def _dump_on_sigusr1(path: str) -> None:
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    try:
        previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except ValueError:  # pragma: no cover - not the main thread
        previous = None
    if previous != -1:  # the job's own event loop owns the wakeup fd: leave it, dump on timeouts only
        if previous is not None:
            signal.set_wakeup_fd(previous)
        os.close(read_fd)
        os.close(write_fd)
        return
    # The wakeup fd is written by Python's C-level handler, so SIGUSR1 needs a Python handler;
    # faulthandler (Python stacks into the log) runs first and chains to it.
    signal.signal(signal.SIGUSR1, lambda _signum, _frame: None)
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True, chain=True)
    threading.Thread(
        target=_dump_loop, args=(read_fd, path), name="orch-flight-recorder", daemon=True
    ).start()
    _installed = True


def _dump_loop(read_fd: int, path: str) -> None:
    while True:
        try:
            received = os.read(read_fd, 64)
        except OSError:  # pragma: no cover
            return
        if not received:
            return
        if signal.SIGUSR1 not in received:
            continue  # another handled signal (a preemption's SIGUSR2) woke us
        try:
            size = dump_flight_recorder(path)
        except Exception as exc:  # noqa: BLE001 - a failed dump must not kill the rank
            print(f"[orch] flight recorder dump failed: {exc}", file=sys.stderr, flush=True)
            continue
        if size is not None:
            print(f"[orch] flight recorder dumped to {path} ({size} bytes)", file=sys.stderr, flush=True)
