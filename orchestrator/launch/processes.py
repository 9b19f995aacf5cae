"""How rank processes are started and stopped (the launcher Protocol) and the fresh-interpreter
launcher.

Every attempt gets its own process group. Its leader is a tiny reaper (`sh`) that reads a pipe
whose only writer is the supervisor: when the supervisor dies in any way, even SIGKILL, the
pipe reaches EOF and the reaper SIGKILLs the whole group, which also takes DataLoader workers and
other grandchildren that a parent-death signal would miss. Each rank also gets
PR_SET_PDEATHSIG(SIGKILL) as a second line. The leader lives as long as the attempt, so ranks can
always join its group.

A rank's stdout and stderr are its log file, opened for it; when job.pass_env has a value to
mask, they are a pipe to the attempt's masker instead (MaskedOutput, orchestrator.launch.masking),
which writes the log files with those values replaced.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

from orchestrator.contract import ENV_PASS_ENV, secret_values
from orchestrator.launch.masking import DRAIN_MAX_S
from orchestrator.spec.plan import RankSpec

_PR_SET_PDEATHSIG = 1
try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - non-glibc platforms
    _libc = None

# The reaper waits for EOF on stdin, then kills its own process group. It starts with SIGTERM
# and the other stop signals ignored (_ignore_stop_signals), so a graceful stop of the group
# leaves it in place to finish the job with SIGKILL.
_REAPER_SCRIPT = "while read -r _; do :; done; kill -KILL 0"
# How long AttemptGroup.close waits, in all, for the reaper and then for the ranks' exit statuses.
CLOSE_WAIT_S = 5.0
# The least AttemptGroup.close waits for the masker to drain the ranks' pipes and leave.
MASKER_WAIT_S = DRAIN_MAX_S + 0.5
# A rank's pipe to the masker holds this much (Linux's default most for a user): a rank blocks
# on a print only when the masker is this far behind.
PIPE_BYTES = 1 << 20


def process_state(pid: int) -> str | None:
    """The one-letter state from /proc/PID/stat (R, S, D, T, Z...), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return None


