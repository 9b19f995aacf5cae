"""The fork-server launcher: ranks are forked from a pre-warmed process (orchestrator.launch.forkserver)
that imported torch and the job's heavy imports once; restarts fork from it again.

Falls back to fresh interpreters (SubprocessLauncher) whenever forking is not safe, and says
why in the attempt's `notice`, which the supervisor logs:
- `launch.mode: subprocess` (the user's opt-out);
- `job.python` names another interpreter than the one the server would run;
- the server found threads or a CUDA context after its imports, or could not start.
A server that dies or is stopped during an attempt is that attempt's failure (`failure()`, which
the supervisor polls, names it); the next attempt starts a fresh server.
A preloaded job import that starts a thread (or fails) is dropped from the preload list and
the server restarted without it, so one unsafe library does not cost the whole speed-up.

Exit statuses: the ranks are the server's children, so the server reaps them and reports
each exit over its socket; `ForkedProcess` offers the part of `subprocess.Popen` that the
supervisor uses (pid, returncode, poll, wait).

Output: the server opens each rank's log file, or, when job.pass_env has a value to mask, gives
the rank the pipe to the attempt's masker that came with its spawn request (processes.MaskedOutput).
"""

from __future__ import annotations

import ast
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Mapping, Sequence

from orchestrator.contract import CONTRACT_VARS
from orchestrator.launch.forkserver import (
    SERVER_BLOCKED_SIGNALS,
)  # at import: no imports after fork (import lock)
from orchestrator.launch.processes import (
    AttemptGroup,
    MaskedOutput,
    RankProcess,
    SubprocessLauncher,
    _set_parent_death_signal,
    process_state,
    rank_environment,
    start_reaper,
)
from orchestrator.launch.readiness import wait_ready
from orchestrator.spec.config import ClusterConfig
from orchestrator.spec.plan import RankSpec

READY_TIMEOUT_S = 120.0  # importing torch on a loaded 2-core machine can take ~10 s
MAX_PRELOAD_RETRIES = 3
STOPPED_FOR_S = 2.0  # a fork server in state T this long is failed (see ForkServer.failure)


def _parse(script: str | None) -> ast.Module | None:
    """The entrypoint's syntax tree, or None (no script, or a broken one: the rank reports it)."""
    if not script:
        return None
    try:
        with open(script, "rb") as fh:
            return ast.parse(fh.read(), filename=script)
    except (OSError, SyntaxError, ValueError):
        return None


def job_imports(script: str | None) -> list[str]:
    """Modules the entrypoint imports at its top level, except its own local modules: what is
    worth importing once in the server (a local module may change between restarts)."""
    tree = _parse(script)
    if tree is None:
        return []
    here = os.path.dirname(os.path.abspath(script))  # type: ignore[arg-type]
    names: list[str] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                names.extend(alias.name for alias in node.names)
            elif (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and node.module
                and node.module != "__future__"
            ):
                names.append(node.module)
                # `from pkg import sub` may name a submodule; the server skips it if not.
                names.extend(f"{node.module}.{alias.name}" for alias in node.names if alias.name != "*")
            elif isinstance(node, (ast.If, ast.Try)):  # `try: import x except ImportError`
                visit(node.body)

    visit(tree.body)

    def local(name: str) -> bool:
        return any(os.path.exists(os.path.join(here, name.split(".")[0] + ext)) for ext in (".py", ""))

    return [n for n in dict.fromkeys(names) if not local(n)]


# Heavy modules torch imports on first use, not at `import torch`, keyed by a name whose
# presence in the entrypoint means that use is coming. Constructing the first optimizer imports
# torch._dynamo (~2.4 s of CPU here, ~800 modules), in every fresh rank.
FIRST_USE_IMPORTS = {
    "optim": "torch._dynamo",
    # Constructing DistributedDataParallel imports torch._dynamo too (822 modules, ~5.8 s here).
    "DistributedDataParallel": "torch._dynamo",
    "wrap_ddp": "torch._dynamo",
    "SummaryWriter": "torch.utils.tensorboard",
    "Metrics": "torch.utils.tensorboard",  # orchestrator.runtime.Metrics writes TensorBoard
}


def first_use_imports(script: str | None) -> list[str]:
    """The FIRST_USE_IMPORTS the entrypoint will trigger, judged by the names it mentions."""
    tree = _parse(script)
    if tree is None:
        return []
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names.update(alias.name.split("."))
            if isinstance(node, ast.ImportFrom) and node.module:
                names.update(node.module.split("."))
    return list(dict.fromkeys(module for name, module in FIRST_USE_IMPORTS.items() if name in names))


