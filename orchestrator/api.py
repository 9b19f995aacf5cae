"""The Python API: `orch`'s verbs for scripts and notebooks. The CLI (cli.py) is built on it:
every command parses its arguments, calls one function here, and prints what it returns.

    from orchestrator import load_config, run, get_run

    config = load_config("cluster.yaml", ["job.args=[--steps,200]"])
    r = run(config, wait=False)         # supervised in a process of its own
    r.wait(timeout=600).state            # 'succeeded'
    r.checkpoints()[-1]["model_digest"]

A run started with wait=False is supervised by `orch resume RUN_DIR` in a new session (its
console lines go to the run directory's supervisor.log), so it outlives the notebook's kernel
and stops like any run: `r.cancel()`. Errors are OrchError (UsageError, ConfigError,
RunNotFound) with a one-line message, as the CLI prints them.

Whoever starts, resumes or submits a run holds the run directory's claim (storage/rundir.py:
`claim_directory`) from before its state check until it stops acting on the run (a local run:
until its supervision ends), and whoever runs or submits a sweep's points holds the sweep's: a
second starter is refused in one line naming the holder, so no run and no point starts twice.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from orchestrator.contract import Event
from orchestrator.errors import OrchError, UsageError
from orchestrator.launch.detached import console_log, start_detached
from orchestrator.storage.faults import fault_point

DEFAULT_CONFIG = "cluster.yaml"
# States a run can be resumed from (`orch resume`).
RESUMABLE = ("created", "stopped", "cancelled", "failed", "lost")


# ---------------------------------------------------------------------------- configs


def load_config(
    path: str = DEFAULT_CONFIG, overrides: Iterable[str] = (), *, backend: str | None = None
) -> Any:
    """cluster.yaml with `--set`-style overrides ("resources.nodes=2") -> a validated ClusterConfig."""
    from orchestrator.spec.config import load_config as _load

    return _load(path, list(overrides), backend=backend)


def load_sweep(
    path: str = DEFAULT_CONFIG,
    overrides: Iterable[str] = (),
    *,
    grid: Iterable[str] = (),
    max_parallel: int | None = None,
    backend: str | None = None,
) -> Any:
    """cluster.yaml with a `sweep:` section (and/or `grid` axes "lr=1e-3,3e-3") -> a SweepSpec:
    one validated config per point."""
    from orchestrator.spec.sweep import load_sweep as _load

    return _load(path, list(overrides), grid=list(grid), max_parallel=max_parallel, backend=backend)


def check_pass_env(config: Any) -> None:
    missing = [n for n in config.job.pass_env if n not in os.environ]
    if missing:
        raise UsageError(f"job.pass_env: {missing[0]} is not set in this environment")


def check_shown_ranks(ranks: Sequence[int] | None, config: Any) -> None:
    """The ranks a console is to show (`--ranks`) must be in the run's world."""
    bad = [r for r in ranks or () if not 0 <= r < config.resources.world_size]
    if bad:
        raise UsageError(
            f"--ranks: rank {bad[0]} is outside the world of {config.resources.world_size} ranks"
        )


def backend_for(config: Any, command: str) -> Any:
    """The config's backend, checked for the command (`run` in the foreground or `submit`)."""
    from orchestrator.backends import get_backend

    backend = get_backend(config.backend)
    hint = backend.foreground_hint if command == "run" else backend.submit_hint
    if hint is not None:
        raise UsageError(hint)
    return backend


def _claim(dir: Any, verb: str, what: str, doing: str, hint: str) -> Any:
    """The directory's claim (a DirClaim, a context manager), or a one-line UsageError naming the
    process that holds it."""
    from orchestrator.storage.private import NotPrivate
    from orchestrator.storage.rundir import DirectoryClaimed

    try:
        return dir.claim()
    except NotPrivate as exc:  # its lock file is a link, or another user's (storage/private.py)
        raise UsageError(f"{verb}: cannot claim {what}: {exc}") from None
    except DirectoryClaimed as busy:
        holder = busy.holder
        who = f"pid {holder['pid']} on {holder.get('host')}" if holder.get("pid") else "another process"
        raise UsageError(f"{verb}: {what} is running ({doing} by {who}); {hint}") from None
    except OSError as exc:  # its directory cannot take the lock file (read-only, gone)
        from orchestrator.storage.causes import storage_cause

        raise UsageError(f"{verb}: cannot claim {what} at {dir.url}: {storage_cause(exc)}") from None


