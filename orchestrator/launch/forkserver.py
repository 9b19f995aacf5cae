"""The pre-warmed fork server ("zygote"): imports torch (and the job's heavy imports) once, then
forks ranks on request. Started by `orchestrator.launch.fork_launcher`; one per `orch run`, alive for
every attempt, so restarts fork from it again.

    python -m orchestrator.launch.forkserver FD        (FD: the control socket, inherited)

Why: `import torch` costs ~1.5 s of CPU per process on these machines; fresh interpreters for
8 ranks on 2 cores take ~8 s just to import. A fork shares the imported pages copy-on-write and
starts in milliseconds.

Forking is only safe from a process with one thread and no CUDA context: a lock held by another
thread at fork time stays locked forever in the child, and CUDA cannot be used in a forked
child once the parent initialised it. After each preloaded module the server checks both and
refuses (naming the module) rather than fork an unsafe image; the launcher then falls back to
fresh interpreters and logs why.

Protocol: newline-delimited JSON on a SOCK_STREAM socketpair.
  server -> {"ready": true, "preloaded": [...], "import_s": s}
            or  {"ready": false, "reason": ..., "module": ...}
  client -> {"spawn": id, "argv": [...], "env": {...}, "cwd": ..., "log": path, "pgid": n}
            with "output_fd": true, the rank's stdout and stderr come with the message
            (SCM_RIGHTS: a pipe to the masker, orchestrator.launch.masking) instead of `log`
  server -> {"spawned": id, "pid": n}  or  {"spawned": id, "error": "..."}
  server -> {"exited": pid, "code": n}   (n < 0: killed by signal -n, as subprocess reports it)
The server exits when the socket closes (the supervisor is gone) or on its parent's death.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import io
import json
import os
import signal
import socket
import sys
import time
from collections import deque
from typing import Any

from orchestrator.launch import entry
from orchestrator.launch.readiness import wait_ready

_PR_SET_PDEATHSIG = 1
# Descriptors one read may bring: Linux ends a read after a message that carries some, and a
# spawn request carries one.
MAX_FDS_PER_READ = 16


def _prctl_pdeathsig() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:  # pragma: no cover - non-glibc platforms
        pass


def native_thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # pragma: no cover - no procfs
        import threading

        return threading.active_count()


def fork_hazard() -> str | None:
    """Why forking this process now would be unsafe, or None."""
    import threading

    if threading.active_count() > 1:
        names = ", ".join(t.name for t in threading.enumerate() if t is not threading.main_thread())
        return f"Python threads are running ({names})"
    threads = native_thread_count()
    if threads > 1:
        return f"{threads - 1} native thread(s) are running"
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch, "cuda", None) is not None and torch.cuda.is_initialized():
        return "CUDA is initialised (a forked child cannot use it)"
    return None


def preload(modules: list[str]) -> tuple[list[str], str | None, str | None]:
    """Import each module (skipping those that fail: the rank will report that itself); stop
    at the first that leaves the process unsafe to fork. Returns (imported, culprit, reason)."""
    done = []
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - e.g. `from pkg import name` where name is no module
            continue
        hazard = fork_hazard()
        if hazard:
            return done, name, f"after importing {name}: {hazard}"
        done.append(name)
    return done, None, None


class _Channel:
    """The server's end. It never blocks on a send: replies wait in an outbox that the main
    loop writes out when the socket has room, while it goes on reading requests. (Blocking
    sends deadlocked with a supervisor that was itself blocked sending spawn requests: 256
    ranks that exit at once fill both directions.)"""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.outbox = bytearray()
        # Descriptors received and not yet taken, in the order of the messages they came with.
        self.fds: deque[int] = deque()

    def send(self, message: dict[str, Any]) -> None:
        self.outbox += json.dumps(message).encode() + b"\n"
        self.flush()

    def flush(self) -> None:
        """Write as much of the outbox as the socket takes now."""
        while self.outbox:
            try:
                sent = self.sock.send(self.outbox, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            del self.outbox[:sent]

    def flush_all(self) -> None:
        """Write the whole outbox, waiting for room (before the loop: the client is reading)."""
        self.sock.sendall(self.outbox)
        self.outbox.clear()

    def receive(self) -> list[dict[str, Any]] | None:
        """The complete messages now readable; None at EOF. A message's descriptors are queued
        by the time it is complete: they come with its first byte."""
        data, fds, flags, _ = socket.recv_fds(self.sock, 1 << 20, MAX_FDS_PER_READ)
        if flags & socket.MSG_CTRUNC:  # some were dropped: no message could be matched to its own
            raise RuntimeError("descriptors from the client were cut off (MSG_CTRUNC)")
        self.fds.extend(fds)
        if not data:
            return None
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        return [json.loads(line) for line in lines if line]


# Blocked in the server (by its launcher, before exec: fork_launcher._prepare_server_process),
# which must outlive every signal meant for its ranks: under Slurm every process of a step may
# get the step's signals (proctrack linuxproc or cgroup). A forked rank starts with default
# dispositions (never changed in the server) and unblocks all but SIGUSR2.
SERVER_BLOCKED_SIGNALS = {signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP}


def serve(sock: socket.socket, modules: list[str]) -> None:
    channel = _Channel(sock)
    # Terminal signals are for the supervisor; the server leaves with its socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    t0 = time.perf_counter()
    imported, module, reason = preload(modules)
    if reason is None:
        reason = fork_hazard()
    if reason is not None:
        channel.send({"ready": False, "reason": reason, "module": module, "preloaded": imported})
        channel.flush_all()
        return
    import_s = time.perf_counter() - t0
    # Everything imported so far goes to the collector's permanent generation: a rank's garbage
    # collections then never walk (and so never write to) those objects, whose pages stay
    # shared with this server instead of being copied into every rank (measured: 141 MiB of
    # private pages per rank of a small DDP job without this).
    gc.collect()
    gc.freeze()
    print(
        f"[forkserver] pid {os.getpid()}: imported {', '.join(imported)} in {import_s:.2f}s; ready",
        file=sys.stderr,
        flush=True,
    )
    channel.send({"ready": True, "preloaded": imported, "import_s": round(import_s, 3), "pid": os.getpid()})
    channel.flush_all()

    # SIGCHLD wakes the loop through a pipe, so no thread is ever needed to reap.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: set[int] = set()
    while True:
        readable, writable = wait_ready([sock, wake_r], [sock] if channel.outbox else [])
        if writable:
            channel.flush()
        if wake_r in readable:
            os.read(wake_r, 4096)
        _reap(channel, children)
        if sock in readable:
            messages = channel.receive()
            if messages is None:
                return  # the supervisor is gone; ranks die with us (PDEATHSIG)
            for message in messages:
                if "spawn" in message:
                    _spawn(channel, message, children, (sock.fileno(), wake_r, wake_w))


def _reap(channel: _Channel, children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        channel.send({"exited": pid, "code": code, "at": time.time()})  # when reaped, not when read


def _output(channel: _Channel, request: dict[str, Any]) -> int | str:
    """The rank's stdout and stderr: the descriptor that came with the request, or its log
    file opened; what went wrong otherwise."""
    if request.get("output_fd"):
        return channel.fds.popleft() if channel.fds else "no output descriptor came with the request"
    try:
        return os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError as exc:
        return f"cannot open {request['log']}: {exc}"


def _spawn(
    channel: _Channel, request: dict[str, Any], children: set[int], private_fds: tuple[int, ...]
) -> None:
    log_fd = _output(channel, request)
    if isinstance(log_fd, str):
        channel.send({"spawned": request["spawn"], "error": log_fd})
        return
    server = os.getpid()
    pid = os.fork()
    if pid == 0:  # the rank
        try:
            # Other ranks' outputs, received and not yet used: a rank holding one would keep
            # that rank's pipe open after it ended.
            _become_rank(request, log_fd, (*private_fds, *channel.fds), server)
        finally:
            os._exit(70)  # only reached if setting up the rank itself failed
    os.close(log_fd)
    try:
        os.setpgid(pid, request["pgid"])  # also here, so the group is right before we answer
    except OSError:
        pass  # the child already joined (or died)
    children.add(pid)
    channel.send({"spawned": request["spawn"], "pid": pid})


def _become_rank(request: dict[str, Any], log_fd: int, private_fds: tuple[int, ...], server: int) -> None:
    """In the forked child: turn the server's image into the rank a fresh interpreter would be."""
    try:
        os.setpgid(0, request["pgid"])  # the attempt's group, led by its reaper
    except OSError:
        pass
    _prctl_pdeathsig()
    if os.getppid() != server:
        os._exit(137)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a fresh interpreter's handler
    # As the launchers promise: a stop warning stays pending until the runtime's handler.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SERVER_BLOCKED_SIGNALS - {signal.SIGUSR2})
    for fd in private_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(devnull)
    os.close(log_fd)
    os.chdir(request["cwd"])
    env = request["env"]
    os.environ.clear()
    os.environ.update(env)
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = io.TextIOWrapper(
        io.FileIO(1, "w", closefd=False), line_buffering=not unbuffered, write_through=unbuffered
    )
    sys.stderr = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False),
        line_buffering=True,
        write_through=unbuffered,
        errors="backslashreplace",
    )
    _fresh_process_state(env)
    os._exit(_run_entrypoint(request["argv"]))


