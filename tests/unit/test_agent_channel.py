"""The persistent node agents' control channel (backends/slurm/channel.py, agent_step.AgentHub)
over real loopback sockets: only an agent with the step's token is let in, one per node, and
messages arrive whole however TCP splits them."""

from __future__ import annotations

import json
import socket
import time

import pytest

from orchestrator.backends.slurm.agent_step import AgentHub
from orchestrator.backends.slurm.channel import Channel, ChannelClosed, Op, parse_address
from orchestrator.contract import ENV_AGENT_ADDR, ENV_AGENT_TOKEN


def _connect(hub: AgentHub) -> Channel:
    host, port = parse_address(hub.env("127.0.0.1")[ENV_AGENT_ADDR])
    return Channel(socket.create_connection((host, port), timeout=5))


def _pump_until(hub: AgentHub, done, timeout: float = 5.0) -> list:
    messages = []
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        messages += hub.pump(0.05)
    return messages


def test_agents_with_the_token_are_let_in_by_node_and_strangers_are_not() -> None:
    hub = AgentHub(nodes=2)
    try:
        token = hub.env("h")[ENV_AGENT_TOKEN]
        assert len(token) == 32 and hub.env("h")[ENV_AGENT_ADDR] == f"h:{hub.port}"
        stranger, wrong_node, first, second, duplicate = (_connect(hub) for _ in range(5))
        stranger.send(Op.HELLO, node=0, token="0" * 32, pid=1, host="x")
        wrong_node.send(Op.HELLO, node=2, token=token, pid=1, host="x")
        first.send(Op.HELLO, node=1, token=token, pid=11, host="a")
        _pump_until(hub, lambda: 1 in hub.agents)
        second.send(Op.HELLO, node=0, token=token, pid=10, host="b")
        duplicate.send(Op.HELLO, node=1, token=token, pid=12, host="c")
        _pump_until(hub, lambda: hub.complete and not hub.pending)
        assert sorted(hub.agents) == [0, 1]
        assert hub.hellos[1] == {"op": "hello", "node": 1, "pid": 11, "host": "a"}  # no token kept
        for refused in (stranger, wrong_node, duplicate):
            with pytest.raises(ChannelClosed):
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    refused.receive()
                    time.sleep(0.02)
        # orders reach the right agent; its answers come back under its node
        assert hub.send(1, Op.START, attempt=3, env={"A": "1"})
        got = []
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            got += first.receive()
        assert got == [{"op": "welcome"}, {"op": "start", "attempt": 3, "env": {"A": "1"}}]
        first.send(Op.ENDED, attempt=3, code=75, rank_codes=[75, 75])
        messages = _pump_until(hub, lambda: False, timeout=0.3)
        assert messages == [(1, {"op": "ended", "attempt": 3, "code": 75, "rank_codes": [75, 75]})]
        # an agent that goes away is noticed as closed, and sending to it fails
        second.close()
        _pump_until(hub, lambda: 0 in hub.closed)
        assert hub.closed == {0} and not hub.send(0, Op.EXIT)
    finally:
        hub.close()


def test_a_message_split_across_packets_arrives_whole() -> None:
    left, right = socket.socketpair()
    reader = Channel(right)
    data = (json.dumps({"op": "start", "env": {"X": "y" * 100_000}}) + "\n").encode()
    left.sendall(data[:7])
    assert reader.receive() == []
    left.sendall(data[7:] + b'{"op": "stop", "grace_s": 2}\n{"op": "si')
    deadline = time.monotonic() + 5
    got = []
    while len(got) < 2 and time.monotonic() < deadline:
        got += reader.receive()
    assert [m["op"] for m in got] == ["start", "stop"] and len(got[0]["env"]["X"]) == 100_000
    left.sendall(b'gnal", "signum": 10}\n')
    time.sleep(0.05)
    assert reader.receive() == [{"op": "signal", "signum": 10}]
    left.close()
    time.sleep(0.05)
    with pytest.raises(ChannelClosed):
        reader.receive()


def test_parse_address() -> None:
    assert parse_address("n1:4242") == ("n1", 4242)
    with pytest.raises(ValueError):
        parse_address("n1")


def test_a_stranger_with_a_non_ascii_token_is_refused_without_harm() -> None:
    # compare_digest raises TypeError on non-ASCII str: the hub compares bytes.
    hub = AgentHub(nodes=1)
    try:
        stranger = _connect(hub)
        stranger.sock.sendall(b'{"op":"hello","node":0,"token":"\\u00e9","pid":1,"host":"x"}\n')
        _pump_until(hub, lambda: False, timeout=0.5)
        assert not hub.agents and not hub.pending
    finally:
        hub.close()


def test_the_last_message_before_a_close_is_not_lost() -> None:
    left, right = socket.socketpair()
    reader = Channel(right)
    left.sendall(b'{"op": "ended", "attempt": 1, "code": 0}\n')
    left.close()
    time.sleep(0.05)
    assert reader.receive() == [{"op": "ended", "attempt": 1, "code": 0}]
    with pytest.raises(ChannelClosed):
        reader.receive()