def _check_before_creating(config: Any, backend: Any) -> None:
    check_pass_env(config)
    backend.check_storage(config.storage_root)  # fails before creating anything
    backend.check_host(config)  # a host without the GPUs it asks for


# ---------------------------------------------------------------------------- runs


def _run_record(config: Any, run_id: str, config_file: str | None, sweep: dict[str, Any] | None) -> dict:
    from orchestrator.spec.config import config_to_dict

    record: dict[str, Any] = {
        "run_id": run_id,
        "created": time.time(),
        "backend": config.backend,
        "config_file": os.path.abspath(config_file) if config_file else None,
        "base_dir": config.base_dir,
        "config": config_to_dict(config),
    }
    if sweep is not None:
        record["sweep"] = sweep
    return record


def _create(dir: Any, record: dict[str, Any], flag: str, what: str, kind: str = "run") -> None:
    try:
        dir.create(record)
    except FileExistsError:
        raise UsageError(f"{flag}: {what} already exists at {dir.url}") from None
    except Exception as exc:  # noqa: BLE001 - any storage's error (OSError, botocore's own): one line
        from orchestrator.storage.causes import storage_cause

        raise UsageError(
            f"storage.root: cannot create the {kind} directory {dir.url}: {storage_cause(exc)}"
        ) from None


def create_run(config: Any, *, run_id: str | None = None, config_file: str | None = None) -> Run:
    """A new run directory with the config frozen into its run.yaml; nothing is started."""
    from orchestrator.storage.rundir import RunDir, join_url
    from orchestrator.storage.runid import is_valid_run_id, new_run_id

    run_id = run_id or new_run_id(config.job_name)
    if not is_valid_run_id(run_id):
        raise UsageError(f"--run-id: {run_id!r} may use letters, digits and _.+- only (and not digits alone)")
    run = RunDir(join_url(config.storage_root, run_id))
    _create(run, _run_record(config, run_id, config_file, None), "--run-id", f"run {run_id}")
    return Run(run)


def run(
    config: Any,
    *,
    run_id: str | None = None,
    config_file: str | None = None,
    wait: bool = True,
    show_ranks: tuple[int, ...] | None = None,
    ranks_to_stdout: bool = True,
) -> Run:
    """Run the job on this machine, supervised (`orch run`). wait=True: in this process until it
    ends (its ranks' output on the console); wait=False: in a process of its own; returns at once."""
    backend = backend_for(config, "run")
    _check_before_creating(config, backend)
    handle = create_run(config, run_id=run_id, config_file=config_file)
    if not wait:
        return handle.start_in_background()  # its supervisor takes the claim
    with handle._claim("run"):
        return handle._run_here(config, backend, show_ranks=show_ranks, ranks_to_stdout=ranks_to_stdout)


def doctor(
    config: Any, *, probe: bool = False, environment: bool = True, probe_timeout_s: float = 300.0
) -> Any:
    """`orch doctor`: every check of the environment, config, storage and backend (and with
    probe=True, on Slurm, a short job that checks every node); a DoctorReport."""
    from orchestrator.doctor import run_checks

    return run_checks(config, environment=environment, probe=probe, probe_timeout_s=probe_timeout_s)


def preflight(config: Any) -> None:
    """The fast checks `orch submit` makes first (not the login node's environment, not the
    probe): OrchError with the first failing check's line and its fix."""
    report = doctor(config, environment=False)
    if report.failed:
        first = report.failed[0]
        more = f" (and {len(report.failed) - 1} more)" if len(report.failed) > 1 else ""
        raise OrchError(
            f"{first.area} {first.name}: {first.detail}; fix: {first.fix}{more}."
            " `orch doctor` shows every check; --no-check submits anyway"
        )


def submit(
    config: Any, *, run_id: str | None = None, config_file: str | None = None, check: bool = True
) -> Run:
    """Submit the job to Slurm (`orch submit`), after the fast checks of `orch doctor` unless
    check=False; the Run's status() follows it."""
    backend = backend_for(config, "submit")
    _check_before_creating(config, backend)
    if check:
        preflight(config)
    handle = create_run(config, run_id=run_id, config_file=config_file)
    with handle._claim("submit"):
        handle._submit(config, backend)
    return handle


