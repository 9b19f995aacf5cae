"""The local backend: every simulated node's ranks on this machine, supervised in the foreground
by `orch run` (supervisor.py); rendered by orchestrator.spec.render."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from orchestrator.backends.api import RunOptions, Submission
from orchestrator.contract import Event
from orchestrator.errors import OrchError, UsageError
from orchestrator.spec.config import ClusterConfig
from orchestrator.storage.causes import storage_cause
from orchestrator.storage.root_safety import check_storage_root
from orchestrator.storage.rundir import RunDir, is_local_url, this_host, url_to_fs
from orchestrator.storage.sweepdir import SweepDir
from orchestrator.supervision.status import LiveState

from .liveness import NotTheSupervisor, SupervisorGone, supervisor_alive, supervisor_to_signal


def _supervisor_start(events: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    starts = [e for e in events if e.get("event") == Event.RUN_STARTED]
    return starts[-1] if starts else None


def _unfinished_start(
    events: Sequence[dict[str, Any]], started: Event, finished: Event
) -> dict[str, Any] | None:
    """The latest `started` record with no `finished` after it (a resumed run starts anew)."""
    start = None
    for e in events:
        if e.get("event") == started:
            start = e
        elif e.get("event") == finished:
            start = None
    return start


def _finished_since_start(events: Sequence[dict[str, Any]]) -> bool:
    """Whether the run's latest supervisor recorded its end."""
    return _unfinished_start(events, Event.RUN_STARTED, Event.RUN_FINISHED) is None


