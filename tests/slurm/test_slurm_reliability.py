"""Our own processes under Slurm fail loudly and recover (issue 13, point 3): a node agent
killed or stopped mid-attempt is that attempt's root cause, named with its node, and the next
attempt (a new srun step) starts fresh agents. The test checks that its signal reached the
agent (its pid from the agent's own record) before judging the outcome."""

from __future__ import annotations

import os
import signal
import time

import pytest

from orchestrator.contract import node_agent_record_name, read_agent_record
from orchestrator.launch.processes import process_state

from ..conftest import TEST_JOBS, read_events, run_orch, wait_for, write_config
from .conftest import status, submit, wait_final

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("slurm_cluster")]


def _agent_record(run_dir, attempt: int, node: int) -> dict | None:
    return read_agent_record(str(run_dir / "logs" / f"attempt-{attempt}" / node_agent_record_name(node)))


def _brief_on_slurm(tmp_path, live_s: str, nodes: int, ranks_per_node: int, **restart) -> object:
    """The config of ranks that say hello and live `live_s` seconds, on the test cluster."""
    return write_config(
        tmp_path,
        TEST_JOBS / "brief.py",
        args=["--live-s", live_s],
        backend="slurm",
        resources={"nodes": nodes, "ranks_per_node": ranks_per_node, "cpus_per_rank": 1, "time_limit": "10"},
        restart=restart,
        slurm={"partition": "debug"},
    )


def _running_agent(run_dir, node: int) -> dict:
    return wait_for(
        lambda: (r := _agent_record(run_dir, 0, node)) and r["state"] == "running" and r,
        120,
        f"node {node}'s agent to run its ranks",
    )


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_node_agent_killed_or_stopped_mid_attempt_is_the_root_cause(tmp_path, how):
    cfg = _brief_on_slurm(tmp_path, "25", 3, 2, max_restarts=1, backoff_s=0.2, stop_grace_s=3)
    run_id = f"agent-{how.lower()}"
    submit(cfg, run_id)
    run_dir = tmp_path / "runs" / run_id
    record = _running_agent(run_dir, 1)
    os.kill(int(record["pid"]), getattr(signal, how))  # every node of the test cluster is this machine
    st = wait_final(cfg, run_id, timeout=240)
    assert st["state"] == "succeeded" and st["attempts"] == 2, st
    ended = [e for e in read_events(run_dir) if e["event"] == "attempt_ended"]
    assert [e["status"] for e in ended] == ["failed", "succeeded"], ended
    cause = ended[0]["root_cause"]
    what = "died without exiting" if how == "SIGKILL" else "stopped answering"
    assert cause["error_type"] == "LauncherFailed" and cause["node_rank"] == 1, cause
    assert cause["message"].startswith(f"the node agent of node 1 (pid {record['pid']} on "), cause
    assert what in cause["message"], cause
    started = [e["agent_step"] for e in read_events(run_dir) if e["event"] == "attempt_started"]
    assert started == ["new", "new"], started
    # the broken step was ended and the next attempt started a new one (persistent agents keep
    # their step only while every agent is sound): its agents are new processes, and each
    # recorded its clean exit
    for node in range(3):
        fresh = _agent_record(run_dir, 1, node)
        assert fresh and fresh["state"] == "exited" and fresh["code"] == 0 and fresh["pid"] != record["pid"]


@pytest.mark.parametrize("live_s", ["0"], ids=["exit-at-once"])  # the shape that wedged (local: both)
def test_512_ranks_through_node_agents_finish(tmp_path, live_s):
    # Issue 13, point 1: the node agent talks to its fork server as the local supervisor does;
    # 256 ranks per node that exit at once must not wedge the two (the test cluster's nodes
    # advertise 256 CPUs).
    cfg = _brief_on_slurm(tmp_path, live_s, 2, 256, max_restarts=0)
    run_id = f"many-{live_s}"
    submit(cfg, run_id)
    st = wait_final(cfg, run_id, timeout=400)
    assert st["state"] == "succeeded" and st["attempts"] == 1, st
    logs = tmp_path / "runs" / run_id / "logs" / "attempt-0"
    assert sorted(int(p.stem.split("-")[1]) for p in logs.glob("rank-*.log")) == list(range(512))
    assert (logs / "rank-511.log").read_text() == "rank 511 of 512\n"
    for node in range(2):
        record = _agent_record(tmp_path / "runs" / run_id, 0, node)
        assert record and record["state"] == "exited" and record["code"] == 0, record


