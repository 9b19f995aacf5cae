"""The node agent (orchestrator/backends/slurm/node_agent.py) run as srun runs it, one per simulated node, on
this machine without Slurm: templates/slurm_node.sh with the step's environment. The real
cluster tests (tests/slurm) run it under srun; these check its parts fast and in detail."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.backends.slurm.node_agent import (
    FAILURE_STOP_GRACE_S,
    HubUnreachable,
    exit_status,
    join_hub,
    rank_env,
)
from orchestrator.backends.slurm.render import NODE_SCRIPT, step_env
from orchestrator.backends.slurm.supervisor import step_failures
from orchestrator.contract import PREEMPTED_EXIT_CODE
from orchestrator.spec.config import config_to_dict, load_config
from orchestrator.storage.rundir import RunDir
from orchestrator.supervision.failures import root_cause

from ..conftest import JOBS, REPO, TEST_JOBS, read_events, wait_for, write_config


def test_rank_env_describes_the_rank_as_its_own_slurm_task() -> None:
    env = rank_env(node_rank=1, local_rank=1, ranks_per_node=2, nodes=3, cpus_per_rank=4, log_dir="/logs")
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")} == {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "NODE_RANK": "1",
        "GROUP_RANK": "1",
    }
    assert (env["SLURM_PROCID"], env["SLURM_LOCALID"], env["SLURM_NODEID"], env["SLURM_GTIDS"]) == (
        "3",
        "1",
        "1",
        "2,3",
    )
    assert (
        env["SLURM_NTASKS"],
        env["SLURM_NPROCS"],
        env["SLURM_STEP_NUM_TASKS"],
        env["SLURM_NTASKS_PER_NODE"],
    ) == ("6", "6", "6", "2")
    assert (env["SLURM_TASKS_PER_NODE"], env["SLURM_STEP_TASKS_PER_NODE"], env["SLURM_CPUS_PER_TASK"]) == (
        "2(x3)",
        "2(x3)",
        "4",
    )
    assert env["ORCH_ERROR_FILE"] == env["TORCHELASTIC_ERROR_FILE"] == "/logs/rank-3.error.json"
    assert env["ORCH_HEARTBEAT_FILE"] == "/logs/rank-3.heartbeat"
    assert (
        rank_env(node_rank=0, local_rank=0, ranks_per_node=8, nodes=1, cpus_per_rank=1, log_dir="/l")[
            "SLURM_TASKS_PER_NODE"
        ]
        == "8"
    )


def _ranks(*codes_in_exit_order: int | None) -> list[SimpleNamespace]:
    # Listed by local rank; `ended` puts them in the order given.
    return [
        SimpleNamespace(popen=SimpleNamespace(returncode=c), ended=None if c is None else float(i))
        for i, c in enumerate(codes_in_exit_order)
    ]


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ((0, 0), 0),
        ((PREEMPTED_EXIT_CODE, PREEMPTED_EXIT_CODE), PREEMPTED_EXIT_CODE),
        ((0, PREEMPTED_EXIT_CODE), PREEMPTED_EXIT_CODE),
        ((PREEMPTED_EXIT_CODE, 1), 1),  # a real failure outranks a stop on request
        ((-9, -15), 137),  # the first to fail, as 128+N for a signal
        ((3, -15), 3),
        ((0, None), 137),  # a rank that outlived SIGKILL is never a success
    ],
)
def test_exit_status_is_the_first_real_failure(codes, expected) -> None:
    assert exit_status(_ranks(*codes)) == expected  # type: ignore[arg-type]


def test_exit_status_follows_exit_order_not_rank_order() -> None:
    ranks = _ranks(-15, 2)
    ranks[0].ended, ranks[1].ended = 5.0, 1.0  # rank 1 failed first; rank 0 was stopped after
    assert exit_status(ranks) == 2  # type: ignore[arg-type]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _kill_agents_left_running():
    yield
    while _started:
        agent = _started.pop()
        if agent.poll() is None:
            agent.kill()  # its fork server and ranks die with it (PDEATHSIG)
            agent.wait()


def start_agents(
    tmp_path: Path,
    script: Path,
    args: list[str],
    *,
    nodes: int,
    env: dict[str, str] | None = None,
    job_python: str | None = None,
    agent_env: dict[str, str] | None = None,
    **sections,
) -> tuple[Path, list[subprocess.Popen]]:
    """One agent per simulated node, with the environment the supervisor gives srun (and
    `agent_env`: a persistent agent's channel, say)."""
    job = {"env": env or {}, **({"python": job_python} if job_python else {})}
    cfg = load_config(
        str(
            write_config(
                tmp_path,
                script,
                args=args,
                backend="slurm",
                resources={"nodes": nodes, "ranks_per_node": 2, "cpus_per_rank": 1},
                job=job,
                **sections,
            )
        )
    )
    run = RunDir(str(tmp_path / "runs" / "agent"))
    run.create({"run_id": "agent", "base_dir": cfg.base_dir, "config": config_to_dict(cfg)})
    log_dir = run.logs_dir(0)
    shared = step_env(
        cfg,
        run_id="agent",
        run_dir=run.url,
        attempt=0,
        master_addr="127.0.0.1",
        master_port=_free_port(),
        log_dir=log_dir,
    )
    agents = []
    for node in range(nodes):
        with open(os.path.join(log_dir, f"node-{node}.log"), "ab") as log:
            agents.append(
                subprocess.Popen(
                    [
                        "/bin/bash",
                        str(NODE_SCRIPT),
                        sys.executable,
                        "--",
                        job_python or sys.executable,
                        str(script),
                        *args,
                    ],
                    env={
                        **os.environ,
                        **shared,
                        **(agent_env or {}),
                        "SLURM_NODEID": str(node),
                        "PYTHONPATH": str(REPO),
                    },
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            )
            _started.append(agents[-1])
    return Path(run.local_path), agents


def _wait_all(agents: list[subprocess.Popen], timeout: float = 120) -> list[int]:
    return [a.wait(timeout=timeout) for a in agents]


def test_agents_fork_their_nodes_ranks_with_the_env_contract(tmp_path: Path) -> None:
    run_dir, agents = start_agents(tmp_path, TEST_JOBS / "env_dump.py", ["two words"], nodes=2)
    assert _wait_all(agents) == [0, 0]
    for rank in range(4):
        seen = json.loads((run_dir / f"env-{rank}.json").read_text())
        node, local = divmod(rank, 2)
        assert (
            seen["RANK"],
            seen["LOCAL_RANK"],
            seen["NODE_RANK"],
            seen["WORLD_SIZE"],
            seen["LOCAL_WORLD_SIZE"],
        ) == (str(rank), str(local), str(node), "4", "2")
        assert (
            seen["slurm"]["SLURM_PROCID"],
            seen["slurm"]["SLURM_LOCALID"],
            seen["slurm"]["SLURM_NODEID"],
        ) == (str(rank), str(local), str(node))
        assert seen["all_reduce"] == 10 and seen["argv"] == ["two words"]
    for node in range(2):
        text = (run_dir / "logs" / "attempt-0" / f"node-{node}.log").read_text()
        assert (
            "fork server ready" in text
            and f"forked ranks {2 * node}-{2 * node + 1}" in text
            and "exit 0" in text
        ), text


def stand_in_hub(timeout_s: float) -> tuple[socket.socket, dict[str, str]]:
    """A listener in place of the supervisor's hub, and the agents' environment naming it (token t)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(timeout_s)
    return listener, {"ORCH_AGENT_ADDR": f"127.0.0.1:{listener.getsockname()[1]}", "ORCH_AGENT_TOKEN": "t"}


def test_an_agent_cut_off_before_its_first_start_exits_non_zero(tmp_path: Path) -> None:
    # A stand-in supervisor lets both agents in (HELLO, WELCOME), then closes node 0's channel
    # without a word (its supervisor gone) and dismisses node 1 with EXIT. Node 0 must not
    # leave as if it was done: srun's --kill-on-bad-exit and the supervisor see the step break
    # only by its exit status.
    listener, agent_env = stand_in_hub(timeout_s=120)
    try:
        run_dir, agents = start_agents(tmp_path, TEST_JOBS / "brief.py", [], nodes=2, agent_env=agent_env)
        channels = {}
        while len(channels) < 2:
            sock, _ = listener.accept()
            with sock.makefile("rb") as lines:
                hello = json.loads(lines.readline())
            assert hello["op"] == "hello" and hello["token"] == "t"
            sock.sendall(b'{"op": "welcome"}\n')
            channels[hello["node"]] = sock
        channels[1].sendall(b'{"op": "exit"}\n')
        for sock in channels.values():
            sock.close()
        codes = _wait_all(agents)
    finally:
        listener.close()
    assert codes[1] == 0 and codes[0] not in (0, PREEMPTED_EXIT_CODE), codes
    log = (run_dir / "logs" / "attempt-0" / "node-0.log").read_text()
    assert "closed before any START" in log, log
    assert "forked ranks" not in log  # the fault fired before any attempt


def _hello(sock: socket.socket) -> dict:
    with sock.makefile("rb") as lines:
        return json.loads(lines.readline())


def test_an_agent_closed_before_its_welcome_connects_again(tmp_path: Path) -> None:
    # A stand-in hub closes the agent's first connection right after its HELLO, unanswered, as
    # the real one closes an address's oldest unintroduced connection under a stranger's flood
    # (agent_step.PENDING_PER_PEER). The agent must come back and be let in, not leave with its
    # node missing from the step.
    listener, agent_env = stand_in_hub(timeout_s=30)
    try:
        run_dir, agents = start_agents(tmp_path, TEST_JOBS / "brief.py", [], nodes=1, agent_env=agent_env)
        first, _ = listener.accept()
        hellos = [_hello(first)]
        first.close()  # before any WELCOME: the fault
        second, _ = listener.accept()
        hellos.append(_hello(second))
        second.sendall(b'{"op": "welcome"}\n{"op": "exit"}\n')
        codes = _wait_all(agents)
        second.close()
    finally:
        listener.close()
    assert [(h["op"], h["node"], h["token"]) for h in hellos] == [("hello", 0, "t")] * 2
    assert codes == [0], (run_dir / "logs" / "attempt-0" / "node-0.log").read_text()


def test_an_agent_that_is_never_let_in_gives_up_in_its_time() -> None:
    # A listener that closes every connection at once: join_hub tries again and again, and
    # gives up (one line, no traceback) when its time is over.
    listener = socket.create_server(("127.0.0.1", 0))
    tries = []

    def refuse_all() -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            tries.append(_hello(sock))
            sock.close()

    threading.Thread(target=refuse_all, daemon=True).start()
    began = time.monotonic()
    try:
        with pytest.raises(HubUnreachable) as refused:
            join_hub(f"127.0.0.1:{listener.getsockname()[1]}", "t", 3, within=1.5)
    finally:
        listener.close()
    took = time.monotonic() - began
    assert 1.0 < took < 3.0, took
    assert len(tries) >= 3 and all(h["node"] == 3 for h in tries), tries
    message = str(refused.value)
    assert "\n" not in message and "could not join the supervisor's hub at 127.0.0.1:" in message, message


def _refusing_address() -> str:
    """host:port where nothing listens (connections are refused): a hub that is gone."""
    return f"127.0.0.1:{_free_port()}"


def test_an_agent_whose_hub_refuses_it_gives_up_at_once(tmp_path: Path) -> None:
    # The hub listens before srun starts the agents (agent_step.AgentStep): a refused connection
    # means it is gone (its supervisor ended the step). An agent left over from that step must
    # not linger for JOIN_RETRY_S (300 s) holding the step's resources: it leaves at its first
    # refusal, failed (71), and says why in one line.
    agent_env = {"ORCH_AGENT_ADDR": _refusing_address(), "ORCH_AGENT_TOKEN": "t"}
    began = time.monotonic()
    run_dir, (agent,) = start_agents(tmp_path, TEST_JOBS / "brief.py", [], nodes=1, agent_env=agent_env)
    code = agent.wait(timeout=60)
    took = time.monotonic() - began
    log = (run_dir / "logs" / "attempt-0" / "node-0.log").read_text()
    print(f"the agent left {took:.2f}s after it was started")
    assert code == 71, (code, log)
    assert f"the supervisor's hub at {agent_env['ORCH_AGENT_ADDR']} refused the connection" in log, log
    assert "tries" not in log and "Traceback" not in log, log  # at its first try, in one line
    # its start (a Python importing the orchestrator on a loaded machine) and one refused try
    assert took < 30, took


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_an_agent_still_joining_its_hub_leaves_at_once_on_a_stop_signal(tmp_path: Path, signum: int) -> None:
    # A stand-in hub takes the agent's connection and HELLO and never answers (the fault): the
    # agent waits for its WELCOME. Its step is being ended meanwhile (AgentStep.close's
    # terminate, scancel): with no rank yet to keep the signal for, the agent must leave at once,
    # not after JOIN_RETRY_S, and not as a failure of its own.
    listener, agent_env = stand_in_hub(timeout_s=60)
    try:
        run_dir, (agent,) = start_agents(tmp_path, TEST_JOBS / "brief.py", [], nodes=1, agent_env=agent_env)
        sock, _ = listener.accept()
        assert _hello(sock)["node"] == 0  # it is joining, and will not be answered
        began = time.monotonic()
        agent.send_signal(signum)
        try:
            code = agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - began
        sock.close()
    finally:
        listener.close()
    log = (run_dir / "logs" / "attempt-0" / "node-0.log").read_text()
    print(f"the agent left {took:.3f}s after {signal.Signals(signum).name}")
    assert code == 128 + signum, (code, log)
    assert f"{signal.Signals(signum).name} while joining the supervisor's hub" in log, log
    assert "forked ranks" not in log and "Traceback" not in log, log
    # milliseconds on an idle machine; the bound leaves room for a loaded one's scheduler
    assert took < 5.0, took


def test_a_stop_signal_after_the_agent_joined_is_kept_for_its_ranks(tmp_path: Path) -> None:
    # Once welcomed, the agent holds SIGTERM for its ranks again, as templates/slurm_node.sh held
    # it before: one that comes before the first START does not end the agent, and reaches the
    # ranks that START forks (they die of it here: brief.py has no handler).
    listener, agent_env = stand_in_hub(timeout_s=60)
    try:
        run_dir, (agent,) = start_agents(
            tmp_path, TEST_JOBS / "brief.py", ["--live-s", "60"], nodes=1, agent_env=agent_env
        )
        sock, _ = listener.accept()
        sock.settimeout(60)
        lines = sock.makefile("rb")
        assert json.loads(lines.readline())["op"] == "hello"
        sock.sendall(b'{"op": "welcome"}\n')
        log_dir = run_dir / "logs" / "attempt-0"
        # past joining: the agent warms its fork server in NodeAgent.run, its ranks not forked
        wait_for(lambda: "fork server ready" in (log_dir / "node-0.log").read_text(), 120, "the fork server")
        agent.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert agent.poll() is None, (log_dir / "node-0.log").read_text()
        start = {"op": "start", "attempt": 0, "env": {"ORCH_LOG_DIR": str(log_dir)}}
        sock.sendall((json.dumps(start) + "\n").encode())
        ended = next(m for m in map(json.loads, lines) if m["op"] == "ended")
        sock.sendall(b'{"op": "exit"}\n')
        code = agent.wait(timeout=60)
        lines.close()
        sock.close()
    finally:
        listener.close()
    assert ended["rank_codes"] == [-signal.SIGTERM] * 2, ended  # not the 60 s they would live
    assert code == 0, (log_dir / "node-0.log").read_text()


def test_first_failure_decides_the_exit_status_and_stops_the_rest(tmp_path: Path) -> None:
    # Rank 0 sleeps outside any collective, so losing its peer cannot end it: only the agent
    # can. Rank 1 fails once rank 0 is asleep (its marker file exists).
    asleep = tmp_path / "rank-0-asleep"
    script = tmp_path / "fail_one.py"
    script.write_text(
        "import os, time\n"
        "from orchestrator import runtime\n"
        "ctx = runtime.init()\n"
        "if ctx.rank == 0:\n"
        f"    open({str(asleep)!r}, 'w').close()\n"
        "    time.sleep(600)\n"
        f"while not os.path.exists({str(asleep)!r}):\n"
        "    time.sleep(0.01)\n"
        "raise ValueError('boom')\n"
    )
    run_dir, (agent,) = start_agents(tmp_path, script, [], nodes=1)
    wait_for(asleep.exists, 120, "rank 0 to fall asleep")
    failed = time.monotonic()
    assert agent.wait(timeout=60) == 1  # the first failure (rank 1), not rank 0's 143 (SIGTERM)
    assert time.monotonic() - failed < 30  # rank 0 had 600 s of sleep left
    error = json.loads((run_dir / "logs" / "attempt-0" / "rank-1.error.json").read_text())
    assert "boom" in error["message"]
    # Rank 0 (no Checkpointer, so no stop handler) was ended by the agent's SIGTERM.
    node_log = (run_dir / "logs" / "attempt-0" / "node-0.log").read_text()
    assert "exit 1 (rank exit codes [-15, 1])" in node_log, node_log


def test_after_a_real_failure_the_rest_are_killed_without_waiting_out_the_grace(tmp_path: Path) -> None:
    # Rank 0 ignores SIGTERM, as a rank stuck in a collective with its dead peer effectively
    # does; restart.stop_grace_s is 60 s. The agent still ends ~FAILURE_STOP_GRACE_S after
    # rank 1's failure: no checkpoint can complete without the peer.
    script = tmp_path / "stuck.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "if os.environ['LOCAL_RANK'] == '1':\n    time.sleep(1); sys.exit(3)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "time.sleep(120)\n"
    )
    run_dir, (agent,) = start_agents(tmp_path, script, [], nodes=1, restart={"stop_grace_s": 60})
    node_log = run_dir / "logs" / "attempt-0" / "node-0.log"
    wait_for(lambda: "ranks 0-1" in node_log.read_text(), 120, "the ranks")
    started = time.monotonic()
    assert agent.wait(timeout=60) == 3
    # ~1 + FAILURE_STOP_GRACE_S s; the slack is for a loaded machine, and the bound stays
    # under half the 60 s grace that the agent must not wait out.
    assert time.monotonic() - started < 1 + FAILURE_STOP_GRACE_S + 25
    assert "rank exit codes [-9, 3]" in node_log.read_text()


def _train(tmp_path: Path, steps: int = 2000) -> tuple[Path, list[subprocess.Popen]]:
    args = ["--steps", str(steps), "--log-every", "1", "--step-sleep", "0.05", "--dataset-size", "256"]
    return start_agents(tmp_path, JOBS / "train_ddp.py", args, nodes=1, storage={"checkpoint_interval": 1000})


def test_stop_signal_to_the_agent_reaches_its_ranks(tmp_path: Path) -> None:
    run_dir, (agent,) = _train(tmp_path)
    log = run_dir / "logs" / "attempt-0" / "rank-0.log"
    wait_for(lambda: log.exists() and "step 3/" in log.read_text(), 120, "training")
    agent.send_signal(signal.SIGUSR2)  # only the agent: what proctrack/pgid delivers
    assert agent.wait(timeout=60) == PREEMPTED_EXIT_CODE
    saved = [e for e in read_events(run_dir) if e["event"] == "checkpoint_committed"]
    assert saved and saved[-1]["step"] >= 3


def _blocks(pid: int, sig: int) -> bool:
    """Whether process `pid` holds `sig` blocked (pending until it unblocks, never lost)."""
    with open(f"/proc/{pid}/status") as fh:
        mask = next(line.split(":", 1)[1] for line in fh if line.startswith("SigBlk:"))
    return bool(int(mask, 16) >> (sig - 1) & 1)


def test_stop_signal_before_the_ranks_exist_is_kept(tmp_path: Path) -> None:
    # Sent while the agent is still starting (and its fork server importing torch): held
    # until the agent's handler exists, then passed on once the ranks are forked, where it
    # waits (blocked) for the runtime's handler. Ranks stop at step 2, as on Slurm.
    run_dir, (agent,) = _train(tmp_path, steps=30)
    # Sent as soon as the agent's process holds it blocked, long before its ranks exist. Not
    # earlier: the shell of templates/slurm_node.sh dies of it, then ignores it for a few ms.
    wait_for(lambda: _blocks(agent.pid, signal.SIGUSR2), 30, "the agent to block SIGUSR2", interval=0.002)
    node_log = run_dir / "logs" / "attempt-0" / "node-0.log"
    assert "forked ranks" not in node_log.read_text()
    agent.send_signal(signal.SIGUSR2)
    assert agent.wait(timeout=120) == PREEMPTED_EXIT_CODE
    saved = [e["step"] for e in read_events(run_dir) if e["event"] == "checkpoint_committed"]
    assert saved == [2]


def test_ranks_die_with_their_agent(tmp_path: Path) -> None:
    run_dir, (agent,) = _train(tmp_path)
    node_log = run_dir / "logs" / "attempt-0" / "node-0.log"
    line = wait_for(
        lambda: next(
            (log_line for log_line in node_log.read_text().splitlines() if "forked ranks" in log_line), None
        ),
        120,
        "the ranks",
    )
    pids = [int(p) for p in line.split("(pids ")[1].rstrip(")").split()]
    agent.kill()
    agent.wait()
    wait_for(
        lambda: (
            not any(
                os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().split(")")[1][:3]
                for p in pids
            )
        ),
        10,
        "the ranks to die",
    )


def test_root_cause_names_an_agent_that_failed_before_its_ranks(tmp_path: Path) -> None:
    (tmp_path / "node-0.log").write_text("[orch.node 0] starting\n")
    (tmp_path / "node-1.log").write_text(
        'Traceback (most recent call last):\n  File "x", line 1\nPermissionError: [Errno 13] run.yaml\n'
    )
    cause = root_cause(step_failures(str(tmp_path), 1, ranks_per_node=2))
    assert (
        cause.rank is None
        and cause.message == "srun step exit code 1; node-1.log: PermissionError: [Errno 13] run.yaml"
    )
    (tmp_path / "node-1.log").write_text("[orch.node 1] exit 143\n")
    assert (
        root_cause(step_failures(str(tmp_path), 143, ranks_per_node=2)).message == "srun step exit code 143"
    )


def test_agent_falls_back_to_fresh_interpreters_and_says_why(tmp_path: Path) -> None:
    # job.python is another interpreter (the system's): the fork server, which runs the
    # orchestrator's, must not serve it. No torch here; the job only records what it saw.
    script = tmp_path / "seen.py"
    script.write_text(
        "import json, os, sys\n"
        "names = ('RANK', 'LOCAL_RANK', 'NODE_RANK', 'WORLD_SIZE', 'SLURM_PROCID', 'SLURM_LOCALID')\n"
        "open(os.path.join(os.environ['ORCH_RUN_DIR'], 'seen-' + os.environ['RANK']), 'w')"
        ".write(json.dumps([sys.executable] + [os.environ[n] for n in names]))\n"
    )
    run_dir, agents = start_agents(tmp_path, script, [], nodes=2, job_python="/usr/bin/python3")
    assert _wait_all(agents) == [0, 0]
    node_log = (run_dir / "logs" / "attempt-0" / "node-1.log").read_text()
    assert (
        "starting ranks as fresh interpreters: job.python (/usr/bin/python3)"
        " is not the interpreter the fork server runs" in node_log
    )
    assert "started ranks 2-3" in node_log
    for rank, local in ((2, 0), (3, 1)):
        seen = json.loads((run_dir / f"seen-{rank}").read_text())
        assert seen == ["/usr/bin/python3", str(rank), str(local), "1", "4", str(rank), str(local)]
