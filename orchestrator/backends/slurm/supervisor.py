"""The supervisor inside a Slurm allocation (the batch step, first node).

submitit calls `supervise(run_url)` in the batch step; a requeued job calls it again. Each
attempt is one `srun` step: one node agent per node, which forks that node's ranks
(orchestrator/backends/slurm/node_agent.py), or with `launch.mode: subprocess` one task per rank. Outcomes:

- every rank exits 0                 -> succeeded
- the step exits 75 (preempted)      -> ranks checkpointed on a signal: `scontrol requeue`
                                        (bounded by slurm.max_requeues); the next incarnation
                                        resumes from that checkpoint
- anything else                      -> failed attempt: a new srun step from the newest
                                        checkpoint while restarts remain, unless the error is
                                        not retryable (a user error) or attempts make no
                                        progress (no new checkpoint: a crash loop)
"""

from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from orchestrator.backends.slurm.scheduler import step_argv, step_env, uses_node_agent
from orchestrator.storage.ckpt_store import newest_committed
from orchestrator.spec.config import ClusterConfig, parse_config
from orchestrator.contract import PREEMPTED_EXIT_CODE, PREEMPTED_TYPE
from orchestrator.backends.slurm.hostlist import expand_hostlist
from orchestrator.spec.plan import rank_files
from orchestrator.launch.ports import lease_port
from orchestrator.storage.rundir import RunDir
from orchestrator.supervision.failures import classify, is_peer_loss
from orchestrator.backends.local.supervisor import STACK_DUMP_WAIT_S, WATCHDOG_PERIOD_S, read_error_file
from orchestrator.supervision.watchdog import read_heartbeat, silent_ranks



def load_run_config(run: RunDir) -> ClusterConfig:
    data = run.read_run_config()
    return parse_config(data["config"], source="run.yaml", base_dir=data.get("base_dir", "."), check_files=False)


def _log(text: str) -> None:
    print(f"[orch.slurm] {time.strftime('%H:%M:%S')} {text}", flush=True)


def root_cause(log_dir: str, step_code: int) -> dict[str, Any]:
    """The earliest real error among the ranks' error files, else the step's exit code."""
    errors = []
    for path in glob.glob(os.path.join(log_dir, "rank-*.error.json")):
        err = read_error_file(path)
        if err:
            rank = int(os.path.basename(path).split("-")[1].split(".")[0])
            errors.append({"rank": rank, "error_type": err.get("type"), "message": f"{err.get('type')}: {err.get('message')}"[:500], "time": err.get("time", 0), "exitcode": step_code})
    preempted = [e for e in errors if e["error_type"] == PREEMPTED_TYPE]
    real = [e for e in errors if e["error_type"] != PREEMPTED_TYPE]
    if preempted and not [e for e in real if not is_peer_loss(e["message"])]:
        return min(preempted, key=lambda e: e["time"])  # a stop on request, not a crash
    primary = [e for e in real if not is_peer_loss(e["message"])] or real
    if primary:
        return min(primary, key=lambda e: e["time"])
    how = f"killed by {signal.Signals(-step_code).name}" if step_code < 0 else f"exit code {step_code}"
    message = f"srun step {how}"
    agent_error = _node_agent_error(log_dir)
    if agent_error:
        message += f"; {agent_error}"
    return {"rank": None, "error_type": None, "message": message[:500], "time": time.time(), "exitcode": step_code}


def _node_agent_error(log_dir: str) -> str | None:
    """The exception of the last traceback in the first node agent log that has one: where an
    agent that failed before its ranks existed says why."""
    for path in sorted(glob.glob(os.path.join(log_dir, "node-*.log"))):
        try:
            with open(path, "rb") as fh:
                fh.seek(max(0, os.path.getsize(path) - 8192))
                lines = fh.read().decode("utf-8", "replace").splitlines()
        except OSError:
            continue
        starts = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
        if not starts:
            continue
        # The exception line is the first one after the traceback's header that is not indented.
        for line in lines[starts[-1] + 1:]:
            if line.strip() and not line[0].isspace():
                return f"{os.path.basename(path)}: {line.strip()}"
    return None


def _newest_step(run: RunDir) -> int | None:
    info = newest_committed(run.child("ckpt"))
    return info.step if info else None


def _checkpoint_seconds(run: RunDir) -> float | None:
    """The longest checkpoint write this run has recorded."""
    times = [float(e["write_s"]) for e in run.events() if e.get("event") == "checkpoint_committed" and "write_s" in e]
    return max(times) if times else None


