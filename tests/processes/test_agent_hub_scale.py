"""The persistent agents' hub (backends/slurm/agent_step.AgentHub) at the size of a large job,
over real loopback sockets (issue 27, point 1): every agent of a 1,100-node step is introduced
however many connect at once, a genuine agent is never closed for how many others connected,
a stranger is closed at its first line that is not a HELLO, and one address's silent
connections make room among their own (issue 28; tests/processes/test_hub_attacker.py attacks
it as another user).

The hub runs in a process of its own with the descriptor limit a batch job usually gets (soft
1024): the hub raises it itself (issue 27, follow-up 3), refuses at once when the hard limit is
too low, and does not spin when an accept finds no descriptor free."""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import sys
import time

import pytest

from orchestrator.backends.slurm.agent_step import (
    MAX_HELLO_LINE,
    PENDING_PER_PEER,
    AgentHub,
    Refusal,
    descriptors_needed,
)
from orchestrator.backends.slurm.channel import HELLO_TIMEOUT_S, Channel, ChannelClosed, Op, parse_address
from orchestrator.contract import ENV_AGENT_ADDR, ENV_AGENT_TOKEN

NODES = 1100
USUAL_SOFT_LIMIT = 1024

# The hub's process: `join N` holds a hub of N nodes and reports on it as JSON lines (what it
# was born with, then after the parent's agents connected and it pumped); `refuse N` reports the
# error of a hub it could not have; `exhausted` fills its descriptors while agents wait to be
# accepted, then frees a few.
HUB_PROCESS = r"""
import json, os, resource, socket, sys, time
from orchestrator.backends.slurm.agent_step import ACCEPT_PER_PUMP, AgentHub
from orchestrator.backends.slurm.channel import Channel, Op
from orchestrator.contract import ENV_AGENT_TOKEN

def say(**fields):
    print(json.dumps(fields), flush=True)

def soft():
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]

mode = sys.argv[1]
if mode == "refuse":
    born = soft()
    try:
        AgentHub(int(sys.argv[2]))
    except Exception as exc:
        say(type=type(exc).__name__, message=str(exc), soft=soft(), born=born)
    else:
        say(type=None)
elif mode == "join":
    nodes = int(sys.argv[2])
    born = soft()
    hub = AgentHub(nodes)
    say(port=hub.port, token=hub.env()[ENV_AGENT_TOKEN], born=born, soft=soft())
    sys.stdin.readline()  # every agent has connected and said HELLO
    slowest, pumps, bites = 0.0, 0, True
    deadline = time.monotonic() + 20
    while not hub.complete and time.monotonic() < deadline:
        t0 = time.monotonic()
        hub.pump(0.05)
        slowest, pumps = max(slowest, time.monotonic() - t0), pumps + 1
        # one pump takes a bounded bite of the queue, whatever waits in it
        bites = bites and len(hub.agents) + len(hub.pending) <= pumps * ACCEPT_PER_PUMP
    last = hub.hellos.get(nodes - 1)
    say(agents=sorted(hub.agents), pending=len(hub.pending), closed=sorted(hub.closed),
        last=last, slowest=slowest, pumps=pumps, bites=bites,
        sent=[hub.send(0, Op.EXIT), hub.send(nodes - 1, Op.EXIT)])
    sys.stdin.read()  # until the parent has read its EXITs
    hub.close()
elif mode == "exhausted":
    hub = AgentHub(4)
    token = hub.env()[ENV_AGENT_TOKEN]
    agents = [Channel(socket.create_connection(("127.0.0.1", hub.port))) for _ in range(4)]
    for node, agent in enumerate(agents):
        agent.send(Op.HELLO, node=node, token=token, pid=node, host="a")
    filler = []
    try:
        while True:
            filler.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass  # EMFILE: not one descriptor is left for an accept
    pumps, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < 1.0:
        hub.pump(0.05)
        pumps += 1
    starved = len(hub.agents) + len(hub.pending)
    for fd in filler[:16]:
        os.close(fd)
    t1 = time.monotonic()
    while not hub.complete and time.monotonic() - t1 < 5:
        hub.pump(0.05)
    say(pumps=pumps, starved=starved, agents=sorted(hub.agents), after_s=time.monotonic() - t1)
"""


