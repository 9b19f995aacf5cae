"""The node agent: under Slurm, `srun` starts one agent per node, and the agent starts that
node's ranks, forked from a fork server that imported torch and the job's imports once
(orchestrator.launch.fork_launcher), so a node with 8 ranks pays one `import torch`, not 8.

    srun --ntasks-per-node=1 ... templates/slurm_node.sh PYTHON -- JOB_PYTHON ENTRY ARGS...

What a rank sees is what a task of a one-task-per-rank step would see:
- the env contract: RANK = node * LOCAL_WORLD_SIZE + local rank, LOCAL_RANK, NODE_RANK and
  GROUP_RANK (the shared part comes from the supervisor through srun's environment);
- Slurm's per-task variables rewritten to describe the rank as a task of such a step
  (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, ...), for libraries that read those instead;
- its own log, error file and heartbeat under ORCH_LOG_DIR, as before;
- the node's GPUs (the agent's CUDA_VISIBLE_DEVICES), or, when the batch step binds GPUs per
  task (--gpus-per-task, --gpu-bind), its own share of them, as srun gives each task;
- SIGUSR2 blocked until the runtime's handler is installed (both launchers do that).

Signals: Slurm signals the step's tasks (the agents) and, with proctrack/linuxproc or cgroup,
every process under them. The agent forwards each stop or debug signal to its ranks' process
group, so ranks get it under any proctrack plugin (with proctrack/pgid only the agents would);
a rank may then see a signal twice, which the runtime's flag-setting handlers absorb. The agent
itself never dies of those signals: it waits for its ranks to checkpoint and leave.

Exit status: 0 when every rank exited 0; 75 (preempted) when the failures were all stops on
request; otherwise the first failing rank's status (128+N for a signal N), after stopping the
node's other ranks. srun's --kill-on-bad-exit then ends the other nodes' agents. A persistent
agent leaves with 0 when told EXIT, and with CUT_OFF_EXIT_CODE when it could not join its hub
(join_hub: refused, or JOIN_RETRY_S of tries) or its channel closes before its first START
without an EXIT. One stopped (SIGTERM, SIGINT) while it joins its hub has no rank to pass the
signal on to: it leaves at once, with 128+N for the signal N (its step is being ended).
"""

from __future__ import annotations

import errno
import os
import random
import signal
import socket
import sys
import time
from types import TracebackType
from typing import Any, Mapping, Sequence

from orchestrator.backends.slurm.channel import JOIN_RETRY_S, Channel, ChannelClosed, Op, parse_address
from orchestrator.contract import (
    AGENT_BEAT_S,
    ENV_AGENT_ADDR,
    ENV_AGENT_TOKEN,
    ENV_ATTEMPT,
    ENV_GPUS_PER_RANK,
    ENV_LOG_DIR,
    ENV_RUN_DIR,
    ENV_VISIBLE_GPUS,
    PREEMPTED_EXIT_CODE,
    AgentState,
    node_agent_record_name,
    node_log_name,
    rank_files,
    rank_files_env,
    rank_log_name,
    read_heartbeat,
    write_agent_record,
)
from orchestrator.launch.fork_launcher import ForkServerLauncher
from orchestrator.launch.gpus import visible_ids
from orchestrator.launch.processes import AttemptGroup, RankProcess
from orchestrator.launch.readiness import wait_ready
from orchestrator.spec.config import ClusterConfig, config_from_run_record
from orchestrator.spec.plan import RankSpec, gpu_slices, own_contract_env
from orchestrator.storage.rundir import RunDir
from orchestrator.supervision.policy import past_first_step, settle_before_stop

