"""One policy, two backends: the same scripted timeline of attempts, run through the local
supervisor (`orch run`) and through the Slurm supervisor (its own `supervise()`, with stand-ins
for srun and scontrol), must lead to the same decisions, the same root cause, and the same
MASTER_PORT handling.

Each timeline here once made the two supervisors disagree (issue 10): the crash-loop count after
a failed attempt that did commit a checkpoint, a fixed distributed.master_port, and the root
cause's node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.spec.config import config_to_dict, load_config
from orchestrator.storage.rundir import RunDir

from ..conftest import REPO, TEST_JOBS, read_events, run_orch, write_config

SCRIPTED = TEST_JOBS / "scripted.py"
CANNOT_START = TEST_JOBS / "cannot_start.py"
FAKE_SLURM = TEST_JOBS / "fake_slurm.py"

# What the supervisor does after each attempt, read back from its events.
DECISION_EVENTS = {
    "restart_scheduled": "restart",
    "giving_up": "give_up",
    "requeued": "resume",
    "incarnation_ended": "leave",
}


def decisions(events: list[dict[str, Any]]) -> list[tuple[int, str, str]]:
    """[(attempt, how it ended, what came next)] from a run's ledger."""
    out: list[tuple[int, str, str]] = []
    pending: tuple[int, str] | None = None
    for e in events:
        if e["event"] == "attempt_ended":
            pending = (e["attempt"], e["status"])
        elif pending is not None and e["event"] in DECISION_EVENTS:
            out.append((*pending, DECISION_EVENTS[e["event"]]))
            pending = None
        elif pending is not None and e["event"] == "run_finished":
            out.append((*pending, "finish"))
            pending = None
    return out


def root_causes(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (e["attempt"], e["root_cause"]["rank"], e["root_cause"]["node_rank"], e["root_cause"]["class"])
        for e in events
        if e["event"] == "attempt_ended" and e.get("root_cause")
    ]


def config_for(
    tmp_path: Path, backend: str, timeline: list[dict[str, Any]], script: Path = SCRIPTED, **sections: Any
) -> Path:
    sections.setdefault("resources", {"nodes": 2, "ranks_per_node": 2, "cpus_per_rank": 1})
    sections.setdefault("launch", {"mode": "subprocess"})
    return write_config(
        tmp_path,
        script,
        backend=backend,
        job={"env": {"SCRIPT_TIMELINE": json.dumps(timeline), "PYTHONPATH": str(REPO)}},
        **sections,
    )


def run_local(
    tmp_path: Path, timeline: list[dict[str, Any]], **sections: Any
) -> tuple[Path, list[dict[str, Any]]]:
    work = tmp_path / "local"
    work.mkdir()
    cfg = config_for(work, "local", timeline, **sections)
    proc = run_orch("run", str(cfg), "--run-id", "scripted", "--quiet")
    run_dir = work / "runs" / "scripted"
    events = read_events(run_dir)
    assert events and events[-1]["event"] == "run_finished", proc.stderr
    return run_dir, events


def run_slurm(
    tmp_path: Path, timeline: list[dict[str, Any]], incarnations: int = 1, **sections: Any
) -> tuple[Path, list[dict[str, Any]]]:
    """The Slurm supervisor in a batch step of its own, once per incarnation of the job (a
    requeue ends one; the next starts with SLURM_RESTART_COUNT one higher)."""
    work = tmp_path / "slurm"
    (work / "bin").mkdir(parents=True)
    for tool in ("srun", "scontrol"):
        stub = work / "bin" / tool
        stub.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_SLURM}" {tool} "$@"\n')
        stub.chmod(0o755)
    config = load_config(str(config_for(work, "slurm", timeline, **sections)))
    run = RunDir(str(work / "runs" / "scripted"))
    run.create(
        {
            "run_id": "scripted",
            "backend": "slurm",
            "base_dir": config.base_dir,
            "config": config_to_dict(config),
        }
    )
    for restart_count in range(incarnations):
        env = {
            **os.environ,
            "PATH": f"{work / 'bin'}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(REPO),
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "localhost",
            "SLURM_RESTART_COUNT": str(restart_count),
            "FAKE_SLURM_LOG": str(work / "scontrol.log"),
        }
        code = f"from orchestrator.backends.slurm.supervisor import supervise; supervise({run.url!r})"
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return Path(run.local_path), read_events(Path(run.local_path))


def fail(
    rank: int, kind: str = "ValueError", message: str = "loss is nan", checkpoint: int | None = None
) -> dict[str, Any]:
    return {"fail": {"rank": rank, "type": kind, "message": message}, "checkpoint": checkpoint}


