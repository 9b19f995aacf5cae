"""The control channel between the Slurm supervisor and its persistent node agents: one TCP
connection per agent, newline-delimited JSON both ways. Both sides import this module, so every
message kind and field lives here.

Why TCP and not files on the shared filesystem: an attempt is a message, and a restart should
cost milliseconds, not a metadata round trip on a busy Lustre or NFS; and a dead agent's
connection closes at once, where a stale file takes AGENT_SILENCE_S to notice.

The supervisor listens (AgentHub in agent_step.py); each agent connects, proves it was started
by that supervisor with the step's token (ENV_AGENT_TOKEN, given through srun's environment,
never logged), is acknowledged, then waits for orders:

    supervisor -> agent   WELCOME                the HELLO was the step's: the agent is in
                          START {attempt, env}   fork this attempt's ranks with `env` on top
                          SIGNAL {signum}        pass a signal on to the ranks (stack dumps)
                          STOP {grace_s}         SIGTERM the ranks, SIGKILL after grace_s
                          EXIT                   stop any ranks and leave (the step ends)
    agent -> supervisor   HELLO {node, token, pid, host}
                          STARTED {attempt, pids}
                          ENDED {attempt, code, rank_codes}   the node's verdict (node_agent.exit_status)

An agent whose connection closes stops its ranks and leaves: no rank outlives its supervisor.
One whose connection closes before its first START and without an EXIT (refused by the hub, or
its supervisor gone) leaves with a failure, so that the step is seen to break.

The hub listens on an address, not every interface: where MASTER_ADDR resolves on the first
node, a network address before a loopback one (hub_address), resolved once per incarnation;
the agents are told that address itself. It reads a connection's first line with one bounded
read (Channel.first_message) as soon as it is accepted, whenever more arrives, and once more
before closing it to make room: a HELLO with the step's token lets an agent in, anything else
closes the connection at that line. A stranger's flood can make the hub close a silent
connection (the oldest of its address), so an agent whose connection is reset or closed before
its WELCOME, or not accepted in time, connects again, for JOIN_RETRY_S at most. A refused one
means the hub is gone (it listens before srun starts the agents): the agent leaves at once.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any

MAX_LINE = 1 << 20  # a START carries the attempt's environment: kilobytes, never a megabyte
HELLO_TIMEOUT_S = 10.0  # an unauthenticated connection gets this long to say who it is
MAX_READS = 64  # recv calls per receive(): 4 MiB at most, then the caller's loop goes on
# How long an agent keeps trying to join its hub: the supervisor's own patience with a step
# whose agents have not all introduced themselves (supervisor.AGENTS_JOIN_S).
JOIN_RETRY_S = 300.0


class Op(StrEnum):
    HELLO = "hello"
    WELCOME = "welcome"
    START = "start"
    STARTED = "started"
    SIGNAL = "signal"
    STOP = "stop"
    ENDED = "ended"
    EXIT = "exit"


class ChannelClosed(Exception):
    """The other side closed the connection, or it broke (`by_peer`), or it broke the protocol."""

    def __init__(self, reason: str, *, by_peer: bool = False) -> None:
        super().__init__(reason)
        self.by_peer = by_peer


class Channel:
    """One connection: whole JSON messages out, whole JSON messages in (non-blocking reads)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):  # orders go out at once, not batched
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = b""
        self._closed: str | None = None  # why the peer's side ended, once read

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, op: Op, **fields: Any) -> None:
        data = (json.dumps({"op": op.value, **fields}, separators=(",", ":")) + "\n").encode()
        # Messages are small and rare: a blocking send with a timeout keeps them whole.
        self.sock.settimeout(10.0)
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise ChannelClosed(str(exc)) from None
        finally:
            self.sock.setblocking(False)

    def receive(self) -> list[dict[str, Any]]:
        """Every whole message that has arrived (maybe none); ChannelClosed at EOF, once the
        messages that came before it have been returned (an agent's last ENDED counts)."""
        if self._closed is not None and b"\n" not in self._buffer:
            raise ChannelClosed(self._closed, by_peer=True)
        for _ in range(MAX_READS):  # bounded: a peer that never stops sending cannot hold us
            try:
                chunk = self.sock.recv(65536)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as exc:
                self._closed = str(exc)
                break
            if not chunk:
                self._closed = "closed by the other side"
                break
            self._buffer += chunk
            if len(self._buffer) - (self._buffer.rfind(b"\n") + 1) > MAX_LINE:
                raise ChannelClosed("a message longer than the channel allows")
        lines = self._buffer.split(b"\n")
        self._buffer = lines.pop()
        messages = []
        for line in lines:
            try:
                message = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ChannelClosed("a message that is not JSON") from None
            if isinstance(message, dict) and "op" in message:
                messages.append(message)
        if not messages and self._closed is not None:
            raise ChannelClosed(self._closed, by_peer=True)
        return messages

    def first_message(self, limit: int) -> dict[str, Any] | None:
        """The connection's first line as a JSON object, once it is whole (None until then),
        from one read of at most `limit` bytes: a peer that has not introduced itself costs
        one small read, whatever it sends. ChannelClosed if the line is longer than `limit`,
        is not a JSON object, or the peer closed first. What follows it is left for receive()."""
        if b"\n" not in self._buffer:
            try:
                chunk = self.sock.recv(limit + 1 - len(self._buffer))
            except (BlockingIOError, InterruptedError):
                chunk = None
            except OSError as exc:
                raise ChannelClosed(str(exc), by_peer=True) from None
            if chunk == b"":
                raise ChannelClosed("closed by the other side", by_peer=True)
            self._buffer += chunk or b""
        line, newline, rest = self._buffer.partition(b"\n")
        if not newline:
            if len(line) > limit:
                raise ChannelClosed(f"a first line longer than {limit} bytes")
            return None
        self._buffer = rest
        try:
            message = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ChannelClosed("a first line that is not JSON") from None
        if not isinstance(message, dict):
            raise ChannelClosed("a first line that is not a message")
        return message

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class HubAddressError(OSError):
    """No address to listen on that every node of the allocation can reach (one line)."""


