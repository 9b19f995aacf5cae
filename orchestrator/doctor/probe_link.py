"""`orch doctor --probe`'s connection test: can the other nodes reach the first one where a run's
ranks would (MASTER_ADDR, a TCP port)? The first node listens; each other node connects and
both prove they hold the probe's token, a random secret the login node gives srun's
environment (ENV_PROBE_TOKEN, never on a command line nor in any field squeue shows): another
user who knows the job id can neither pass as a node nor as the listener. Stdlib only.

Where: the listener binds the address MASTER_ADDR resolves to on the first node, a network one
before a loopback one, as the agents' hub does (backends/slurm/channel.listen_address), so a
name that resolves only to a loopback address there is caught here. Its port is one of
PORT_TRIES candidates derived from the token, so the other nodes need not be told it, and
nobody can hold it in advance.

The exchange, one line each way (hex; `mac` is HMAC-SHA256 keyed with the token):

    node -> listener   NONCE mac("node", NONCE, NAME) NAME     sent with the connection
    listener -> node   mac("listener", NONCE)

The node speaks first, as an agent does to its hub, so that its proof is there when the
listener accepts it: a stranger's flood of connections from the node's own address can close
the oldest waiting ones, and a connection whose proof is read at once never waits. A nonce is
taken once: a proof seen on the wire cannot be replayed.

A connection that sends more than MAX_PROOF bytes, anything that is not a valid proof, or
nothing within PROOF_S is closed, and one address holds at most PENDING_PER_PEER unproven
connections (its oldest is closed, unless its proof has come since it was last read): the
listener serves every connection at once, so a stranger's crowd of silent connections or its
junk delays no node.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import secrets
import selectors
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum

ENV_PROBE_TOKEN = "ORCH_PROBE_TOKEN"
PORT_BASE, PORT_SPAN, PORT_TRIES = 20000, 12000, 8
CONNECT_S = 45.0  # how long other nodes keep trying (the first node may still be importing)
MAX_PROOF = 512  # bytes a connection may send before its proof line is whole
PROOF_S = 5.0  # how long a connection has to prove itself
PENDING_PER_PEER = 16
ACCEPT_PER_ROUND = 256
_ROUND_S = 0.2  # the listener's longest wait between looks at its deadlines


class Refusal(StrEnum):
    """Why the listener closed a connection that did not prove itself (ProbeListener.refused)."""

    NOT_A_PROOF = "not a proof"  # junk, a wrong token, a line too long, a nonce used before
    SILENT = "silent"  # no whole line within PROOF_S
    CROWDED = "crowded"  # closed to make room: its address's oldest, or for a descriptor
    GONE = "gone"  # the peer closed it first


def new_token() -> str:
    return secrets.token_hex(16)


def candidate_ports(token: str) -> list[int]:
    """The listener's candidate ports, from the token: known to every node, to nobody else."""
    first = int.from_bytes(hashlib.sha256(token.encode()).digest()[:4], "big") % PORT_SPAN
    return [PORT_BASE + (first + i * 997) % PORT_SPAN for i in range(PORT_TRIES)]


def mac(token: str, *parts: str) -> str:
    return hmac.new(token.encode(), "\0".join(parts).encode(), hashlib.sha256).hexdigest()


@dataclass
class _Unproven:
    """A connection the listener accepted that has not proven itself yet."""

    sock: socket.socket
    peer: str
    deadline: float
    data: bytes = field(default=b"")


