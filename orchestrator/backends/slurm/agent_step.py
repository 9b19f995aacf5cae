"""The supervisor's side of persistent node agents: one srun step for the whole allocation, whose
agents (one per node, each with its warm fork server) run every attempt they are told to over
the control channel (channel.py).

AgentHub listens and keeps one authenticated connection per node; AgentStep is the srun step and
its hub. The driver that uses them is supervisor.PersistentAgentAttempts.
"""

from __future__ import annotations

import hmac
import secrets
import selectors
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import Any

from orchestrator.backends.slurm.channel import HELLO_TIMEOUT_S, Channel, ChannelClosed, Op
from orchestrator.contract import ENV_AGENT_ADDR, ENV_AGENT_TOKEN

MAX_PENDING = 64  # connections not yet introduced; more are closed at once


class AgentHub:
    """The listening end: accepts agents, checks each one's token, and routes messages by node."""

    def __init__(self, nodes: int) -> None:
        self.nodes = nodes
        # Every interface, a port the kernel picks and we hold for the step's life: no lease
        # race (docs/design.md, MASTER_PORT) because the socket is never let go.
        self.server = socket.create_server(("", 0), family=socket.AF_INET, backlog=max(16, nodes))
        self.server.setblocking(False)
        self.port = self.server.getsockname()[1]
        # epoll where there is one: select() cannot watch descriptors above 1024 (1000+ nodes)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.server, selectors.EVENT_READ, None)
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
        messages: list[tuple[int, dict[str, Any]]] = []
        for key, _ in self.selector.select(max(0.0, timeout)):
            item = key.data
            if item is None:
                self._accept()
            elif item in self.pending:
                self._introduce(item)
            else:
                node = next((n for n, c in self.agents.items() if c is item), None)
                if node is None:
                    continue
                try:
                    messages.extend((node, m) for m in item.receive())
                except ChannelClosed:
                    self._drop(node)
        now = time.monotonic()
        for channel, deadline in list(self.pending.items()):
            if now > deadline:  # a silent stranger: dropped
                self._forget(channel)
        return messages

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.server.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of descriptors, say: the next pump tries again
                return
            if len(self.pending) >= MAX_PENDING:
                sock.close()  # a flood of strangers must not crowd out the agents
                continue
            channel = Channel(sock)
            self.pending[channel] = time.monotonic() + HELLO_TIMEOUT_S
            self.selector.register(channel, selectors.EVENT_READ, channel)

    def _forget(self, channel: Channel) -> None:
        self.pending.pop(channel, None)
        try:
            self.selector.unregister(channel)
        except (KeyError, ValueError):
            pass
        channel.close()

    def _introduce(self, channel: Channel) -> None:
        try:
            messages = channel.receive()
        except ChannelClosed:
            messages = None
        if messages == []:
            return  # half a hello so far
        hello = messages[0] if messages else {}
        node = hello.get("node")
        token = hello.get("token")
        if (
            hello.get("op") != Op.HELLO
            or not isinstance(token, str)
            # bytes: compare_digest refuses str with non-ASCII characters (a TypeError)
            or not hmac.compare_digest(token.encode("utf-8", "replace"), self.token.encode())
            or not isinstance(node, int)
            or isinstance(node, bool)
            or not 0 <= node < self.nodes
            or node in self.agents
        ):
            self._forget(channel)  # not one of ours, or a second agent for one node
            return
        del self.pending[channel]
        self.agents[node] = channel
        self.hellos[node] = {k: v for k, v in hello.items() if k != "token"}

    def _drop(self, node: int) -> None:
        channel = self.agents.pop(node, None)
        if channel is not None:
            try:
                self.selector.unregister(channel)
            except (KeyError, ValueError):
                pass
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
        self.selector.close()
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
