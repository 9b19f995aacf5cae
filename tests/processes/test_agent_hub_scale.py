"""The persistent agents' hub (backends/slurm/agent_step.AgentHub) at the size of a large job,
over real loopback sockets (issue 27, point 1): every agent of a 1,100-node step is introduced
however many connect at once, a genuine agent is never closed for how many others connected,
and a stranger is closed at its first line that is not a HELLO."""

from __future__ import annotations

import resource
import socket
import time

import pytest

from orchestrator.backends.slurm.agent_step import ACCEPT_PER_PUMP, MAX_HELLO_LINE, AgentHub
from orchestrator.backends.slurm.channel import HELLO_TIMEOUT_S, Channel, ChannelClosed, Op, parse_address
from orchestrator.contract import ENV_AGENT_ADDR, ENV_AGENT_TOKEN

NODES = 1100


@pytest.fixture
def descriptors():
    """Room for both ends of every connection (this process plays all the agents)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * NODES + 512
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"ulimit -Hn is {hard}; this test holds {needed} descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _connect(hub: AgentHub) -> Channel:
    return Channel(socket.create_connection(parse_address(hub.env("127.0.0.1")[ENV_AGENT_ADDR]), timeout=5))


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


def test_every_one_of_1100_agents_whose_hellos_arrive_at_once_is_introduced(descriptors) -> None:
    hub = AgentHub(nodes=NODES)
    agents: list[Channel] = []
    try:
        token = hub.env("h")[ENV_AGENT_TOKEN]
        # Every agent connects and says HELLO before the hub looks: all 1,100 wait in the
        # kernel's queue with their HELLO on the wire, as when a big step starts at once.
        for node in range(NODES):
            agents.append(_connect(hub))
            agents[-1].send(Op.HELLO, node=node, token=token, pid=1000 + node, host=f"n{node}")
        slowest, pumps = 0.0, 0
        deadline = time.monotonic() + 60
        while not hub.complete and time.monotonic() < deadline:
            t0 = time.monotonic()
            hub.pump(0.05)
            slowest, pumps = max(slowest, time.monotonic() - t0), pumps + 1
            # one pump takes a bounded bite of the queue, whatever waits in it
            assert len(hub.agents) + len(hub.pending) <= pumps * ACCEPT_PER_PUMP
        assert sorted(hub.agents) == list(range(NODES)), f"{NODES - len(hub.agents)} agents not introduced"
        assert not hub.pending and not hub.closed
        assert hub.hellos[NODES - 1] == {"op": "hello", "node": NODES - 1, "pid": 2099, "host": "n1099"}
        assert slowest < 2.0, f"one pump took {slowest:.2f}s"
        # none of them was closed: each one hears its own order
        assert hub.send(NODES - 1, Op.EXIT) and hub.send(0, Op.EXIT)
        for node in (0, NODES - 1):
            got: list = []
            deadline = time.monotonic() + 5
            while not got and time.monotonic() < deadline:
                got = agents[node].receive()
            assert got == [{"op": "exit"}]
    finally:
        for agent in agents:
            agent.close()
        hub.close()


def test_an_agent_behind_many_silent_connections_is_introduced() -> None:
    # 200 connections that say nothing (strangers, or a port scan) come first: the agent's
    # HELLO is still read and let in, and the silent ones wait out their HELLO timeout.
    hub = AgentHub(nodes=1)
    silent: list[Channel] = []
    try:
        for _ in range(200):
            silent.append(_connect(hub))
            hub.pump(0)  # accepted as they come
        agent = _connect(hub)
        agent.send(Op.HELLO, node=0, token=hub.env("h")[ENV_AGENT_TOKEN], pid=1, host="a")
        deadline = time.monotonic() + 10
        while not hub.complete and time.monotonic() < deadline:
            hub.pump(0.05)
        assert sorted(hub.agents) == [0]
        assert not _closed(agent, within=0.2)
        assert len(hub.pending) == 200  # not closed before they had their time to speak
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
