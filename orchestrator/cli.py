"""`orch`: thin commands over config -> plan -> render -> backend -> supervisor.

Heavy modules (torch, fsspec) are imported inside the commands that need them, so
`orch --help` stays instant. Every user error is one line on stderr and a non-zero exit
status (2 for bad input); never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

from orchestrator import __version__
from orchestrator.backends import backend_names
from orchestrator.contract import Event
from orchestrator.errors import OrchError, UsageError

DEFAULT_CONFIG = "cluster.yaml"


def _config_args(p: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        p.add_argument(
            "config",
            nargs="?",
            default=DEFAULT_CONFIG,
            metavar="CONFIG|SCRIPT",
            help=(
                "cluster.yaml to use (default: ./cluster.yaml), or a training script (.py) to run"
                " without one, torchrun-style; its arguments follow `--`"
            ),
        )
        p.add_argument(
            "-m",
            dest="module",
            metavar="MODULE",
            help="run `python -m MODULE` without a cluster.yaml (its arguments follow `--`)",
        )
        p.add_argument(
            "--nproc-per-node",
            type=int,
            metavar="N",
            help="ranks per node (resources.ranks_per_node)",
        )
        p.add_argument("--nnodes", type=int, metavar="N", help="simulated nodes (resources.nodes)")
    p.add_argument("--backend", choices=backend_names(), help="override the config's top-level `backend`")
    _set_arg(p, "override one field, e.g. --set resources.nodes=2 (repeatable)")


def _set_arg(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE", help=help)


def _run_ref_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run",
        metavar="RUN",
        help="a run id (looked up under storage.root of --config) or a run directory (path or fsspec URL)",
    )
    p.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help="cluster.yaml whose storage.root holds the runs (default: ./cluster.yaml)",
    )


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps descriptions; keeps the line breaks of the examples (the epilog)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("example"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _command(sub: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    return sub.add_parser(name, formatter_class=_HelpFormatter, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orch",
        description=(
            "Run PyTorch training on N nodes x M ranks: locally (gloo on CPU) or on Slurm;"
            " supervised, checkpointed, resumable."
        ),
    )
    parser.add_argument("--version", action="version", version=f"orch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _command(
        sub,
        "render",
        help="print the launch spec without starting anything",
        description=(
            "Print each rank's node, argv and env (secrets redacted)."
            " Nothing is started; the output is stable across runs."
        ),
        epilog="examples:\n  orch render\n  orch render cluster.yaml --backend slurm --set resources.nodes=3",
    )
    _config_args(p)
    p.add_argument("--run-id", help="render with this run id instead of a placeholder")

    p = _command(
        sub,
        "run",
        help="run the job in the foreground on this machine, supervised",
        description=(
            "Start nodes x ranks processes on this machine, stream their logs,"
            " restart failed attempts from the newest checkpoint, and print a summary."
            " Ranks' output goes to stdout, the orchestrator's lines to stderr."
            " Ctrl-C stops every rank."
        ),
        epilog=(
            "examples:\n  orch run\n  orch run cluster.yaml --set resources.nodes=2 --ranks 0\n"
            "  orch run --resume --run-id mnist-20261130-101500-ab12"
        ),
    )
    _config_args(p)
    p.add_argument("--run-id", help="use this run id (default: <name>-<UTC time>-<random>)")
    p.add_argument(
        "--ranks",
        help=(
            "show only these ranks' output on the console, e.g. 0 or 0,3"
            " (all ranks are always logged to files)"
        ),
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="show no rank output on the console, only the orchestrator's lines",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the final summary as JSON on stdout (the ranks' output then goes to stderr)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the existing run --run-id ID (as `orch resume ID`) instead of starting a new one",
    )

    p = _command(
        sub,
        "resume",
        help="continue a stopped, cancelled, failed or lost run from its newest checkpoint",
        description=(
            "Continue a run as its next attempt: same run id, same run directory, events and"
            " goodput continued, from its newest committed checkpoint (exactly: the same result"
            " as a run never stopped). Local runs continue in the foreground, as `orch run`;"
            " Slurm runs are submitted again. The run keeps the config frozen in its run.yaml;"
            " --set may change restart.*, resources.* (a new world size resumes exactly) and"
            " job.args."
        ),
        epilog="example:\n  orch resume mnist-20261130-101500-ab12 --set resources.nodes=1",
    )
    _run_ref_args(p)
    _set_arg(p, "change restart.*, resources.* or job.args for the rest of the run (repeatable)")
    p.add_argument("--ranks", help="local runs: show only these ranks' output on the console, e.g. 0 or 0,3")
    p.add_argument("--quiet", action="store_true", help="local runs: show no rank output on the console")
    p.add_argument("--json", action="store_true", help="print the final summary (or the submission) as JSON")

    p = _command(
        sub,
        "submit",
        help="submit the job to Slurm from a login node",
        description=(
            "Create the run directory, submit the supervisor with submitit (sbatch),"
            " print the run id and the Slurm job id."
            " The supervisor runs each attempt as one srun step, resumes from the newest checkpoint,"
            " and requeues on preemption."
        ),
        epilog="example:\n  orch submit cluster.yaml --backend slurm --set resources.nodes=3",
    )
    _config_args(p)
    p.add_argument("--run-id", help="use this run id (default: <name>-<UTC time>-<random>)")
    p.add_argument("--json", action="store_true", help="print {run_id, job_id, run_dir} as JSON")

    p = _command(
        sub,
        "cancel",
        help="cancel a run (scancel for Slurm runs; SIGTERM to a local supervisor)",
        description=(
            "Cancel a Slurm run (scancel), or ask a local run's supervisor to stop (SIGTERM):"
            " ranks using the runtime checkpoint their step first; `orch resume RUN` continues."
            " A pid that is no longer the run's supervisor is never signalled."
        ),
        epilog="example:\n  orch cancel mnist-20261130-101500-ab12",
    )
    _run_ref_args(p)

    p = _command(
        sub,
        "status",
        help="show a run's state, attempts, newest checkpoint and root cause",
        description=(
            "A run's state (pending, running, preempted-requeued, succeeded, failed, cancelled,"
            " stopped, lost), attempts, wall time, newest checkpoint, goodput and root cause."
        ),
        epilog=(
            "examples:\n  orch status mnist-20261130-101500-ab12\n"
            "  orch status runs/mnist-20261130-101500-ab12 --json"
        ),
    )
    _run_ref_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _command(
        sub,
        "logs",
        help="print a run's rank logs",
        description=(
            "Print the rank logs of a run's latest attempt (or --attempt N), each line prefixed [rank R]."
        ),
        epilog="examples:\n  orch logs mnist-20261130-101500-ab12 --rank 0 -f\n  orch logs RUN --attempt 0",
    )
    _run_ref_args(p)
    p.add_argument("--rank", type=int, action="append", help="only this rank (repeatable; default: all)")
    p.add_argument("--attempt", type=int, help="this attempt (default: the latest)")
    p.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="keep printing new lines until the run finishes (local filesystems)",
    )

    p = _command(
        sub,
        "ls",
        help="list runs under storage.root",
        description="List the runs under storage.root of --config, newest first, with state and attempts.",
        epilog="example:\n  orch ls --json",
    )
    p.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help="cluster.yaml whose storage.root holds the runs (default: ./cluster.yaml)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _command(
        sub,
        "checkpoints",
        help="list a run's committed checkpoints",
        description=(
            "List a run's committed checkpoints: step, time, size, model digest. --verify reads"
            " every file against its checksum and exits 1 if any checkpoint is corrupt."
        ),
        epilog="example:\n  orch checkpoints mnist-20261130-101500-ab12 --verify",
    )
    _run_ref_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--verify", action="store_true", help="read every file and check its checksum")
    return parser


# ---------------------------------------------------------------------------- commands


def _is_quick_start(args: argparse.Namespace) -> bool:
    """A script or module named on the command line, without a cluster.yaml."""
    return bool(getattr(args, "module", None)) or str(args.config).endswith(".py")


def _overrides(args: argparse.Namespace) -> list[str]:
    """--set, then the torchrun-style flags and the arguments after `--`, as overrides of the
    same kind (JSON is YAML: quoted, each argument stays the text it was)."""
    overrides = list(args.overrides)
    if getattr(args, "nproc_per_node", None) is not None:
        overrides.append(f"resources.ranks_per_node={args.nproc_per_node}")
    if getattr(args, "nnodes", None) is not None:
        overrides.append(f"resources.nodes={args.nnodes}")
    if getattr(args, "job_args", None) is not None:
        overrides.append(f"job.args={json.dumps(args.job_args)}")
    return overrides


def _load(args: argparse.Namespace) -> Any:
    from orchestrator.spec.config import load_config, quick_start_config

    overrides = _overrides(args)
    if _is_quick_start(args):
        if args.module and args.config != DEFAULT_CONFIG:
            raise UsageError(f"-m {args.module}: give a module or a script ({args.config}), not both")
        return quick_start_config(
            script=None if args.module else args.config,
            module=args.module,
            overrides=overrides,
            backend=args.backend,
            base_dir=os.getcwd(),
        )
    return load_config(args.config, overrides, backend=args.backend)


def _load_for(args: argparse.Namespace, command: str) -> tuple[Any, Any]:
    """The config and its backend, checked for the command and for the pass_env it needs."""
    from orchestrator.backends import get_backend

    config = _load(args)
    backend = get_backend(config.backend)
    hint = backend.foreground_hint if command == "run" else backend.submit_hint
    if hint is not None:
        raise UsageError(hint)
    _check_pass_env(config)
    return config, backend


def _check_pass_env(config: Any) -> None:
    missing = [n for n in config.job.pass_env if n not in os.environ]
    if missing:
        raise UsageError(f"job.pass_env: {missing[0]} is not set in this environment")


def _run_backend(run: Any, events: list[dict[str, Any]]) -> Any:
    """The backend a run was started on: its events say, else its run.yaml."""
    from orchestrator.backends import get_backend

    named = [
        e["backend"]
        for e in events
        if e.get("event") in (Event.SUBMITTED, Event.RUN_STARTED, Event.JOB_STARTED) and e.get("backend")
    ]
    return get_backend(named[-1] if named else run.read_run_config().get("backend", "local"))


def _storage_root(config_path: str) -> str:
    """storage.root from a config file, without requiring its entrypoint to exist here."""
    from orchestrator.spec.config import load_config

    if not os.path.exists(config_path):
        return os.path.abspath("runs")
    return load_config(config_path, check_files=False).storage_root


def cmd_render(args: argparse.Namespace) -> int:
    from orchestrator.backends import get_backend
    from orchestrator.storage.rundir import join_url

    config = _load(args)
    run_id = args.run_id or "<run-id>"
    text = get_backend(config.backend).render(
        config,
        run_id=run_id,
        run_dir=join_url(config.storage_root, run_id),
        python=config.job.python or sys.executable,
    )
    sys.stdout.write(text)
    return 0


def _parse_ranks(text: str | None, world: int) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        ranks = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise UsageError(f"--ranks: expected comma-separated rank numbers, got {text!r}") from None
    bad = [r for r in ranks if not 0 <= r < world]
    if bad:
        raise UsageError(f"--ranks: rank {bad[0]} is outside the world of {world} ranks")
    return ranks


def _create_run(args: argparse.Namespace, config: Any) -> Any:
    """A new run directory with run.yaml frozen in it."""
    from orchestrator.spec.config import config_to_dict
    from orchestrator.storage.rundir import RunDir, join_url
    from orchestrator.storage.runid import is_valid_run_id, new_run_id

    run_id = args.run_id or new_run_id(config.job_name)
    if not is_valid_run_id(run_id):
        raise UsageError(f"--run-id: {run_id!r} may use letters, digits and _.+- only")
    run = RunDir(join_url(config.storage_root, run_id))
    frozen = {
        "run_id": run_id,
        "created": time.time(),
        "backend": config.backend,
        "config_file": None if _is_quick_start(args) else os.path.abspath(args.config),
        "base_dir": config.base_dir,
        "config": config_to_dict(config),
    }
    try:
        run.create(frozen)
    except FileExistsError:
        raise UsageError(f"--run-id: run {run_id} already exists at {run.url}") from None
    except Exception as exc:  # noqa: BLE001 - any storage's error (OSError, botocore's own): one line
        from orchestrator.storage.causes import storage_cause

        raise UsageError(
            f"storage.root: cannot create the run directory {run.url}: {storage_cause(exc)}"
        ) from None
    return run


def cmd_submit(args: argparse.Namespace) -> int:
    config, backend = _load_for(args, "submit")
    backend.check_storage(config.storage_root)  # fails before creating anything
    backend.check_host(config)
    return _submit(args, config, backend, _create_run(args, config))


def _submit(args: argparse.Namespace, config: Any, backend: Any, run: Any) -> int:
    submission = backend.submit(config, run, config.job.python or sys.executable)
    job_id = submission.job_id
    run.append_event(
        Event.SUBMITTED,
        backend=backend.name,
        job_id=job_id,
        nodes=config.resources.nodes,
        ranks_per_node=config.resources.ranks_per_node,
    )
    if args.json:
        print(json.dumps({"run_id": run.run_id, "job_id": job_id, "run_dir": run.url}))
    else:
        print(
            f"submitted run {run.run_id} as Slurm job {job_id}\nrun dir {run.url}\n"
            f"follow with: orch status {run.run_id}; orch logs {run.run_id} -f"
        )
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from orchestrator.storage.catalog import resolve_run

    run = resolve_run(args.run, _storage_root(args.config))
    events = run.events()
    print(_run_backend(run, events).cancel(run, events))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    if args.resume:
        from orchestrator.storage.rundir import RunDir, join_url

        if not args.run_id:
            raise UsageError("--resume: name the run to continue with --run-id ID")
        run = RunDir(join_url(_load(args).storage_root, args.run_id))
        if not run.exists():
            raise UsageError(f"--resume: no run {args.run_id} at {run.url}")
        return _resume(args, run)
    config, backend = _load_for(args, "run")
    show = _shown_ranks(args, config)  # bad input fails before the run directory exists
    backend.check_storage(config.storage_root)  # so does storage that cannot take the run
    backend.check_host(config)  # and a host without the GPUs it asks for
    return _run_in_foreground(args, config, backend, _create_run(args, config), show)


def cmd_resume(args: argparse.Namespace) -> int:
    from orchestrator.storage.catalog import resolve_run

    return _resume(args, resolve_run(args.run, _storage_root(args.config)))


_RESUMABLE = ("created", "stopped", "cancelled", "failed", "lost")


def _resume(args: argparse.Namespace, run: Any) -> int:
    """The run's next attempt, from its newest checkpoint, with the config it was started with."""
    from orchestrator.spec.config import config_for_resume, config_to_dict
    from orchestrator.supervision.loop import next_attempt
    from orchestrator.supervision.status import run_status

    events = run.events()
    backend = _run_backend(run, events)
    st = run_status(run, events, backend.live_state(run, events))
    if st.state == "succeeded":
        raise UsageError(f"resume: run {run.run_id} succeeded; there is nothing to resume")
    if st.state not in _RESUMABLE:
        raise UsageError(
            f"resume: run {run.run_id} is {st.state}; only a stopped, cancelled, failed or lost run"
            f" resumes (`orch cancel {run.run_id}` first)"
        )
    record = run.read_run_config()
    overrides = _overrides(args)
    config = config_for_resume(record, overrides)
    _check_pass_env(config)
    show = _shown_ranks(args, config)  # bad input fails before anything changes
    backend.check_storage(config.storage_root)  # so does storage that cannot take writes
    backend.check_host(config)
    attempt = next_attempt(events)
    if overrides:
        run.replace_run_config(
            {**record, "config": config_to_dict(config)}, keep_as=f"run-before-attempt-{attempt}.yaml"
        )
    run.append_event(
        Event.RESUMED,
        backend=backend.name,
        from_state=st.state,
        attempt=attempt,
        newest_checkpoint=st.newest_checkpoint,
        overrides=overrides,
    )
    print(
        f"[orch] resuming run {run.run_id} ({st.state}) as attempt {attempt}, from "
        + (f"checkpoint step {st.newest_checkpoint}" if st.newest_checkpoint is not None else "the start"),
        file=sys.stderr,
    )
    if backend.foreground_hint is not None:  # a scheduler's backend: the next attempt is a new job
        return _submit(args, config, backend, run)
    return _run_in_foreground(args, config, backend, run, show)


