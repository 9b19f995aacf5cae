"""The persistent node agents' control channel (backends/slurm/channel.py, agent_step.AgentHub)
over real loopback sockets: only an agent with the step's token is let in, one per node, and
messages arrive whole however TCP splits them; and where the hub listens (channel.hub_address)."""

from __future__ import annotations

import json
import socket
import time

import pytest

from orchestrator.backends.slurm.agent_step import AgentHub
from orchestrator.backends.slurm.channel import (
    Channel,
    ChannelClosed,
    HubAddressError,
    Op,
    UnresolvableHost,
    hub_address,
    parse_address,
    preferred_address,
)
from orchestrator.contract import ENV_AGENT_ADDR, ENV_AGENT_TOKEN


def _connect(hub: AgentHub) -> Channel:
    host, port = parse_address(hub.env()[ENV_AGENT_ADDR])
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
        token = hub.env()[ENV_AGENT_TOKEN]
        assert len(token) == 32 and hub.env()[ENV_AGENT_ADDR] == f"127.0.0.1:{hub.port}"
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
    assert parse_address("[fd00::1]:4242") == ("fd00::1", 4242)
    with pytest.raises(ValueError):
        parse_address("n1")


def resolver(table: dict[str, list[str]], asked: list[str] | None = None):
    """A stand-in for the resolver of the first node: `table`'s names, in its order (and the
    names it was asked, in `asked`)."""

    def lookup(name: str) -> list[str]:
        if asked is not None:
            asked.append(name)
        if name not in table:
            raise UnresolvableHost(f"MASTER_ADDR {name!r} does not resolve on this node: not known")
        return table[name]

    return lookup


def test_the_hub_listens_on_a_network_address_before_a_loopback_one() -> None:
    # Debian and Ubuntu images write `127.0.1.1 HOSTNAME` into /etc/hosts, before what DNS says
    asked: list[str] = []
    lookup = resolver({"n1": ["127.0.1.1", "10.0.0.1"], "n2": ["10.0.0.2"]}, asked)
    assert hub_address(["n1", "n2"], 2, lookup) == "10.0.0.1"
    assert asked == ["n1"]  # the other nodes' names are not looked up (a 1,000-node job)
    assert preferred_address(["fd00::1", "10.0.0.1"]) == "10.0.0.1"  # IPv4 first
    assert preferred_address(["::1", "127.0.0.1"]) == "127.0.0.1"
    assert preferred_address(["127.0.1.1", "fd00::1"]) == "fd00::1"  # IPv6 before loopback
    assert preferred_address(["10.0.0.3", "10.0.0.1"]) == "10.0.0.3"  # else the resolver's order
    assert hub_address(["v6"], 2, resolver({"v6": ["fd00::5"]})) == "fd00::5"  # no IPv4 at all


def test_a_loopback_hub_is_refused_where_another_host_must_reach_it() -> None:
    lookup = resolver({"n1": ["127.0.1.1"], "n2": ["10.0.0.2"]})
    with pytest.raises(HubAddressError) as refused:
        hub_address(["n1", "n2"], 2, lookup)
    message = str(refused.value)
    assert "\n" not in message and "'n1' resolves only to loopback on this node (127.0.1.1)" in message
    assert "node 'n2' (10.0.0.2)" in message and "/etc/hosts" in message, message
    # a node whose name does not resolve here is not shown to be this host either
    with pytest.raises(HubAddressError, match="node 'n3' \\(no address\\)"):
        hub_address(["n1", "n3"], 2, lookup)


def test_a_loopback_hub_is_kept_where_every_node_is_this_host() -> None:
    # the test cluster: simulated nodes on one machine, whose names all resolve to 127.0.0.1
    lookup = resolver({"n1": ["127.0.0.1"], "n2": ["127.0.0.1"], "n3": ["::1", "127.0.0.1"]})
    assert hub_address(["n1", "n2", "n3"], 3, lookup) == "127.0.0.1"
    # a one-node allocation (the stand-in srun runs every "node" here), or a one-node step
    assert hub_address(["localhost"], 2, resolver({"localhost": ["127.0.0.1"]})) == "127.0.0.1"
    assert hub_address(["n1", "n2"], 1, resolver({"n1": ["127.0.1.1"], "n2": ["10.0.0.2"]})) == "127.0.1.1"


def test_a_first_node_whose_name_does_not_resolve_is_refused_in_one_line() -> None:
    with pytest.raises(UnresolvableHost, match="^MASTER_ADDR 'n9' does not resolve on this node: not known$"):
        hub_address(["n9", "n1"], 2, resolver({"n1": ["10.0.0.1"]}))


def test_agents_reach_a_hub_on_ipv6_by_its_address() -> None:
    try:
        hub = AgentHub(nodes=1, address="::1")
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        address = hub.env()[ENV_AGENT_ADDR]
        assert address == f"[::1]:{hub.port}"
        agent = Channel(socket.create_connection(parse_address(address), timeout=5))
        agent.send(Op.HELLO, node=0, token=hub.env()[ENV_AGENT_TOKEN], pid=1, host="a")
        _pump_until(hub, lambda: hub.complete)
        assert sorted(hub.agents) == [0]
        agent.close()
    finally:
        hub.close()


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