_terminated = threading.Event()


def _on_sigterm(signum: int, _frame: Any) -> None:
    # Ranks get Slurm's SIGTERM themselves and checkpoint; the supervisor keeps waiting for
    # its srun step and only remembers that this incarnation is ending.
    _terminated.set()


def supervise(run_url: str) -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)  # replaces submitit's "bypass" handler
    run = RunDir(run_url)
    config = load_run_config(run)
    job_id = os.environ.get("SLURM_JOB_ID", "?")
    restart_count = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    nodes = expand_hostlist(os.environ.get("SLURM_JOB_NODELIST", socket.gethostname()))
    attempt = sum(1 for e in run.events() if e.get("event") == "attempt_started")
    run.append_event("job_started", job_id=job_id, restart_count=restart_count, host=socket.gethostname(), pid=os.getpid(), nodes=nodes, backend="slurm")
    _log(f"job {job_id} (requeue {restart_count}) on {','.join(nodes)}; next attempt {attempt}")
    restarts = 0
    attempts_without_progress = 0
    started = time.time()
    while True:
        before = _newest_step(run)
        code, cause = _run_attempt(run, config, attempt, nodes[0], job_id)
        after = _newest_step(run)
        _check_lead_time(run, config)
        if code == 0:
            run.append_event("run_finished", status="succeeded", attempts=attempt + 1, wall_s=round(time.time() - started, 3), newest_checkpoint=after, job_id=job_id, exit_code=0)
            _log("succeeded")
            return
        if code == PREEMPTED_EXIT_CODE:
            _requeue(run, config, job_id, restart_count, after)
            return
        if _terminated.is_set():
            # Slurm is ending this incarnation (cancel, requeue, node failure): no new step.
            run.append_event("incarnation_ended", job_id=job_id, attempt=attempt, newest_checkpoint=after)
            _log("terminated by Slurm; not starting another step")
            return
        attempts_without_progress = 0 if after != before else attempts_without_progress + 1
        verdict = None
        classified = classify(exitcode=cause.get("exitcode"), error_type=cause.get("error_type"), message=cause.get("message", ""))
        cause = {**cause, "class": classified.kind, "hint": classified.hint}
        if not classified.retryable:
            verdict = f"{cause['error_type']} is not retryable (it fails the same way every time)"
        elif 0 < config.restart.crash_loop_attempts <= attempts_without_progress:
            verdict = f"crash loop: {attempts_without_progress} attempts in a row without a new checkpoint"
        elif restarts >= config.restart.max_restarts:
            verdict = f"no restarts left ({config.restart.max_restarts} allowed)"
        if verdict:
            run.append_event("run_finished", status="failed", attempts=attempt + 1, wall_s=round(time.time() - started, 3), newest_checkpoint=after, root_cause=cause, reason=verdict, job_id=job_id, exit_code=1)
            _log(f"failed: {verdict}; root cause: {cause['message']}")
            raise RuntimeError(f"run failed: {verdict}; root cause rank {cause['rank']}: {cause['message']}")
        restarts += 1
        delay = min(config.restart.backoff_max_s, config.restart.backoff_s * 2 ** (restarts - 1))
        run.append_event("restart_scheduled", attempt=attempt + 1, backoff_s=delay, restarts_used=restarts)
        _log(f"attempt {attempt} failed ({cause['message']}); restart {restarts}/{config.restart.max_restarts} in {delay:.1f}s")
        time.sleep(delay)
        attempt += 1


def _run_attempt(run: RunDir, config: ClusterConfig, attempt: int, master_addr: str, job_id: str) -> tuple[int, dict[str, Any]]:
    log_dir = run.logs_dir(attempt)
    with lease_port() as lease:  # on the first node, where rank 0 binds it
        env = {**os.environ, **step_env(config, run_id=run.run_id, run_dir=run.url, attempt=attempt, master_addr=master_addr, master_port=lease.port, log_dir=log_dir)}
        # srun must not inherit the batch step's own task layout.
        for key in ("SLURM_NTASKS", "SLURM_NPROCS", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_CPUS_PER_TASK"):
            env.pop(key, None)
        argv = step_argv(config, log_dir=log_dir, attempt=attempt, python=sys.executable)
        launcher = "node-agent" if uses_node_agent(config) else "task-per-rank"
        run.append_event("attempt_started", attempt=attempt, job_id=job_id, master_addr=master_addr, master_port=lease.port, launcher=launcher, newest_checkpoint=_newest_step(run))
        t0 = time.time()
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)
        code, hang = _wait(proc, run, config, log_dir, job_id)
    cause = hang or ({} if code == 0 else root_cause(log_dir, code))
    if code != 0 and (code == PREEMPTED_EXIT_CODE or cause.get("error_type") == PREEMPTED_TYPE):
        code, cause = PREEMPTED_EXIT_CODE, {}
    status = "succeeded" if code == 0 else ("preempted" if code == PREEMPTED_EXIT_CODE else "failed")
    run.append_event("attempt_ended", attempt=attempt, status=status, exit_code=code, duration_s=round(time.time() - t0, 3), root_cause=cause or None)
    return code, cause


