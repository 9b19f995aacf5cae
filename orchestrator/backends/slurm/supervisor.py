"""The supervisor inside a Slurm allocation (the batch step, first node), on the shared loop
(orchestrator.supervision.loop).

submitit calls `supervise(run_url)` in the batch step; a requeued job calls it again. With
`launch.mode: auto` one `srun` step runs a node agent per node for the whole allocation
(PersistentAgentAttempts): each attempt is a message to the agents, which fork their node's
ranks from warm fork servers (orchestrator/backends/slurm/node_agent.py); a broken step (an
agent dead, failed or silent) is ended and the next attempt starts a new one. With
`slurm.persistent_agents: false` each attempt is a step of its own (SrunAttempts), and with
`launch.mode: subprocess` a step of one task per rank. What is Slurm's here is only how an
attempt starts and stops (srun, scancel, the agents' channel) and how a preempted run goes on:
`scontrol requeue` (bounded by slurm.max_requeues), after which the next incarnation of the job
resumes from the checkpoint.
"""

from __future__ import annotations

import glob
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from orchestrator.backends.slurm.agent_step import AgentStep, DescriptorLimitError, soft_limit_for
from orchestrator.backends.slurm.channel import JOIN_RETRY_S, HubAddressError, Op, hub_address
from orchestrator.backends.slurm.hostlist import expand_hostlist
from orchestrator.backends.slurm.node_agent import FAILURE_STOP_GRACE_S
from orchestrator.backends.slurm.render import (
    attempt_step_name,
    srun_environ,
    step_argv,
    step_env,
    uses_node_agent,
    uses_persistent_agents,
)
from orchestrator.contract import (
    AGENT_BEAT_S,
    AGENT_SILENCE_S,
    PREEMPTED_EXIT_CODE,
    AgentState,
    Event,
    node_agent_record_name,
    rank_files,
    rank_of_file,
    read_agent_record,
    read_error_record,
    read_heartbeat,
)
from orchestrator.launch.ports import lease_port
from orchestrator.spec.config import ClusterConfig, config_from_run_record
from orchestrator.storage.rundir import RunDir
from orchestrator.supervision.failures import RankFailure, exception_line, is_peer_loss
from orchestrator.supervision.loop import Ended, Started, Supervision, next_attempt
from orchestrator.supervision.policy import Action, AttemptState, past_first_step, settle_before_stop


def _log(text: str) -> None:
    print(f"[orch.slurm] {time.strftime('%H:%M:%S')} {text}", flush=True)


def node_agent_error(log_dir: str) -> str | None:
    """The exception of the last traceback in the first node agent log that has one: where an
    agent that failed before its ranks existed says why."""
    for path in sorted(glob.glob(os.path.join(log_dir, "node-*.log"))):
        try:
            with open(path, "rb") as fh:
                fh.seek(max(0, os.path.getsize(path) - 8192))
                lines = fh.read().decode("utf-8", "replace").splitlines()
        except OSError:
            continue
        if any(line.startswith("Traceback") for line in lines):
            return f"{os.path.basename(path)}: {exception_line(lines)}"
    return None


def step_failures(log_dir: str, step_code: int, ranks_per_node: int) -> list[RankFailure]:
    """Every rank's error record in the attempt's log folder; when no rank left one, the step
    itself as the failure (its exit status, and a node agent's traceback if there is one)."""
    failures = []
    for path in glob.glob(os.path.join(log_dir, "rank-*.error.json")):
        record = read_error_record(path)
        rank = rank_of_file(os.path.basename(path))
        if record and rank is not None:
            failures.append(
                RankFailure.from_record(
                    record, rank=rank, node_rank=rank // ranks_per_node, exitcode=step_code, time=0.0
                )
            )
    if failures:
        return failures
    how = f"killed by {signal.Signals(-step_code).name}" if step_code < 0 else f"exit code {step_code}"
    message = f"srun step {how}"
    agent_error = node_agent_error(log_dir)
    if agent_error:
        message += f"; {agent_error}"
    return [
        RankFailure(
            rank=None,
            node_rank=None,
            exitcode=step_code,
            time=time.time(),
            error_type=None,
            message=message[:500],
        )
    ]


