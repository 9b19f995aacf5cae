"""The supervisor's side of persistent node agents: one srun step for the whole allocation, whose
agents (one per node, each with its warm fork server) run every attempt they are told to over
the control channel (channel.py).

AgentHub listens and keeps one authenticated connection per node; AgentStep is the srun step and
its hub. The driver that uses them is supervisor.PersistentAgentAttempts.
"""

from __future__ import annotations

import hmac
import secrets
import select
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import Any

from orchestrator.backends.slurm.channel import HELLO_TIMEOUT_S, Channel, ChannelClosed, Op
from orchestrator.contract import ENV_AGENT_ADDR, ENV_AGENT_TOKEN


class AgentHub:
    """The listening end: accepts agents, checks each one's token, and routes messages by node."""

    def __init__(self, nodes: int) -> None:
        self.nodes = nodes
        # Every interface, a port the kernel picks and we hold for the step's life: no lease
        # race (docs/design.md, MASTER_PORT) because the socket is never let go.
        self.server = socket.create_server(("", 0), family=socket.AF_INET, backlog=max(16, nodes))
        self.server.setblocking(False)
        self.port = self.server.getsockname()[1]
        self.token = secrets.token_hex(16)
        self.pending: dict[Channel, float] = {}  # not yet introduced -> deadline
        self.agents: dict[int, Channel] = {}
        self.hellos: dict[int, dict[str, Any]] = {}
        self.closed: set[int] = set()  # nodes whose agent's connection closed

    @property
    def complete(self) -> bool:
        return len(self.agents) == self.nodes

    def env(self, host: str) -> dict[str, str]:
        """What the step's agents need to find and prove themselves to this hub."""
        return {ENV_AGENT_ADDR: f"{host}:{self.port}", ENV_AGENT_TOKEN: self.token}

    def pump(self, timeout: float) -> list[tuple[int, dict[str, Any]]]:
        """Accept, introduce and read for up to `timeout`: the agents' messages, by node. A
        node whose connection closes is added to `closed`."""
        now = time.monotonic()
        for channel, deadline in list(self.pending.items()):
            if now > deadline:  # silent stranger: drop it
                del self.pending[channel]
                channel.close()
        readable, _, _ = select.select(
            [self.server, *self.pending, *self.agents.values()], [], [], max(0.0, timeout)
        )
        messages: list[tuple[int, dict[str, Any]]] = []
        for item in readable:
            if item is self.server:
                self._accept()
            elif item in self.pending:
                self._introduce(item)
            else:
                node = next(n for n, c in self.agents.items() if c is item)
                try:
                    messages.extend((node, m) for m in item.receive())
                except ChannelClosed:
                    self._drop(node)
        return messages

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.server.accept()
            except (BlockingIOError, InterruptedError):
                return
            self.pending[Channel(sock)] = time.monotonic() + HELLO_TIMEOUT_S

    def _introduce(self, channel: Channel) -> None:
        try:
            messages = channel.receive()
        except ChannelClosed:
            messages = None
        if messages == []:
            return  # half a hello so far
        del self.pending[channel]
        hello = messages[0] if messages else {}
        node = hello.get("node")
        if (
            hello.get("op") != Op.HELLO
            or not hmac.compare_digest(str(hello.get("token", "")), self.token)
            or not isinstance(node, int)
            or not 0 <= node < self.nodes
            or node in self.agents
        ):
            channel.close()  # not one of ours, or a second agent for one node
            return
        self.agents[node] = channel
        self.hellos[node] = {k: v for k, v in hello.items() if k != "token"}

    def _drop(self, node: int) -> None:
        channel = self.agents.pop(node, None)
        if channel is not None:
            channel.close()
        self.closed.add(node)

    def send(self, node: int, op: Op, **fields: Any) -> bool:
        channel = self.agents.get(node)
        if channel is None:
            return False
        try:
            channel.send(op, **fields)
        except ChannelClosed:
            self._drop(node)
            return False
        return True

    def close(self) -> None:
        for channel in [*self.pending, *self.agents.values()]:
            channel.close()
        self.pending.clear()
        self.agents.clear()
        self.server.close()


class AgentStep:
    """The agents' srun step and its hub, alive across attempts until it breaks or is closed."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], nodes: int, host: str) -> None:
        self.hub = AgentHub(nodes)
        self.proc = subprocess.Popen(list(argv), env={**env, **self.hub.env(host)}, stdin=subprocess.DEVNULL)
        self.broken: str | None = None  # why this step must not run another attempt

    def exit_code(self) -> int | None:
        return self.proc.poll()

    def usable(self) -> bool:
        return self.broken is None and self.proc.poll() is None

    def close(self, wait_s: float = 10.0) -> None:
        """Tell every agent to leave and wait for the step to end; kill it if it does not."""
        if self.proc.poll() is None:
            for node in list(self.hub.agents):
                self.hub.send(node, Op.EXIT)
            try:
                self.proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                self.proc.terminate()  # srun passes it on to the agents; a second one ends srun
                try:
                    self.proc.wait(timeout=wait_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        self.hub.close()