def _shown_ranks(args: argparse.Namespace, config: Any) -> tuple[int, ...] | None:
    return () if args.quiet else _parse_ranks(args.ranks, config.resources.world_size)


def _run_in_foreground(
    args: argparse.Namespace, config: Any, backend: Any, run: Any, show: tuple[int, ...] | None
) -> int:
    from orchestrator.backends.api import RunOptions

    result = backend.run(config, run, RunOptions(show_ranks=show, ranks_to_stdout=not args.json))
    ckpt = (
        f"; newest checkpoint step {result.newest_checkpoint}" if result.newest_checkpoint is not None else ""
    )
    if result.status == "succeeded":
        line = (
            f"run {result.run_id} succeeded in {result.wall_s:.1f}s after {result.attempts} attempt(s){ckpt}"
        )
    elif result.status == "stopped":
        line = f"run {result.run_id} stopped after {result.wall_s:.1f}s{ckpt}"
    else:
        cause = result.root_cause.describe if result.root_cause else "unknown cause"
        line = f"run {result.run_id} failed after {result.attempts} attempt(s): {cause}{ckpt}"
    print(f"[orch] {line}\n[orch] run dir {result.run_dir}", file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                {
                    "run_id": result.run_id,
                    "run_dir": result.run_dir,
                    "status": result.status,
                    "attempts": result.attempts,
                    "wall_s": round(result.wall_s, 3),
                    "newest_checkpoint": result.newest_checkpoint,
                    "root_cause": result.root_cause.to_json() if result.root_cause else None,
                }
            )
        )
    return result.exit_code


