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
from orchestrator.errors import OrchError

DEFAULT_CONFIG = "cluster.yaml"


def _config_args(p: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        p.add_argument(
            "config",
            nargs="?",
            default=DEFAULT_CONFIG,
            metavar="CONFIG",
            help="cluster.yaml to use (default: ./cluster.yaml)",
        )
    p.add_argument("--backend", choices=backend_names(), help="override the config's top-level `backend`")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override one field, e.g. --set resources.nodes=2 (repeatable)",
    )


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

    p = sub.add_parser(
        "render",
        help="print the launch spec without starting anything",
        description=(
            "Print each rank's node, argv and env (secrets redacted)."
            " Nothing is started; the output is stable across runs."
        ),
    )
    _config_args(p)
    p.add_argument("--run-id", help="render with this run id instead of a placeholder")

    p = sub.add_parser(
        "run",
        help="run the job in the foreground on this machine, supervised",
        description=(
            "Start nodes x ranks processes on this machine, stream their logs,"
            " restart failed attempts from the newest checkpoint, and print a summary."
            " Ctrl-C stops every rank."
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
    p.add_argument("--json", action="store_true", help="print the final summary as JSON on stdout")

    p = sub.add_parser(
        "submit",
        help="submit the job to Slurm from a login node",
        description=(
            "Create the run directory, submit the supervisor with submitit (sbatch),"
            " print the run id and the Slurm job id."
            " The supervisor runs each attempt as one srun step, resumes from the newest checkpoint,"
            " and requeues on preemption."
        ),
    )
    _config_args(p)
    p.add_argument("--run-id", help="use this run id (default: <name>-<UTC time>-<random>)")
    p.add_argument("--json", action="store_true", help="print {run_id, job_id, run_dir} as JSON")

    p = sub.add_parser("cancel", help="cancel a run (scancel for Slurm runs; SIGTERM to a local supervisor)")
    _run_ref_args(p)

    p = sub.add_parser("status", help="show a run's state, attempts, newest checkpoint and root cause")
    _run_ref_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("logs", help="print a run's rank logs")
    _run_ref_args(p)
    p.add_argument("--rank", type=int, action="append", help="only this rank (repeatable; default: all)")
    p.add_argument("--attempt", type=int, help="this attempt (default: the latest)")
    p.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="keep printing new lines until the run finishes (local filesystems)",
    )

    p = sub.add_parser("ls", help="list runs under storage.root")
    p.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help="cluster.yaml whose storage.root holds the runs (default: ./cluster.yaml)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("checkpoints", help="list a run's committed checkpoints")
    _run_ref_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--verify", action="store_true", help="read every file and check its checksum")
    return parser


# ---------------------------------------------------------------------------- commands


def _load(args: argparse.Namespace) -> Any:
    from orchestrator.spec.config import load_config

    return load_config(args.config, args.overrides, backend=args.backend)


def _load_for(args: argparse.Namespace, command: str) -> tuple[Any, Any]:
    """The config and its backend, checked for the command and for the pass_env it needs."""
    from orchestrator.backends import get_backend

    config = _load(args)
    backend = get_backend(config.backend)
    hint = backend.foreground_hint if command == "run" else backend.submit_hint
    if hint is not None:
        raise OrchError(hint)
    missing = [n for n in config.job.pass_env if n not in os.environ]
    if missing:
        raise OrchError(f"job.pass_env: {missing[0]} is not set in this environment")
    return config, backend


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
        raise OrchError(f"--ranks: expected comma-separated rank numbers, got {text!r}") from None
    bad = [r for r in ranks if not 0 <= r < world]
    if bad:
        raise OrchError(f"--ranks: rank {bad[0]} is outside the world of {world} ranks")
    return ranks


def _create_run(args: argparse.Namespace, config: Any) -> Any:
    """A new run directory with run.yaml frozen in it."""
    from orchestrator.spec.config import config_to_dict
    from orchestrator.storage.rundir import RunDir, join_url
    from orchestrator.storage.runid import is_valid_run_id, new_run_id

    run_id = args.run_id or new_run_id(config.job_name)
    if not is_valid_run_id(run_id):
        raise OrchError(f"--run-id: {run_id!r} may use letters, digits and _.+- only")
    run = RunDir(join_url(config.storage_root, run_id))
    frozen = {
        "run_id": run_id,
        "created": time.time(),
        "backend": config.backend,
        "config_file": os.path.abspath(args.config),
        "base_dir": config.base_dir,
        "config": config_to_dict(config),
    }
    try:
        run.create(frozen)
    except FileExistsError:
        raise OrchError(f"--run-id: run {run_id} already exists at {run.url}") from None
    return run


def cmd_submit(args: argparse.Namespace) -> int:
    config, backend = _load_for(args, "submit")
    backend.check_storage(config.storage_root)  # fails before creating anything
    run = _create_run(args, config)
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
    from orchestrator.backends.api import RunOptions

    config, backend = _load_for(args, "run")
    show = () if args.quiet else _parse_ranks(args.ranks, config.resources.world_size)
    run = _create_run(args, config)
    result = backend.run(config, run, RunOptions(show_ranks=show))
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
    for rank, url in chosen:
        data = open(url, "rb").read() if run.is_local else _read_remote(url, run)
        for line in data.decode("utf-8", "replace").splitlines():
            print(f"[rank {rank}] {line}")
    return 0


def _follow_logs(run: Any, ranks: list[int] | None) -> int:
    """Print the latest attempt's rank logs as they grow; move on to new attempts; stop when
    the run has finished."""
    from orchestrator.launch.logstream import LogStreamer

    if not run.is_local:
        raise OrchError("logs -f: follows run directories on a filesystem; without -f it reads any storage")
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
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
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
    return 0


COMMANDS = {
    "render": cmd_render,
    "run": cmd_run,
    "submit": cmd_submit,
    "cancel": cmd_cancel,
    "status": cmd_status,
    "logs": cmd_logs,
    "ls": cmd_ls,
    "checkpoints": cmd_checkpoints,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
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
