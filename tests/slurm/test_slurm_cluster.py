"""The slurm backend on a real cluster (3 slurmd nodes): multi-node DDP, the env contract,
preemption in each of its forms with exact resume, failures inside the allocation."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.contract import CONTRACT_VARS

from ..conftest import JOBS, TEST_JOBS, orch_cmd, read_events, run_orch, wait_for, write_config
from .conftest import status, submit, wait_final

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("slurm_cluster")]

TRAIN_ARGS = ["--steps", "120", "--log-every", "5", "--step-sleep", "0.08", "--dataset-size", "1024"]


def slurm_config(tmp_path: Path, script: Path, args: list[str], **sections) -> Path:
    base = {
        "backend": "slurm",
        "resources": {"nodes": 3, "ranks_per_node": 2, "cpus_per_rank": 1, "time_limit": "10"},
        "storage": {"checkpoint_interval": 20},
        "slurm": {"partition": "debug", "signal_lead_s": 30, "max_requeues": 3},
    }
    for key, value in sections.items():
        base.setdefault(key, {}).update(value)
    return write_config(tmp_path, script, args=args, **base)


def rank0_step(run_dir: Path) -> int:
    steps = [0]
    for path in (run_dir / "logs").glob("attempt-*/rank-0.log"):
        for line in path.read_text().splitlines():
            if line.startswith("step "):
                steps.append(int(line.split()[1].split("/")[0]))
    return max(steps)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[int, str]:
    """The uninterrupted 3 x 2 run: the example job succeeds on the cluster; its final digest
    is what every interrupted run must end with."""
    tmp = tmp_path_factory.mktemp("slurm-ref")
    cfg = slurm_config(tmp, JOBS / "train_ddp.py", TRAIN_ARGS)
    submit(cfg, "ref")
    st = wait_final(cfg, "ref")
    assert st["state"] == "succeeded" and st["attempts"] == 1, st
    assert st["slurm_state"] == "COMPLETED"
    assert sorted(p.name for p in (tmp / "runs" / "ref" / "logs" / "attempt-0").glob("rank-*.log")) == [
        f"rank-{r}.log" for r in range(6)
    ]
    return st["newest_checkpoint"], st["newest_checkpoint_digest"]


def test_multinode_ranks_see_the_same_contract_as_local(tmp_path, reference):
    cfg = slurm_config(tmp_path, TEST_JOBS / "env_dump.py", ["--flag", "two words"])
    submit(cfg, "env")
    assert wait_final(cfg, "env")["state"] == "succeeded"
    run_dir = tmp_path / "runs" / "env"
    for rank in range(6):
        seen = json.loads((run_dir / f"env-{rank}.json").read_text())
        node, local = divmod(rank, 2)
        expected = {
            "RANK": str(rank),
            "LOCAL_RANK": str(local),
            "WORLD_SIZE": "6",
            "LOCAL_WORLD_SIZE": "2",
            "NODE_RANK": str(node),
            "GROUP_RANK": str(node),
            "NNODES": "3",
            "TORCHELASTIC_RESTART_COUNT": "0",
            "ROLE_RANK": str(rank),
            "ROLE_NAME": "default",
            "ROLE_WORLD_SIZE": "6",
            "GROUP_WORLD_SIZE": "3",
            "TORCHELASTIC_RUN_ID": "env",
            "TORCHELASTIC_MAX_RESTARTS": "2",
            "TORCHELASTIC_USE_AGENT_STORE": "False",
            "ORCH_RUN_ID": "env",
            "ORCH_RUN_DIR": str(run_dir),
            "ORCH_ATTEMPT": "0",
        }
        host_and_port = {"MASTER_ADDR", "MASTER_PORT"}
        assert {k: seen[k] for k in CONTRACT_VARS if k not in host_and_port} == expected
        assert seen["torchelastic_launched"] is True
        assert seen["MASTER_ADDR"] == "n1" and int(seen["MASTER_PORT"]) > 0
        assert seen["all_reduce"] == sum(range(1, 7)) and seen["argv"] == ["--flag", "two words"]
        assert (
            seen["slurm"]["SLURM_PROCID"],
            seen["slurm"]["SLURM_LOCALID"],
            seen["slurm"]["SLURM_NODEID"],
        ) == (str(rank), str(local), str(node))
    # Each node's agent forked its two ranks from one fork server.
    for node in range(3):
        text = (run_dir / "logs" / "attempt-0" / f"node-{node}.log").read_text()
        assert f"forked ranks {2 * node}-{2 * node + 1}" in text and "fork server ready" in text, text


# What differs between two steps of any kind: the job, the step's ports, the task's pid (under
# the node agent, the agent's: the process Slurm started).
PER_STEP_VARS = {
    "SLURM_JOB_ID",
    "SLURM_JOBID",
    "SLURM_STEP_LAUNCHER_PORT",
    "SLURM_SRUN_COMM_PORT",
    "SLURM_TASK_PID",
}


def test_forked_ranks_see_what_one_task_per_rank_sees(tmp_path):
    """The node agent's ranks get the same SLURM_* variables (and contract) as ranks started
    as one srun task each (launch.mode subprocess)."""
    seen = {}
    for mode in ("auto", "subprocess"):
        (tmp_path / mode).mkdir()
        cfg = slurm_config(tmp_path / mode, TEST_JOBS / "env_dump.py", [], launch={"mode": mode})
        submit(cfg, mode)
        assert wait_final(cfg, mode)["state"] == "succeeded"
        seen[mode] = [
            json.loads((tmp_path / mode / "runs" / mode / f"env-{rank}.json").read_text())
            for rank in range(6)
        ]
    assert not list(
        (tmp_path / "subprocess" / "runs" / "subprocess" / "logs" / "attempt-0").glob("node-*.log")
    )
    for mode, launcher in (("auto", "node-agent"), ("subprocess", "task-per-rank")):
        assert [
            e["launcher"]
            for e in read_events(tmp_path / mode / "runs" / mode)
            if e["event"] == "attempt_started"
        ] == [launcher]
    for forked, task in zip(seen["auto"], seen["subprocess"], strict=True):
        drop = lambda env: {k: v for k, v in env.items() if k not in PER_STEP_VARS}  # noqa: E731
        assert drop(forked["slurm"]) == drop(task["slurm"])
        per_run = ("MASTER_PORT", "ORCH_RUN_ID", "ORCH_RUN_DIR", "TORCHELASTIC_RUN_ID")
        assert {k: forked[k] for k in CONTRACT_VARS if k not in per_run} == {
            k: task[k] for k in CONTRACT_VARS if k not in per_run
        }


def _interrupt_and_check(tmp_path, reference, run_id, interrupt, **sections) -> dict:
    cfg = slurm_config(tmp_path, JOBS / "train_ddp.py", TRAIN_ARGS, **sections)
    job = submit(cfg, run_id)
    run_dir = tmp_path / "runs" / run_id
    wait_for(lambda: rank0_step(run_dir) >= 30, 120, "training past step 30")
    interrupt(job)
    st = wait_final(cfg, run_id, timeout=300)
    assert st["state"] == "succeeded", st
    kinds = [e["event"] for e in read_events(run_dir)]
    assert kinds.count("job_started") >= 2, kinds  # a second incarnation ran
    assert (st["newest_checkpoint"], st["newest_checkpoint_digest"]) == reference
    # The ledger counts the requeue's wait in the queue (Slurm restarts a requeued job after ~10 s).
    assert st["goodput"]["lost_s"]["queue"] > 5 and 0 < st["goodput"]["goodput"] < 1
    return st


def test_signal_warning_checkpoints_requeues_and_resumes(tmp_path, reference):
    def warn(job):
        subprocess.run(["scancel", "--signal=USR2", job], check=True)

    _interrupt_and_check(tmp_path, reference, "warned", warn)
    events = read_events(tmp_path / "runs" / "warned")
    preempted = [e for e in events if e["event"] == "preempted"]
    assert preempted and preempted[0]["checkpoint"] >= 30
    resumed = [e for e in events if e["event"] == "attempt_started"][-1]
    assert resumed["newest_checkpoint"] == preempted[0]["checkpoint"]  # resumed from the agreed step


def test_scontrol_requeue_from_outside_resumes(tmp_path, reference):
    _interrupt_and_check(
        tmp_path, reference, "requeued", lambda job: subprocess.run(["scontrol", "requeue", job], check=True)
    )


def test_partition_preemption_resumes(tmp_path, reference):
    def preempt(job):
        urgent = subprocess.run(
            [
                "sbatch",
                "--parsable",
                "-p",
                "urgent",
                "-N",
                "3",
                "--exclusive",
                "-o",
                "/dev/null",
                "--wrap",
                "sleep 2",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        assert urgent.stdout.strip()

    _interrupt_and_check(tmp_path, reference, "preempted", preempt)


@pytest.mark.timeout(600)
def test_time_limit_checkpoints_and_requeues_until_done(tmp_path):
    # ~100 s of training under a 2 minute limit with a 20 s lead. Slurm checks limits about
    # once a minute and rather warns early, so the warning lands 40-100 s after the start:
    # always before the end of training. Each incarnation is warned, checkpoints and is
    # requeued; a later one finishes. A warning that lands while the ranks still import torch
    # must be kept, not lost (tests/processes/test_early_stop_signal.py): a lost one runs the job into
    # its time limit, which Slurm ends as TIMEOUT.
    args = ["--steps", "250", "--dataset-size", "1024"]
    cfg = slurm_config(
        tmp_path,
        JOBS / "train_ddp.py",
        [*args, "--log-every", "5", "--step-sleep", "0.4"],
        resources={"time_limit": "2"},
        slurm={"signal_lead_s": 20, "max_requeues": 6},
    )
    submit(cfg, "limited")
    # Meanwhile the same job, uninterrupted, on the local backend with the same world size.
    (tmp_path / "local").mkdir()
    local_cfg = write_config(
        tmp_path / "local",
        JOBS / "train_ddp.py",
        args=[*args, "--log-every", "100"],
        resources={"nodes": 3, "ranks_per_node": 2},
        storage={"checkpoint_interval": 125},
    )
    local = run_orch("run", str(local_cfg), "--run-id", "uninterrupted", "--quiet", "--json")
    assert local.returncode == 0, local.stderr
    expected = json.loads(run_orch("status", "uninterrupted", "--config", str(local_cfg), "--json").stdout)
    st = wait_final(cfg, "limited", timeout=540)
    events = read_events(tmp_path / "runs" / "limited")
    assert st["state"] == "succeeded", (
        st,
        [e for e in events if e["event"] in ("attempt_ended", "preempted", "requeued", "run_finished")],
    )
    assert sum(e["event"] == "requeued" for e in events) >= 1
    assert (st["newest_checkpoint"], st["newest_checkpoint_digest"]) == (
        250,
        expected["newest_checkpoint_digest"],
    )


@pytest.mark.parametrize("mode", ["auto", "subprocess"])
def test_warning_while_ranks_import_is_kept(tmp_path, mode):
    # The warning lands just after the step's tasks start (all their logs exist, plus 0.5 s for
    # the scripts' hop), while torch is still being imported: by the node agents' fork servers
    # (auto), or by each rank (subprocess).
    cfg = slurm_config(
        tmp_path,
        JOBS / "train_ddp.py",
        ["--steps", "30", "--log-every", "5", "--dataset-size", "256"],
        storage={"checkpoint_interval": 10},
        launch={"mode": mode},
    )
    job = submit(cfg, "early")
    run_dir = tmp_path / "runs" / "early"
    task_logs = [f"node-{n}.log" for n in range(3)] if mode == "auto" else [f"rank-{r}.log" for r in range(6)]
    logs = [run_dir / "logs" / "attempt-0" / name for name in task_logs]
    wait_for(lambda: all(log.exists() for log in logs), 120, "the step's tasks")
    time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    st = wait_final(cfg, "early")
    events = read_events(run_dir)
    assert st["state"] == "succeeded", st
    assert [e["status"] for e in events if e["event"] == "attempt_ended"] == ["preempted", "succeeded"]
    # Delivered when the handler was installed: the flag is set at step 1's end and the
    # ranks' vote on it read at step 2's, so they stop at step 2.
    assert [e["checkpoint"] for e in events if e["event"] == "preempted"] == [2]
    assert st["newest_checkpoint"] == 30


def test_requeues_are_bounded(tmp_path):
    cfg = slurm_config(
        tmp_path,
        JOBS / "train_ddp.py",
        ["--steps", "400", "--log-every", "5", "--step-sleep", "0.25"],
        slurm={"max_requeues": 0},
    )
    job = submit(cfg, "bounded")
    wait_for(lambda: rank0_step(tmp_path / "runs" / "bounded") >= 10, 120, "training")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    st = wait_final(cfg, "bounded")
    assert st["state"] == "failed"
    finished = [e for e in read_events(tmp_path / "runs" / "bounded") if e["event"] == "run_finished"][-1]
    assert "no requeues left" in finished["reason"]


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent-agents", "step-per-attempt"])
def test_rank_crash_restarts_the_ranks(tmp_path, persistent):
    cfg = slurm_config(
        tmp_path,
        TEST_JOBS / "fail.py",
        [],
        job={"env": {"FAIL_ONLY_ATTEMPT": "0", "FAIL_RANK": "3"}},
        restart={"max_restarts": 2, "backoff_s": 0.5},
        slurm={"persistent_agents": persistent},
    )
    submit(cfg, "crash-once")
    st = wait_final(cfg, "crash-once")
    assert st["state"] == "succeeded" and st["attempts"] == 2, st
    run_dir = tmp_path / "runs" / "crash-once"
    events = read_events(run_dir)
    ended = [e for e in events if e["event"] == "attempt_ended"]
    assert ended[0]["status"] == "failed" and ended[0]["root_cause"]["rank"] == 3
    # Persistent agents: the restart was a message to the same agents (one srun step for the
    # allocation); otherwise each attempt had a step, and so agents, of its own.
    started = [e.get("agent_step") for e in events if e["event"] == "attempt_started"]
    assert started == (["new", "kept"] if persistent else [None, None]), started
    agents = [
        {
            json.loads((run_dir / "logs" / f"attempt-{a}" / f"node-{n}.agent.json").read_text())["pid"]
            for n in range(3)
        }
        for a in (0, 1)
    ]
    assert (agents[0] == agents[1]) is persistent, agents


def test_crash_loop_fails_with_root_cause(tmp_path):
    cfg = slurm_config(
        tmp_path,
        TEST_JOBS / "fail.py",
        [],
        job={"env": {"FAIL_RANK": "4", "FAIL_WITH": "loss is nan"}},
        restart={"max_restarts": 10, "backoff_s": 0.2},
    )
    submit(cfg, "looping")
    st = wait_final(cfg, "looping")
    assert st["state"] == "failed" and st["attempts"] == 3, st
    assert st["root_cause"]["rank"] == 4 and st["root_cause"]["message"] == "ValueError: loss is nan"
    text = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "status", str(tmp_path / "runs" / "looping")],
        capture_output=True,
        text=True,
    ).stdout
    assert "root cause rank 4" in text and "loss is nan" in text


def test_non_retryable_error_fails_at_once(tmp_path):
    cfg = slurm_config(
        tmp_path,
        TEST_JOBS / "fail.py",
        [],
        job={"env": {"FAIL_RANK": "0", "FAIL_TYPE": "NameError", "FAIL_WITH": "name 'lr' is not defined"}},
        restart={"max_restarts": 5},
    )
    submit(cfg, "usererror")
    st = wait_final(cfg, "usererror")
    assert st["state"] == "failed" and st["attempts"] == 1
    assert st["root_cause"]["message"] == "NameError: name 'lr' is not defined"


def test_a_job_that_cannot_start_is_said_once_and_not_retried(tmp_path):
    # Every rank fails to import a module before it could import the runtime (issue 27.9): the
    # node agents' fork servers run the job through orchestrator.launch.entry, which records the
    # error; the supervisor holds its STOP to the other node (policy.settle_before_stop), so the
    # failure is seen on both nodes, and the one policy gives up. (A step per attempt, mode
    # subprocess, cannot hold it: srun's --kill-on-bad-exit stops the other node at once.)
    cfg = slurm_config(
        tmp_path,
        TEST_JOBS / "cannot_start.py",
        [],
        resources={"nodes": 2, "ranks_per_node": 1},
        restart={"max_restarts": 5, "backoff_s": 0.2},
        launch={"mode": "auto"},
    )
    submit(cfg, "nostart")
    st = wait_final(cfg, "nostart")
    assert st["state"] == "failed" and st["attempts"] == 1, st
    assert st["root_cause"]["message"].startswith("ModuleNotFoundError: No module named"), st
    events = read_events(tmp_path / "runs" / "nostart")
    assert "cannot start" in next(e for e in events if e["event"] == "giving_up")["reason"]
    assert not [e for e in events if e["event"] == "restart_scheduled"]
    text = run_orch("status", "nostart", "--config", str(cfg)).stdout
    assert f"at {TEST_JOBS / 'cannot_start.py'}:4" in text, text


def test_lead_time_shorter_than_checkpoint_time_is_reported(tmp_path):
    cfg = slurm_config(
        tmp_path,
        JOBS / "train_ddp.py",
        ["--steps", "20", "--log-every", "5"],
        job={"env": {"ORCH_FAULT": "ckpt.file_written:sleep=3"}},
        storage={"checkpoint_interval": 10},
        slurm={"signal_lead_s": 2},
    )
    submit(cfg, "slowsave")
    st = wait_final(cfg, "slowsave")
    assert st["state"] == "succeeded"
    assert any(
        "signal_lead_s=2 is shorter than the last checkpoint's write time" in w for w in st["warnings"]
    ), st["warnings"]


def test_logs_and_cancel_from_the_login_node(tmp_path):
    cfg = slurm_config(
        tmp_path, JOBS / "train_ddp.py", ["--steps", "2000", "--log-every", "5", "--step-sleep", "0.1"]
    )
    job = submit(cfg, "cancelme")
    run_dir = tmp_path / "runs" / "cancelme"
    wait_for(lambda: rank0_step(run_dir) >= 10, 120, "training")
    st = status(cfg, "cancelme")
    assert st["state"] == "running" and st["current_attempt"] == 0 and st["job_id"] == job
    logs = run_orch("logs", "cancelme", "--config", str(cfg), "--rank", "0")
    assert logs.returncode == 0 and "[rank 0] step 5/2000" in logs.stdout
    assert run_orch("cancel", "cancelme", "--config", str(cfg)).returncode == 0
    st = wait_final(cfg, "cancelme", timeout=120)
    assert st["state"] == "cancelled" and st["slurm_state"] == "CANCELLED", st
    # Slurm's SIGTERM for a cancel looks like a preemption's: the supervisor must not requeue.
    events = wait_for(
        lambda: [e for e in read_events(run_dir) if e["event"] == "run_finished"] and read_events(run_dir),
        60,
        "the supervisor's run_finished",
    )
    assert "requeued" not in [e["event"] for e in events]
    assert [e["status"] for e in events if e["event"] == "run_finished"] == ["cancelled"]


def test_hung_rank_inside_the_allocation_is_dumped_and_restarted(tmp_path):
    cfg = slurm_config(
        tmp_path,
        TEST_JOBS / "hang.py",
        [],
        job={"env": {"HANG_HOW": "stop", "HANG_RANK": "3", "HANG_STEP": "10"}},
        storage={"checkpoint_interval": 5},
        watchdog={"hang_timeout_s": 4},
        restart={"max_restarts": 2, "backoff_s": 0.2},
    )
    submit(cfg, "hung")
    st = wait_final(cfg, "hung")
    assert st["state"] == "succeeded" and st["attempts"] == 2, st
    run_dir = tmp_path / "runs" / "hung"
    hang = [e for e in read_events(run_dir) if e["event"] == "hang_detected"]
    assert len(hang) == 1 and 3 in hang[0]["silent_ranks"] and hang[0]["step"] == 10
    assert "most recent call first" in (run_dir / "logs" / "attempt-0" / "rank-3.log").read_text()
    ended = [e for e in read_events(run_dir) if e["event"] == "attempt_ended"]
    assert ended[0]["root_cause"]["error_type"] == "Hang"


def test_a_cancelled_run_resumes_as_a_new_submission(tmp_path, reference):
    # orch cancel -> status "cancelled" (no root cause) -> orch resume: a new Slurm job of the
    # same run, from the checkpoint the cancel saved, ending in the uninterrupted weights.
    cfg = slurm_config(tmp_path, JOBS / "train_ddp.py", TRAIN_ARGS)
    first_job = submit(cfg, "again")
    run_dir = tmp_path / "runs" / "again"
    wait_for(lambda: rank0_step(run_dir) >= 30, 120, "training past step 30")
    cancel = run_orch("cancel", "again", "--config", str(cfg))
    assert cancel.returncode == 0, cancel.stderr
    st = wait_final(cfg, "again")
    assert st["state"] == "cancelled" and st["root_cause"] is None, st
    stopped_at = st["newest_checkpoint"]
    assert stopped_at is not None and stopped_at >= 20
    resumed = run_orch("resume", "again", "--config", str(cfg), "--json")
    assert resumed.returncode == 0, resumed.stderr
    second_job = json.loads(resumed.stdout)["job_id"]
    assert second_job != first_job
    st = wait_final(cfg, "again")
    assert st["state"] == "succeeded" and st["job_id"] == second_job, st
    assert (st["newest_checkpoint"], st["newest_checkpoint_digest"]) == reference
    restored = [e for e in read_events(run_dir) if e["event"] == "restored"]
    assert restored[-1]["step"] == stopped_at


def test_quick_start_submission_without_a_config_file(tmp_path):
    # `orch submit` torchrun-style: a module, nodes and ranks per node on the command line, the
    # job's own arguments after `--`; runs under ./runs of the working directory.
    import shutil

    shutil.copy(TEST_JOBS / "env_dump.py", tmp_path / "dump.py")
    proc = subprocess.run(
        orch_cmd(
            "submit", "--backend", "slurm", "--nnodes", "2", "--nproc-per-node", "2",
            "--set", "slurm.partition=debug", "--run-id", "quick", "-m", "dump", "--json",
            "--", "--flag", "x y",
        ),
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "runs" / "quick"
    cfg = tmp_path / "none.yaml"  # no config: the runs are under ./runs
    wait_for(lambda: (run_dir / "env-3.json").exists(), 240, "the four ranks' env files")
    seen = json.loads((run_dir / "env-3.json").read_text())
    assert seen["WORLD_SIZE"] == "4" and seen["NNODES"] == "2" and seen["argv"] == ["--flag", "x y"]
    st = subprocess.run(
        orch_cmd("status", "quick", "--config", str(cfg), "--json"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert st.returncode == 0 and json.loads(st.stdout)["backend"] == "slurm", st.stderr
