"""The supervisor's side of persistent node agents: one srun step for the whole allocation, whose
agents (one per node, each with its warm fork server) run every attempt they are told to over
the control channel (channel.py).

AgentHub listens and keeps one authenticated connection per node; AgentStep is the srun step and
its hub. The driver that uses them is supervisor.PersistentAgentAttempts.
"""

from __future__ import annotations

import errno
import hmac
import resource
import secrets
import selectors
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from enum import StrEnum
from typing import Any

from orchestrator.backends.slurm.channel import (
    HELLO_TIMEOUT_S,
    Channel,
    ChannelClosed,
    Op,
    join_address,
)
from orchestrator.contract import ENV_AGENT_ADDR, ENV_AGENT_TOKEN
from orchestrator.errors import OrchError

# A HELLO is a node number, a token, a pid and a host name: far under this. A connection's
# first line is read with one recv of at most this, so a stranger costs one small read a pump,
# and at most this in all before it is closed.
MAX_HELLO_LINE = 4096
# Connections not yet introduced that one peer address may hold; past it, that address's oldest
# is closed. An agent sends its HELLO with its connection and is let in at its first read, so
# its address has none pending for long; a stranger's crowd of silent connections (from its
# node, or from the agent's) makes room among its own, and never among other nodes' agents.
PENDING_PER_PEER = 16
# Connections accepted per pump; the rest wait in the kernel's queue (the listening socket stays
# readable) for the next one, so that one pump stays short however many connect at once.
ACCEPT_PER_PUMP = 256
# Descriptors the hub's process keeps for what is not the hub's: the supervisor's own files,
# pipes and srun. The rest of its limit is the hub's: one connection per node (introduced or not
# yet), and STRANGER_ROOM at least for connections that are not agents (a port scan, a stale
# agent of an older step) while they get their HELLO_TIMEOUT_S.
FD_RESERVE = 256
STRANGER_ROOM = 64
# After an accept refused for want of a descriptor with nothing of the hub's to let go, the
# listening socket is not watched for this long (it stays readable: watching it would make
# every pump return at once); it is watched again sooner when the hub closes a connection.
ACCEPT_RETRY_S = 0.1


class Refusal(StrEnum):
    """Why the hub closed a connection that never became an agent's (AgentHub.refused)."""

    NOT_A_HELLO = "not a hello"  # junk, another message, a wrong token or node, a second agent
    SILENT = "silent"  # no whole first line within HELLO_TIMEOUT_S
    CROWDED = "crowded"  # closed to make room: its address's or the hub's oldest pending
    GONE = "gone"  # the peer closed it first


class DescriptorLimitError(OrchError):
    """The process may not open as many files as the hub of a step's agents needs."""


def descriptors_needed(nodes: int) -> int:
    """The RLIMIT_NOFILE a hub of `nodes` agents needs in the supervisor's process. Pure."""
    return nodes + STRANGER_ROOM + FD_RESERVE


def soft_limit_for(nodes: int, soft: int, hard: int) -> int:
    """The soft RLIMIT_NOFILE to run a hub of `nodes` agents with, from the process's `soft` and
    `hard` limits: `soft` when it is enough, else raised to what the hub needs (the common soft
    limit, 1024, is less than a 1,000-node step needs; the hard limit is usually far higher).
    Raises DescriptorLimitError when the hard limit itself is too low. Pure."""
    needed = descriptors_needed(nodes)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise DescriptorLimitError(
            f"the supervisor may open {hard} files at most (hard limit; soft {soft}) and the persistent"
            f" node agents of {nodes} nodes need {needed}: raise it where the job is submitted and on"
            f" its first node (`ulimit -n {needed}` before `orch submit`, or nofile in"
            " /etc/security/limits.conf), or set slurm.persistent_agents: false"
        )
    return needed


def is_agent_hello(message: Mapping[str, Any], token: str, nodes: int) -> bool:
    """Whether a connection's first message is a HELLO from one of the step's agents: the step's
    token and a node number of the step. Pure."""
    node, given = message.get("node"), message.get("token")
    return (
        message.get("op") == Op.HELLO
        and isinstance(given, str)
        # bytes: compare_digest refuses str with non-ASCII characters (a TypeError)
        and hmac.compare_digest(given.encode("utf-8", "replace"), token.encode())
        and isinstance(node, int)
        and not isinstance(node, bool)
        and 0 <= node < nodes
    )


