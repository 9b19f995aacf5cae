"""`orch run` end to end with real gloo ranks: completion, the env contract, restarts after a
SIGKILLed rank, and no rank outliving its supervisor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from orchestrator.contract import CONTRACT_VARS

from ..conftest import JOBS, TEST_JOBS, orch_cmd, read_events, run_orch, wait_for, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRAIN = JOBS / "train_ddp.py"

# Correctness on both launch modes: forked from the fork server (auto) and fresh interpreters.
MODES = pytest.mark.parametrize("mode", ["auto", "subprocess"])


def _final_digest(run_dir: Path) -> tuple[int, str]:
    steps = sorted(
        p for p in (run_dir / "ckpt").iterdir() if p.name.startswith("step-") and ".tmp-" not in p.name
    )
    manifest = json.loads((steps[-1] / "manifest.json").read_text())
    return manifest["step"], manifest["model_digest"]


def test_two_nodes_by_two_ranks_complete(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        TRAIN,
        args=["--steps", "40", "--log-every", "10"],
        resources={"nodes": 2, "ranks_per_node": 2},
    )
    proc = run_orch("run", str(cfg), "--run-id", "r2x2", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["status"] == "succeeded" and summary["attempts"] == 1
    assert summary["newest_checkpoint"] == 40
    run_dir = tmp_path / "runs" / "r2x2"
    assert oct(run_dir.stat().st_mode & 0o777) == "0o700"
    for sub in ("run.yaml", "events.jsonl", "ckpt", "logs", "tb"):
        assert (run_dir / sub).exists(), sub
    assert sorted(p.name for p in (run_dir / "logs" / "attempt-0").glob("rank-*.log")) == [
        f"rank-{r}.log" for r in range(4)
    ]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run_dir / "tb"))
    tb.Reload()
    tags = set(tb.Tags()["scalars"])
    assert {"loss", "samples_per_s", "step_time_s", "lr", "orch/restarts", "orch/goodput"} <= tags, tags
    # The ranks' console is one merged, rank-prefixed stream: on stderr with --json, whose
    # summary is then all of stdout.
    assert "[rank 0] step 40/40" in proc.stderr and json.loads(proc.stdout)["status"] == "succeeded"
    events = read_events(run_dir)
    supervisor_events = {
        "run_started",
        "attempt_started",
        "attempt_ended",
        "restart_scheduled",
        "run_finished",
    }
    assert [e["event"] for e in events if e["event"] in supervisor_events] == [
        "run_started",
        "attempt_started",
        "attempt_ended",
        "run_finished",
    ]
    assert [e["event"] for e in events if e["event"] in ("restored", "training_started")] == [
        "restored",
        "training_started",
    ]
    assert [e["step"] for e in events if e["event"] == "checkpoint_committed"] == [20, 40]


@MODES
def test_every_rank_sees_exactly_the_env_contract(tmp_path: Path, mode: str) -> None:
    cfg = write_config(
        tmp_path,
        TEST_JOBS / "env_dump.py",
        args=["--flag", "value with space"],
        resources={"nodes": 2, "ranks_per_node": 2},
        launch={"mode": mode},
    )
    proc = run_orch("run", str(cfg), "--run-id", "envrun", "--quiet")
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "runs" / "envrun"
    events = read_events(run_dir)
    port = next(e["master_port"] for e in events if e["event"] == "attempt_started")
    for rank in range(4):
        seen = json.loads((run_dir / f"env-{rank}.json").read_text())
        node, local = divmod(rank, 2)
        expected = {
            "RANK": str(rank),
            "LOCAL_RANK": str(local),
            "WORLD_SIZE": "4",
            "LOCAL_WORLD_SIZE": "2",
            "NODE_RANK": str(node),
            "GROUP_RANK": str(node),
            "NNODES": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "TORCHELASTIC_RESTART_COUNT": "0",
            "ROLE_RANK": str(rank),
            "ROLE_NAME": "default",
            "ROLE_WORLD_SIZE": "4",
            "GROUP_WORLD_SIZE": "2",
            "TORCHELASTIC_RUN_ID": "envrun",
            "TORCHELASTIC_MAX_RESTARTS": "2",
            "TORCHELASTIC_USE_AGENT_STORE": "False",
            "ORCH_RUN_ID": "envrun",
            "ORCH_RUN_DIR": str(run_dir),
            "ORCH_ATTEMPT": "0",
        }
        assert {k: seen[k] for k in CONTRACT_VARS} == expected
        assert seen["torchelastic_launched"] is True
        assert seen["dist_rank"] == rank and seen["dist_world"] == 4
        assert seen["all_reduce"] == 1 + 2 + 3 + 4
        assert seen["argv"] == ["--flag", "value with space"]


def test_failed_rank_is_named_as_root_cause(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        TEST_JOBS / "fail.py",
        restart={"max_restarts": 1, "backoff_s": 0.1, "stop_grace_s": 2},
        job={"script": str(TEST_JOBS / "fail.py"), "env": {"FAIL_RANK": "1", "FAIL_WITH": "bad batch shape"}},
    )
    proc = run_orch("run", str(cfg), "--run-id", "failing", "--json")
    assert proc.returncode == 1
    summary = json.loads(proc.stdout)
    assert summary["status"] == "failed" and summary["attempts"] == 2
    assert summary["root_cause"]["rank"] == 1
    assert summary["root_cause"]["error_type"] == "ValueError"
    assert (
        "failed after 2 attempt(s): rank 1 (node 0) exit code 1: ValueError: bad batch shape" in proc.stderr
    )
    status = run_orch("status", str(tmp_path / "runs" / "failing"), "--json")
    assert json.loads(status.stdout)["state"] == "failed"


def _start_run(cfg: Path, run_id: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        orch_cmd("run", str(cfg), "--run-id", run_id, "--quiet", *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _committed(run_dir: Path) -> list[int]:
    ckpt = run_dir / "ckpt"
    if not ckpt.exists():
        return []
    return sorted(
        int(p.name[5:]) for p in ckpt.iterdir() if p.name.startswith("step-") and ".tmp-" not in p.name
    )


@MODES
def test_sigkilled_rank_restarts_from_last_checkpoint(tmp_path: Path, mode: str) -> None:
    args = ["--steps", "120", "--step-sleep", "0.03", "--log-every", "10"]
    # The uninterrupted reference run.
    ref_cfg = write_config(tmp_path / "ref", TRAIN, args=args) if (tmp_path / "ref").mkdir() is None else None
    ref = run_orch("run", str(ref_cfg), "--run-id", "ref", "--quiet")
    assert ref.returncode == 0, ref.stderr
    ref_step, ref_digest = _final_digest(tmp_path / "ref" / "runs" / "ref")

    cfg = write_config(tmp_path, TRAIN, args=args, launch={"mode": mode})
    run_dir = tmp_path / "runs" / "killed"
    proc = _start_run(cfg, "killed")
    try:
        first = wait_for(lambda: _committed(run_dir), 90, "a committed checkpoint")[0]
        pids = next(e["pids"] for e in read_events(run_dir) if e["event"] == "attempt_started")
        os.kill(pids[1], signal.SIGKILL)
        out, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    events = read_events(run_dir)
    ended = [e for e in events if e["event"] == "attempt_ended"]
    assert [e["status"] for e in ended] == ["failed", "succeeded"]
    assert ended[0]["root_cause"]["rank"] == 1 and ended[0]["root_cause"]["exitcode"] == -signal.SIGKILL
    resumed = (run_dir / "logs" / "attempt-1" / "rank-0.log").read_text()
    resumed_step = int(resumed.split("resumed from step ")[1].split()[0])
    assert resumed_step >= first
    assert "rank 1 (node 0) killed by SIGKILL" in err
    # Same world size, resumed from a committed checkpoint: the same final weights, bit for bit.
    assert _final_digest(run_dir) == (ref_step, ref_digest)
    # The goodput ledger accounts for the whole wall time and shows the failure's cost.
    g = json.loads(run_orch("status", str(run_dir), "--json").stdout)["goodput"]
    assert [a["status"] for a in g["attempts"]] == ["failed", "succeeded"]
    assert g["lost_s"]["lost_work"] > 0 and g["lost_s"]["startup"] > 0 and g["lost_s"]["backoff"] > 0
    assert abs(g["productive_s"] + sum(g["lost_s"].values()) - g["wall_s"]) < 0.01
    assert 0 < g["goodput"] < 1


def _run_processes(root_pid: int) -> list[psutil.Process]:
    return psutil.Process(root_pid).children(recursive=True)


@MODES
def test_sigkill_of_supervisor_leaves_no_rank_alive(tmp_path: Path, mode: str) -> None:
    cfg = write_config(tmp_path, TEST_JOBS / "sleeper.py", launch={"mode": mode})
    run_dir = tmp_path / "runs" / "orphans"
    proc = _start_run(cfg, "orphans")
    try:
        wait_for(
            lambda: (
                all(
                    "ready" in (run_dir / "logs" / "attempt-0" / f"rank-{r}.log").read_text()
                    for r in range(2)
                )
                if (run_dir / "logs" / "attempt-0" / "rank-1.log").exists()
                else False
            ),
            60,
            "ranks ready",
        )
        procs = _run_processes(proc.pid)
        # two ranks, each with a child, and the reaper
        assert len(procs) >= 5, procs
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=5)
        t0 = time.monotonic()
        gone, alive = psutil.wait_procs(procs, timeout=5)
        assert not alive, f"survived {time.monotonic() - t0:.1f}s after SIGKILL of the supervisor: {alive}"
    finally:
        proc.kill()
        for p in _run_processes(proc.pid) if psutil.pid_exists(proc.pid) else []:
            p.kill()


@MODES
def test_sigint_stops_every_rank(tmp_path: Path, mode: str) -> None:
    cfg = write_config(tmp_path, TEST_JOBS / "sleeper.py", restart={"stop_grace_s": 2}, launch={"mode": mode})
    run_dir = tmp_path / "runs" / "interrupted"
    proc = _start_run(cfg, "interrupted", "--json")
    wait_for(
        lambda: (
            (run_dir / "logs" / "attempt-0" / "rank-1.log").exists()
            and "ready" in (run_dir / "logs" / "attempt-0" / "rank-1.log").read_text()
        ),
        60,
        "ranks ready",
    )
    procs = _run_processes(proc.pid)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert json.loads(out)["status"] == "stopped"
    gone, alive = psutil.wait_procs(procs, timeout=5)
    assert not alive
    assert read_events(run_dir)[-1]["event"] == "run_finished"