def _live_sweep_runner(events: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The start record of a sweep's runner still at work on this host, else None."""
    start = _unfinished_start(events, Event.SWEEP_STARTED, Event.SWEEP_FINISHED)
    if start is None or start.get("host") != this_host() or not supervisor_alive(start):
        return None
    return start


# How long an object store may take to answer one listing. A client's own retries against an
# endpoint that accepts connections and never answers take minutes (botocore's read timeout
# times its attempts, times s3fs's), which a user would take for a hang.
STORAGE_PROBE_S = 10.0


def probe_storage(url: str, timeout_s: float) -> None:
    """List `url` once, in a thread given `timeout_s`; a failure is one UsageError line."""
    outcome: dict[str, BaseException] = {}

    def probe() -> None:
        try:
            fs, path = url_to_fs(url)
            fs.ls(path, detail=False)
        except FileNotFoundError:
            pass  # nothing there yet: the run directory is created next
        except BaseException as exc:  # noqa: BLE001 - any client's error, reported below
            outcome["error"] = exc

    # A daemon thread: a client stuck on a silent endpoint must not hold up orch's exit.
    thread = threading.Thread(target=probe, name="orch-storage-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise UsageError(
            f"storage.root: {url} did not answer within {timeout_s:g}s (storage unreachable);"
            " check the endpoint (AWS_ENDPOINT_URL) and the network"
        )
    if "error" in outcome:
        raise UsageError(f"storage.root: cannot reach {url}: {storage_cause(outcome['error'])}")


def probe_local_root(root: str) -> None:
    """Create a nameless file in `root` (O_TMPFILE: nothing is left behind); a failure is one
    UsageError line. Root ignores permissions, so only trying finds a read-only mount."""
    try:
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as exc:
        raise UsageError(f"storage.root: cannot write to {root}: {storage_cause(exc)}") from None


@contextlib.contextmanager
def signal_handlers(handlers: dict[int, Any]) -> Iterator[None]:
    """These handlers while supervising in the foreground, the caller's own again afterwards (a
    notebook's Ctrl-C raises KeyboardInterrupt again). Signals reach only the main thread: from
    another thread nothing is installed, and stopping is `orch cancel`'s (or the API's cancel())."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class LocalBackend:
    name: ClassVar[str] = "local"
    foreground_hint: ClassVar[str | None] = None
    submit_hint: ClassVar[str | None] = (
        "submit: needs the slurm backend (set `backend: slurm` or pass --backend slurm);"
        " `orch run` runs locally"
    )

    def render(self, config: ClusterConfig, *, run_id: str, run_dir: str, python: str) -> str:
        from orchestrator.spec.plan import build_local_plan
        from orchestrator.spec.render import render_local

        port = config.distributed.master_port if isinstance(config.distributed.master_port, int) else "<auto>"
        from orchestrator.launch.gpus import host_gpus

        gpu_ids = host_gpus()
        if len(gpu_ids) < config.resources.nodes * config.resources.gpus_per_node:  # show the slices anyway
            gpu_ids = tuple(str(i) for i in range(config.resources.nodes * config.resources.gpus_per_node))
        plan = build_local_plan(
            config,
            run_id=run_id,
            run_dir=run_dir,
            attempt=0,
            master_port=port,
            python=python,
            host_gpus=gpu_ids,
        )
        return render_local(plan)

    def check_storage(self, storage_root: str) -> None:
        """Any fsspec URL works (logs are staged locally and uploaded per attempt), but the
        storage must take writes: an object store must answer one listing, bounded in time, so
        that a wrong endpoint or missing credentials stop `orch` in one line before anything
        starts; an existing local root must take a file (read-only, or refused), and no other
        user may be able to swap its run directories (root_safety)."""
        if not is_local_url(storage_root):
            probe_storage(storage_root, STORAGE_PROBE_S)
            return
        check_storage_root(storage_root)
        if os.path.isdir(root := storage_root.removeprefix("file://")):
            probe_local_root(root)

    def check_host(self, config: ClusterConfig) -> None:
        """The simulated nodes' GPUs come from this host: it must have nodes x gpus_per_node."""
        from orchestrator.launch import gpus

        res = config.resources
        have = gpus.host_gpus()
        if config.distributed.backend == "nccl" and not have:
            raise UsageError(
                f"distributed.backend: nccl needs CUDA, and this host has no GPU ({gpus.describe()})"
            )
        need = res.nodes * res.gpus_per_node
        if need > len(have):
            raise UsageError(
                f"resources.gpus_per_node: {res.nodes} node(s) x {res.gpus_per_node} GPU(s) = {need},"
                f" but this host has {len(have)} ({gpus.describe()})"
            )
        from orchestrator.storage.private import NotPrivate, user_temp_dir

        try:
            # Port leases, claims and staged logs live in this user's folder of the host's temp
            # directory: made or checked private now, before anything is created (once ours, no
            # one else can replace it: the temp directory is sticky).
            user_temp_dir()
        except NotPrivate as exc:
            raise UsageError(f"temp directory: {exc}") from None

    def run(self, config: ClusterConfig, run: RunDir, options: RunOptions) -> Any:
        from orchestrator.backends.local.supervisor import Supervisor
        from orchestrator.launch.fork_launcher import ForkServerLauncher

        supervisor = Supervisor(
            config=config,
            run=run,
            console=sys.stderr,
            rank_console=sys.stdout if options.ranks_to_stdout else sys.stderr,
            show_ranks=options.show_ranks,
            launcher=ForkServerLauncher(config),
        )
        handlers = {
            signal.SIGINT: lambda signum, _frame: supervisor.request_stop(signum),
            signal.SIGTERM: lambda signum, _frame: supervisor.request_stop(signum),
            # A preemption drill: ranks checkpoint and exit 75, and a new attempt resumes.
            signal.SIGUSR2: lambda signum, _frame: supervisor.request_preemption(signum),
        }
        with signal_handlers(handlers):
            return supervisor.run_all()

    def submit(self, config: ClusterConfig, run: RunDir, python: str) -> Submission:
        raise UsageError(self.submit_hint or "submit: not offered by the local backend")

    def check_sweep(self, spec: Any) -> None:
        """Nothing beyond each point's own checks: points may differ in anything."""

    def run_sweep(
        self, sweep: SweepDir, record: dict[str, Any], points: Sequence[RunDir], console: Any
    ) -> dict[int, str]:
        """The points in the foreground, up to max_parallel at once (sweep.py); index -> state."""
        from orchestrator.backends.local.sweep import SweepRunner, available_cores, default_max_parallel
        from orchestrator.launch import gpus
        from orchestrator.spec.config import config_from_run_record

        configs = [config_from_run_record(p.read_run_config()) for p in points]
        fits = default_max_parallel(configs, available_cores(), len(gpus.host_gpus()))
        wanted = record.get("max_parallel")
        if wanted is not None and wanted > fits:
            print(
                f"[orch] sweep.max_parallel={wanted}: more points at once than this machine's"
                f" {available_cores()} core(s) hold without sharing ({fits}); running {wanted} anyway",
                file=console,
            )
        runner = SweepRunner(sweep, points, wanted or fits, console)
        stop = lambda signum, _frame: runner.request_stop(signum)  # noqa: E731
        with signal_handlers({signal.SIGINT: stop, signal.SIGTERM: stop}):
            return runner.run()

    def submit_sweep(self, sweep: SweepDir, record: dict[str, Any], points: Sequence[RunDir]) -> list[str]:
        raise UsageError(self.submit_hint or "submit: not offered by the local backend")

    def sweep_active(self, sweep: SweepDir) -> bool:
        """Whether a sweep's runner is at work on this host (points may wait in its queue)."""
        return _live_sweep_runner(sweep.events()) is not None

    def cancel_sweep(self, sweep: SweepDir, points: Sequence[Any]) -> str:
        start = _live_sweep_runner(sweep.events())
        if start is None:
            raise OrchError(f"sweep {sweep.sweep_id} is not running here")
        try:
            pid = supervisor_to_signal(start, sweep)
        except SupervisorGone:
            raise OrchError(f"sweep {sweep.sweep_id} is not running here") from None
        except NotTheSupervisor as exc:
            raise OrchError(f"sweep {sweep.sweep_id}: {exc}") from None
        # Recorded first: the runner records a cancel in each running point before its SIGTERM.
        sweep.append_event(Event.CANCEL_REQUESTED, pid=pid)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            raise OrchError(f"sweep {sweep.sweep_id} is not running here (it just ended)") from None
        return (
            f"asked sweep {sweep.sweep_id} (pid {pid}) to stop: each running point"
            " checkpoints and stops; `orch resume` continues it"
        )

    def live_state(self, run: RunDir, events: Sequence[dict[str, Any]]) -> LiveState:
        start = _supervisor_start(events)
        if start is None or start.get("host") != this_host() or not start.get("pid"):
            return LiveState()  # not started yet, or supervised on another machine
        return LiveState(supervisor_alive=supervisor_alive(start))

    def cancel(self, run: RunDir, events: Sequence[dict[str, Any]]) -> str:
        start = _supervisor_start(events)
        if start is None or _finished_since_start(events):
            raise OrchError(f"run {run.run_id} is not running")
        if start.get("host") != this_host():
            raise OrchError(f"run {run.run_id} is supervised on {start.get('host')}; cancel it there")
        gone = (
            f"run {run.run_id} is not running: its supervisor (pid {start['pid']}) is gone;"
            f" `orch resume {run.run_id}` continues it"
        )
        try:  # never signal a pid that may now be, or may be named to be, another process
            pid = supervisor_to_signal(start, run)
        except SupervisorGone:
            raise OrchError(gone) from None
        except NotTheSupervisor as exc:
            raise OrchError(f"run {run.run_id}: {exc}") from None
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            raise OrchError(gone) from None
        run.append_event(Event.CANCEL_REQUESTED, pid=pid)
        return f"asked the supervisor of run {run.run_id} (pid {pid}) to stop"


BACKEND = LocalBackend()

__all__ = ["BACKEND", "LocalBackend"]