class PendingConnections:
    """The connections accepted and not yet introduced, oldest first, each with the time by
    which it must have said HELLO and the address it came from."""

    def __init__(self, per_peer: int) -> None:
        self.per_peer = per_peer
        self._deadlines: dict[Channel, float] = {}  # in the order accepted: the deadlines' order
        self._peers: dict[Channel, str] = {}
        self._by_peer: dict[str, dict[Channel, None]] = {}  # each address's, oldest first

    def __len__(self) -> int:
        return len(self._deadlines)

    def __iter__(self) -> Iterator[Channel]:
        return iter(list(self._deadlines))

    def __contains__(self, channel: object) -> bool:
        return channel in self._deadlines

    def add(self, channel: Channel, peer: str, deadline: float) -> None:
        self._deadlines[channel] = deadline
        self._peers[channel] = peer
        self._by_peer.setdefault(peer, {})[channel] = None

    def crowding(self, peer: str) -> Channel | None:
        """The oldest of `peer`'s connections when it holds more than `per_peer` (to close)."""
        same = self._by_peer.get(peer, {})
        return next(iter(same)) if len(same) > self.per_peer else None

    def remove(self, channel: Channel) -> None:
        if self._deadlines.pop(channel, None) is None:
            return
        peer = self._peers.pop(channel)
        same = self._by_peer[peer]
        del same[channel]
        if not same:
            del self._by_peer[peer]

    def clear(self) -> None:
        self._deadlines.clear()
        self._peers.clear()
        self._by_peer.clear()

    def oldest(self) -> Channel | None:
        return next(iter(self._deadlines), None)

    def expired(self, now: float) -> list[Channel]:
        """The connections whose time to say HELLO is over."""
        late = []
        for channel, deadline in self._deadlines.items():
            if deadline >= now:
                break
            late.append(channel)
        return late