# Slurm's signals that the ranks act on: stop (USR2, TERM, INT), stack dumps (USR1), wake-up.
FORWARDED_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGCONT)
POLL_S = 0.05
# After a real failure no checkpoint can complete without the failed peer: the other ranks get
# this long after SIGTERM to write their error records and flush, then SIGKILL, so that the
# step ends (and the restart begins) without waiting out restart.stop_grace_s.
FAILURE_STOP_GRACE_S = 2.0
# The node's exit status when its fork server failed (the agent's record says how): not a rank's.
LAUNCHER_FAILED_EXIT_CODE = 70
# A persistent agent's exit status when it never joined its supervisor's hub (refused or cut off
# at every try), or its channel closed before any START and without an EXIT (the supervisor
# went away before the first attempt). Never 0: the step is broken (the other nodes cannot
# rendezvous without this one), and only a failed exit makes srun's --kill-on-bad-exit end it
# and the supervisor see it end.
CUT_OFF_EXIT_CODE = 71
# One try to connect to the hub: a connection that is not accepted within this (its SYN dropped
# by a full queue, say) is given up and tried again.
CONNECT_TRY_S = 5.0
# Pauses between tries to join the hub: doubling from the first to the last, each a random part
# of it, so that the agents of a big step cut off at once do not all come back at once.
RETRY_PAUSE_S = (0.05, 1.0)
# The signals that end a persistent agent still joining its hub (its step is being ended:
# AgentStep.close's terminate, scancel): it has no rank yet to keep them for.
LEAVE_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def tasks_per_node(ranks_per_node: int, nodes: int) -> str:
    """Slurm's compressed form, as in SLURM_TASKS_PER_NODE: `2(x3)`, or `2` on one node."""
    return f"{ranks_per_node}(x{nodes})" if nodes > 1 else str(ranks_per_node)


def rank_env(
    *, node_rank: int, local_rank: int, ranks_per_node: int, nodes: int, cpus_per_rank: int, log_dir: str
) -> dict[str, str]:
    """What one rank gets on top of the agent's environment: its part of the contract, its
    files, and Slurm's task variables as a one-task-per-rank step would set them."""
    rank = node_rank * ranks_per_node + local_rank
    world = ranks_per_node * nodes
    per_node = tasks_per_node(ranks_per_node, nodes)
    first = node_rank * ranks_per_node
    return {
        **own_contract_env(rank=rank, local_rank=local_rank, node_rank=node_rank),
        **rank_files_env(log_dir, rank),
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(local_rank),
        "SLURM_NODEID": str(node_rank),
        "SLURM_NTASKS": str(world),
        "SLURM_NPROCS": str(world),
        "SLURM_STEP_NUM_TASKS": str(world),
        "SLURM_NTASKS_PER_NODE": str(ranks_per_node),
        "SLURM_TASKS_PER_NODE": per_node,
        "SLURM_STEP_TASKS_PER_NODE": per_node,
        "SLURM_CPUS_PER_TASK": str(cpus_per_rank),
        "SLURM_GTIDS": ",".join(str(first + i) for i in range(ranks_per_node)),
        "SLURM_DISTRIBUTION": "block",
    }


def exit_status(ranks: Sequence[RankProcess]) -> int:
    """The node's verdict from its ranks' exit codes, in the order they exited."""
    if any(r.popen.returncode is None for r in ranks):
        return 128 + signal.SIGKILL  # a rank that outlived SIGKILL (D state): never a success
    failed = sorted(
        (r for r in ranks if r.popen.returncode != 0),
        key=lambda r: float("inf") if r.ended is None else r.ended,
    )
    if not failed:
        return 0
    real = [r for r in failed if r.popen.returncode != PREEMPTED_EXIT_CODE]
    if not real:
        return PREEMPTED_EXIT_CODE
    code = int(real[0].popen.returncode)  # type: ignore[arg-type]
    return 128 - code if code < 0 else code


