"""The supervisor: runs attempts until the job succeeds, fails for good, or is stopped.

One attempt = one launch of every rank. The loop is a small state machine:

    start attempt -> watch -> (all ranks exit 0)          -> succeeded
                           -> (a rank fails)              -> stop the rest -> restart or failed
                           -> (SIGINT/SIGTERM to orch)    -> stop every rank -> stopped

A restarted attempt is a fresh set of processes with a fresh MASTER_PORT lease (no rendezvous
state is reused; see NOTES.md on torchrun's restarts) and resumes from the newest committed
checkpoint, which the runtime inside the job loads.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from orchestrator.spec.config import ClusterConfig
from orchestrator.contract import PREEMPTED_EXIT_CODE, PREEMPTED_TYPE
from orchestrator.supervision.failures import classify, is_peer_loss
from orchestrator.supervision.watchdog import read_heartbeat as heartbeat_record
from orchestrator.supervision.watchdog import silent_ranks
from orchestrator.launch.processes import AttemptGroup, Launcher, RankProcess, SubprocessLauncher
from orchestrator.launch.logstream import LogStreamer, tail_lines
from orchestrator.spec.plan import build_local_plan, rank_files, rank_files_env
from orchestrator.launch.ports import lease_port
from orchestrator.storage.rundir import RunDir, join_url, this_host


@dataclass(frozen=True)
class RankFailure:
    rank: int
    node_rank: int
    exitcode: int
    time: float
    error_type: str | None
    message: str

    @property
    def describe(self) -> str:
        how = f"killed by {signal.Signals(-self.exitcode).name}" if self.exitcode < 0 else f"exit code {self.exitcode}"
        return f"rank {self.rank} (node {self.node_rank}) {how}: {self.message}" if self.message else f"rank {self.rank} (node {self.node_rank}) {how}"

    @property
    def classified(self) -> Any:
        return classify(exitcode=self.exitcode, error_type=self.error_type, message=self.message)

    def to_json(self) -> dict[str, Any]:
        c = self.classified
        return {
            "rank": self.rank,
            "node_rank": self.node_rank,
            "exitcode": self.exitcode,
            "time": round(self.time, 6),
            "error_type": self.error_type,
            "message": self.message,
            "class": c.kind,
            "hint": c.hint,
        }


@dataclass(frozen=True)
class AttemptOutcome:
    status: str  # succeeded | failed | stopped
    root_cause: RankFailure | None
    duration_s: float


@dataclass
class RunResult:
    run_id: str
    run_dir: str
    status: str  # succeeded | failed | stopped
    attempts: int
    wall_s: float
    root_cause: RankFailure | None = None
    newest_checkpoint: int | None = None
    exit_code: int = 0


def read_error_file(path: str) -> dict[str, Any] | None:
    """The runtime's error file, or torch elastic's (`@record`) format; None if absent."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if isinstance(data.get("message"), dict):  # torch.distributed.elastic format
        inner = data["message"]
        text = str(inner.get("message", ""))
        extra = inner.get("extraInfo", {})
        error_type, _, message = text.partition(": ")
        return {"type": error_type or None, "message": message or text, "time": float(extra.get("timestamp", 0) or 0)}
    return data


def _last_error_line(lines: list[str]) -> str:
    """The line a person would read first in a crashed rank's log: the exception."""
    for line in reversed(lines):
        stripped = line.strip()
        if stripped and not stripped.startswith(("File ", "^", "~")) and ("Error" in stripped or "Exception" in stripped or ": " in stripped):
            return stripped[:500]
    return lines[-1].strip()[:500] if lines else ""


def describe_failure(proc: RankProcess, error_file: str) -> RankFailure:
    code = proc.popen.returncode
    err = read_error_file(error_file)
    if err:
        return RankFailure(
            rank=proc.spec.rank,
            node_rank=proc.spec.node_rank,
            exitcode=code,
            time=float(err.get("time") or proc.ended or time.time()),
            error_type=err.get("type"),
            message=(f"{err.get('type')}: {err.get('message')}" if err.get("type") else str(err.get("message", "")))[:500],
        )
    message = "" if code < 0 else _last_error_line(tail_lines(proc.log_path))
    return RankFailure(
        rank=proc.spec.rank,
        node_rank=proc.spec.node_rank,
        exitcode=code,
        time=proc.ended or time.time(),
        error_type=None,
        message=message,
    )