def hub_process(*args: str, soft: int, hard: int | None = None) -> subprocess.Popen:
    """The hub's process, started with RLIMIT_NOFILE (soft, hard), hard unchanged if None."""
    _, hard_now = resource.getrlimit(resource.RLIMIT_NOFILE)

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard_now if hard is None else hard))

    return subprocess.Popen(
        [sys.executable, "-c", HUB_PROCESS, *args],
        preexec_fn=limits,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def needs_hard_limit(descriptors: int) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < descriptors:
        pytest.skip(f"ulimit -Hn is {hard}; this test holds {descriptors} descriptors")


@pytest.fixture
def agents_room():
    """Room in this process for the agents' ends of NODES connections: here one process plays
    every node's agent (on a cluster each has a node of its own). The hub's process is another
    one, and its limit is its own business."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = NODES + 256
    needs_hard_limit(needed)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_every_one_of_1100_agents_is_introduced_under_the_usual_descriptor_limit(agents_room) -> None:
    needs_hard_limit(descriptors_needed(NODES))
    hub = hub_process("join", str(NODES), soft=USUAL_SOFT_LIMIT)
    agents: list[Channel] = []
    try:
        assert hub.stdout is not None and hub.stdin is not None
        born = json.loads(hub.stdout.readline())
        # The hub raised its process's limit itself: 1024 cannot hold 1,100 connections.
        assert born["born"] == USUAL_SOFT_LIMIT and born["soft"] >= descriptors_needed(NODES), born
        # Every agent connects and says HELLO before the hub looks: all 1,100 wait in the
        # kernel's queue with their HELLO on the wire, as when a big step starts at once.
        for node in range(NODES):
            agents.append(Channel(socket.create_connection(("127.0.0.1", born["port"]), timeout=5)))
            agents[-1].send(Op.HELLO, node=node, token=born["token"], pid=1000 + node, host=f"n{node}")
        hub.stdin.write("go\n")
        hub.stdin.flush()
        report = json.loads(hub.stdout.readline())
        assert report["agents"] == list(range(NODES)), (
            f"{NODES - len(report['agents'])} agents not introduced"
        )
        assert report["pending"] == 0 and report["closed"] == [] and report["bites"], report
        assert report["last"] == {"op": "hello", "node": NODES - 1, "pid": 2099, "host": "n1099"}
        assert report["slowest"] < 2.0, f"one pump took {report['slowest']:.2f}s"
        # none of them was closed: each one was welcomed and hears its own order
        assert report["sent"] == [True, True]
        for node in (0, NODES - 1):
            got: list = []
            deadline = time.monotonic() + 5
            while len(got) < 2 and time.monotonic() < deadline:
                got += agents[node].receive()
            assert got == [{"op": "welcome"}, {"op": "exit"}]
    finally:
        for agent in agents:
            agent.close()
        hub.kill()
        hub.communicate()


def test_a_hard_descriptor_limit_too_low_for_the_step_is_refused_in_one_line() -> None:
    hub = hub_process("refuse", "300", soft=256, hard=256)
    out, _ = hub.communicate(timeout=60)
    refused = json.loads(out)
    assert refused["type"] == "DescriptorLimitError", refused
    message = refused["message"]
    assert "\n" not in message and "ulimit -n" in message and "256" in message, message
    assert str(descriptors_needed(300)) in message and refused["soft"] == 256  # nothing changed


def test_a_low_soft_limit_is_raised_for_a_hub_of_300() -> None:
    needs_hard_limit(descriptors_needed(300))
    hub = hub_process("join", "300", soft=256)
    agents: list[Channel] = []
    try:
        assert hub.stdout is not None and hub.stdin is not None
        born = json.loads(hub.stdout.readline())
        assert born["born"] == 256 and born["soft"] >= descriptors_needed(300), born
        for node in range(300):
            agents.append(Channel(socket.create_connection(("127.0.0.1", born["port"]), timeout=5)))
            agents[-1].send(Op.HELLO, node=node, token=born["token"], pid=node, host=f"n{node}")
        hub.stdin.write("go\n")
        hub.stdin.flush()
        report = json.loads(hub.stdout.readline())
        assert report["agents"] == list(range(300)), f"{300 - len(report['agents'])} agents not introduced"
    finally:
        for agent in agents:
            agent.close()
        hub.kill()
        hub.communicate()


def test_an_accept_without_a_free_descriptor_does_not_spin() -> None:
    # Every descriptor of the hub's process is taken (by something else) while four agents
    # wait to be accepted: pumps wait as asked, and the agents get in once a few are freed.
    hub = hub_process("exhausted", soft=512)
    out, _ = hub.communicate(timeout=60)
    report = json.loads(out)
    assert report["starved"] == 0, report  # the fault fired: no accept got a descriptor
    assert report["pumps"] <= 40, f"{report['pumps']} pumps of 0.05s in 1s: a busy loop"
    assert report["agents"] == [0, 1, 2, 3] and report["after_s"] < 2.0, report


def _connect(hub: AgentHub) -> Channel:
    return Channel(socket.create_connection(parse_address(hub.env()[ENV_AGENT_ADDR]), timeout=5))


def _closed(channel: Channel, within: float) -> bool:
    """Whether the hub closed `channel` within `within` seconds (it reads EOF or a reset)."""
    deadline = time.monotonic() + within
    while True:
        try:
            channel.receive()
        except ChannelClosed:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def test_an_agent_behind_many_silent_connections_from_its_address_is_introduced() -> None:
    # 200 connections that say nothing (strangers, or a port scan) come first, from the agent's
    # own address: the agent's HELLO is still read and let in, and its address holds no more
    # than PENDING_PER_PEER of them (the oldest are closed to make room).
    hub = AgentHub(nodes=1)
    silent: list[Channel] = []
    try:
        for _ in range(200):
            silent.append(_connect(hub))
            hub.pump(0)  # accepted as they come
        agent = _connect(hub)
        agent.send(Op.HELLO, node=0, token=hub.env()[ENV_AGENT_TOKEN], pid=1, host="a")
        deadline = time.monotonic() + 10
        while not hub.complete and time.monotonic() < deadline:
            hub.pump(0.05)
        assert sorted(hub.agents) == [0]
        assert not _closed(agent, within=0.2)
        assert len(hub.pending) == PENDING_PER_PEER, len(hub.pending)
        assert hub.refused == {Refusal.CROWDED: 200 - PENDING_PER_PEER}, hub.refused
        # the newest silent ones are those still held, the oldest were closed
        assert [_closed(c, within=0.2) for c in (silent[0], silent[-1])] == [True, False]
    finally:
        for channel in silent:
            channel.close()
        hub.close()


def test_a_stranger_is_closed_at_its_first_line_that_is_not_a_hello() -> None:
    # Not after HELLO_TIMEOUT_S of lines skipped one by one: at the first line, whatever it is.
    hub = AgentHub(nodes=1)
    try:
        strangers = [_connect(hub) for _ in range(4)]
        strangers[0].sock.sendall(b"{}\n")  # JSON, but no message
        strangers[1].sock.sendall(b'{"op": "ended", "attempt": 0, "code": 0}\n')  # a message, not HELLO
        strangers[2].sock.sendall(b"GET / HTTP/1.1\r\n\r\n")  # a port scanner's probe
        strangers[3].sock.sendall(b"x" * (MAX_HELLO_LINE + 1))  # a line that never ends
        open_ = list(strangers)
        deadline = time.monotonic() + HELLO_TIMEOUT_S / 4
        while open_ and time.monotonic() < deadline:
            hub.pump(0.05)
            open_ = [s for s in open_ if not _closed(s, within=0)]
        assert not open_, [strangers.index(s) for s in open_]
        assert not hub.pending and not hub.agents
    finally:
        hub.close()