def cmd_status(args: argparse.Namespace) -> int:
    from orchestrator.storage.catalog import resolve_run
    from orchestrator.supervision.status import format_status, run_status

    run = resolve_run(args.run, _storage_root(args.config))
    events = run.events()
    st = run_status(run, events, _run_backend(run, events).live_state(run, events))
    print(json.dumps(st.to_json(), indent=1) if args.json else format_status(st))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from orchestrator.storage.catalog import resolve_run

    run = resolve_run(args.run, _storage_root(args.config))
    if args.follow:
        return _follow_logs(run, args.rank)
    files = run.log_files()
    if not files:
        raise OrchError(f"run {run.run_id} has no logs yet")
    attempt = args.attempt if args.attempt is not None else max(a for a, _ in files)
    chosen = sorted(
        (rank, url)
        for (a, rank), url in files.items()
        if a == attempt and (not args.rank or rank in args.rank)
    )
    if not chosen:
        raise OrchError(f"no logs for attempt {attempt}" + (f" rank(s) {args.rank}" if args.rank else ""))
    from orchestrator.launch.logstream import rank_line

    for rank, url in chosen:
        data = open(url, "rb").read() if run.is_local else _read_remote(url, run)
        for line in data.splitlines():
            print(rank_line(rank, line))
    return 0