def agent_failure(record: dict[str, Any], node: int, silent_s: float | None = None) -> RankFailure:
    """A node agent that failed as a launcher: lost (no sign of life for `silent_s`), dead
    without exiting, or failed by its fork server (its record's reason)."""
    who = f"the node agent of node {node} (pid {record.get('pid')} on {record.get('host')})"
    if silent_s is not None:
        message = (
            f"{who} stopped answering: no sign of life for {silent_s:.0f}s (stopped, or its node is lost)"
        )
    elif record.get("state") == AgentState.FAILED:
        message = f"node {node}: {record.get('reason')}"
    else:
        message = f"{who} died without exiting (killed by a signal); its ranks died with it"
    return RankFailure.launcher_failed(message, node_rank=node, time=float(record.get("time") or time.time()))


# A node's exit status when its ranks succeeded, or stopped because they were told to (srun
# ending the step passes SIGTERM on): anything else is a failure of its own.
STOPPED_CODES = (0, PREEMPTED_EXIT_CODE, 128 + signal.SIGTERM)


def dead_agents(log_dir: str, nodes: int) -> tuple[list[RankFailure], list[RankFailure]]:
    """After the step: the agents that recorded a failure, and those whose record still says
    starting or running (they never recorded an exit: killed, oldest record first). The second
    list is empty when some agent recorded a failed exit of its own (a rank killed by the OOM
    killer leaves no record): srun then ended the others itself (--kill-on-bad-exit), and
    their silence says nothing."""
    failed, vanished, bad_exit = [], [], False
    for node in range(nodes):
        record = read_agent_record(os.path.join(log_dir, node_agent_record_name(node)))
        if record is None:
            continue
        state = record.get("state")
        if state == AgentState.FAILED:
            failed.append(agent_failure(record, node))
        elif state in (AgentState.STARTING, AgentState.RUNNING):
            vanished.append(agent_failure(record, node))
        elif state == AgentState.EXITED and record.get("code") not in STOPPED_CODES:
            bad_exit = True
    return failed, [] if bad_exit else sorted(vanished, key=lambda f: f.time)


def checkpoint_seconds(run: RunDir) -> float | None:
    """The longest checkpoint write this run has recorded."""
    times = [
        float(e["write_s"])
        for e in run.events()
        if e.get("event") == Event.CHECKPOINT_COMMITTED and "write_s" in e
    ]
    return max(times) if times else None