def _wait(proc: subprocess.Popen, run: RunDir, config: ClusterConfig, log_dir: str, job_id: str) -> tuple[int, dict[str, Any] | None]:
    """Wait for the srun step, watching the ranks' heartbeats (on the shared run directory)."""
    n = config.resources.world_size
    beats = {rank: rank_files(log_dir, rank)[1] for rank in range(n)}
    while True:
        try:
            return proc.wait(timeout=WATCHDOG_PERIOD_S), None
        except subprocess.TimeoutExpired:
            pass
        silent = silent_ranks(config.watchdog, {r: read_heartbeat(p) for r, p in beats.items()}, time.time())
        if not silent:
            continue
        culprit = silent[0]
        run.append_event("hang_detected", **culprit.event(silent))
        _log(f"rank {culprit.rank} silent for {culprit.silent_s:.1f}s at step {culprit.step}: dumping stacks, restarting the step")
        step_id = _step_id(job_id, proc)
        for sig in ("CONT", "USR1"):  # wake a stopped rank, then faulthandler dumps its stacks
            subprocess.run(["scancel", f"--signal={sig}", step_id], capture_output=True, timeout=30)
        time.sleep(STACK_DUMP_WAIT_S)
        subprocess.run(["scancel", step_id], capture_output=True, timeout=30)
        try:
            code = proc.wait(timeout=config.restart.stop_grace_s + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        return (code if code != 0 else 1), {"rank": culprit.rank, "error_type": "Hang", "message": f"Hang: {culprit.message}", "time": time.time(), "exitcode": code}


def _step_id(job_id: str, proc: subprocess.Popen) -> str:
    """JOB.STEP of our srun (the newest running step of this job)."""
    out = subprocess.run(["squeue", "-h", "-s", "-j", job_id, "-o", "%i"], capture_output=True, text=True, timeout=30).stdout.split()
    steps = sorted((s for s in out if s.split(".")[-1].isdigit()), key=lambda s: int(s.split(".")[-1]))
    return steps[-1] if steps else job_id


def _requeue(run: RunDir, config: ClusterConfig, job_id: str, restart_count: int, step: int | None) -> None:
    run.append_event("preempted", job_id=job_id, checkpoint=step)
    if restart_count >= config.slurm.max_requeues:
        run.append_event("run_finished", status="failed", reason=f"preempted with no requeues left ({config.slurm.max_requeues})", newest_checkpoint=step, job_id=job_id, exit_code=1)
        raise RuntimeError("preempted with no requeues left")
    proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    # Slurm's own preemption requeues the job itself; then our request is refused: fine.
    run.append_event("requeued", job_id=job_id, checkpoint=step, by="orch" if proc.returncode == 0 else "slurm", detail=proc.stderr.strip()[:200])
    _log(f"checkpointed at step {step}; requeued ({proc.stderr.strip() or 'ok'})")
    # Slurm ends this incarnation now (SIGTERM, then SIGKILL after KillWait); leave at the
    # SIGTERM instead of lingering until the SIGKILL.
    _terminated.wait(600)


def _check_lead_time(run: RunDir, config: ClusterConfig) -> None:
    seconds = _checkpoint_seconds(run)
    if seconds is not None and seconds > config.slurm.signal_lead_s:
        message = f"slurm.signal_lead_s={config.slurm.signal_lead_s} is shorter than the last checkpoint's write time ({seconds:.1f}s): a preemption warning may come too late to save"
        if not any(e.get("event") == "warning" and e.get("message") == message for e in run.events()):
            run.append_event("warning", message=message, checkpoint_s=seconds, signal_lead_s=config.slurm.signal_lead_s)
            _log(f"WARNING: {message}")