@dataclass
class Run:
    """A handle on one run directory (a run of its own or a sweep's point)."""

    dir: Any  # RunDir
    result: Any = field(default=None, repr=False)  # the RunResult of a run supervised here
    process: subprocess.Popen | None = field(default=None, repr=False)  # its background supervisor

    @property
    def run_id(self) -> str:
        return self.dir.run_id

    @property
    def url(self) -> str:
        return self.dir.url

    def events(self) -> list[dict[str, Any]]:
        return self.dir.events()

    def backend(self, events: list[dict[str, Any]] | None = None) -> Any:
        """The backend the run was started on: its events say, else its run.yaml."""
        events = self.events() if events is None else events
        named = [
            e["backend"]
            for e in events
            if e.get("event") in (Event.SUBMITTED, Event.RUN_STARTED, Event.JOB_STARTED) and e.get("backend")
        ]
        if named:
            return _recorded_backend(named[-1], f"run {self.run_id}: events.jsonl")
        recorded = self.dir.read_run_config().get("backend", "local")
        return _recorded_backend(recorded, f"run {self.run_id}: run.yaml")

    def status(self) -> Any:
        """The run's RunStatus (state, attempts, newest checkpoint, root cause, goodput...)."""
        from orchestrator.supervision.status import run_status

        events = self.events()
        return run_status(self.dir, events, self.backend(events).live_state(self.dir, events))

    def wait(self, timeout: float | None = None, poll_s: float = 0.5) -> Any:
        """Block until the run ends (succeeded, failed, stopped, cancelled, or lost); its status.
        TimeoutError after `timeout` seconds."""
        from orchestrator.supervision.status import FINAL_STATES

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is None:
                st = None  # its supervisor is still at work
            else:
                st = self.status()
                if st.state in FINAL_STATES or st.state == "lost":
                    return st
                if self.process is not None and self.process.returncode != 0:
                    raise OrchError(
                        f"run {self.run_id}: its supervisor ended ({self.process.returncode}) with the run"
                        f" {st.state}: {_last_line(console_log(self.url, self.run_id))}"
                    )
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"run {self.run_id} still {st.state if st else 'running'} after {timeout}s"
                )
            time.sleep(poll_s)

    def metrics(self) -> dict[str, Any]:
        """The last scalars the job logged (runtime.Metrics): {"step": N, "scalars": {...}}."""
        from orchestrator.storage.rundir import read_metrics

        return read_metrics(self.dir)

    def checkpoints(self, verify: bool = False) -> list[dict[str, Any]]:
        """Committed checkpoints, oldest first: step, created, size, model_digest, url; with
        verify=True every file is read against its checksum (`verified` False and `error` for a
        corrupt one)."""
        from orchestrator.storage.ckpt_store import CheckpointStore, CorruptCheckpoint

        store = CheckpointStore(self.dir.child("ckpt"))
        rows = []
        for step in store.committed_steps():
            try:
                info = store.verify(step) if verify else store.info(step)
                rows.append(
                    {
                        "step": step,
                        "created": info.created,
                        "size": info.size,
                        "model_digest": info.model_digest,
                        "verified": True if verify else None,
                        "url": info.url,
                    }
                )
            except (CorruptCheckpoint, OSError) as exc:  # OSError: the storage, mid-read (deleted, ESTALE)
                error = (
                    str(exc)
                    if isinstance(exc, CorruptCheckpoint)
                    else f"storage error: {exc.strerror or exc}"
                )
                rows.append(
                    {
                        "step": step,
                        "created": None,
                        "size": None,
                        "model_digest": None,
                        "verified": False,
                        "error": error,
                    }
                )
        return rows

    def logs(
        self,
        rank: int | Sequence[int] | None = None,
        attempt: int | None = None,
        follow: bool = False,
        out: IO[str] | None = None,
    ) -> list[str]:
        """The rank logs of the latest attempt (or `attempt`), each line `[rank R] ...`.
        follow=True writes them to `out` (default stdout) as they grow, across attempts, until
        the run finishes (local filesystems), and returns []."""
        ranks = None if rank is None else ([rank] if isinstance(rank, int) else list(rank))
        if follow:
            self._follow_logs(ranks, out or sys.stdout)
            return []
        from orchestrator.launch.logstream import rank_line

        files = self.dir.log_files()
        if not files:
            raise OrchError(f"run {self.run_id} has no logs yet")
        attempt = attempt if attempt is not None else max(a for a, _ in files)
        chosen = sorted(
            (r, url) for (a, r), url in files.items() if a == attempt and (not ranks or r in ranks)
        )
        if not chosen:
            raise OrchError(f"no logs for attempt {attempt}" + (f" rank(s) {ranks}" if ranks else ""))
        lines = []
        for r, url in chosen:
            data = open(url, "rb").read() if self.dir.is_local else _read_remote(url, self.dir)
            lines.extend(rank_line(r, line) for line in data.splitlines())
        return lines

    def _follow_logs(self, ranks: list[int] | None, out: IO[str]) -> None:
        """Print the latest attempt's rank logs as they grow; move on to new attempts; stop when
        the run has finished."""
        from orchestrator.launch.logstream import LogStreamer

        if not self.dir.is_local:
            raise UsageError(
                "logs -f: follows run directories on a filesystem; without -f it reads any storage"
            )
        streamer = LogStreamer(out, ranks, interval_s=0.2)
        streamer.start()
        attempt = None
        try:
            while True:
                files = self.dir.log_files()
                latest = max((a for a, _ in files), default=None)
                if latest is not None and latest != attempt:
                    if attempt is not None:
                        streamer.flush()
                    attempt = latest
                    for (a, r), path in sorted(files.items()):
                        if a == attempt:
                            streamer.follow(r, path)
                elif latest is not None:
                    for (a, r), path in files.items():
                        if a == attempt:
                            streamer.follow_if_new(r, path)
                if any(e.get("event") == Event.RUN_FINISHED for e in self.events()):
                    break
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            streamer.stop()

    def cancel(self) -> str:
        """Stop the run (scancel for Slurm; SIGTERM to a local supervisor); what was done."""
        _await_start(self.process, lambda: any(e.get("event") == Event.RUN_STARTED for e in self.events()))
        events = self.events()
        return self.backend(events).cancel(self.dir, events)

    def resume(
        self,
        overrides: Iterable[str] = (),
        *,
        wait: bool = True,
        show_ranks: tuple[int, ...] | None = None,
        ranks_to_stdout: bool = True,
        announce: IO[str] | None = None,
    ) -> Run:
        """The run's next attempt from its newest checkpoint (`orch resume`): Slurm runs are
        submitted again; local ones are supervised here (wait=True) or in the background."""
        overrides = list(overrides)
        if not wait and self.backend().foreground_hint is None:
            from orchestrator.spec.config import config_for_resume

            # Checked here, in one line; the background process then does the rest, under a
            # claim of its own (a starter that slips in between is refused there, in its log).
            with self._claim("resume"):
                self._check_resumable(self.status())
                check_pass_env(config_for_resume(self.dir.read_run_config(), overrides))
            return self.start_in_background([arg for o in overrides for arg in ("--set", o)])
        # Held from before the state check until the run's supervision here ends (or its job is
        # submitted): another resume cannot pass the same check in between.
        with self._claim("resume"):
            prepared = self._prepare_resume(overrides, show_ranks, announce)
            if prepared is None:  # a scheduler's backend: the next attempt is a new job
                return self
            config, backend = prepared
            return self._run_here(config, backend, show_ranks=show_ranks, ranks_to_stdout=ranks_to_stdout)

    def _claim(self, verb: str) -> Any:
        """The run directory's claim, held by whoever starts, resumes, submits or supervises it
        here; refused in one line naming the holder."""
        return _claim(
            self.dir,
            verb,
            f"run {self.run_id}",
            "started or supervised",
            f"`orch status {self.run_id}` follows it, `orch cancel {self.run_id}` stops it",
        )

    def _prepare_resume(
        self, overrides: list[str], show_ranks: tuple[int, ...] | None, announce: IO[str] | None
    ) -> tuple[Any, Any] | None:
        from orchestrator.spec.config import config_for_resume, config_to_dict
        from orchestrator.supervision.loop import next_attempt

        if self.dir.is_local:
            # Before run.yaml is read (it names the script a resume starts, and the storage root
            # checked below): a run directory another user could have swapped is not read.
            from orchestrator.storage.root_safety import check_run_directory

            check_run_directory(self.dir.url)
        events = self.events()
        backend = self.backend(events)
        st = self.status()
        self._check_resumable(st)
        fault_point("resume.checked")  # a test holds a resume here, between its check and its start
        record = self.dir.read_run_config()
        config = config_for_resume(record, overrides)
        check_pass_env(config)
        check_shown_ranks(show_ranks, config)
        backend.check_storage(config.storage_root)  # fails before anything changes
        backend.check_host(config)
        attempt = next_attempt(events)
        if overrides:
            self.dir.replace_run_config(
                {**record, "config": config_to_dict(config)}, keep_as=f"run-before-attempt-{attempt}.yaml"
            )
        if st.state != "created" or any(e.get("event") == Event.RESUMED for e in events) or overrides:
            self._record_resume(backend.name, st, attempt, overrides)
            diverged = (st.root_cause or {}).get("class") == "diverged"
            if diverged and config.restart.on_divergence == "rollback":
                # As the supervisor's own rollback: the attempt skips the data that diverged.
                self.dir.append_event(Event.ROLLBACK_SCHEDULED, attempt=attempt, to_step=st.newest_checkpoint)
            what = f"resuming run {self.run_id} ({st.state}) as attempt {attempt}, from " + (
                f"checkpoint step {st.newest_checkpoint}" if st.newest_checkpoint is not None else "the start"
            )
        else:  # a sweep's point (or a run created by the API) that never started: its first start
            what = f"starting run {self.run_id}"
        print(f"[orch] {what}", file=announce or sys.stderr)
        if backend.foreground_hint is not None:
            self._submit(config, backend)
            return None
        return config, backend

    def _check_resumable(self, st: Any) -> None:
        if st.state == "succeeded":
            raise UsageError(f"resume: run {self.run_id} succeeded; there is nothing to resume")
        if st.state not in RESUMABLE:
            raise UsageError(
                f"resume: run {self.run_id} is {st.state}; only a stopped, cancelled, failed or lost run"
                f" resumes (`orch cancel {self.run_id}` first)"
            )

    def _record_resume(self, backend: str, st: Any, attempt: int, overrides: list[str]) -> None:
        """The ledger's mark that the run goes on: its earlier end no longer stands."""
        self.dir.append_event(
            Event.RESUMED,
            backend=backend,
            from_state=st.state,
            attempt=attempt,
            newest_checkpoint=st.newest_checkpoint,
            overrides=overrides,
        )

    # -------------------------------------------------------------- starting

    def _run_here(self, config: Any, backend: Any, *, show_ranks: Any, ranks_to_stdout: bool) -> Run:
        from orchestrator.backends.api import RunOptions

        self.result = backend.run(
            config, self.dir, RunOptions(show_ranks=show_ranks, ranks_to_stdout=ranks_to_stdout)
        )
        return self

    def _submit(self, config: Any, backend: Any) -> str:
        submission = backend.submit(config, self.dir, config.job.python or sys.executable)
        # The job may already have started, and written `job_started`, before this lands: the
        # status fold lets that start win whatever the order (supervision/status.py).
        self.dir.append_event(
            Event.SUBMITTED,
            backend=backend.name,
            job_id=submission.job_id,
            nodes=config.resources.nodes,
            ranks_per_node=config.resources.ranks_per_node,
        )
        return submission.job_id

    def job_id(self) -> str | None:
        jobs = [
            e.get("job_id") for e in self.events() if e.get("event") == Event.SUBMITTED and e.get("job_id")
        ]
        return str(jobs[-1]) if jobs else None

    def start_in_background(self, extra_args: Sequence[str] = ()) -> Run:
        """Supervise this (created or resumable, local) run in a new session: `orch resume`."""
        self.process = start_detached(
            ["resume", self.url, "--quiet", *extra_args], console_log(self.dir.url, self.run_id)
        )
        return self