def test_crash_loop_count_restarts_at_zero_after_an_attempt_that_checkpointed(tmp_path: Path) -> None:
    # Attempt 0 commits step 10 and then fails; 1 and 2 fail without a new checkpoint. With
    # crash_loop_attempts 2, the run gives up after attempt 2: attempt 0 made progress, so the
    # loop is attempts 1 and 2 (the local supervisor used to count attempt 0 too and stop at 1).
    timeline = [fail(1, checkpoint=10), fail(1)]
    restart = {"max_restarts": 5, "backoff_s": 0.05, "crash_loop_attempts": 2}
    _, local = run_local(tmp_path, timeline, restart=restart)
    _, slurm = run_slurm(tmp_path, timeline, restart=restart)
    expected = [(0, "failed", "restart"), (1, "failed", "restart"), (2, "failed", "give_up")]
    assert decisions(local) == decisions(slurm) == expected
    for events in (local, slurm):
        giving_up = next(e for e in events if e["event"] == "giving_up")
        assert "crash loop (2 failed attempts in a row without a new checkpoint)" in giving_up["reason"]
        assert events[-1]["status"] == "failed" and events[-1]["newest_checkpoint"] == 10


def test_root_cause_names_the_rank_and_its_node(tmp_path: Path) -> None:
    # Rank 3 of 2 nodes x 2 ranks raises a user error: not retried, and both backends name
    # rank 3 on node 1 (the Slurm supervisor's cause used to have no node: "(node None)").
    timeline = [fail(3, "NameError", "name 'lr' is not defined")]
    local_dir, local = run_local(tmp_path, timeline)
    slurm_dir, slurm = run_slurm(tmp_path, timeline)
    assert decisions(local) == decisions(slurm) == [(0, "failed", "give_up")]
    assert root_causes(local) == root_causes(slurm) == [(0, 3, 1, "user_error")]
    for run_dir in (local_dir, slurm_dir):
        text = run_orch("status", str(run_dir)).stdout
        assert "root cause rank 3 (node 1): exit 1 NameError: name 'lr' is not defined" in text, text


def test_fixed_master_port_is_used_by_both(tmp_path: Path) -> None:
    port = _free_port()
    timeline = [fail(0, checkpoint=5), {"checkpoint": 6}]
    sections = {"distributed": {"master_port": port}, "restart": {"max_restarts": 2, "backoff_s": 0.05}}
    local_dir, local = run_local(tmp_path, timeline, **sections)
    slurm_dir, slurm = run_slurm(tmp_path, timeline, **sections)
    assert decisions(local) == decisions(slurm) == [(0, "failed", "restart"), (1, "succeeded", "finish")]
    for run_dir, events in ((local_dir, local), (slurm_dir, slurm)):
        assert [e["master_port"] for e in events if e["event"] == "attempt_started"] == [port, port]
        seen = {(run_dir / f"port-{attempt}-{rank}").read_text() for attempt in (0, 1) for rank in range(4)}
        assert seen == {str(port)}  # every rank of every attempt saw it


def test_preemption_resumes_without_counting_a_failure(tmp_path: Path) -> None:
    # Attempt 0 checkpoints on request (every rank exits 75); the run resumes (Slurm: requeue,
    # then a new incarnation of the job) and attempt 1 succeeds. No root cause is recorded.
    timeline = [{"preempt": True, "checkpoint": 7}, {"checkpoint": 8}]
    restart = {"max_restarts": 0}
    _, local = run_local(tmp_path, timeline, restart=restart)
    slurm_dir, slurm = run_slurm(tmp_path, timeline, incarnations=2, restart=restart)
    assert decisions(local) == decisions(slurm) == [(0, "preempted", "resume"), (1, "succeeded", "finish")]
    assert root_causes(local) == root_causes(slurm) == []
    assert (
        slurm_dir.parent.parent / "scontrol.log"
    ).read_text() == "requeue 4242\n"  # the stand-in did requeue


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def test_a_fenced_incarnation_leaves_without_a_restart(tmp_path: Path) -> None:
    # The checkpoint fence stopped rank 0 (a newer incarnation of the run has started): never
    # retried, since a restart would take a higher number and fence the live incarnation.
    timeline = [
        fail(0, "StaleIncarnationError", "incarnation 0 is stale: incarnation 1 of this run has started")
    ]
    restart = {"max_restarts": 5, "backoff_s": 0.05}
    _, local = run_local(tmp_path, timeline, restart=restart)
    _, slurm = run_slurm(tmp_path, timeline, restart=restart)
    assert decisions(local) == decisions(slurm) == [(0, "failed", "leave")]
    assert root_causes(local) == root_causes(slurm) == [(0, 0, 0, "stale")]
    assert not any(e["event"] == "run_finished" for e in slurm)  # the live incarnation ends the run