def preload_list(config: ClusterConfig) -> list[str]:
    script = config.script_path
    return list(
        dict.fromkeys(["torch", *config.launch.preload, *job_imports(script), *first_use_imports(script)])
    )


def fork_refusal(config: ClusterConfig, python: str) -> str | None:
    """Why this config must not use the fork server, before trying it."""
    if config.launch.mode == "subprocess":
        return "launch.mode is subprocess"
    # Not realpath: a virtualenv's python is a symlink to the system one, with other packages.
    if config.job.python and os.path.abspath(config.job.python) != os.path.abspath(python):
        return f"job.python ({config.job.python}) is not the interpreter the fork server runs"
    if not hasattr(os, "fork") or not os.path.isdir("/proc/self/task"):
        return "this platform has no fork or no /proc"
    return None


def _prepare_server_process(parent_pid: int) -> None:
    """Before exec: die with the launcher, and hold the signals meant for ranks blocked from the
    first instruction on (forkserver.serve() blocks them too, but only once it runs)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SERVER_BLOCKED_SIGNALS)
    _set_parent_death_signal(parent_pid)


class ForkServerError(RuntimeError):
    pass


class ForkServer:
    """The client side of one server process."""

    def __init__(self, python: str, modules: Sequence[str], env: Mapping[str, str], log_path: str) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        parent = os.getpid()
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [python, "-m", "orchestrator.launch.forkserver", str(theirs.fileno()), *modules],
                env=dict(env),
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                process_group=0,  # Ctrl-C at the terminal is the supervisor's to handle
                preexec_fn=lambda: _prepare_server_process(parent),
            )
        theirs.close()
        self.sock = ours
        self.buffer = b""
        self.alive = True
        self.handles: dict[int, ForkedProcess] = {}
        self.early_exits: dict[int, tuple[int, float | None]] = {}
        self.replies: dict[int, dict[str, Any]] = {}
        self.hello: dict[str, Any] | None = None
        self._next_id = 0
        self.stopped_since: float | None = None  # first seen in state T (time.monotonic)

    # -------------------------------------------------------------- messages

    def drain(self, timeout: float = 0.0) -> None:
        """Read and dispatch what the server has sent, waiting up to `timeout` for the first byte."""
        if not self.alive:
            return
        readable, _ = wait_ready([self.sock], timeout=max(0.0, timeout))
        while readable:
            try:
                data = self.sock.recv(1 << 20)
            except OSError:
                data = b""
            if not data:
                self._lost()
                return
            self.buffer += data
            *lines, self.buffer = self.buffer.split(b"\n")
            for line in lines:
                if line:
                    self._dispatch(json.loads(line))
            readable, _ = wait_ready([self.sock], timeout=0)

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "exited" in message:
            pid, code, at = int(message["exited"]), int(message["code"]), message.get("at")
            handle = self.handles.get(pid)
            if handle is None:
                self.early_exits[pid] = (code, at)  # exited before its spawn reply was read
            else:
                handle._exited(code, at)
        elif "spawned" in message:
            self.replies[int(message["spawned"])] = message
        elif "ready" in message:
            self.hello = message

    def _lost(self) -> None:
        """The server is gone: its ranks died with it (PDEATHSIG)."""
        self.alive = False
        for handle in self.handles.values():
            if handle.returncode is None:
                handle._exited(-9)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            self.proc.kill()

    def _send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        """Send without ever blocking while the server may be blocked sending to us: whenever
        the socket has no room, read (and dispatch) what the server sent, then try again.
        `fds` go with the message's first byte (SCM_RIGHTS), so they reach the server no later
        than the message does."""
        data = memoryview(json.dumps(message).encode() + b"\n")
        while data:
            if not self.alive:
                raise ForkServerError("the fork server is gone")
            readable, writable = wait_ready([self.sock], [self.sock], timeout=1.0)
            if readable:
                self.drain()
            if writable and self.alive:
                try:
                    if fds:
                        sent = socket.send_fds(self.sock, [data], fds, socket.MSG_DONTWAIT)
                        fds = ()
                    else:
                        sent = self.sock.send(data, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    self._lost()
                    raise ForkServerError(f"the fork server is gone ({exc})") from None
                data = data[sent:]

    # -------------------------------------------------------------- operations

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while self.hello is None:
            if not self.alive:
                raise ForkServerError(
                    f"the fork server exited during start-up (exit code {self.proc.returncode})"
                )
            if time.monotonic() > deadline:
                self.close()
                raise ForkServerError(f"the fork server was not ready after {timeout:.0f}s")
            self.drain(0.5)
        return self.hello

    def spawn_all(
        self, requests: Sequence[dict[str, Any]], outputs: Sequence[int] | None = None
    ) -> list[int]:
        """Fork one rank per request; their pids, in order. All requests go out before any
        reply is read, so the server forks back to back. `outputs`: each rank's stdout and
        stderr (a pipe to the masker), sent along, in place of opening the request's log."""
        ids = []
        for i, request in enumerate(requests):
            self._next_id += 1
            ids.append(self._next_id)
            if outputs is None:
                self._send({"spawn": self._next_id, **request})
            else:
                self._send({"spawn": self._next_id, **request, "output_fd": True}, [outputs[i]])
        pids = []
        for request_id in ids:
            while request_id not in self.replies:
                if not self.alive:
                    raise ForkServerError("the fork server died while forking ranks")
                self.drain(1.0)
            reply = self.replies.pop(request_id)
            if "error" in reply:
                raise ForkServerError(reply["error"])
            pid = int(reply["pid"])
            handle = ForkedProcess(self, pid)
            self.handles[pid] = handle
            if pid in self.early_exits:
                handle._exited(*self.early_exits.pop(pid))
            pids.append(pid)
        return pids

    def failure(self) -> str | None:
        """Why this server can no longer report its ranks' exits, or None: it is gone (its ranks
        died with it), or stopped (SIGSTOP: ranks may run on, but no exit would be reaped)."""
        if self.alive and self.proc.poll() is not None:
            self.drain()  # it died while nobody read its socket (between attempts): EOF now
        if not self.alive:
            code = self.proc.poll()
            if code is not None and code < 0:
                how = f"was killed by {signal.Signals(-code).name}"
            else:
                how = "exited" if code is None else f"exited with code {code}"
            return f"the fork server (pid {self.proc.pid}) {how}; its ranks died with it"
        if process_state(self.proc.pid) != "T":
            self.stopped_since = None
            return None
        # Stopped for STOPPED_FOR_S on end, not at one glance: a job suspended and resumed by
        # Slurm gets SIGCONT process by process, and the server may wake a moment after us.
        now = time.monotonic()
        self.stopped_since = self.stopped_since or now
        if now - self.stopped_since < STOPPED_FOR_S:
            return None
        return f"the fork server (pid {self.proc.pid}) was stopped (SIGSTOP); its ranks could not be watched"

    def kill(self) -> None:
        """SIGKILL (which also ends a stopped process): its ranks die with it and count as killed."""
        try:
            self.proc.kill()
        except ProcessLookupError:  # pragma: no cover - already reaped
            pass
        self.sock.close()
        self._lost()

    def close(self) -> None:
        try:
            self.sock.close()  # EOF: the server returns, and its remaining ranks die with it
        finally:
            self.alive = False
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class ForkedProcess:
    """A rank forked by the server: what the supervisor needs of subprocess.Popen."""

    def __init__(self, server: ForkServer, pid: int) -> None:
        self._server = server
        self.pid = pid
        self.returncode: int | None = None
        self.exit_time: float | None = None

    def _exited(self, code: int, at: float | None = None) -> None:
        self.returncode = code
        self.exit_time = at  # when the server reaped it: orders exits that one read delivers

    def poll(self) -> int | None:
        if self.returncode is None:
            self._server.drain(0.0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(f"rank pid {self.pid}", timeout or 0)
            self._server.drain(min(left, 1.0))
        return self.returncode


class ForkServerLauncher:
    """Forks ranks from a pre-warmed server; fresh interpreters where that is not safe."""

    def __init__(
        self, config: ClusterConfig, python: str = sys.executable, server_log: str | None = None
    ) -> None:
        self.config = config
        self.server_log = server_log  # default: RUN_DIR/logs/forkserver.log
        self.python = python
        self.pass_env = config.job.pass_env
        self.fallback = SubprocessLauncher(self.pass_env)
        self.server: ForkServer | None = None
        self.refusal = fork_refusal(config, python)
        self.preload = preload_list(config)
        self.skipped: list[str] = []
        self._notice_given = False
        self._forked_this_attempt = False  # the running attempt's ranks are the server's children

    @property
    def name(self) -> str:
        return "fork" if self.refusal is None else "subprocess"

    def start_attempt(
        self, specs: Sequence[RankSpec], log_paths: Sequence[str], extra_env: Sequence[Mapping[str, str]]
    ) -> AttemptGroup:
        notes = []
        self._forked_this_attempt = False
        failed = self.server.failure() if self.refusal is None and self.server is not None else None
        if failed is not None and self.server is not None:
            # A server killed or stopped mid-attempt was that attempt's root cause; this one
            # gets a fresh server (if the next one cannot start, ranks start as interpreters).
            notes.append(f"starting a fresh fork server: {failed}")
            self.server.kill()
            self.server.close()
            self.server = None
        if self.refusal is None and self.server is None:
            log = self.server_log or os.path.join(os.path.dirname(log_paths[0]), os.pardir, "forkserver.log")
            notes.extend(self._start_server(specs[0], log))
        if self.refusal is not None:
            group = self.fallback.start_attempt(specs, log_paths, extra_env)
            if not self._notice_given:
                notes.append(f"starting ranks as fresh interpreters: {self.refusal}")
                self._notice_given = True
            group.notice = "; ".join(notes) or None
            return group
        assert self.server is not None
        reaper, pipe = start_reaper()
        group = AttemptGroup(pgid=reaper.pid, reaper=reaper, reaper_pipe=pipe, launched_by="fork")
        try:
            group.output = MaskedOutput.start(self.pass_env, log_paths)
            cwd = os.getcwd()
            requests = [
                {
                    "argv": list(spec.argv),
                    "env": rank_environment(spec, extra, self.pass_env),
                    "cwd": cwd,
                    "log": log,
                    "pgid": group.pgid,
                }
                for spec, log, extra in zip(specs, log_paths, extra_env, strict=True)
            ]
            started = time.time()
            outputs = group.output.rank_ends if group.output is not None else None
            try:
                pids = self.server.spawn_all(requests, outputs)
            finally:
                if group.output is not None:
                    group.output.hand_over()
            for spec, log, pid in zip(specs, log_paths, pids, strict=True):
                group.ranks.append(
                    RankProcess(spec=spec, popen=self.server.handles[pid], log_path=log, started=started)
                )
            self._forked_this_attempt = True
        except ForkServerError as exc:
            # The server died between its start and its replies (the OOM killer, a kill from
            # outside): this attempt's ranks start as fresh interpreters, the next attempt
            # tries a fresh server (failure() names the dead one).
            group.close()
            group = self.fallback.start_attempt(specs, log_paths, extra_env)
            notes.append(f"starting ranks as fresh interpreters for this attempt: {exc}")
        except BaseException:
            group.close()
            raise
        group.notice = "; ".join(notes) or None
        return group

    def warm(self, spec: RankSpec, log_path: str) -> list[str]:
        """Start the server now, before any attempt (a persistent node agent does, so its first
        attempt forks at once); notes on what happened. Nothing when forking is refused."""
        if self.refusal is not None or self.server is not None:
            return []
        return self._start_server(spec, self.server_log or log_path)

    def _start_server(self, spec: RankSpec, log_path: str) -> list[str]:
        """Start the server, dropping preloads that make it unsafe; notes on what happened."""
        # The server's environment is what every rank shares (job.env, runtime settings):
        # libraries read some of it at import (OMP_NUM_THREADS, PYTHONPATH, PYTHONHASHSEED).
        env = {**os.environ, **{k: v for k, v in spec.env.items() if k not in CONTRACT_VARS}}
        # numpy's OpenBLAS starts a thread pool at import unless told otherwise, and a process
        # with threads must not fork. Ranks then run numpy's BLAS single-threaded (torch's own
        # threads are set per rank); set OPENBLAS_NUM_THREADS in job.env to choose otherwise.
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
        notes = []
        modules = list(self.preload)
        for _ in range(MAX_PRELOAD_RETRIES + 1):
            try:
                server = ForkServer(self.python, modules, env, os.path.normpath(log_path))
                hello = server.wait_ready()
            except (OSError, ForkServerError) as exc:
                self.refusal = f"the fork server could not start ({exc})"
                return notes
            if hello.get("ready"):
                self.server = server
                notes.insert(
                    0,
                    f"fork server ready: imported {', '.join(hello['preloaded'])}"
                    f" once in {hello['import_s']:.1f}s",
                )
                return notes
            server.close()
            module = hello.get("module")
            if module and module != "torch" and module in modules:
                modules.remove(module)
                self.skipped.append(module)
                notes.append(f"not preloading {module}: {hello['reason']}")
                continue
            self.refusal = f"forking is unsafe: {hello['reason']}"
            return notes
        self.refusal = "too many preloaded modules were unsafe to fork"
        return notes

    def failure(self) -> str | None:
        server = self.server
        return server.failure() if server is not None and self._forked_this_attempt else None

    def abandon(self) -> None:
        if self.server is not None:
            self.server.kill()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