def _fresh_process_state(env: dict[str, str]) -> None:
    """What a fresh interpreter would have but a fork copies from the server."""
    torch = sys.modules.get("torch")
    if torch is not None and env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        # The OpenMP runtime read OMP_NUM_THREADS when the server imported torch.
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()  # numpy's global RNG is not reseeded on fork (random's is)


def _run_entrypoint(argv: list[str]) -> int:
    """Run `python SCRIPT ARGS` or `python -m MODULE ARGS` in this process; the exit code. An
    uncaught exception is printed and recorded in the rank's error file (launch/entry.py)."""
    import atexit
    import threading
    import traceback

    code = 0
    entry.install_recorder()
    try:
        entry.run(argv[1:])
    except SystemExit as exc:
        code = _exit_status(exc.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException as exc:  # noqa: BLE001 - print (and record) it as the interpreter would, exit 1
        exc.__traceback__ = entry.from_the_job(exc.__traceback__)  # for every hook, the runtime's too
        sys.excepthook(type(exc), exc, exc.__traceback__)
        code = 1
    # The interpreter's own shutdown: wait for non-daemon threads, run atexit, flush.
    try:
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001
        code = code or 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if code < 0:  # die by the signal, as Python does after KeyboardInterrupt
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code & 0xFF


def _exit_status(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)
    return 1


def main() -> None:
    fd = int(sys.argv[1])
    modules = [m for m in sys.argv[2:] if m]
    _prctl_pdeathsig()
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    code = 0
    try:
        serve(sock, modules)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the client is gone: the same end as EOF
    except BaseException:  # noqa: BLE001 - say why in the log, then leave as fast as below
        import traceback

        traceback.print_exc()
        code = 1
    # Leave without the interpreter's finalization: with torch (and torch._dynamo) imported it
    # takes ~1.7 s of CPU here, and a restart under Slurm waits for this process to end.
    # Nothing is left to clean up: the ranks die with us (PDEATHSIG), the socket is closed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