class NodeAgent:
    def __init__(self, config: ClusterConfig, job_argv: Sequence[str], env: Mapping[str, str]) -> None:
        self.config = config
        self.job_argv = tuple(job_argv)
        self.node_rank = int(env["SLURM_NODEID"])
        self.nodes = int(env["NNODES"])
        self.ranks_per_node = int(env["LOCAL_WORLD_SIZE"])
        self.log_dir = env[ENV_LOG_DIR]
        # Per-task GPU binding asked of the batch step: each rank gets its own share of the
        # node's GPUs, as srun gives each task (render.srun_environ explains why the agent does it).
        self.rank_gpus: list[str] | None = None
        if env.get(ENV_GPUS_PER_RANK):
            self.rank_gpus = gpu_slices(
                visible_ids(env.get(ENV_VISIBLE_GPUS, "")),
                parts=self.ranks_per_node,
                each=int(env[ENV_GPUS_PER_RANK]),
            )
        self.group: AttemptGroup | None = None
        self.early_signals: list[int] = []  # arrived before the ranks existed, in order
        self.failure: str | None = None  # what failed the node's fork server, if it failed
        self.exit_asked = False  # the supervisor said EXIT (or went away) during an attempt
        self.attempt: int | None = None  # a persistent agent's current attempt, as START named it
        self.orders: list[dict] = []  # the supervisor's messages read but not yet acted on
        self.cut_off = False  # the channel closed without an EXIT

    @property
    def record_path(self) -> str:
        return os.path.join(self.log_dir, node_agent_record_name(self.node_rank))

    def _record(self, state: AgentState, **extra: object) -> None:
        """The agent's sign of life for the supervisor (contract.write_agent_record); a shared
        filesystem that fails for a moment must not fail the node."""
        try:
            write_agent_record(
                self.record_path, state=state, pid=os.getpid(), host=socket.gethostname(), **extra
            )
        except OSError as exc:
            self._say(f"could not write {self.record_path}: {exc}")

    def _say(self, text: str) -> None:
        print(f"[orch.node {self.node_rank}] {time.strftime('%H:%M:%S')} {text}", flush=True)

    def _forward(self, signum: int, _frame: object) -> None:
        group = self.group
        if group is None:
            if signum not in self.early_signals:
                self.early_signals.append(signum)
        else:
            group.signal_all(signum)

    def run(self, channel: Channel | None = None) -> int:
        """One attempt (a step per attempt), or, given the supervisor's channel, every attempt
        of the allocation until the supervisor says EXIT or goes away."""
        try:
            for sig in FORWARDED_SIGNALS:
                signal.signal(sig, self._forward)
            # templates/slurm_node.sh held these blocked: what arrived meanwhile is delivered now.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
            launcher = ForkServerLauncher(
                self.config,
                python=sys.executable,
                server_log=os.path.join(self.log_dir, node_log_name(self.node_rank)),
            )
            try:
                if channel is None:
                    return self._attempt(launcher, {}, None)
                return self._serve(launcher, channel)
            finally:
                launcher.close()
        except Exception as exc:
            # The traceback goes to the node's log (node_agent_error reads it); the record says
            # the agent failed, not that it vanished.
            self._record(
                AgentState.FAILED, reason=f"the node agent failed: {type(exc).__name__}: {exc}"[:500]
            )
            raise

    def _specs(self, shared_env: Mapping[str, str]) -> tuple[list[RankSpec], list[str], list[dict[str, str]]]:
        res = self.config.resources
        specs, logs, extra = [], [], []
        for local in range(self.ranks_per_node):
            rank = self.node_rank * self.ranks_per_node + local
            specs.append(
                RankSpec(rank=rank, local_rank=local, node_rank=self.node_rank, argv=self.job_argv, env={})
            )
            logs.append(os.path.join(self.log_dir, rank_log_name(rank)))
            own = rank_env(
                node_rank=self.node_rank,
                local_rank=local,
                ranks_per_node=self.ranks_per_node,
                nodes=self.nodes,
                cpus_per_rank=res.cpus_per_rank,
                log_dir=self.log_dir,
            )
            if self.rank_gpus is not None:
                own[ENV_VISIBLE_GPUS] = self.rank_gpus[local]
            extra.append({**shared_env, **own})
        return specs, logs, extra

    def _attempt(
        self, launcher: ForkServerLauncher, shared_env: Mapping[str, str], channel: Channel | None
    ) -> int:
        """Start the node's ranks, watch them until they are all gone, and give the node's
        verdict (its exit status)."""
        self._record(AgentState.STARTING)
        specs, logs, extra = self._specs(shared_env)
        t0 = time.perf_counter()
        try:
            self.group = launcher.start_attempt(specs, logs, extra)
            if self.group.notice:
                self._say(self.group.notice)
            how = "forked" if self.group.launched_by == "fork" else "started"
            self._say(
                f"{how} ranks {specs[0].rank}-{specs[-1].rank} in {time.perf_counter() - t0:.2f}s"
                f" (pids {' '.join(str(r.pid) for r in self.group.ranks)})"
            )
            if channel is not None:
                self._tell(channel, Op.STARTED, pids=[r.pid for r in self.group.ranks])
            # What arrived while the ranks were being started (or, for a persistent agent,
            # since its last attempt ended) is theirs.
            early, self.early_signals = self.early_signals, []
            for signum in early:
                self.group.signal_all(signum)
            code = self._wait(self.group, launcher, channel)
        finally:
            # No forwarding to a group that is being torn down (its id may be reused after).
            group, self.group = self.group, None
            if group is not None:
                group.close()
        codes = [r.popen.returncode for r in group.ranks] if group else []
        self._say(f"exit {code} (rank exit codes {codes})")
        if self.failure is None:
            self._record(AgentState.EXITED, code=code)
        if channel is not None:
            self._tell(channel, Op.ENDED, code=code, rank_codes=codes)
        return code

    def _tell(self, channel: Channel, op: Op, **fields: object) -> None:
        """A message for the supervisor about this attempt; a channel that broke means the
        supervisor is gone: the agent leaves (its ranks are stopped by then or at once)."""
        try:
            channel.send(op, attempt=self.attempt, **fields)
        except ChannelClosed:
            self.exit_asked = True
            if self.group is not None:
                self.group.stop(FAILURE_STOP_GRACE_S)

    def _wait(self, group: AttemptGroup, launcher: ForkServerLauncher, channel: Channel | None) -> int:
        """Until every rank exits; after the first failure (not a stop on request), stop the rest.
        A fork server that dies or is stopped fails the node: its ranks die with it. A
        persistent agent also obeys its supervisor meanwhile (SIGNAL, STOP, EXIT)."""
        next_beat = 0.0
        stop_at: float | None = None  # after a rank's failure: when the others are stopped
        while group.alive():
            if self._launcher_failed(launcher):
                launcher.abandon()
                group.stop(0)
                return LAUNCHER_FAILED_EXIT_CODE
            codes = [r.popen.returncode for r in group.ranks]
            if stop_at is None and any(c not in (0, None, PREEMPTED_EXIT_CODE) for c in codes):
                settle_s = settle_before_stop(self._attempt_number(), self._reached_step(group))
                stop_at = time.monotonic() + settle_s
            if stop_at is not None and time.monotonic() >= stop_at:
                group.stop(min(self.config.restart.stop_grace_s, FAILURE_STOP_GRACE_S))
                break
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + AGENT_BEAT_S
                self._record(AgentState.RUNNING)
            if channel is None:
                time.sleep(POLL_S)
                continue
            for message in self._orders(channel, POLL_S):
                op = message.get("op")
                if op == Op.SIGNAL:
                    group.signal_all(int(message["signum"]))
                elif op == Op.STOP:
                    group.stop(float(message.get("grace_s", FAILURE_STOP_GRACE_S)))
                elif op == Op.EXIT:
                    self.exit_asked = True
                    group.stop(FAILURE_STOP_GRACE_S)
        if self._launcher_failed(launcher):  # it died and its ranks with it (PDEATHSIG)
            return LAUNCHER_FAILED_EXIT_CODE
        return exit_status(group.ranks)

    def _attempt_number(self) -> int:
        """The attempt this agent runs: a persistent agent's START names it; a step per attempt
        has it in its environment."""
        return self.attempt if self.attempt is not None else int(os.environ.get(ENV_ATTEMPT, "0"))

    def _reached_step(self, group: AttemptGroup) -> bool:
        """Whether one of the node's ranks got past its first step (its heartbeat says so)."""
        beats = {r.spec.rank: read_heartbeat(rank_files(self.log_dir, r.spec.rank)[1]) for r in group.ranks}
        return past_first_step(beats)

    def _launcher_failed(self, launcher: ForkServerLauncher) -> bool:
        """Whether the node's fork server died or was stopped; if so, said and recorded."""
        failure = launcher.failure()
        if failure is None:
            return False
        self._say(failure)
        self.failure = failure
        self._record(AgentState.FAILED, reason=failure)
        return True

    def _orders(self, channel: Channel, timeout: float) -> list[dict]:
        """The supervisor's messages within `timeout` (those read earlier first); a closed
        channel is an EXIT: no rank outlives its supervisor."""
        if self.orders:
            orders, self.orders = self.orders, []
            return orders
        try:
            wait_ready([channel], timeout=timeout)
            return channel.receive()
        except ChannelClosed:
            self.cut_off = True
            return [{"op": Op.EXIT}]
        except InterruptedError:  # a forwarded signal woke the select
            return []

    def _serve(self, launcher: ForkServerLauncher, channel: Channel) -> int:
        """A persistent agent: warm the fork server once, then run each attempt it is told to
        start, until EXIT or its channel closes. A fork server that failed an attempt is replaced
        at the next START (ForkServerLauncher.start_attempt); the agent stays. Cut off before
        its first START, it fails (CUT_OFF_EXIT_CODE); after, a closed channel is an EXIT."""
        spec = self._specs({})[0][0]
        for note in launcher.warm(spec, os.path.join(self.log_dir, node_log_name(self.node_rank))):
            self._say(note)
        while not self.exit_asked:
            messages = self._orders(channel, 1.0)
            while messages:
                message = messages.pop(0)
                op = message.get("op")
                if op == Op.EXIT:
                    self.exit_asked = True
                    break
                if op != Op.START:
                    continue  # a SIGNAL or STOP for ranks that are gone already
                env = {str(k): str(v) for k, v in message["env"].items()}
                self.attempt, self.failure = int(message["attempt"]), None
                self._follow_log(env[ENV_LOG_DIR])
                # What came with the START (a STOP for an attempt being stopped) is its own.
                self.orders, messages = messages, []
                self._attempt(launcher, env, channel)
                # Orders for this attempt that came after its ranks ended are moot; not an EXIT.
                self.exit_asked |= any(m.get("op") == Op.EXIT for m in self.orders)
                self.orders = []
        if self.cut_off and self.attempt is None:
            reason = (
                "the node agent's channel to the supervisor closed before any START, without an EXIT"
                " (the supervisor's hub refused it, or the supervisor is gone)"
            )
            self._say(f"{reason}; leaving with exit status {CUT_OFF_EXIT_CODE}")
            self._record(AgentState.FAILED, reason=reason)
            return CUT_OFF_EXIT_CODE
        self._say("leaving (the supervisor is done with this step)")
        return 0

    def give_up(self, reason: str) -> int:
        """A persistent agent that never joined its hub: said, recorded, and a failed exit (as
        one cut off before its first START) so that the step is seen to break."""
        self._say(f"{reason}; leaving with exit status {CUT_OFF_EXIT_CODE}")
        self._record(AgentState.FAILED, reason=reason)
        return CUT_OFF_EXIT_CODE

    def stopped_joining(self, signum: int) -> int:
        """A persistent agent stopped while it joined its hub: its step is being ended, and it
        has no rank to stop. Said, not recorded as a failure; the status of a process that the
        signal ended (as exit_status gives a rank's)."""
        code = 128 + signum
        name = signal.Signals(signum).name
        self._say(f"{name} while joining the supervisor's hub; leaving with exit status {code}")
        return code

    def _follow_log(self, log_dir: str) -> None:
        """Move to the attempt's log folder: the agent's own lines go to its node log there,
        as they would from a step started for the attempt."""
        if log_dir == self.log_dir:
            return
        self.log_dir = log_dir
        sys.stdout.flush()
        sys.stderr.flush()
        fd = os.open(
            os.path.join(log_dir, node_log_name(self.node_rank)),
            os.O_WRONLY | os.O_CREAT | os.O_APPEND,
            0o600,
        )
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)