def _follow_logs(run: Any, ranks: list[int] | None) -> int:
    """Print the latest attempt's rank logs as they grow; move on to new attempts; stop when
    the run has finished."""
    from orchestrator.launch.logstream import LogStreamer

    if not run.is_local:
        raise UsageError("logs -f: follows run directories on a filesystem; without -f it reads any storage")
    streamer = LogStreamer(sys.stdout, ranks, interval_s=0.2)
    streamer.start()
    attempt = None
    try:
        while True:
            files = run.log_files()
            latest = max((a for a, _ in files), default=None)
            if latest is not None and latest != attempt:
                if attempt is not None:
                    streamer.flush()
                attempt = latest
                for (a, rank), path in sorted(files.items()):
                    if a == attempt:
                        streamer.follow(rank, path)
            elif latest is not None:
                for (a, rank), path in files.items():
                    if a == attempt:
                        streamer.follow_if_new(rank, path)
            if any(e.get("event") == Event.RUN_FINISHED for e in run.events()):
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        streamer.stop()
    return 0


def _read_remote(path: str, run: Any) -> bytes:
    import fsspec

    fs, _ = fsspec.core.url_to_fs(run.url)
    return fs.cat_file(path)


def cmd_ls(args: argparse.Namespace) -> int:
    from orchestrator.storage.catalog import list_runs
    from orchestrator.supervision.status import summarize

    root = _storage_root(args.config)
    rows = []
    for run in list_runs(root):
        fields = summarize(run.events())
        rows.append(
            {
                "run_id": run.run_id,
                "state": fields["state"],
                "attempts": fields["attempts"],
                "started": fields["started"],
                "run_dir": run.url,
            }
        )
    rows.sort(key=lambda r: r["started"] or 0)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no runs under {root}")
        return 0
    print(f"{'RUN':48} {'STATE':10} {'ATTEMPTS':8} STARTED")
    for r in rows:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["started"])) if r["started"] else "-"
        print(f"{r['run_id']:48} {r['state']:10} {r['attempts']:<8} {started}")
    return 0