class ProcessHandle(Protocol):
    """What the supervisor uses of a rank's process: subprocess.Popen, or a forked rank's handle."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


@dataclass
class RankProcess:
    spec: RankSpec
    popen: ProcessHandle
    log_path: str
    started: float
    ended: float | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        code = self.popen.poll()
        if code is not None and self.ended is None:
            self.ended = getattr(self.popen, "exit_time", None) or time.time()
        return code


def rank_environment(spec: RankSpec, extra: Mapping[str, str], pass_env: Sequence[str]) -> dict[str, str]:
    """A rank's whole environment: this process's (which holds the job.pass_env values), the
    plan's, the launcher's, and the pass_env names, so that the rank redacts their values from
    its error record (contract.exception_record)."""
    names = {ENV_PASS_ENV: ",".join(pass_env)} if pass_env else {}
    return {**os.environ, **spec.env, **extra, **names}


@dataclass
class MaskedOutput:
    """The ranks' stdout and stderr through one masker process, which writes each rank's log
    file with every job.pass_env value replaced (orchestrator.launch.masking). Each rank gets
    the write end of its own pipe (`rank_ends`); the masker holds the read ends and the logs,
    and leaves once every pipe has ended, so what a killed rank wrote last still reaches its
    file. It runs in a process group of its own, with the stop signals ignored: a stop of the
    attempt's group, or Ctrl-C at the terminal, does not cut the ranks' last words off.
    `control` is the write end of its stdin: closed once the ranks are reaped (finish), or when
    this process dies, it tells the masker to drain the pipes and leave."""

    process: subprocess.Popen
    rank_ends: list[int]
    control: int

    @classmethod
    def start(cls, pass_env: Sequence[str], log_paths: Sequence[str]) -> MaskedOutput | None:
        """The masker for these logs, or None when no pass_env value needs masking: the ranks
        then write their files directly, at no cost."""
        if not secret_values(pass_env, os.environ):
            return None
        ours: list[int] = []  # every descriptor opened here, closed once the masker has them
        rank_ends: list[int] = []
        pairs: list[str] = []
        control_read, control = os.pipe()  # close-on-exec: no rank or other child inherits it
        try:
            for path in log_paths:
                log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                ours.append(log)
                read_end, write_end = os.pipe()
                ours.append(read_end)
                rank_ends.append(write_end)
                _widen(write_end)
                pairs.append(f"{read_end}:{log}")
            process = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.launch.masking", ",".join(pass_env), *pairs],
                stdin=control_read,
                stdout=subprocess.DEVNULL,  # stderr stays: a masker that fails says why
                pass_fds=ours,
                process_group=0,
                preexec_fn=_ignore_stop_signals,
            )
        except BaseException:
            for fd in (*rank_ends, control):
                os.close(fd)
            raise
        finally:
            for fd in (*ours, control_read):
                os.close(fd)
        return cls(process=process, rank_ends=rank_ends, control=control)

    def hand_over(self) -> None:
        """Close this process's copies of the ranks' ends (each rank holds its own now): only
        then can a pipe end when its rank does."""
        while self.rank_ends:
            os.close(self.rank_ends.pop())

    def finish(self, timeout: float) -> None:
        """Once the ranks are gone: wait until the masker has written everything they wrote.
        It leaves when every pipe has ended, or, with a pipe that a process outside the
        attempt keeps open, after draining them (masking.DRAIN_MAX_S at most), leaving a copy
        of itself for that process. After `timeout`, kill it (wedged on a log's disk)."""
        self.hand_over()
        if self.control >= 0:
            os.close(self.control)
            self.control = -1
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _widen(pipe_end: int) -> None:
    try:
        fcntl.fcntl(pipe_end, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:  # over /proc/sys/fs/pipe-max-size: the default 64 KiB still works
        pass


@dataclass
class AttemptGroup:
    """The processes of one attempt: a reaper leading the group, and the ranks in it."""

    pgid: int
    reaper: subprocess.Popen
    reaper_pipe: int
    ranks: list[RankProcess] = field(default_factory=list)
    launched_by: str = "subprocess"
    notice: str | None = None  # what the launcher wants said (e.g. why it could not fork)
    output: MaskedOutput | None = None  # the ranks' masker, when job.pass_env has values to mask

    def alive(self) -> list[RankProcess]:
        return [r for r in self.ranks if r.poll() is None]

    def signal_all(self, sig: int) -> None:
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass

    def stop(self, grace_s: float) -> None:
        """SIGTERM the group, wait up to grace_s for the ranks, then SIGKILL everything."""
        if self.alive():
            self.signal_all(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.02)
        self.close()

    def close(self) -> None:
        """Kill whatever is left of the group and reap the reaper. Waits at most
        CLOSE_WAIT_S in all for the ranks' exit statuses (one wait per rank would add up to
        minutes on a wedged fork server or ranks stuck in D state)."""
        if self.reaper_pipe >= 0:
            os.close(self.reaper_pipe)  # EOF: the reaper kills the group, itself included
            self.reaper_pipe = -1
        try:
            self.reaper.wait(timeout=CLOSE_WAIT_S)
        except subprocess.TimeoutExpired:
            self.signal_all(signal.SIGKILL)
            self.reaper.wait()
        self.signal_all(signal.SIGKILL)  # in case the reaper could not
        deadline = time.monotonic() + CLOSE_WAIT_S
        for r in self.ranks:
            try:
                r.popen.wait(timeout=max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:  # unkillable (D state), or nobody left to report it
                pass
            r.poll()
        if self.output is not None:  # the logs are whole before anyone reads their ends
            self.output.finish(timeout=max(MASKER_WAIT_S, deadline - time.monotonic()))
            self.output = None


class Launcher(Protocol):
    """Starts the ranks of one attempt."""

    name: str

    def start_attempt(
        self, specs: Sequence[RankSpec], log_paths: Sequence[str], extra_env: Sequence[Mapping[str, str]]
    ) -> AttemptGroup: ...

    def failure(self) -> str | None:
        """Why the launcher itself can no longer run or watch this attempt's ranks (a fork server
        that died or was stopped), or None. The supervisor asks on every poll."""

    def abandon(self) -> None:
        """Give up on what failure() named: kill it, so its ranks die and count as killed."""

    def close(self) -> None:
        """Release what outlives attempts (a fork server); called once when the run ends."""


def _prepare_rank_process(parent_pid: int) -> None:
    """In the forked child, before exec: die with the supervisor, and hold SIGUSR2 pending
    (a stop request sent while the rank still imports) until orchestrator.runtime's
    preemption handler unblocks it, instead of being killed by its default action."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    _set_parent_death_signal(parent_pid)


def _set_parent_death_signal(parent_pid: int) -> None:
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the supervisor died before prctl took effect
        os._exit(137)


def _ignore_stop_signals() -> None:
    """In the reaper, before exec (which keeps ignored signals): a graceful stop, or a signal for
    the whole Slurm step (proctrack linuxproc or cgroup), cannot kill it, even while sh starts."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def start_reaper() -> tuple[subprocess.Popen, int]:
    read_end, write_end = os.pipe()
    try:
        reaper = subprocess.Popen(
            ["/bin/sh", "-c", _REAPER_SCRIPT],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            process_group=0,
            close_fds=True,
            preexec_fn=_ignore_stop_signals,
        )
    finally:
        os.close(read_end)
    os.set_inheritable(write_end, False)
    return reaper, write_end


def recorded_argv(argv: Sequence[str]) -> list[str]:
    """A rank's command line run through orchestrator.launch.entry, which records an uncaught
    exception from the job's first line on (an import that fails, before the job imports the
    runtime). Only in this interpreter, which has this package: a job.python of its own may not
    (its ranks then have the runtime's record, once the job imports it)."""
    if os.path.abspath(argv[0]) != os.path.abspath(sys.executable):
        return list(argv)
    if len(argv) < 2 or (argv[1].startswith("-") and argv[1] != "-m"):
        return list(argv)  # `python -c CODE` or other interpreter options: the entry runs a script or -m
    return [argv[0], "-m", "orchestrator.launch.entry", *argv[1:]]


class SubprocessLauncher:
    """A fresh interpreter per rank (what torchrun does): always safe, ~1.5 s of imports each.
    `pass_env`: job.pass_env, whose values are masked in the ranks' logs and error records."""

    name = "subprocess"

    def __init__(self, pass_env: Sequence[str] = ()) -> None:
        self.pass_env = tuple(pass_env)

    def start_attempt(
        self, specs: Sequence[RankSpec], log_paths: Sequence[str], extra_env: Sequence[Mapping[str, str]]
    ) -> AttemptGroup:
        reaper, pipe = start_reaper()
        group = AttemptGroup(pgid=reaper.pid, reaper=reaper, reaper_pipe=pipe)
        parent = os.getpid()
        try:
            group.output = MaskedOutput.start(self.pass_env, log_paths)
            for i, (spec, log_path, extra) in enumerate(zip(specs, log_paths, extra_env, strict=True)):
                if group.output is not None:
                    fd = os.dup(group.output.rank_ends[i])  # hand_over closes the original
                else:
                    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                try:
                    popen = subprocess.Popen(
                        recorded_argv(spec.argv),
                        env=rank_environment(spec, extra, self.pass_env),
                        stdin=subprocess.DEVNULL,
                        stdout=fd,
                        stderr=fd,
                        process_group=group.pgid,
                        preexec_fn=lambda: _prepare_rank_process(parent),
                        close_fds=True,
                    )
                finally:
                    os.close(fd)
                group.ranks.append(
                    RankProcess(spec=spec, popen=popen, log_path=log_path, started=time.time())
                )
        except BaseException:
            group.close()
            raise
        finally:
            if group.output is not None:
                group.output.hand_over()
        return group

    def failure(self) -> str | None:
        return None  # each rank is our own child: nothing stands between us and its exit

    def abandon(self) -> None:
        pass

    def close(self) -> None:
        pass