class HubUnreachable(Exception):
    """The agent could not join its supervisor's hub (one line: why)."""


class JoinStopped(Exception):
    """A stop signal (LEAVE_SIGNALS) came while the agent joined its hub."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class LeaveOnSignal:
    """While a persistent agent joins its hub (a `with` block in main): SIGTERM and SIGINT are
    noted (`signum`) and wake its waits (a pipe as the signal wakeup fd), so that it leaves at
    once (`check`). templates/slurm_node.sh holds SIGTERM blocked for the ranks to come: what
    came before is delivered now (before any rank, it ends the agent too). After the block both
    are blocked again, as before, until NodeAgent.run passes them on to the ranks."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._handlers: dict[int, Any] = {}
        self._wakeup = -1

    def fileno(self) -> int:
        return self._read

    def check(self) -> None:
        if self.signum is not None:
            raise JoinStopped(self.signum)

    def _note(self, signum: int, _frame: object) -> None:
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> LeaveOnSignal:
        self._handlers = {sig: signal.signal(sig, self._note) for sig in LEAVE_SIGNALS}
        self._wakeup = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, LEAVE_SIGNALS)
        return self

    def __exit__(
        self, _type: type[BaseException] | None, _value: BaseException | None, _tb: TracebackType | None
    ) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, LEAVE_SIGNALS)  # kept for the ranks from now on
        signal.set_wakeup_fd(self._wakeup)
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)
        os.close(self._read)
        os.close(self._write)