def cmd_checkpoints(args: argparse.Namespace) -> int:
    from orchestrator.storage.catalog import resolve_run
    from orchestrator.storage.ckpt_store import CheckpointStore, CorruptCheckpoint

    run = resolve_run(args.run, _storage_root(args.config))
    store = CheckpointStore(run.child("ckpt"))
    rows = []
    for step in store.committed_steps():
        try:
            info = store.verify(step) if args.verify else store.info(step)
            rows.append(
                {
                    "step": step,
                    "created": info.created,
                    "size": info.size,
                    "model_digest": info.model_digest,
                    "verified": True if args.verify else None,
                    "url": info.url,
                }
            )
        except (CorruptCheckpoint, OSError) as exc:  # OSError: the storage, mid-read (deleted, ESTALE)
            error = (
                str(exc) if isinstance(exc, CorruptCheckpoint) else f"storage error: {exc.strerror or exc}"
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
    # Any checkpoint that fails verification fails the command: scripts check before they copy.
    exit_status = 1 if any(r["verified"] is False for r in rows) else 0
    if args.json:
        print(json.dumps(rows, indent=1))
        return exit_status
    if not rows:
        print(f"no committed checkpoints in {store.url}")
        return 0
    print(f"{'STEP':>10} {'CREATED':19} {'SIZE':>12} {'VERIFIED':8} MODEL DIGEST")
    for r in rows:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"])) if r["created"] else "-"
        verified = {True: "yes", False: "CORRUPT", None: "-"}[r["verified"]]
        size = f"{r['size']:,}" if r["size"] is not None else "-"
        print(
            f"{r['step']:>10} {created:19} {size:>12} {verified:8}"
            f" {(r['model_digest'] or r.get('error', ''))[:64]}"
        )
    return exit_status


COMMANDS = {
    "render": cmd_render,
    "run": cmd_run,
    "submit": cmd_submit,
    "resume": cmd_resume,
    "cancel": cmd_cancel,
    "status": cmd_status,
    "logs": cmd_logs,
    "ls": cmd_ls,
    "checkpoints": cmd_checkpoints,
}


_TAKES_JOB_ARGS = ("render", "run", "submit", "resume")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first `--` is the job's own command line, passed as written.
    job_args = None
    if "--" in argv:
        cut = argv.index("--")
        argv, job_args = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    args.job_args = job_args
    try:
        if job_args is not None and args.command not in _TAKES_JOB_ARGS:
            raise UsageError(f"{args.command}: takes no job arguments (after `--`)")
        return COMMANDS[args.command](args)
    except OrchError as exc:
        print(
            str(exc) if exc.exit_code == 2 and ":" in str(exc) else f"orch {args.command}: {exc}",
            file=sys.stderr,
        )
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"orch {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