class AgentHub:
    """The listening end: accepts agents, checks each one's token, and routes messages by node.

    It listens on `address` (an IP: channel.hub_address, where MASTER_ADDR resolves; loopback
    unless told), the address the agents are told to connect to. No connection is closed unread:
    each one accepted is read at once (an agent's HELLO is usually there already), then whenever
    it has more to say, one read of at most MAX_HELLO_LINE a pump, until its first line is
    whole, and once more before it is closed to make room (its HELLO may have come since). That
    line must be an agent's HELLO, which the hub acknowledges (WELCOME); anything else closes
    the connection there and then. One that says nothing is closed after HELLO_TIMEOUT_S, or to
    make room: when its address holds more than PENDING_PER_PEER, or the hub's descriptors are
    needed for a newer connection (the one silent longest goes first). An agent closed before
    its WELCOME connects again (node_agent.join_hub).

    Its process's soft descriptor limit is raised to what `nodes` agents need (or the hub
    refuses to exist: DescriptorLimitError): at the common 1024, a 1,100-node step's accepts
    would fail with EMFILE and its agents never all be let in."""

    def __init__(self, nodes: int, address: str = "127.0.0.1") -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = soft_limit_for(nodes, soft, hard)  # before anything is opened: may refuse
        if wanted != soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        # Connections (introduced or not) the hub may hold: its share of the limit.
        self.max_connections = (1 << 20 if wanted == resource.RLIM_INFINITY else wanted) - FD_RESERVE
        self.nodes = nodes
        # The address the agents are told to reach and no other, a port the kernel picks and we
        # hold for the step's life: no lease race (docs/design.md, MASTER_PORT) because the
        # socket is never let go. The queue is as long as the kernel allows: every agent of a
        # big step connects at once.
        self.address = address
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.server = socket.create_server((address, 0), family=family, backlog=max(nodes, socket.SOMAXCONN))
        self.server.setblocking(False)
        self.port = self.server.getsockname()[1]
        # epoll where there is one: select() cannot watch descriptors above 1024 (1000+ nodes).
        # Each key's data says what it is: None the listening socket, a Channel a connection
        # not yet introduced, an int the node whose agent it is.
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.server, selectors.EVENT_READ, None)
        # When the listening socket is watched again after an accept found no descriptor free
        # (ACCEPT_RETRY_S); None while it is watched.
        self.accept_paused_until: float | None = None
        self.token = secrets.token_hex(16)
        self.pending = PendingConnections(PENDING_PER_PEER)
        self.refused: Counter[Refusal] = Counter()  # connections closed before they were agents'
        self.agents: dict[int, Channel] = {}
        self.hellos: dict[int, dict[str, Any]] = {}
        self.closed: set[int] = set()  # nodes whose agent's connection closed

    @property
    def complete(self) -> bool:
        return len(self.agents) == self.nodes

    def missing(self) -> list[int]:
        """The nodes whose agent has not introduced itself (those that did and left are in
        `closed`)."""
        return [n for n in range(self.nodes) if n not in self.agents and n not in self.closed]

    def env(self) -> dict[str, str]:
        """What the step's agents need to find and prove themselves to this hub: the address it
        listens on (not a name, which each node would resolve on its own) and the token."""
        return {ENV_AGENT_ADDR: join_address(self.address, self.port), ENV_AGENT_TOKEN: self.token}

    def pump(self, timeout: float) -> list[tuple[int, dict[str, Any]]]:
        """Accept, introduce and read for up to `timeout`: the agents' messages, by node. A
        node whose connection closes is added to `closed`. Bounded: one read of at most
        MAX_HELLO_LINE per connection that has not introduced itself, at most ACCEPT_PER_PUMP
        new ones, so strangers cost a pump little however many there are or what they send."""
        messages: list[tuple[int, dict[str, Any]]] = []
        accept = False
        paused = self.accept_paused_until
        if paused is not None and time.monotonic() >= paused:
            self._listen()
        elif paused is not None:
            timeout = min(timeout, paused - time.monotonic())  # watched again on time
        for key, _ in self.selector.select(max(0.0, timeout)):
            item = key.data
            if item is None:
                accept = True  # after the reads: a connection read now is not made room for
            elif isinstance(item, Channel):
                self._introduce(item)
            elif item in self.agents:
                try:
                    messages.extend((item, m) for m in self.agents[item].receive())
                except ChannelClosed:
                    self._drop(item)
        if accept:
            self._accept()
        for channel in self.pending.expired(time.monotonic()):
            self._forget(channel, Refusal.SILENT)
        return messages

    def _accept(self) -> None:
        for _ in range(ACCEPT_PER_PUMP):
            try:
                sock, where = self.server.accept()  # (address, port), and two more for IPv6
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE):
                    return  # the next pump tries again
                if not self.pending:
                    # No descriptor, and none of the hub's own to let go: the connection waits
                    # in the kernel's queue. Not watched for a while, or every pump would
                    # return at once to fail the same accept (a busy loop).
                    self._pause_accepting()
                    return
                self._make_room(self.pending.oldest())  # for one not yet read
                continue
            if len(self.agents) + len(self.pending) >= self.max_connections:
                self._make_room(self.pending.oldest())  # the one silent longest
            channel, peer = Channel(sock), str(where[0])
            self.pending.add(channel, peer, time.monotonic() + HELLO_TIMEOUT_S)
            self.selector.register(channel, selectors.EVENT_READ, channel)
            self._introduce(channel)  # an agent's HELLO is usually there already
            # Still silent: it counts against its address, whose silent longest makes room.
            self._make_room(self.pending.crowding(peer))

    def _make_room(self, victim: Channel | None) -> None:
        """Close `victim`, a connection not yet introduced, to make room, unless it has
        introduced itself since it was last read: its HELLO may have come while this pump
        accepted others (a stranger's crowd from the agent's own node), and the pump's reads
        were chosen before. One read, as every pump's: a stranger gains nothing by it."""
        if victim is None:
            return
        self._introduce(victim)
        if victim in self.pending:
            self._forget(victim, Refusal.CROWDED)

    def _pause_accepting(self) -> None:
        if self.accept_paused_until is None:
            self.selector.unregister(self.server)
        self.accept_paused_until = time.monotonic() + ACCEPT_RETRY_S

    def _listen(self) -> None:
        """Watch the listening socket again (a descriptor may be free)."""
        if self.accept_paused_until is not None:
            self.accept_paused_until = None
            self.selector.register(self.server, selectors.EVENT_READ, None)

    def _forget(self, channel: Channel | None, why: Refusal) -> None:
        if channel is None:
            return
        self.refused[why] += 1
        self.pending.remove(channel)
        try:
            self.selector.unregister(channel)
        except (KeyError, ValueError):
            pass
        channel.close()
        self._listen()  # its descriptor is free

    def _introduce(self, channel: Channel) -> None:
        """Read what a connection not yet introduced has sent: nothing whole yet, an agent's
        HELLO (it is acknowledged and becomes its node's channel), or anything else (closed)."""
        try:
            hello = channel.first_message(MAX_HELLO_LINE)
        except ChannelClosed as exc:
            self._forget(channel, Refusal.GONE if exc.by_peer else Refusal.NOT_A_HELLO)
            return
        if hello is None:
            return  # half a hello so far
        node = hello.get("node")
        if not is_agent_hello(hello, self.token, self.nodes) or node in self.agents:
            self._forget(channel, Refusal.NOT_A_HELLO)  # not one of ours, or a second agent for a node
            return
        try:
            channel.send(Op.WELCOME)
        except ChannelClosed:
            self._forget(channel, Refusal.GONE)
            return
        self.pending.remove(channel)
        self.selector.modify(channel, selectors.EVENT_READ, node)
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
            self._listen()  # its descriptor is free
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

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], nodes: int, address: str) -> None:
        # The hub listens before srun starts: an agent whose connection is refused knows its
        # hub is gone for good (node_agent.join_hub).
        self.hub = AgentHub(nodes, address)
        self.proc = subprocess.Popen(list(argv), env={**env, **self.hub.env()}, stdin=subprocess.DEVNULL)
        self.began = time.monotonic()  # the agents' time to introduce themselves counts from here
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