def join_hub(
    address: str, token: str, node: int, within: float = JOIN_RETRY_S, leave: LeaveOnSignal | None = None
) -> tuple[Channel, list[dict[str, Any]]]:
    """The persistent agent's channel to its supervisor, introduced with the step's token and
    acknowledged (WELCOME), and the orders that came with the acknowledgement. A connection
    reset or closed before its WELCOME, or not accepted in time, is made again: a stranger's
    flood can make the hub close one it has not read yet (agent_step.PENDING_PER_PEER). A
    refused one is not: the hub listens before srun starts its agents, so it is gone for good
    (the supervisor ended the step). HubUnreachable then, or after `within` seconds of tries;
    JoinStopped as soon as `leave` notes a stop signal."""
    deadline = time.monotonic() + within
    pause = RETRY_PAUSE_S[0]
    tries = 0
    while True:
        tries += 1
        try:
            return _introduce(address, token, node, deadline, leave)
        except ConnectionRefusedError as exc:
            raise HubUnreachable(
                f"the supervisor's hub at {address} refused the connection ({exc.strerror}): it is gone"
            ) from None
        except (OSError, ChannelClosed) as exc:
            why = str(exc) or type(exc).__name__
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise HubUnreachable(
                f"could not join the supervisor's hub at {address} in {within:.0f}s ({tries} tries): {why}"
            )
        # The last pause is cut to the deadline, and one more try made there: the agent tries for
        # its whole time, not until a pause would pass it.
        _wait_or_leave([], min(random.uniform(pause / 2, pause), remaining), leave)
        pause = min(pause * 2, RETRY_PAUSE_S[1])


