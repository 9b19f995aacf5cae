"""The local supervisor: every rank of every simulated node on this machine, supervised by the
shared loop (orchestrator.supervision.loop).

What is local here is only how processes start and stop: a launcher (fork server or fresh
interpreters) starts each attempt's ranks in one process group led by a reaper; this module
polls their exit codes, signals them, and stops the group. A restarted attempt is a fresh set of
processes with a fresh MASTER_PORT lease (no rendezvous state is reused; see NOTES.md on
torchrun's restarts) and resumes from the newest committed checkpoint, which the runtime inside
the job loads.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

from orchestrator.backends.local.liveness import process_start_time
from orchestrator.contract import (
    ENV_INCARNATION,
    Event,
    rank_files,
    rank_files_env,
    rank_log_name,
    read_error_record,
)
from orchestrator.launch.gpus import host_gpus
from orchestrator.launch.logstream import LogStreamer, tail_lines
from orchestrator.launch.ports import lease_port
from orchestrator.launch.processes import (
    AttemptGroup,
    Launcher,
    RankProcess,
    SubprocessLauncher,
    process_state,
)
from orchestrator.spec.config import ClusterConfig
from orchestrator.spec.plan import build_local_plan
from orchestrator.storage.rundir import RunDir, this_host
from orchestrator.supervision.failures import RankFailure, abort_line, exception_line
from orchestrator.supervision.loop import Ended, Started, Supervision, newest_checkpoint, next_attempt
from orchestrator.supervision.policy import Action, AttemptState
from orchestrator.supervision.status import attempt_beats, declared_total_steps, live_progress, progress_line

# After a stop request, how long past restart.stop_grace_s the run may take to end before it is
# killed outright (issue 13: stoppable within the grace + 5 s, whatever it waits on).
STOP_DEADLINE_S = 4.0
# A forced stop still tries to record the run's end (stopped, and why), for this long at most: the
# storage may be what hangs (so within the issue-13 bound: the grace + 5 s). Recorded, the run reads
# `stopped` (or `cancelled`), not `lost`.
FORCED_END_RECORD_S = 0.75


@dataclass(frozen=True)
class RunResult:
    run_id: str
    run_dir: str
    status: str  # succeeded | failed | stopped
    attempts: int
    wall_s: float
    root_cause: RankFailure | None = None
    newest_checkpoint: int | None = None
    exit_code: int = 0


def describe_failure(proc: RankProcess, error_file: str) -> RankFailure:
    """A failed rank, from its error record, else its exit code and the end of its log."""
    code = proc.popen.returncode
    assert code is not None
    when = proc.ended or time.time()
    record = read_error_record(error_file)
    if record:
        return RankFailure.from_record(
            record, rank=proc.spec.rank, node_rank=proc.spec.node_rank, exitcode=code, time=when
        )
    if code == -signal.SIGABRT:  # it aborted itself (NCCL's watchdog does): its log says why
        message = abort_line(tail_lines(proc.log_path))
    else:
        message = "" if code < 0 else exception_line(tail_lines(proc.log_path))
    return RankFailure(
        rank=proc.spec.rank,
        node_rank=proc.spec.node_rank,
        exitcode=code,
        time=when,
        error_type=None,
        message=message,
    )


class LocalAttempts:
    """The AttemptDriver of the local backend: one process group per attempt on this machine."""

    def __init__(self, config: ClusterConfig, run: RunDir, launcher: Launcher, stream: LogStreamer) -> None:
        self.config = config
        self.run = run
        self.launcher = launcher
        self.stream = stream
        self.group: AttemptGroup | None = None
        self.error_files: dict[int, str] = {}
        self.attempt: int | None = None  # the attempt started last
        self.launcher_failure: RankFailure | None = None  # our own process failed this attempt
        # Read once: LocalBackend.check_host found enough of them for resources.gpus_per_node.
        self.host_gpus = host_gpus()

    def start(self, attempt: int, master_port: int) -> Started:
        self.attempt = attempt
        self.launcher_failure = None
        plan = build_local_plan(
            self.config,
            run_id=self.run.run_id,
            run_dir=self.run.url,
            attempt=attempt,
            master_port=master_port,
            python=sys.executable,
            host_gpus=self.host_gpus,
        )
        logs = self.run.logs_dir(attempt)
        log_paths = [os.path.join(logs, rank_log_name(s.rank)) for s in plan.ranks]
        self.error_files = {s.rank: rank_files(logs, s.rank)[0] for s in plan.ranks}
        beats = {s.rank: rank_files(logs, s.rank)[1] for s in plan.ranks}
        extra = [{**rank_files_env(logs, s.rank), ENV_INCARNATION: str(attempt)} for s in plan.ranks]
        for spec, path in zip(plan.ranks, log_paths, strict=True):
            self.stream.follow(spec.rank, path)
        group = self.launcher.start_attempt(plan.ranks, log_paths, extra)
        self.group = group
        fields = {
            "launcher": group.launched_by,
            "pids": [r.pid for r in group.ranks],
        }
        return Started(fields=fields, heartbeats=beats, notice=group.notice)

    def poll(self) -> Ended | None:
        assert self.group is not None
        running = 0
        first_failed = None
        for proc in self.group.ranks:
            code = proc.poll()
            if code is None:
                running += 1
            elif code != 0 and first_failed is None:
                first_failed = proc.spec.rank
        # Asked after the ranks: a dead server's ranks all read as killed, and it is the cause.
        if self._launcher_failed():
            return Ended(failed=True)
        if first_failed is not None:
            return Ended(failed=True, first_seen=first_failed)
        return None if running else Ended(failed=False)

    def _launcher_failed(self) -> bool:
        """Whether the launcher (the fork server) failed this attempt; records it once."""
        if self.launcher_failure is None:
            reason = self.launcher.failure()
            if reason is None:
                return False
            self.launcher_failure = RankFailure.launcher_failed(reason, node_rank=None, time=time.time())
        return True

    def signal_ranks(self, signum: int) -> None:
        """To each rank, not its children (DataLoader workers have no handlers for these)."""
        group = self.group
        for proc in group.ranks if group is not None else ():
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signum)
                except ProcessLookupError:
                    pass

    def process_state(self, rank: int) -> str | None:
        group = self.group
        pid = next((p.pid for p in group.ranks if p.spec.rank == rank), None) if group else None
        return process_state(pid) if pid is not None else None

    def stop(self, grace_s: float) -> Ended:
        group = self.group
        assert group is not None
        if self._launcher_failed():
            self.launcher.abandon()  # its ranks die with it; none could report an exit anyway
        group.stop(grace_s)  # nothing alive: only closes the group
        self.stream.flush()
        codes = {str(r.spec.rank): r.popen.returncode for r in group.ranks}
        return Ended(failed=any(c != 0 for c in codes.values()), fields={"exit_codes": codes})

    def failures(self, ended: Ended) -> list[RankFailure]:
        group = self.group
        assert group is not None
        self.group = None
        failed = [
            describe_failure(r, self.error_files[r.spec.rank])
            for r in group.ranks
            if r.popen.returncode not in (0, None)
        ]
        if self.launcher_failure is None:
            return failed
        # The ranks it took down left no record; one that failed on its own before did.
        return [self.launcher_failure, *(f for f in failed if f.error_type is not None)]

    def kill_all(self) -> None:
        if self.group is not None:
            self.group.signal_all(signal.SIGKILL)


@dataclass
class Supervisor:
    """`orch run`: supervises a run in the foreground until it succeeds, fails, or is stopped."""

    config: ClusterConfig
    run: RunDir
    console: TextIO = sys.stderr  # the orchestrator's own lines
    rank_console: TextIO = sys.stdout  # the ranks' output, prefixed
    show_ranks: tuple[int, ...] | None = None
    launcher: Launcher = field(default_factory=SubprocessLauncher)
    poll_s: float = 0.05
    _stop_requested: threading.Event = field(default_factory=threading.Event, init=False)
    _stop_signal: int | None = field(default=None, init=False)
    _stop_deadline: threading.Timer | None = field(default=None, init=False)
    # Held while the run's end is recorded (by the loop, or by a forced stop): one record, never two.
    _end_lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _end_recorded: bool = field(default=False, init=False)
    _attempts: LocalAttempts | None = field(default=None, init=False)
    _total_steps: int | None = field(default=None, init=False)
    _total_read_at: float = field(default=-1e9, init=False)

    # ------------------------------------------------------------------ progress

    def _progress_line(self) -> str | None:
        """The console's progress line: the running attempt's heartbeats, and the total steps
        the job declared (events re-read every 2 s until it has, then every 30 s)."""
        attempts = self._attempts
        if attempts is None or attempts.attempt is None:
            return None
        if time.monotonic() >= self._total_read_at + (2 if self._total_steps is None else 30):
            self._total_read_at = time.monotonic()
            self._total_steps = declared_total_steps(self.run.events())
        progress = live_progress(attempt_beats(self.run, attempts.attempt), self._total_steps, time.time())
        return progress_line(progress) if progress else None

    # ------------------------------------------------------------------ signals

    def request_stop(self, signum: int) -> None:
        """What SIGINT/SIGTERM to `orch run` does: stop every rank, then return. The loop stops
        the ranks with restart.stop_grace_s of grace; whatever it may be stuck on (a stalled
        storage call, a wedged fork server), the run ends STOP_DEADLINE_S later at the latest,
        and at once on a second signal."""
        if self._stop_requested.is_set():
            self._force_stop(signum, "a second stop signal")
            return
        self._stop_signal = signum
        self._stop_requested.set()
        limit = self.config.restart.stop_grace_s + STOP_DEADLINE_S
        why = f"not stopped {limit:.0f}s after the signal"
        self._stop_deadline = threading.Timer(limit, self._force_stop, (signum, why))
        self._stop_deadline.daemon = True
        self._stop_deadline.start()

    def _force_stop(self, signum: int, why: str) -> None:
        """Kill every process of the run and leave now. The run's end is recorded if the storage
        takes it within FORCED_END_RECORD_S (a start-up slowed by a loaded machine is no reason
        to call the run lost); if the storage is what hangs, it is not, and `orch status` shows
        the run as lost. Either way `orch resume` continues it from its newest committed
        checkpoint."""
        try:
            if self._attempts is not None:
                self._attempts.kill_all()
            self.launcher.abandon()
            print(
                f"[orch] {why}: killed every rank; `orch resume {self.run.run_id}` continues the run",
                file=self.console,
                flush=True,
            )
            recorder = threading.Thread(
                target=self._record_forced_end, args=(signum, why), name="orch-forced-end", daemon=True
            )
            recorder.start()
            recorder.join(FORCED_END_RECORD_S)
        finally:
            os._exit(128 + signum)

    def _record_forced_end(self, signum: int, why: str) -> None:
        """The forced stop's record of the run's end: stopped, killed, and why. Nothing if the
        loop is recording the end itself (or did), or the storage does not answer."""
        if not self._end_lock.acquire(timeout=FORCED_END_RECORD_S):
            return  # the loop is stuck recording the end: the storage hangs
        try:
            if self._end_recorded:
                return
            self._end_recorded = True
            attempt = self._attempts.attempt if self._attempts is not None else None
            self.run.append_event(
                Event.RUN_FINISHED,
                status="stopped",
                attempts=attempt + 1 if attempt is not None else 0,
                wall_s=None,
                newest_checkpoint=newest_checkpoint(self.run),
                root_cause=None,
                reason=f"{why}: every rank killed",
                exit_code=128 + signum,
                forced=True,
            )
        except Exception:  # noqa: BLE001 - best effort: the run then shows as lost, as before
            pass
        finally:
            self._end_lock.release()

    def request_preemption(self, signum: int = signal.SIGUSR2) -> None:
        """What SIGUSR2 to `orch run` does: forward it to every rank (not their children), so
        they checkpoint the same step and exit 75; a new attempt resumes from there."""
        if self._attempts is not None:
            self._attempts.signal_ranks(signum)

    # ------------------------------------------------------------------ RunHooks

    def say(self, text: str) -> None:
        self._stream.note(f"[orch] {text}\n")

    def stop_requested(self) -> bool:
        return self._stop_requested.is_set()

    def wait_backoff(self, seconds: float) -> bool:
        return not self._stop_requested.wait(seconds)

    def resume(self, attempt: int, newest_checkpoint: int | None) -> bool:
        self.run.append_event(Event.REQUEUED, attempt=attempt + 1, reason="preempted")
        return True

    # ------------------------------------------------------------------ the run

    def run_all(self) -> RunResult:
        started = time.time()
        self._stream = LogStreamer(
            self.rank_console, self.show_ranks, notes=self.console, status=self._progress_line
        )
        self._stream.start()
        cfg = self.config
        self.run.append_event(
            Event.RUN_STARTED,
            run_id=self.run.run_id,
            host=this_host(),
            pid=os.getpid(),
            pid_started=process_start_time(os.getpid()),
            backend="local",
            launcher=self.launcher.name,
            world_size=cfg.resources.world_size,
            nnodes=cfg.resources.nodes,
            ranks_per_node=cfg.resources.ranks_per_node,
        )
        self.say(
            f"run {self.run.run_id}: {cfg.resources.nodes} node(s) x {cfg.resources.ranks_per_node} rank(s),"
            f" run dir {self.run.url}"
        )
        self._attempts = LocalAttempts(cfg, self.run, self.launcher, self._stream)
        loop = Supervision(
            config=cfg,
            run=self.run,
            driver=self._attempts,
            hooks=self,
            lease_port=lease_port,
            poll_s=self.poll_s,
            first_attempt=next_attempt(self.run.events()),  # a resumed run continues the count
        )
        try:
            result = loop.run_attempts()
        finally:
            self.launcher.close()
            self._stream.stop()
            try:
                self.run.publish_run_logs()  # the fork server's log, once it has stopped writing
            except Exception as exc:  # noqa: BLE001 - storage down: the staged copy stays, named
                kept = os.path.dirname(self.run.logs_path(0))
                self.say(f"could not upload the fork server's log ({type(exc).__name__}); it stays in {kept}")
        outcome = result.outcome
        if outcome.state is AttemptState.SUCCEEDED:
            status = "succeeded"
        elif self._stop_requested.is_set() or outcome.state is AttemptState.STOPPED:
            status = "stopped"
        else:
            status = "failed"
        exit_code = {"succeeded": 0, "failed": 1}.get(status, 128 + (self._stop_signal or signal.SIGTERM))
        cause = (
            outcome.root_cause
            if status != "succeeded" and outcome.root_cause and not outcome.root_cause.is_stop_on_request
            else None
        )
        run_result = RunResult(
            run_id=self.run.run_id,
            run_dir=self.run.url,
            status=status,
            attempts=result.attempts,
            wall_s=time.time() - started,
            root_cause=cause,
            newest_checkpoint=result.newest_checkpoint,
            exit_code=exit_code,
        )
        with self._end_lock:
            if self._end_recorded:  # a forced stop recorded it, and is leaving now
                return run_result
            self._end_recorded = True
            self.run.append_event(  # may hang on stalled storage: the stop deadline still holds
                Event.RUN_FINISHED,
                status=status,
                attempts=run_result.attempts,
                wall_s=round(run_result.wall_s, 3),
                newest_checkpoint=result.newest_checkpoint,
                root_cause=cause.to_json() if cause else None,
                reason=result.decision.reason
                if result.decision.action in (Action.GIVE_UP, Action.LEAVE)
                else None,
                exit_code=exit_code,
            )
            if self._stop_deadline is not None:
                self._stop_deadline.cancel()  # ended in time
        return run_result