class SrunAttempts:
    """The AttemptDriver of the Slurm backend: one srun step per attempt."""

    def __init__(self, config: ClusterConfig, run: RunDir, job_id: str, master_addr: str) -> None:
        self.config = config
        self.run = run
        self.job_id = job_id
        self.master_addr = master_addr
        self.proc: subprocess.Popen | None = None
        self.log_dir = ""
        self.lost_agent: RankFailure | None = None
        # node -> (the record's time last seen, when it last changed here): the agent's own
        # clock is never compared with ours.
        self.agent_beats: dict[int, tuple[float, float]] = {}
        self.next_agent_check = 0.0

    def start(self, attempt: int, master_port: int) -> Started:
        self.log_dir = log_dir = self.run.logs_dir(attempt)
        self.lost_agent, self.agent_beats = None, {}
        shared = self._attempt_env(attempt, master_port)
        env = srun_environ(os.environ, self.config)
        env.update(shared)
        argv = step_argv(self.config, log_dir=log_dir, attempt=attempt, python=sys.executable)
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)
        world = self.config.resources.world_size
        fields = {
            "job_id": self.job_id,
            "master_addr": self.master_addr,
            "launcher": "node-agent" if uses_node_agent(self.config) else "task-per-rank",
        }
        return Started(
            fields=fields, heartbeats={rank: rank_files(log_dir, rank)[1] for rank in range(world)}
        )

    def _attempt_env(self, attempt: int, master_port: int) -> dict[str, str]:
        """The attempt's shared environment (render.step_env) for this run and host."""
        return step_env(
            self.config,
            run_id=self.run.run_id,
            run_dir=self.run.url,
            attempt=attempt,
            master_addr=self.master_addr,
            master_port=master_port,
            log_dir=self.log_dir,
        )

    def poll(self) -> Ended | None:
        assert self.proc is not None
        code = self.proc.poll()
        if code is not None:
            return Ended(failed=code != 0, fields={"exit_code": code})
        if uses_node_agent(self.config) and time.monotonic() >= self.next_agent_check:
            self.next_agent_check = time.monotonic() + AGENT_BEAT_S
            self.lost_agent = self._silent_agent()
            if self.lost_agent is not None:
                return Ended(failed=True)
        return None

    def _silent_agent(self) -> RankFailure | None:
        """A running agent whose record has not changed for AGENT_SILENCE_S (SIGSTOPped, or
        its node lost): its ranks may run on, but nobody would see them end."""
        now = time.monotonic()
        for node in range(self.config.resources.nodes):
            record = read_agent_record(os.path.join(self.log_dir, node_agent_record_name(node)))
            if not record or record.get("state") != AgentState.RUNNING:
                continue
            seen = float(record.get("time", 0))
            last, changed = self.agent_beats.get(node, (None, now))
            if seen != last:
                self.agent_beats[node] = (seen, now)
            elif now - changed > AGENT_SILENCE_S:
                return agent_failure(record, node, silent_s=now - changed)
        return None

    def _step_id(self) -> str:
        """JOB.STEP of our srun (the newest running step of this job), else the job."""
        return self._newest_step() or self.job_id

    def _newest_step(self) -> str | None:
        out = subprocess.run(
            ["squeue", "-h", "-s", "-j", self.job_id, "-o", "%i"], capture_output=True, text=True, timeout=30
        ).stdout.split()
        steps = sorted((s for s in out if s.split(".")[-1].isdigit()), key=lambda s: int(s.split(".")[-1]))
        return steps[-1] if steps else None

    def signal_ranks(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            name = signal.Signals(signum).name.removeprefix("SIG")
            subprocess.run(["scancel", f"--signal={name}", self._step_id()], capture_output=True, timeout=30)

    def process_state(self, rank: int) -> str | None:
        return None  # ranks run on other nodes: the longest silent one is the culprit

    def stop(self, grace_s: float) -> Ended:
        proc = self.proc
        assert proc is not None
        if proc.poll() is None:
            # A lost agent cannot pass a graceful stop on: its node's ranks are killed outright.
            how = ["--signal=KILL"] if self.lost_agent is not None else []
            subprocess.run(["scancel", *how, self._step_id()], capture_output=True, timeout=30)
            try:
                proc.wait(timeout=grace_s + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        code = proc.returncode
        return Ended(failed=code != 0, fields={"exit_code": code})

    def close(self) -> None:
        """The incarnation is over (each attempt's step ended with it)."""

    def failures(self, ended: Ended) -> list[RankFailure]:
        failed = step_failures(
            self.log_dir, int(ended.fields.get("exit_code", 1)), self.config.resources.ranks_per_node
        )
        # A rank's own failure is the cause even when agents die after it (srun ends the step's
        # other tasks); without one, an agent that failed or was killed took its ranks down,
        # which then left no record, or a peer loss, or the stop record of a step being ended.
        own = [
            f for f in failed if f.rank is not None and not f.is_stop_on_request and not is_peer_loss(f.head)
        ]
        if self.lost_agent is not None:
            return [self.lost_agent, *own]
        failed_agents, vanished = dead_agents(self.log_dir, self.config.resources.nodes)
        if failed_agents:  # said so itself: root_cause orders it with the ranks' own failures
            return [*failed_agents, *own]
        return vanished[:1] if vanished and not own else failed


def node_verdict(codes: Mapping[int, int]) -> int:
    """The attempt's exit status from each node's (as a step's would be): the first real
    failure in node order, else 75 when some node stopped on request, else 0."""
    real = [c for _, c in sorted(codes.items()) if c not in (0, PREEMPTED_EXIT_CODE)]
    if real:
        return real[0]
    return PREEMPTED_EXIT_CODE if PREEMPTED_EXIT_CODE in codes.values() else 0


# How long the other nodes wait for node 0's ranks to exist before they start anyway.
RANK0_FIRST_WAIT_S = 2.0
# How long an agent may take from START to STARTED: a fresh fork server's start-up (its
# READY_TIMEOUT_S) plus the silence allowed to an agent's record.
STARTED_WITHIN_S = 140.0
# How long the agents of a step being ended get to stop their ranks and leave on their own.
AGENTS_LEAVE_S = 10.0
# How long a new step's agents get to introduce themselves (HELLO), from srun's start: srun may
# wait for the previous step's nodes to be released, and each agent imports the orchestrator
# from a shared filesystem that a big job's start makes slow. Past it the step is broken and the
# nodes that never said hello are named: the others cannot rendezvous without them, and the
# ENDED of a node that never joined would be waited for forever. The agents try to join as long
# (channel.JOIN_RETRY_S): both sides give up together. (A candidate for a config field,
# slurm.agents_join_s, for sites whose step launches are slower still.)
AGENTS_JOIN_S = JOIN_RETRY_S
# How long a step whose agent's connection closed gets to end on its own (srun's
# --kill-on-bad-exit ends the other agents) before the attempt is called over anyway.
BROKEN_STEP_END_S = 10.0


def unjoined_failure(missing: list[int], nodes: int, waited_s: float) -> RankFailure:
    """The launcher failure of a step whose agents on `missing` nodes never introduced
    themselves within `waited_s` of its start, named by the first of them. Pure."""
    shown = ", ".join(str(n) for n in missing[:16])
    if len(missing) > 16:
        shown += f" and {len(missing) - 16} more"
    if len(missing) == 1:
        who = f"the node agent of node {shown} (1 of {nodes}) never introduced itself"
    else:
        who = f"the node agents of nodes {shown} ({len(missing)} of {nodes}) never introduced themselves"
    return RankFailure.launcher_failed(
        f"{who} to the supervisor within {waited_s:.0f}s of the step's start"
        " (not started by srun, hung before connecting, or refused)",
        node_rank=missing[0],
        time=time.time(),
    )


class PersistentAgentAttempts(SrunAttempts):
    """The AttemptDriver with persistent node agents: one srun step for the allocation; an
    attempt is a START message to its agents, whose fork servers stay warm, so a restart
    forks at once (no new step, no `import torch`). A step whose agent died, failed or went
    silent is ended, and the next attempt starts a new one (the same fallback as a step per
    attempt). Failures are read as SrunAttempts reads them: rank and agent records."""

    def __init__(
        self, config: ClusterConfig, run: RunDir, job_id: str, master_addr: str, hub_address: str
    ) -> None:
        super().__init__(config, run, job_id, master_addr)
        self.hub_address = hub_address  # an IP, resolved once for the incarnation (supervise)
        self.step: AgentStep | None = None
        self.attempt = -1
        self.start_env: dict[str, str] = {}
        self.start_sent: set[int] = set()
        self.started: set[int] = set()  # nodes whose ranks exist this attempt (STARTED)
        self.asked_at: dict[int, float] = {}  # node -> when it was sent this attempt's START
        self.reports: dict[int, int] = {}  # node -> its verdict (ENDED) this attempt
        self.stop_order: dict[str, Any] | None = None  # the STOP every node of the attempt gets
        self.stop_due: float | None = None  # after a node's failure: when the others get the STOP
        self.broken_since: float | None = None

    def start(self, attempt: int, master_port: int) -> Started:
        self.log_dir = log_dir = self.run.logs_dir(attempt)
        self.attempt, self.lost_agent, self.agent_beats = attempt, None, {}
        self.start_sent, self.started, self.reports, self.asked_at = set(), set(), {}, {}
        self.stop_order, self.stop_due, self.broken_since = None, None, None
        self.start_env = self._attempt_env(attempt, master_port)
        # What a step of its own would have shown the attempt's ranks as the step's name.
        self.start_env["SLURM_JOB_NAME"] = attempt_step_name(self.config, attempt)
        if self.step is not None and self.step.usable():
            # An agent that left since the last attempt breaks the step: read before any START.
            self._pump(0.0, send=False)
        kept = self.step is not None and self.step.usable()
        if not kept:
            self._end_step()
            env = srun_environ(os.environ, self.config)
            env.update(self.start_env)
            argv = step_argv(
                self.config, log_dir=log_dir, attempt=attempt, python=sys.executable, persistent=True
            )
            self.step = AgentStep(argv, env, self.config.resources.nodes, self.hub_address)
        self._send_starts()
        # The other nodes start once node 0's ranks exist (a fork: milliseconds), so that rank
        # 0's TCPStore listens before they call on it: a client that finds the port closed
        # retries only after a second. Bounded: past RANK0_FIRST_WAIT_S, _send_starts (from
        # poll) starts them anyway.
        deadline = time.monotonic() + RANK0_FIRST_WAIT_S
        while len(self.start_sent) < len(self.step.hub.agents) and time.monotonic() < deadline:
            self._pump(0.005)
        world = self.config.resources.world_size
        fields = {
            "job_id": self.job_id,
            "master_addr": self.master_addr,
            "launcher": "node-agent",
            "agent_step": "kept" if kept else "new",
        }
        return Started(
            fields=fields, heartbeats={rank: rank_files(log_dir, rank)[1] for rank in range(world)}
        )

    def _send_starts(self) -> None:
        """START to every agent that has introduced itself and not had it yet, node 0 (rank 0's)
        first and the others once its ranks exist (or RANK0_FIRST_WAIT_S after it was asked);
        an agent that comes late to an attempt being stopped gets the STOP right after (its
        ranks start and stop at once, and it gives its verdict like the others)."""
        assert self.step is not None
        waited = 0 in self.asked_at and time.monotonic() - self.asked_at[0] > RANK0_FIRST_WAIT_S
        rank0_ready = 0 in self.started or waited or self.stop_order is not None
        for node in sorted(self.step.hub.agents):
            if node != 0 and not rank0_ready:
                continue
            if node not in self.start_sent and self.step.hub.send(
                node, Op.START, attempt=self.attempt, env=self.start_env
            ):
                self.start_sent.add(node)
                self.asked_at[node] = time.monotonic()
                if self.stop_order is not None:
                    self.step.hub.send(node, Op.STOP, **self.stop_order)

    def _pump(self, timeout: float, send: bool = True) -> None:
        step = self.step
        assert step is not None
        for node, message in step.hub.pump(timeout):
            if message.get("op") == Op.STARTED and message.get("attempt") == self.attempt:
                self.started.add(node)
            if message.get("op") == Op.ENDED and message.get("attempt") == self.attempt:
                code = int(message.get("code", 1))
                self.reports[node] = code
                if code not in (0, PREEMPTED_EXIT_CODE) and self.stop_due is None:
                    # A node's rank failed: no checkpoint can complete without it, so the other
                    # nodes' ranks get the short grace a step's --kill-on-bad-exit gives; in the
                    # run's first attempt before any step, only after they had the time to fail
                    # on their own (policy.settle_before_stop: the start-up rule needs it).
                    self.stop_due = time.monotonic() + settle_before_stop(self.attempt, self._reached_step())
        if self.stop_due is not None and self.stop_order is None and time.monotonic() >= self.stop_due:
            self._stop_all(FAILURE_STOP_GRACE_S)
        if step.hub.closed and step.broken is None:
            step.broken = f"the node agent of node {min(step.hub.closed)} closed its connection"
            self.broken_since = time.monotonic()
        if send and step.broken is None:
            self._send_starts()

    def _reached_step(self) -> bool:
        """Whether a rank of this attempt got past its first step (its heartbeat says so); read
        only where the answer matters (the run's first attempt)."""
        if self.attempt != 0:
            return True
        world = self.config.resources.world_size
        return past_first_step({r: read_heartbeat(rank_files(self.log_dir, r)[1]) for r in range(world)})

    def _stop_all(self, grace_s: float) -> None:
        self.stop_order = {"grace_s": grace_s}
        self._tell_running(Op.STOP, **self.stop_order)

    def _tell_running(self, op: Op, **fields: Any) -> None:
        assert self.step is not None
        for node in sorted(self.step.hub.agents):
            if node not in self.reports:
                self.step.hub.send(node, op, **fields)

    def _ended(self) -> Ended | None:
        """How the attempt ended, once it has: every node gave its verdict, or the step ended."""
        step = self.step
        assert step is not None
        if len(self.reports) == self.config.resources.nodes:  # every node's verdict is in
            verdict = node_verdict(self.reports)
            return Ended(failed=verdict != 0, fields={"exit_code": verdict})
        code = step.exit_code()
        if code is not None:
            step.broken = step.broken or f"the agents' step ended (exit code {code})"
            return Ended(failed=True, fields={"exit_code": code or 1})
        if self.broken_since is not None and time.monotonic() - self.broken_since > BROKEN_STEP_END_S:
            return Ended(failed=True, fields={"exit_code": 1})
        return None

    def poll(self) -> Ended | None:
        self._pump(0.0)
        ended = self._ended()
        if ended is not None:
            return ended
        if time.monotonic() >= self.next_agent_check:
            self.next_agent_check = time.monotonic() + AGENT_BEAT_S
            self.lost_agent = self._unjoined_agents() or self._silent_agent() or self._unstarted_agent()
            if self.lost_agent is not None:
                assert self.step is not None
                self.step.broken = self.lost_agent.message
                return Ended(failed=True)
        return None

    def _unjoined_agents(self) -> RankFailure | None:
        """The nodes whose agents have not introduced themselves AGENTS_JOIN_S after the step
        started (a node of a kept step joined long ago: it cannot be one)."""
        step = self.step
        assert step is not None
        waited = time.monotonic() - step.began
        missing = step.hub.missing()
        if not missing or waited <= AGENTS_JOIN_S:
            return None
        return unjoined_failure(missing, self.config.resources.nodes, waited)

    def _unstarted_agent(self) -> RankFailure | None:
        """An agent asked to start that has not said STARTED in STARTED_WITHIN_S: stopped
        while idle, or lost with its node (its record cannot show it: it never wrote one for
        this attempt)."""
        now = time.monotonic()
        for node, asked in sorted(self.asked_at.items()):
            if node not in self.started and now - asked > STARTED_WITHIN_S:
                assert self.step is not None
                hello = self.step.hub.hellos.get(node, {})
                who = f"the node agent of node {node} (pid {hello.get('pid')} on {hello.get('host')})"
                return RankFailure.launcher_failed(
                    f"{who} did not start its ranks within {STARTED_WITHIN_S:.0f}s of being asked"
                    " (stopped, or its node is lost)",
                    node_rank=node,
                    time=time.time(),
                )
        return None

    def signal_ranks(self, signum: int) -> None:
        if self.step is not None and self.step.usable():
            self._tell_running(Op.SIGNAL, signum=signum)
        else:
            super().signal_ranks(signum)

    def stop(self, grace_s: float) -> Ended:
        step = self.step
        assert step is not None
        if step.usable() and len(self.reports) < self.config.resources.nodes:
            self._stop_all(grace_s)
            deadline = time.monotonic() + grace_s + 30
            while time.monotonic() < deadline and self._ended() is None and step.usable():
                self._pump(0.2)
        ended = self._ended()
        if ended is not None and step.usable():
            return ended  # the step runs on for the next attempt
        # The step is broken (an agent died, failed or went silent) or did not stop: end it; the
        # next attempt starts a new one.
        if step.broken is None:
            step.broken = "its agents did not stop their ranks in time"
        self._end_step()
        return ended or Ended(failed=True, fields={"exit_code": step.exit_code() or 1})

    def _end_step(self) -> None:
        step, self.step = self.step, None
        if step is None:
            return
        # EXIT, then the channels closed: each sound agent stops its ranks and leaves, as told
        # (one cut off without an EXIT before its first START would call itself failed).
        for node in list(step.hub.agents):
            step.hub.send(node, Op.EXIT)
        step.hub.close()
        try:
            step.proc.wait(timeout=0 if self.lost_agent is not None else AGENTS_LEAVE_S)
        except subprocess.TimeoutExpired:
            # What did not leave (a stopped or lost agent) is ended by Slurm: KILL, since a lost
            # agent cannot pass a graceful stop on. Never the job: only a step id found now.
            step_id = self._newest_step()
            if step_id is not None:
                subprocess.run(["scancel", "--signal=KILL", step_id], capture_output=True, timeout=30)
            try:
                step.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                step.proc.kill()  # srun gone: slurmd ends the step's tasks
                step.proc.wait()
        step.close(wait_s=1.0)

    def close(self) -> None:
        """The incarnation is over: the agents leave and the step ends."""
        step, self.step = self.step, None
        if step is not None:
            step.close()


class SlurmIncarnation:
    """The RunHooks of one incarnation of the job (a requeue starts a new one)."""

    def __init__(
        self,
        config: ClusterConfig,
        run: RunDir,
        job_id: str,
        restart_count: int,
        names: frozenset[str] = frozenset(),
    ) -> None:
        self.config = config
        self.run = run
        self.job_id = job_id
        self.restart_count = restart_count
        # Every name this job goes by in the ledger: its id, and for an array task `ARRAY_TASK`,
        # which is what `orch sweep` and `orch cancel SWEEP/N` record.
        self.names = names | {job_id}
        # Ranks get Slurm's SIGTERM themselves and checkpoint; the supervisor keeps waiting for
        # its srun step and only remembers that this incarnation is ending.
        self.terminated = threading.Event()

    def say(self, text: str) -> None:
        _log(text)

    def stop_requested(self) -> bool:
        return False  # Slurm ends the ranks itself; the step's outcome still counts

    def wait_backoff(self, seconds: float) -> bool:
        return not self.terminated.wait(seconds)

    def resume(self, attempt: int, newest_checkpoint: int | None) -> bool:
        """Requeue the job; the next incarnation resumes from the checkpoint. Not when the
        SIGTERM was `orch cancel`'s scancel: Slurm sends the same signal for a cancel as for a
        preemption, and a requeue would bring the cancelled job back."""
        run, job_id = self.run, self.job_id
        if any(
            e.get("event") == Event.CANCEL_REQUESTED and str(e.get("job_id")) in self.names
            for e in run.events()
        ):
            run.append_event(
                Event.RUN_FINISHED,
                status="cancelled",
                job_id=job_id,
                newest_checkpoint=newest_checkpoint,
                exit_code=128 + signal.SIGTERM,
            )
            _log(f"cancelled (orch cancel); checkpointed at step {newest_checkpoint}; not requeued")
            return False
        run.append_event(Event.PREEMPTED, job_id=job_id, checkpoint=newest_checkpoint)
        if self.restart_count >= self.config.slurm.max_requeues:
            raise NoRequeuesLeft(
                f"preempted with no requeues left ({self.config.slurm.max_requeues})", newest_checkpoint
            )
        proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
        # Slurm's own preemption requeues the job itself; then our request is refused: fine.
        run.append_event(
            Event.REQUEUED,
            job_id=job_id,
            checkpoint=newest_checkpoint,
            by="orch" if proc.returncode == 0 else "slurm",
            detail=proc.stderr.strip()[:200],
        )
        _log(f"checkpointed at step {newest_checkpoint}; requeued ({proc.stderr.strip() or 'ok'})")
        # Slurm ends this incarnation now (SIGTERM, then SIGKILL after KillWait); leave at the
        # SIGTERM instead of lingering until the SIGKILL.
        self.terminated.wait(600)
        return False


class NoRequeuesLeft(Exception):
    def __init__(self, reason: str, newest_checkpoint: int | None) -> None:
        super().__init__(reason)
        self.newest_checkpoint = newest_checkpoint


def check_lead_time(run: RunDir, config: ClusterConfig) -> None:
    seconds = checkpoint_seconds(run)
    if seconds is not None and seconds > config.slurm.signal_lead_s:
        message = (
            f"slurm.signal_lead_s={config.slurm.signal_lead_s} is shorter than the last checkpoint's"
            " write time "
            f"({seconds:.1f}s): a preemption warning may come too late to save"
        )
        if not any(e.get("event") == Event.WARNING and e.get("message") == message for e in run.events()):
            run.append_event(
                Event.WARNING, message=message, checkpoint_s=seconds, signal_lead_s=config.slurm.signal_lead_s
            )
            _log(f"WARNING: {message}")


def job_names(environ: Mapping[str, str]) -> frozenset[str]:
    """The names of the job this process runs in: its SLURM_JOB_ID, and `ARRAY_TASK` for a task
    of a job array (whose SLURM_JOB_ID is a number of its own). Pure."""
    names = {environ["SLURM_JOB_ID"]} if environ.get("SLURM_JOB_ID") else set()
    array, task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        names.add(f"{array}_{task}")
    return frozenset(names)


def supervise(run_url: str) -> None:
    run = RunDir(run_url)
    config = config_from_run_record(run.read_run_config())
    job_id = os.environ.get("SLURM_JOB_ID", "?")
    restart_count = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    nodes = expand_hostlist(os.environ.get("SLURM_JOB_NODELIST", socket.gethostname()))
    incarnation = SlurmIncarnation(config, run, job_id, restart_count, job_names(os.environ))
    signal.signal(
        signal.SIGTERM, lambda _signum, _frame: incarnation.terminated.set()
    )  # replaces submitit's "bypass" handler
    attempt = next_attempt(run.events())
    run.append_event(
        Event.JOB_STARTED,
        job_id=job_id,
        restart_count=restart_count,
        host=socket.gethostname(),
        pid=os.getpid(),
        nodes=nodes,
        backend="slurm",
    )
    _log(f"job {job_id} (requeue {restart_count}) on {','.join(nodes)}; next attempt {attempt}")
    started = time.time()
    address: str | None = None  # the persistent agents' hub's
    if uses_persistent_agents(config):
        # Refused before any attempt, as the run's end: every attempt's hub would fail the same
        # way. The hub's address is resolved here, once: a resolver that fails at a later
        # restart cannot end the run there, and every step's agents are told the same address.
        try:
            soft_limit_for(config.resources.nodes, *resource.getrlimit(resource.RLIMIT_NOFILE))
            address = hub_address(nodes, config.resources.nodes)
        except (DescriptorLimitError, HubAddressError) as exc:
            run.append_event(Event.RUN_FINISHED, status="failed", reason=str(exc), job_id=job_id, exit_code=1)
            raise RuntimeError(str(exc)) from None
    driver = (
        PersistentAgentAttempts(config, run, job_id, nodes[0], address)
        if address is not None
        else SrunAttempts(config, run, job_id, nodes[0])
    )
    # The port is leased on this node, the first, where rank 0 binds it.
    loop = Supervision(
        config=config, run=run, driver=driver, hooks=incarnation, lease_port=lease_port, first_attempt=attempt
    )
    try:
        result = loop.run_attempts()
    except NoRequeuesLeft as exc:
        run.append_event(
            Event.RUN_FINISHED,
            status="failed",
            reason=str(exc),
            newest_checkpoint=exc.newest_checkpoint,
            job_id=job_id,
            exit_code=1,
        )
        raise RuntimeError(str(exc)) from None
    finally:
        driver.close()
        check_lead_time(run, config)
    outcome, decision = result.outcome, result.decision
    if decision.action in (Action.RESUME, Action.LEAVE):
        return  # requeued, or a newer incarnation runs: the run goes on without this one
    if outcome.state is not AttemptState.SUCCEEDED and decision.action is not Action.GIVE_UP:
        # Slurm is ending this incarnation (cancel, requeue, node failure): no new step.
        run.append_event(
            Event.INCARNATION_ENDED,
            job_id=job_id,
            attempt=outcome.attempt,
            newest_checkpoint=result.newest_checkpoint,
        )
        _log("terminated by Slurm; not starting another step")
        return
    status = "succeeded" if outcome.state is AttemptState.SUCCEEDED else "failed"
    cause = (
        outcome.root_cause
        if status == "failed" and outcome.root_cause and not outcome.root_cause.is_stop_on_request
        else None
    )
    fields: dict[str, Any] = (
        {"root_cause": cause.to_json() if cause else None, "reason": decision.reason}
        if status == "failed"
        else {}
    )
    run.append_event(
        Event.RUN_FINISHED,
        status=status,
        attempts=result.attempts,
        wall_s=round(time.time() - started, 3),
        newest_checkpoint=result.newest_checkpoint,
        job_id=job_id,
        exit_code=0 if status == "succeeded" else 1,
        **fields,
    )
    if status == "succeeded":
        _log("succeeded")
        return
    _log(f"failed: {decision.reason}; root cause: {cause.describe if cause else 'unknown'}")
    raise RuntimeError(f"run failed: {decision.reason}; root cause: {cause.describe if cause else 'unknown'}")