def test_orch_cancel_stops_a_run_whose_node_agent_is_stopped(tmp_path):
    # Issue 13, point 2 under Slurm: a stopped agent cannot pass the stop on; the run still
    # ends within restart.stop_grace_s + 5 s of `orch cancel` (Slurm wakes the job's processes
    # with SIGCONT before its SIGTERM).
    grace = 3
    cfg = _brief_on_slurm(tmp_path, "300", 2, 2, max_restarts=0, stop_grace_s=grace)
    submit(cfg, "frozen")
    run_dir = tmp_path / "runs" / "frozen"
    record = _running_agent(run_dir, 1)
    os.kill(int(record["pid"]), signal.SIGSTOP)
    wait_for(lambda: process_state(int(record["pid"])) == "T", 10, "the agent to be stopped")
    t0 = time.monotonic()
    assert run_orch("cancel", "frozen", "--config", str(cfg)).returncode == 0
    st = wait_for(
        lambda: (s := status(cfg, "frozen"))["slurm_state"] not in ("RUNNING", "COMPLETING") and s,
        60,
        "Slurm to end the job",
    )
    took = time.monotonic() - t0
    assert took <= grace + 5, f"took {took:.1f}s: {st}"
    assert st["slurm_state"] == "CANCELLED", st


def test_a_killed_fork_server_is_named_and_its_agent_starts_a_fresh_one(tmp_path):
    # Issue 15, point 1: a persistent agent whose fork server dies (its ranks die with it) names
    # it as the root cause with its node, and starts a fresh server for the next attempt, which
    # runs in the same agents' step.
    cfg = _brief_on_slurm(tmp_path, "25", 3, 2, max_restarts=1, backoff_s=0.2, stop_grace_s=3)
    run_id = "forkserver-kill"
    submit(cfg, run_id)
    run_dir = tmp_path / "runs" / run_id
    agent = _running_agent(run_dir, 1)
    log = run_dir / "logs" / "attempt-0" / "node-1.log"
    server = int(
        wait_for(
            lambda: next(
                (x for x in log.read_text().splitlines() if x.startswith("[forkserver] pid ")), None
            ),
            60,
            "the fork server's first line",
        )
        .split()[2]
        .rstrip(":")
    )
    assert server != int(agent["pid"])
    os.kill(server, signal.SIGKILL)
    st = wait_final(cfg, run_id, timeout=240)
    assert st["state"] == "succeeded" and st["attempts"] == 2, st
    events = read_events(run_dir)
    ended = [e for e in events if e["event"] == "attempt_ended"]
    assert [e["status"] for e in ended] == ["failed", "succeeded"], ended
    assert ended[0]["duration_s"] < 20, ended  # the other nodes' ranks were stopped, not waited for
    cause = ended[0]["root_cause"]
    assert cause["error_type"] == "LauncherFailed" and cause["node_rank"] == 1, cause
    assert f"the fork server (pid {server}) was killed by SIGKILL" in cause["message"], cause  # it fired
    assert [e["agent_step"] for e in events if e["event"] == "attempt_started"] == ["new", "kept"]
    fresh = _agent_record(run_dir, 1, 1)
    assert fresh and fresh["state"] == "exited" and fresh["code"] == 0 and fresh["pid"] == agent["pid"]
    assert "starting a fresh fork server" in (run_dir / "logs" / "attempt-1" / "node-1.log").read_text()