class UnresolvableHost(HubAddressError):
    """The name the nodes are told to connect to does not resolve here."""


def resolve(host: str) -> list[str]:
    """Every address `host` resolves to here, IPv4 and IPv6, in the resolver's order, each once.
    UnresolvableHost (one line) when it resolves to none."""
    try:
        found = socket.getaddrinfo(host, None, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except OSError as exc:
        raise UnresolvableHost(f"MASTER_ADDR {host!r} does not resolve on this node: {exc}") from None
    return list(dict.fromkeys(str(entry[4][0]) for entry in found))


def is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def preferred_address(found: Sequence[str]) -> str:
    """The address of `found` (what a name resolves to, in the resolver's order) to listen on:
    one the network reaches before a loopback one (Debian and Ubuntu put `127.0.1.1 HOSTNAME`
    in /etc/hosts, before what DNS says), IPv4 before IPv6 (what a cluster's nodes route for
    sure), else the resolver's order. Pure."""
    ranked = sorted(enumerate(found), key=lambda item: (is_loopback(item[1]), ":" in item[1], item[0]))
    return ranked[0][1]


def listen_address(host: str) -> str:
    """The address to listen on for connections the nodes make to `host` (MASTER_ADDR): one it
    resolves to here (preferred_address), not every interface, so that a listener is reachable
    where the nodes are told it is and nowhere else. UnresolvableHost (one line) when it does
    not resolve."""
    return preferred_address(resolve(host))


def hub_address(names: Sequence[str], nodes: int, lookup: Callable[[str], Sequence[str]] = resolve) -> str:
    """Where the agents' hub listens, for an allocation of the hosts `names` (the first is
    MASTER_ADDR, this node) whose step runs on `nodes` of them: the address the first name
    resolves to here (`lookup`), a network one when there is one (preferred_address). The agents
    are told that address, not the name, so that they connect exactly where the hub listens.

    A loopback address reaches no other host: it is kept only when no other host needs it, that
    is when the step runs on one node, or when every name of the allocation resolves only to
    loopback here too (they are all this host: simulated nodes on one machine). Otherwise
    HubAddressError, one line naming the host and /etc/hosts; as UnresolvableHost when the
    first name does not resolve."""
    host = names[0]
    found = lookup(host)
    address = preferred_address(found)
    if not is_loopback(address) or nodes <= 1:
        return address
    for other in names[1:]:
        try:
            elsewhere = [a for a in lookup(other) if not is_loopback(a)]
        except UnresolvableHost:
            elsewhere = ["no address"]
        if elsewhere:
            raise HubAddressError(
                f"MASTER_ADDR {host!r} resolves only to loopback on this node ({', '.join(found)}),"
                f" where node {other!r} ({', '.join(elsewhere)}) cannot reach the persistent node"
                f" agents' hub: make {host!r} resolve to this node's network address (/etc/hosts:"
                f" Debian and Ubuntu images write `127.0.1.1 {host}` there; or DNS)"
            )
    return address


def join_address(address: str, port: int) -> str:
    """`host:port` for ENV_AGENT_ADDR, an IPv6 address in brackets."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def parse_address(value: str) -> tuple[str, int]:
    """`host:port` or `[IPv6]:port` (ENV_AGENT_ADDR) -> (host, port)."""
    host, _, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdecimal():
        raise ValueError(f"not host:port: {value!r}")
    return host, int(port)