class ProbeListener:
    """The first node's side: accepts, checks each connection's proof, and counts the nodes that
    proved themselves (by name) until `expected` have or `serve`'s time is over."""

    def __init__(self, address: str, ports: list[int], token: str, expected: int) -> None:
        self.token, self.expected = token, expected
        self.reached: dict[str, str] = {}  # node name -> the address it came from
        self.nonces: set[str] = set()  # those of the proofs taken
        self.refused: Counter[Refusal] = Counter()  # connections closed unproven, by why
        self.server, self.port = _bind(address, ports)
        self.closed = False
        self.server.listen(socket.SOMAXCONN)
        self.server.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.server, selectors.EVENT_READ, None)
        self.unproven: dict[socket.socket, _Unproven] = {}  # in the order accepted

    def start(self, within: float) -> threading.Thread:
        thread = threading.Thread(target=self.serve, args=(within,), daemon=True)
        thread.start()
        return thread

    def serve(self, within: float) -> None:
        deadline = time.monotonic() + within
        try:
            while len(self.reached) < self.expected and time.monotonic() < deadline:
                self.round(min(_ROUND_S, max(0.0, deadline - time.monotonic())))
        finally:
            self.close()

    def round(self, timeout: float) -> None:
        """One look: read what arrived (one bounded read per connection), accept (a bounded
        number), close the connections whose time is over."""
        for key, _ in self.selector.select(timeout):
            if key.data is None:
                self._accept()
            else:
                self._read(key.data)
        now = time.monotonic()
        for pending in [p for p in self.unproven.values() if p.deadline < now]:
            self._close(pending, Refusal.SILENT)

    def _accept(self) -> None:
        for _ in range(ACCEPT_PER_ROUND):
            try:
                sock, where = self.server.accept()  # (address, port), and two more for IPv6
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE) and self.unproven:
                    self._make_room(next(iter(self.unproven.values())))
                    continue
                return  # the next round tries again
            sock.setblocking(False)
            peer = str(where[0])
            pending = _Unproven(sock, peer, time.monotonic() + PROOF_S)
            self.unproven[sock] = pending
            self.selector.register(sock, selectors.EVENT_READ, pending)
            self._read(pending)  # a node's proof is there already
            if sock in self.unproven:  # still silent: it counts against its address
                same = [p for p in self.unproven.values() if p.peer == peer]
                if len(same) > PENDING_PER_PEER:
                    self._make_room(same[0])  # its address's silent longest

    def _make_room(self, victim: _Unproven) -> None:
        """Close `victim`, an unproven connection, to make room, unless its proof has come since
        it was last read: it may have come while this round accepted others (a stranger's crowd
        from the node's own address), and the round's reads were chosen before. One read, as
        every round's."""
        self._read(victim)
        if victim.sock in self.unproven:
            self._close(victim, Refusal.CROWDED)

    def _read(self, pending: _Unproven) -> None:
        try:
            chunk = pending.sock.recv(MAX_PROOF + 1 - len(pending.data))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close(pending, Refusal.GONE)
            return
        pending.data += chunk
        line, newline, _ = pending.data.partition(b"\n")
        if not newline:
            if len(pending.data) > MAX_PROOF:
                self._close(pending, Refusal.NOT_A_PROOF)
            return
        proven = self._proven(line)
        if proven is None:
            self._close(pending, Refusal.NOT_A_PROOF)
            return
        nonce, name = proven
        self.nonces.add(nonce)
        self.reached[name] = pending.peer
        try:
            pending.sock.send(f"{mac(self.token, 'listener', nonce)}\n".encode())  # into an empty buffer
        except OSError:
            pass  # the node reached us all the same
        self._close(pending, None)

    def _proven(self, line: bytes) -> tuple[str, str] | None:
        """The nonce and node name of a valid proof line not seen before, or None."""
        try:
            nonce, proof, name = line.decode("ascii").split(" ", 2)
        except (UnicodeDecodeError, ValueError):
            return None
        expected = mac(self.token, "node", nonce, name)
        if nonce in self.nonces or not hmac.compare_digest(proof.encode(), expected.encode()):
            return None
        return nonce, name

    def _close(self, pending: _Unproven, why: Refusal | None) -> None:
        if why is not None:
            self.refused[why] += 1
        self.unproven.pop(pending.sock, None)
        try:
            self.selector.unregister(pending.sock)
        except (KeyError, ValueError):
            pass
        pending.sock.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for pending in list(self.unproven.values()):
            self._close(pending, None)
        self.selector.close()
        self.server.close()


def _bind(address: str, ports: list[int]) -> tuple[socket.socket, int]:
    """A socket bound to the first free one of `ports` on `address`."""
    busy = []
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    for port in ports:
        server = socket.socket(family, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            server.bind((address, port))
        except OSError:
            server.close()
            busy.append(port)
            continue
        return server, port
    raise OSError(f"ports {', '.join(map(str, busy))} are all in use")


def reach(
    host: str, ports: list[int], token: str, me: str, within: float = CONNECT_S
) -> tuple[int | None, str]:
    """Another node's side: the candidate port where the listener proved itself, or why none
    did (the listener may still be starting: tried again for `within` seconds)."""
    deadline = time.monotonic() + within
    last = "no answer"
    while time.monotonic() < deadline:
        for port in ports:
            try:
                if _prove(host, port, token, me):
                    return port, ""
                last = f"port {port} answered without the probe's token (another program listens there)"
            except OSError as exc:
                last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5)
    return None, last


def _prove(host: str, port: int, token: str, me: str) -> bool:
    """One exchange with what listens on `port`: whether it proved it holds the token."""
    nonce = secrets.token_hex(16)
    with socket.create_connection((host, port), timeout=3) as conn:
        conn.settimeout(5)
        conn.sendall(f"{nonce} {mac(token, 'node', nonce, me)} {me}\n".encode())
        with conn.makefile("rb") as lines:
            answer = lines.readline(128).decode("ascii", "replace").strip()
    return hmac.compare_digest(answer.encode(), mac(token, "listener", nonce).encode())