def _recorded_backend(name: Any, where: str) -> Any:
    """The backend a run or sweep directory names; an unknown name (a directory may be written by
    others) is one line naming the file, never a traceback."""
    from orchestrator.backends import get_backend

    try:
        return get_backend(name)
    except ValueError as exc:
        raise OrchError(f"{where}: {exc}") from None


def _await_start(process: subprocess.Popen | None, started: Any, timeout_s: float = 60.0) -> None:
    """A supervisor just started in the background records its start within seconds: a cancel
    sent before it would find nothing to stop (or kill it before it can stop cleanly)."""
    deadline = time.monotonic() + timeout_s
    while process is not None and process.poll() is None and not started() and time.monotonic() < deadline:
        time.sleep(0.1)


def _last_line(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = [line.strip() for line in fh if line.strip()]
    except OSError:
        return f"see {path}"
    return lines[-1] if lines else f"see {path}"


def _read_remote(path: str, run: Any) -> bytes:
    import fsspec

    fs, _ = fsspec.core.url_to_fs(run.url)
    return fs.cat_file(path)


# ---------------------------------------------------------------------------- finding runs


def storage_root_of(config_path: str = DEFAULT_CONFIG) -> str:
    """storage.root from a config file, without requiring its entrypoint to exist here."""
    from orchestrator.spec.config import load_config as _load

    if not os.path.exists(config_path):
        return os.path.abspath("runs")
    return _load(config_path, check_files=False, sweep="ignore").storage_root


def get_run(ref: str, *, config: str = DEFAULT_CONFIG, storage_root: str | None = None) -> Run | Sweep:
    """A run or sweep by id (`mnist-...`, a sweep's `sweep-id`, a point's `sweep-id/3`) under
    storage.root of `config` (or `storage_root`), or by its directory (path or URL)."""
    from orchestrator.storage.catalog import names_a_directory, resolve

    if storage_root is None:
        # A directory named by its path needs no config (a background supervisor, started
        # anywhere, must not read whatever cluster.yaml its working directory holds).
        storage_root = "" if names_a_directory(ref) else storage_root_of(config)
    found = resolve(ref, storage_root)
    from orchestrator.storage.sweepdir import SweepDir

    return Sweep(found) if isinstance(found, SweepDir) else Run(found)


def list_runs(storage_root: str) -> list[dict[str, Any]]:
    """Every run under `storage_root`, oldest first: run_id, state, attempts, started, run_dir,
    and `sweep` (the sweep id) and `values` for a sweep's points."""
    from orchestrator.storage.catalog import list_entries
    from orchestrator.storage.sweepdir import SweepDir
    from orchestrator.supervision.status import summarize

    rows = []
    for entry in list_entries(storage_root):
        if isinstance(entry, SweepDir):
            try:
                record = entry.record()
            except (OSError, ValueError):
                continue  # a sweep being created, or damaged: its points cannot be named
            members = [(p.get("values") or {}, run, entry.sweep_id) for p, run in entry.points(record)]
        else:
            members = [(None, entry, None)]
        for values, run_dir, sweep_id in members:
            fields = summarize(run_dir.events())
            row = {
                "run_id": run_dir.run_id,
                "state": fields["state"],
                "attempts": fields["attempts"],
                "started": fields["started"],
                "run_dir": run_dir.url,
            }
            if sweep_id is not None:
                row.update(sweep=sweep_id, values=values)
            rows.append(row)
    rows.sort(key=lambda r: (r["started"] or 0, r["run_id"]))
    return rows


# ---------------------------------------------------------------------------- sweeps


def sweep(
    spec: Any,
    *,
    sweep_id: str | None = None,
    config_file: str | None = None,
    wait: bool = True,
    console: IO[str] | None = None,
    check: bool = True,
) -> Sweep:
    """Start every point of a SweepSpec (`orch sweep`): locally, up to max_parallel points at once
    (wait=True: in this process until all end; wait=False: in a process of its own); on Slurm,
    one job array, after `orch doctor`'s fast checks of its allocation unless check=False."""
    from orchestrator.backends import get_backend

    backend = get_backend(spec.base.backend)
    for config in spec.configs:
        check_pass_env(config)
    backend.check_storage(spec.base.storage_root)
    for config in spec.configs:
        backend.check_host(config)
    backend.check_sweep(spec)
    if check and backend.foreground_hint is not None:  # submitted: as `orch submit` checks first
        preflight(spec.configs[0])  # every point has the same allocation (check_sweep)
    handle = create_sweep(spec, sweep_id=sweep_id, config_file=config_file)
    with handle._claim("sweep") as claim, contextlib.ExitStack() as held:
        points = handle.points()
        if backend.foreground_hint is not None:  # submitted: each point held until it is (_start)
            for point in points:
                held.enter_context(point._claim("sweep"))
        return handle._start(backend, [point.dir for point in points], claim, wait=wait, console=console)


def create_sweep(spec: Any, *, sweep_id: str | None = None, config_file: str | None = None) -> Sweep:
    """The sweep's directory and every point's run directory; nothing is started."""
    from orchestrator.storage.rundir import join_url
    from orchestrator.storage.runid import is_valid_run_id, new_run_id
    from orchestrator.storage.sweepdir import SweepDir

    sweep_id = sweep_id or new_run_id(spec.base.job_name)
    if not is_valid_run_id(sweep_id):
        raise UsageError(
            f"--sweep-id: {sweep_id!r} may use letters, digits and _.+- only (and not digits alone)"
        )
    folder = SweepDir(join_url(spec.base.storage_root, sweep_id))
    points = [{"index": p.index, "values": dict(p.values)} for p in spec.points]
    record = {
        "sweep_id": sweep_id,
        "created": time.time(),
        "backend": spec.base.backend,
        "config_file": os.path.abspath(config_file) if config_file else None,
        "max_parallel": spec.max_parallel,
        "names": spec.names,
        "points": points,
    }
    _create(folder, record, "--sweep-id", f"sweep {sweep_id}", kind="sweep")
    try:
        _create_points(folder, spec, sweep_id, config_file)
    except BaseException:
        # No half-made sweep (a full disk, Ctrl-C): its id stays free for the next try.
        from orchestrator.storage.sweepdir import remove_tree

        remove_tree(folder.url)
        raise
    return Sweep(folder)


def _create_points(folder: Any, spec: Any, sweep_id: str, config_file: str | None) -> None:
    from orchestrator.storage.runid import point_run_id

    for point, config in zip(spec.points, spec.configs, strict=True):
        run_dir = folder.point(point.index)
        about = {"id": sweep_id, "index": point.index, "values": dict(point.values)}
        _create(
            run_dir,
            _run_record(config, point_run_id(sweep_id, point.index), config_file, about),
            "--sweep-id",
            "point",
        )
        if run_dir.is_local:
            from orchestrator.storage.hparams import write_hparams

            write_hparams(run_dir.child("tb"), dict(point.values))


@dataclass
class Sweep:
    """A handle on a sweep directory: its points are Runs."""

    dir: Any  # SweepDir
    process: subprocess.Popen | None = field(default=None, repr=False)
    outcome: dict[int, str] = field(default_factory=dict, repr=False)  # point -> state, run here

    @property
    def sweep_id(self) -> str:
        return self.dir.sweep_id

    @property
    def run_id(self) -> str:
        return self.sweep_id

    @property
    def url(self) -> str:
        return self.dir.url

    def record(self) -> dict[str, Any]:
        return self.dir.record()

    def points(self) -> list[Run]:
        return [Run(run_dir) for _, run_dir in self.dir.points()]

    def point(self, index: int) -> Run:
        return Run(self.dir.point(index))

    def status(self) -> Any:
        """A SweepStatus: one row per point (values, state, attempts, step, scalars, goodput)."""
        from orchestrator.supervision.sweep_status import sweep_status

        record = self.record()
        points = [Run(run_dir) for _, run_dir in self.dir.points(record)]
        return sweep_status(
            self.sweep_id,
            self.url,
            record,
            [run.status() for run in points],
            [run.metrics() for run in points],
        )

    def wait(self, timeout: float | None = None, poll_s: float = 1.0) -> Any:
        """Block until the sweep is settled: no point running or queued (every point ended, or a
        stopped sweep's unstarted points left `created`); the SweepStatus. TimeoutError after
        `timeout` seconds."""
        backend = self._backend()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.process is None or self.process.poll() is not None:
                st = self.status()
                busy = [r for r in st.rows if r["state"] in ("running", "pending", "preempted-requeued")]
                if not busy and not backend.sweep_active(self.dir):
                    return st
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"sweep {self.sweep_id} not finished after {timeout}s")
            time.sleep(poll_s)

    def cancel(self, index: int | None = None) -> str:
        """Stop every point (or point `index`): the Slurm job array (or its task), or the local
        sweep's supervisor, which stops each running point with a checkpoint."""
        if index is not None:
            return self.point(index).cancel()
        _await_start(
            self.process, lambda: any(e.get("event") == Event.SWEEP_STARTED for e in self.dir.events())
        )
        return self._backend().cancel_sweep(self.dir, self.points())

    def resume(self, *, wait: bool = True, console: IO[str] | None = None) -> Sweep:
        """Start again every point that has not succeeded, each from its newest checkpoint."""
        from orchestrator.supervision.loop import next_attempt
        from orchestrator.supervision.status import FINAL_STATES

        if self.dir.is_local:  # as Run._prepare_resume: before sweep.yaml names what runs
            from orchestrator.storage.root_safety import check_run_directory

            check_run_directory(self.dir.url)
        backend = self._backend()
        submitted = backend.foreground_hint is not None
        # Taken before any point's state is read, held until the points are submitted or (run
        # here) until the runner ends: a second resume would pass the same checks and start the
        # points still queued a second time.
        with self._claim("resume") as claim, contextlib.ExitStack() as held:
            points = []
            for run in self.points():
                # A point that its own `orch resume SWEEP/N` is starting right now is that one's.
                # Submitted, each point's claim is held until its `submitted` is appended
                # (_start); run here, each point's own `orch resume` takes it, so it goes now.
                point_claim = held.enter_context(run._claim("resume"))
                st = run.status()
                if not submitted:
                    point_claim.release()
                if st.state == "succeeded":
                    continue
                if st.state not in RESUMABLE:
                    raise UsageError(
                        f"resume: point {run.run_id} is {st.state}; `orch cancel {self.sweep_id}` first"
                        if st.state not in FINAL_STATES
                        else f"resume: point {run.run_id} is {st.state}"
                    )
                points.append((run, st))
            if not points:
                raise UsageError(
                    f"resume: every point of sweep {self.sweep_id} succeeded; there is nothing to resume"
                )
            if submitted:  # submitted again: each point's ledger says it goes on
                for run, st in points:
                    if st.state != "created":
                        run._record_resume(backend.name, st, next_attempt(run.events()), [])
            # (Locally, each point's own `orch resume` records it, under the point's claim.)
            return self._start(backend, [run.dir for run, _ in points], claim, wait=wait, console=console)

    def _backend(self) -> Any:
        return _recorded_backend(self.record().get("backend", "local"), f"sweep {self.sweep_id}: sweep.yaml")

    def _claim(self, verb: str) -> Any:
        """The sweep directory's claim, held by whoever runs or submits its points."""
        return _claim(
            self.dir,
            verb,
            f"sweep {self.sweep_id}",
            "run or submitted",
            f"`orch status {self.sweep_id}` follows it, `orch cancel {self.sweep_id}` stops it",
        )

    def _start(
        self, backend: Any, points: list[Any], claim: Any, *, wait: bool, console: IO[str] | None
    ) -> Sweep:
        """Start `points` while holding the sweep's `claim` (for a runner in the background, the
        claim passes to it: released here first, taken there). Submitted, the caller holds every
        point's claim too, until the job array's `submitted` is in each point's ledger: an
        `orch resume SWEEP/N` meanwhile would find the point `created` (or stopped) and submit it
        a second time. One descriptor per point: a sweep needs fewer points than the open-file
        limit (`ulimit -n`, 1024 by default; Slurm's MaxArraySize is 1001 by default)."""
        record = self.record()
        if backend.foreground_hint is not None:  # a scheduler: one job array of these points
            backend.submit_sweep(self.dir, record, points)
            return self
        if not wait:
            claim.release()
            self.process = start_detached(
                ["resume", self.url, "--quiet"], console_log(self.url, self.sweep_id)
            )
            return self
        self.outcome = backend.run_sweep(self.dir, record, points, console or sys.stderr)
        return self