def _process_state(pid: int) -> str | None:
    """The one-letter state from /proc/PID/stat (R, S, D, T, Z...)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return None


# How often the watchdog reads heartbeats, and how long stacks get to reach the logs.
WATCHDOG_PERIOD_S = 0.5
STACK_DUMP_WAIT_S = 1.0


def backoff_delay(config: ClusterConfig, restart_number: int) -> float:
    """Seconds to wait before restart number `restart_number` (1-based)."""
    return min(config.restart.backoff_max_s, config.restart.backoff_s * (2 ** (restart_number - 1)))


@dataclass
class Supervisor:
    config: ClusterConfig
    run: RunDir
    console: TextIO = sys.stderr
    show_ranks: tuple[int, ...] | None = None
    launcher: Launcher = field(default_factory=SubprocessLauncher)
    poll_s: float = 0.05
    _stop_requested: threading.Event = field(default_factory=threading.Event, init=False)
    _stop_signal: int | None = field(default=None, init=False)

    # ------------------------------------------------------------------ signals

    def request_stop(self, signum: int) -> None:
        """What SIGINT/SIGTERM to `orch run` does: stop every rank, then return."""
        if self._stop_requested.is_set() and self._group is not None:
            self._group.signal_all(signal.SIGKILL)  # second Ctrl-C: no more grace
        self._stop_signal = signum
        self._stop_requested.set()

    _group: AttemptGroup | None = field(default=None, init=False)

    def request_preemption(self, signum: int = signal.SIGUSR2) -> None:
        """What SIGUSR2 to `orch run` does: forward it to every rank (not their children), so
        they checkpoint the same step and exit 75; a new attempt resumes from there."""
        group = self._group
        if group is None:
            return
        for proc in group.ranks:
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signum)
                except ProcessLookupError:
                    pass

    def _say(self, text: str) -> None:
        self._stream.write(f"[orch] {text}\n")

    # ------------------------------------------------------------------ the loop

    def run_all(self) -> RunResult:
        started = time.time()
        self._stream = LogStreamer(self.console, self.show_ranks)
        self._stream.start()
        cfg = self.config
        self.run.append_event(
            "run_started",
            run_id=self.run.run_id,
            host=this_host(),
            pid=os.getpid(),
            backend="local",
            launcher=self.launcher.name,
            world_size=cfg.resources.world_size,
            nnodes=cfg.resources.nodes,
            ranks_per_node=cfg.resources.ranks_per_node,
        )
        self._say(f"run {self.run.run_id}: {cfg.resources.nodes} node(s) x {cfg.resources.ranks_per_node} rank(s), run dir {self.run.url}")
        attempt = 0
        restarts = 0
        without_progress = 0
        last_checkpoint = self._newest_checkpoint()
        outcome: AttemptOutcome
        try:
            while True:
                outcome = self._run_attempt(attempt)
                if outcome.status == "preempted" and not self._stop_requested.is_set():
                    # Checkpointed on request: resume at once; not a failure, not counted,
                    # unless preemptions keep coming without any progress.
                    newest = self._newest_checkpoint()
                    without_progress = without_progress + 1 if newest == last_checkpoint else 0
                    last_checkpoint = newest
                    if 0 < cfg.restart.crash_loop_attempts <= without_progress:
                        self._say("not resuming: preempted repeatedly without a new checkpoint")
                        self.run.append_event("giving_up", reason="preempted repeatedly without a new checkpoint")
                        outcome = AttemptOutcome("failed", outcome.root_cause, outcome.duration_s)
                        break
                    self.run.append_event("requeued", attempt=attempt + 1, reason="preempted")
                    self._say(f"attempt {attempt} checkpointed and stopped (preemption); resuming")
                    attempt += 1
                    continue
                if outcome.status != "failed" or self._stop_requested.is_set():
                    break
                newest = self._newest_checkpoint()
                without_progress = without_progress + 1 if newest == last_checkpoint else 1
                last_checkpoint = newest
                verdict = self._give_up(outcome, restarts, without_progress)
                if verdict:
                    self._say(verdict)
                    self.run.append_event("giving_up", reason=verdict)
                    break
                restarts += 1
                delay = backoff_delay(cfg, restarts)
                self.run.append_event("restart_scheduled", attempt=attempt + 1, backoff_s=delay, restarts_used=restarts)
                self._say(f"restart {restarts}/{cfg.restart.max_restarts} in {delay:.1f}s from the newest committed checkpoint")
                if self._stop_requested.wait(delay):
                    outcome = AttemptOutcome("stopped", outcome.root_cause, 0.0)
                    break
                attempt += 1
        finally:
            self.launcher.close()
            self._stream.stop()
        newest = self._newest_checkpoint()
        status = "stopped" if self._stop_requested.is_set() and outcome.status != "succeeded" else outcome.status
        exit_code = 0 if status == "succeeded" else (128 + (self._stop_signal or signal.SIGTERM) if status == "stopped" else 1)
        result = RunResult(
            run_id=self.run.run_id,
            run_dir=self.run.url,
            status=status,
            attempts=attempt + 1,
            wall_s=time.time() - started,
            root_cause=outcome.root_cause if status != "succeeded" else None,
            newest_checkpoint=newest,
            exit_code=exit_code,
        )
        self.run.append_event(
            "run_finished",
            status=status,
            attempts=result.attempts,
            wall_s=round(result.wall_s, 3),
            newest_checkpoint=newest,
            root_cause=result.root_cause.to_json() if result.root_cause else None,
            exit_code=exit_code,
        )
        return result

    def _give_up(self, outcome: AttemptOutcome, restarts: int, without_progress: int) -> str | None:
        """Why not to restart after this failed attempt, or None to restart."""
        cause = outcome.root_cause
        if cause is not None and not cause.classified.retryable:
            return f"not restarting: {cause.error_type} fails the same way on every attempt ({cause.classified.hint})"
        if 0 < self.config.restart.crash_loop_attempts <= without_progress:
            return f"not restarting: crash loop ({without_progress} failed attempts in a row without a new checkpoint)"
        if restarts >= self.config.restart.max_restarts:
            return f"no restarts left ({self.config.restart.max_restarts} allowed)"
        return None

    def _newest_checkpoint(self) -> int | None:
        from orchestrator.storage.ckpt_store import CheckpointStore

        try:
            steps = CheckpointStore(join_url(self.run.url, "ckpt")).committed_steps()
        except Exception:  # noqa: BLE001 - a listing error must not hide the run's own outcome
            return None
        return steps[0] if steps else None

    def _run_attempt(self, attempt: int) -> AttemptOutcome:
        cfg = self.config
        fixed = cfg.distributed.master_port if isinstance(cfg.distributed.master_port, int) else None
        started = time.time()
        with lease_port(fixed) as lease:
            plan = build_local_plan(
                cfg,
                run_id=self.run.run_id,
                run_dir=self.run.url,
                attempt=attempt,
                master_port=lease.port,
                python=sys.executable,
            )
            logs = self.run.logs_dir(attempt)
            log_paths = [os.path.join(logs, f"rank-{s.rank}.log") for s in plan.ranks]
            error_files = [rank_files(logs, s.rank)[0] for s in plan.ranks]
            beats = {s.rank: rank_files(logs, s.rank)[1] for s in plan.ranks}
            extra = [{**rank_files_env(logs, s.rank), "ORCH_INCARNATION": str(attempt)} for s in plan.ranks]
            for s, path in zip(plan.ranks, log_paths):
                self._stream.follow(s.rank, path)
            group = self.launcher.start_attempt(plan.ranks, log_paths, extra)
            self._group = group
            if group.notice:
                self.run.append_event("launcher_notice", attempt=attempt, launcher=group.launched_by, message=group.notice)
                self._say(group.notice)
            self.run.append_event(
                "attempt_started",
                attempt=attempt,
                master_port=lease.port,
                launcher=group.launched_by,
                pids=[r.pid for r in group.ranks],
                newest_checkpoint=self._newest_checkpoint(),
            )
            how = "forked" if group.launched_by == "fork" else "started"
            self._say(f"attempt {attempt}: {how} {len(group.ranks)} rank(s), MASTER_PORT={lease.port}")
            failure_seen, hang = self._watch(group, beats)
            stopped = self._stop_requested.is_set()
            if failure_seen or stopped:
                if stopped:
                    self._say("stopping every rank")
                group.stop(cfg.restart.stop_grace_s)
            else:
                group.close()
            self._group = None
        self._stream.flush()
        failures = [
            describe_failure(r, e)
            for r, e in zip(group.ranks, error_files)
            if r.popen.returncode not in (0, None)
        ]
        root = hang or self._root_cause(failures, failure_seen)
        if stopped:
            status = "stopped"
        elif failure_seen is not None and root is not None and (root.exitcode == PREEMPTED_EXIT_CODE or root.error_type == PREEMPTED_TYPE):
            status = "preempted"
        elif failure_seen is not None or hang is not None:
            status = "failed"
        else:
            status = "succeeded"
        duration = time.time() - started
        self.run.append_event(
            "attempt_ended",
            attempt=attempt,
            status=status,
            duration_s=round(duration, 3),
            root_cause=root.to_json() if root else None,
            exit_codes={str(r.spec.rank): r.popen.returncode for r in group.ranks},
        )
        self.run.publish_logs(attempt)
        if status == "failed" and root is not None:
            hint = root.classified.hint
            self._say(f"attempt {attempt} failed: {root.describe}" + (f"\n[orch]   hint: {hint}" if hint else ""))
        return AttemptOutcome(status, root, duration)

    def _watch(self, group: AttemptGroup, beats: dict[int, str]) -> tuple[RankProcess | None, RankFailure | None]:
        """Wait until every rank exits 0, a rank fails (that rank), a rank hangs (its
        description), or a stop is asked."""
        next_check = time.monotonic() + WATCHDOG_PERIOD_S
        while not self._stop_requested.is_set():
            running = 0
            for proc in group.ranks:
                code = proc.poll()
                if code is None:
                    running += 1
                elif code != 0:
                    return proc, None
            if running == 0:
                return None, None
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + WATCHDOG_PERIOD_S
                hang = self._check_hang(group, beats)
                if hang is not None:
                    return None, hang
            time.sleep(self.poll_s)
        return None, None

    def _check_hang(self, group: AttemptGroup, beats: dict[int, str]) -> RankFailure | None:
        silent = silent_ranks(self.config.watchdog, {r: heartbeat_record(p) for r, p in beats.items()}, time.time())
        if not silent:
            return None
        # A stopped process (state T) is certainly the culprit; otherwise the longest silent
        # one, since ranks waiting in a collective for it went quiet a moment later.
        stopped = [x for x in silent if _process_state(next(p.pid for p in group.ranks if p.spec.rank == x.rank)) == "T"]
        culprit = (stopped or silent)[0]
        self.run.append_event("hang_detected", **culprit.event(silent))
        self._say(f"rank {culprit.rank} silent for {culprit.silent_s:.1f}s at step {culprit.step} ({culprit.phase}; limit {culprit.limit_s:.1f}s): dumping stacks, restarting")
        # Stacks of every rank (who waits in which collective tells the story): faulthandler
        # on SIGUSR1; SIGCONT first wakes a stopped rank so it can dump.
        for proc in group.ranks:
            if proc.poll() is None:
                for sig in (signal.SIGCONT, signal.SIGUSR1):
                    try:
                        os.kill(proc.pid, sig)
                    except ProcessLookupError:
                        pass
        time.sleep(STACK_DUMP_WAIT_S)
        spec = next(p.spec for p in group.ranks if p.spec.rank == culprit.rank)
        return RankFailure(
            rank=culprit.rank,
            node_rank=spec.node_rank,
            exitcode=0,
            time=time.time(),
            error_type="Hang",
            message=culprit.message,
        )

    @staticmethod
    def _root_cause(failures: list[RankFailure], first_seen: RankProcess | None) -> RankFailure | None:
        """The earliest failure that is not merely a consequence of another.

        A rank that loses a peer fails too (gloo "connection closed", a collective timeout), often
        writing an error file before the supervisor even sees the peer's exit; those count only
        when nothing else failed. Ranks we stopped after the first failure are never causes.
        """
        if not failures:
            return None
        primary = [f for f in failures if not is_peer_loss(f.message)] or failures
        if first_seen is not None:
            seen = next((f for f in failures if f.rank == first_seen.spec.rank), None)
            if seen is not None and not is_peer_loss(seen.message):
                earlier = [f for f in primary if f.error_type is not None and f.time < seen.time]
                return min(earlier, key=lambda f: f.time) if earlier else seen
        return min(primary, key=lambda f: f.time)