# Issue 15, point 1: with launch.mode auto the Slurm supervisor keeps one step of node agents
# for the allocation and sends each attempt to them; its decisions must be those of a step per
# attempt (task per rank, or agents per attempt).
SLURM_LAUNCHERS = {
    "task-per-rank": {"launch": {"mode": "subprocess"}},
    "agents-per-attempt": {"launch": {"mode": "auto"}, "slurm": {"persistent_agents": False}},
    "persistent-agents": {"launch": {"mode": "auto"}},
}
TIMELINES = {
    "crash-loop": (
        [fail(1, checkpoint=10), fail(3)],
        {"max_restarts": 5, "backoff_s": 0.05, "crash_loop_attempts": 2},
        1,
    ),
    "preemption": ([{"preempt": True, "checkpoint": 7}, {"checkpoint": 8}], {"max_restarts": 0}, 2),
}


@pytest.mark.parametrize("timeline_name", sorted(TIMELINES))
def test_persistent_node_agents_decide_as_a_step_per_attempt(tmp_path: Path, timeline_name: str) -> None:
    timeline, restart, incarnations = TIMELINES[timeline_name]
    seen = {}
    for name, sections in SLURM_LAUNCHERS.items():
        (tmp_path / name).mkdir()
        run_dir, events = run_slurm(tmp_path / name, timeline, incarnations, restart=restart, **sections)
        seen[name] = (decisions(events), root_causes(events))
        started = [e for e in events if e["event"] == "attempt_started"]
        if name != "persistent-agents":
            assert all("agent_step" not in e for e in started), started
            continue
        # Within one incarnation (job_started starts one) the agents' step is started once and
        # kept; each node's agent is the same process in every attempt of it.
        incarnation_of = {}
        incarnation = -1
        for e in events:
            if e["event"] == "job_started":
                incarnation += 1
            elif e["event"] == "attempt_started":
                incarnation_of[e["attempt"]] = incarnation
        firsts = {min(a for a, i in incarnation_of.items() if i == n) for n in set(incarnation_of.values())}
        assert [e["agent_step"] for e in started] == [
            "new" if e["attempt"] in firsts else "kept" for e in started
        ], started
        for node in range(2):
            pids = {
                a: json.loads((run_dir / "logs" / f"attempt-{a}" / f"node-{node}.agent.json").read_text())[
                    "pid"
                ]
                for a in incarnation_of
            }
            for a, b in zip(sorted(pids), sorted(pids)[1:], strict=False):
                assert (pids[a] == pids[b]) == (incarnation_of[a] == incarnation_of[b]), pids
            assert (
                "leaving (the supervisor is done with this step)"
                in (run_dir / "logs" / f"attempt-{max(pids)}" / f"node-{node}.log").read_text()
            )
    assert seen["persistent-agents"] == seen["agents-per-attempt"] == seen["task-per-rank"], seen
    expected = {
        "crash-loop": [(0, "failed", "restart"), (1, "failed", "restart"), (2, "failed", "give_up")],
        "preemption": [(0, "preempted", "resume"), (1, "succeeded", "finish")],
    }[timeline_name]
    assert seen["task-per-rank"][0] == expected, seen


def test_a_job_that_cannot_start_is_not_retried_by_either(tmp_path: Path) -> None:
    # Issue 27, point 9: every rank fails to import a module before its first step, in the run's
    # first attempt. The fork server that starts the ranks (locally, and in the Slurm node
    # agents) records the error; the one policy then gives up at once on both backends.
    sections = {"launch": {"mode": "auto"}, "restart": {"max_restarts": 3, "backoff_s": 0.05}}
    local_dir, local = run_local(tmp_path, [], script=CANNOT_START, **sections)
    slurm_dir, slurm = run_slurm(tmp_path, [], script=CANNOT_START, **sections)
    assert decisions(local) == decisions(slurm) == [(0, "failed", "give_up")]
    assert [c[3] for c in root_causes(local)] == [c[3] for c in root_causes(slurm)] == ["missing"]
    for run_dir, events in ((local_dir, local), (slurm_dir, slurm)):
        assert "cannot start" in next(e for e in events if e["event"] == "giving_up")["reason"]
        text = run_orch("status", str(run_dir)).stdout
        assert f"at {CANNOT_START}:4" in text, text