def _wait_or_leave(channels: list[Channel], timeout: float, leave: LeaveOnSignal | None) -> None:
    """Until one of `channels` is readable or `timeout` is over; JoinStopped at once on a stop
    signal."""
    wait_ready([*channels, leave] if leave is not None else channels, timeout=timeout)
    if leave is not None:
        leave.check()


def _connect(address: str, timeout: float, leave: LeaveOnSignal | None) -> socket.socket:
    """A connection to `address` (host:port), not accepted within `timeout`: TimeoutError.
    Non-blocking, so that a stop signal ends the wait (a blocking connect resumes after one)."""
    host, port = parse_address(address)
    family, kind, proto, _, where = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        code = sock.connect_ex(where)
        if code in (errno.EINPROGRESS, errno.EINTR):  # EINTR: it goes on all the same
            _, writable = wait_ready([leave] if leave is not None else [], [sock], timeout=timeout)
            if leave is not None:
                leave.check()
            if not writable:
                raise TimeoutError(f"not accepted within {timeout:.1f}s")
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            raise OSError(code, os.strerror(code))  # ConnectionRefusedError for ECONNREFUSED
        return sock
    except BaseException:
        sock.close()
        raise


def _introduce(
    address: str, token: str, node: int, deadline: float, leave: LeaveOnSignal | None
) -> tuple[Channel, list[dict[str, Any]]]:
    """One try: connect, say HELLO, and wait until the hub answers WELCOME (ChannelClosed if it
    closes the connection first, or the deadline passes)."""
    timeout = max(0.1, min(CONNECT_TRY_S, deadline - time.monotonic()))
    channel = Channel(_connect(address, timeout, leave))
    try:
        channel.send(Op.HELLO, node=node, token=token, pid=os.getpid(), host=socket.gethostname())
        messages: list[dict[str, Any]] = []
        while not messages:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChannelClosed("the hub did not acknowledge the HELLO")
            _wait_or_leave([channel], min(left, 1.0), leave)
            messages = channel.receive()
        if messages[0].get("op") != Op.WELCOME:
            raise ChannelClosed(f"the hub answered the HELLO with {messages[0].get('op')!r}")
        return channel, messages[1:]
    except BaseException:
        channel.close()
        raise


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if len(args) < 2:
        print(
            "usage: python -m orchestrator.backends.slurm.node_agent -- PYTHON ENTRY [ARGS...]",
            file=sys.stderr,
        )
        return 2
    config = config_from_run_record(RunDir(os.environ[ENV_RUN_DIR]).read_run_config())
    # The channel's address and token are the agent's, not the ranks': out of the environment
    # they inherit (and of the fork server's).
    address, token = os.environ.pop(ENV_AGENT_ADDR, None), os.environ.pop(ENV_AGENT_TOKEN, "")
    agent = NodeAgent(config, args, os.environ)
    channel = None
    if address:
        try:
            with LeaveOnSignal() as leave:
                channel, agent.orders = join_hub(address, token, agent.node_rank, leave=leave)
                leave.check()  # a stop that came with the WELCOME is still a stop while joining
        except HubUnreachable as exc:
            return agent.give_up(str(exc))
        except JoinStopped as exc:
            if channel is not None:
                channel.close()
            return agent.stopped_joining(exc.signum)
    try:
        return agent.run(channel)
    finally:
        if channel is not None:
            channel.close()


if __name__ == "__main__":
    sys.exit(main())
