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
from orchestrator.errors import OrchError, UsageError
from orchestrator.storage.private import NotPrivate

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


def _profile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--profile",
        action="store_true",
        help=(
            "profile a window of steps with torch.profiler (profile.enabled; the window, ranks and"
            " memory in the profile: section); see `orch profile RUN`"
        ),
    )


def _set_arg(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE", help=help)


def _grid_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="NAME=V1,V2",
        help=(
            "a sweep axis: one point per value (repeatable: every combination);"
            " adds to or replaces sweep.grid"
        ),
    )


def _run_ref_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run",
        metavar="RUN",
        help=(
            "a run id, a sweep id or a sweep's point SWEEP/N (looked up under storage.root of --config),"
            " or a run directory (path or fsspec URL)"
        ),
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
    p.add_argument("--run-id", help="render with this run id (or sweep id) instead of a placeholder")
    _grid_arg(p)

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
    _profile_arg(p)

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
            " job.args. A sweep id resumes every point that did not succeed (SWEEP/N: one point)."
        ),
        epilog=(
            "examples:\n  orch resume mnist-20261130-101500-ab12 --set resources.nodes=1\n  orch resume SWEEP"
        ),
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
    _profile_arg(p)
    p.add_argument(
        "--no-check",
        action="store_true",
        help="submit without `orch doctor`'s fast checks (partition, limits, accounting, storage)",
    )

    p = _command(
        sub,
        "doctor",
        help="check the environment, config, storage and cluster before a run",
        description=(
            "One line per check, ok / warn / fail, each problem with its fix: this machine's Python,"
            " torch, CUDA/NCCL and GPUs; the resolved launch; the storage root (writable, credentials,"
            " create-only writes, free space, the preemption lead a checkpoint's write time implies);"
            " locally free ports and cores; on Slurm the commands, the controller, the partition,"
            " account and QOS against the request, and accounting. --probe (Slurm) runs a short job on"
            " the requested shape that checks every node: the run directory visible and writable, the"
            " job's Python and the orchestrator, torch's devices, MASTER_ADDR:MASTER_PORT reachable."
            " Exit status 1 when any check fails."
        ),
        epilog=(
            "examples:\n  orch doctor\n  orch doctor cluster.yaml --backend slurm --probe\n"
            "  orch doctor --set slurm.partition=gpu --json"
        ),
    )
    _config_args(p)
    p.add_argument("--probe", action="store_true", help="slurm: also run a short job that checks every node")
    p.add_argument(
        "--probe-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="how long the probe job may wait in the queue and run (default 300)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _command(
        sub,
        "sweep",
        help="run (or submit) every point of a sweep: a grid, listed points or random draws",
        description=(
            "Every point of the config's `sweep:` section (and the --grid axes) as a whole run of its"
            " own (run id SWEEP/N): locally up to max_parallel points at once (default: as many as"
            " the cores hold), each supervised, checkpointed and resumable; on Slurm, one job array."
            " `{name}` placeholders in job.args, job.env and sweep.set take each point's values."
            " Ctrl-C stops every running point with a checkpoint; `orch resume SWEEP` continues the"
            " points that did not succeed."
        ),
        epilog=(
            "examples:\n  orch sweep cluster.yaml --set 'job.args=[--lr,{lr},--seed,{seed}]'"
            " --grid lr=1.0e-3,3.0e-3 --grid seed=0,1,2\n"
            "  orch sweep sweep.yaml --backend slurm --max-parallel 4\n  orch status SWEEP --sort loss"
        ),
    )
    p.add_argument(
        "config",
        nargs="?",
        default=DEFAULT_CONFIG,
        metavar="CONFIG",
        help="cluster.yaml (default: ./cluster.yaml)",
    )
    _grid_arg(p)
    p.add_argument("--backend", choices=backend_names(), help="override the config's top-level `backend`")
    _set_arg(p, "override one field, e.g. --set 'job.args=[--lr,{lr}]' (repeatable)")
    p.add_argument(
        "--max-parallel", type=int, metavar="N", help="points running at once (sweep.max_parallel)"
    )
    p.add_argument("--sweep-id", help="use this sweep id (default: <name>-<UTC time>-<random>)")
    p.add_argument("--json", action="store_true", help="print the sweep's final table as JSON")
    p.add_argument(
        "--no-check",
        action="store_true",
        help="slurm: submit without `orch doctor`'s fast checks (as `orch submit --no-check`)",
    )

    p = _command(
        sub,
        "cancel",
        help="cancel a run (scancel for Slurm runs; SIGTERM to a local supervisor)",
        description=(
            "Cancel a Slurm run (scancel), or ask a local run's supervisor to stop (SIGTERM):"
            " ranks using the runtime checkpoint their step first; `orch resume RUN` continues."
            " A sweep id cancels every point (a Slurm sweep's job array); SWEEP/N one point."
            " A pid that is no longer the run's supervisor is never signalled."
        ),
        epilog=(
            "examples:\n  orch cancel mnist-20261130-101500-ab12\n  orch cancel SWEEP\n  orch cancel SWEEP/3"
        ),
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
    p.add_argument(
        "--sort",
        metavar="KEY",
        help=(
            "a sweep: order its points by a column (state, step...), a swept value or a logged scalar (loss)"
        ),
    )
    p.add_argument("--reverse", action="store_true", help="with --sort: largest first")

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

    p = _command(
        sub,
        "export",
        help="turn a run's checkpoint into a model file others can load",
        description=(
            "Build the model with job.model_factory, load a committed checkpoint's weights (the newest,"
            " or --step N) and write it in --format; the export is first run on the factory's"
            " example inputs and must match the eager model within the tolerance, or nothing is written."
        ),
        epilog=(
            "examples:\n  orch export mnist-20261130-101500-ab12 --format onnx --out model.onnx\n"
            "  orch export RUN --format torchscript --step 500 --out model.ts"
        ),
    )
    _run_ref_args(p)
    p.add_argument(
        "--format",
        default="state_dict",
        choices=("state_dict", "torchscript", "onnx", "pt2"),
        help=(
            "state_dict: the weights (torch.save); torchscript: torch.jit.trace; onnx: torch.onnx"
            " (needs the onnx extra); pt2: torch.export (default: state_dict)"
        ),
    )
    p.add_argument("--step", type=int, help="this committed checkpoint (default: the newest)")
    p.add_argument("--out", help="where to write (default: RUN_DIR/export/model-STEP.EXT)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _command(
        sub,
        "profile",
        help="print the top ops of a profiled run (orch run --profile)",
        description=(
            "Print each profiled rank's top ops by self time (per step of the profiled window) for"
            " the newest profiled attempt, or --attempt N, and where its traces are: open the folder"
            " with `tensorboard --logdir` (the PyTorch profiler tab) or a trace file in Perfetto."
        ),
        epilog="examples:\n  orch profile mnist-20261130-101500-ab12\n  orch profile RUN --rank 0 --json",
    )
    _run_ref_args(p)
    p.add_argument("--attempt", type=int, help="this attempt (default: the newest profiled one)")
    p.add_argument("--rank", type=int, action="append", help="only this rank (repeatable; default: all)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _command(
        sub,
        "report",
        help="write a run's (or a sweep's) report: one self-contained HTML file",
        description=(
            "Write one HTML file that opens offline: loss and throughput over steps across all"
            " attempts, a timeline of attempts with failures, preemptions, restarts and checkpoints,"
            " and the goodput breakdown; for a sweep, every point side by side."
        ),
        epilog="examples:\n  orch report mnist-20261130-101500-ab12\n  orch report RUN --out report.html",
    )
    _run_ref_args(p)
    p.add_argument("--out", help="where to write (default: RUN_DIR/report.html)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


# ---------------------------------------------------------------------------- commands
# Each command parses its arguments, calls orchestrator.api, and prints what comes back.


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
    if getattr(args, "profile", False):
        overrides.append("profile.enabled=true")
    return overrides


def _load(args: argparse.Namespace) -> Any:
    from orchestrator import api
    from orchestrator.spec.config import quick_start_config

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
    return api.load_config(args.config, overrides, backend=args.backend)


def _config_file(args: argparse.Namespace) -> str | None:
    return None if _is_quick_start(args) else args.config


def _is_sweep(args: argparse.Namespace) -> bool:
    """A cluster.yaml with a `sweep:` section (or --grid axes on the command line)."""
    if _is_quick_start(args):
        if getattr(args, "grid", None):
            raise UsageError("--grid: a sweep needs a cluster.yaml (its job.args take the {placeholders})")
        return False
    if getattr(args, "grid", None):
        return True
    from orchestrator.spec.config import apply_overrides, read_document

    return apply_overrides(read_document(args.config), args.overrides).get("sweep") is not None


def cmd_render(args: argparse.Namespace) -> int:
    from orchestrator.backends import get_backend
    from orchestrator.storage.rundir import join_url

    if _is_sweep(args):
        return _render_sweep(args)
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


def _render_sweep(args: argparse.Namespace) -> int:
    """Every point's values, its resolved job.args / job.env, and its launch."""
    from orchestrator import api
    from orchestrator.backends import get_backend
    from orchestrator.storage.rundir import join_url

    spec = api.load_sweep(args.config, _overrides(args), grid=args.grid, backend=args.backend)
    backend = get_backend(spec.base.backend)
    sweep_id = args.run_id or "<sweep-id>"
    parallel = spec.max_parallel if spec.max_parallel is not None else "as many as the cores allow"
    out = [
        f"# orch render: sweep of {len(spec.points)} point(s), max_parallel {parallel}; nothing was started"
    ]
    for point, config in zip(spec.points, spec.configs, strict=True):
        values = ", ".join(f"{k}={v}" for k, v in point.values.items())
        run_id = f"{sweep_id}/{point.index}"
        out += [
            "",
            f"# ======== point {point.index}: {values} (run id {run_id})",
            f"# job.args: {json.dumps(list(config.job.args))}",
            f"# job.env: {json.dumps(dict(config.job.env), sort_keys=True)}",
        ]
        out.append(
            backend.render(
                config,
                run_id=run_id,
                run_dir=join_url(config.storage_root, sweep_id, str(point.index)),
                python=config.job.python or sys.executable,
            ).rstrip("\n")
        )
    sys.stdout.write("\n".join(out) + "\n")
    return 0


def _parse_ranks(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise UsageError(f"--ranks: expected comma-separated rank numbers, got {text!r}") from None


def _shown_ranks(args: argparse.Namespace, config: Any) -> tuple[int, ...] | None:
    if args.quiet:
        return ()
    from orchestrator.api import check_shown_ranks

    ranks = _parse_ranks(args.ranks)
    check_shown_ranks(ranks, config)
    return ranks


def _refuse_sweep(args: argparse.Namespace, command: str) -> None:
    if not _is_quick_start(args) and _is_sweep(args):
        raise UsageError(
            f"{args.config}: sweep: this config is a sweep: start it with `orch sweep {args.config}`"
            f" (`orch {command}` starts one run; `orch render` shows every point)"
        )


def cmd_submit(args: argparse.Namespace) -> int:
    from orchestrator import api

    _refuse_sweep(args, "submit")
    run = api.submit(_load(args), run_id=args.run_id, config_file=_config_file(args), check=not args.no_check)
    _print_submission(args, run)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from orchestrator import api

    config = _load(args)
    if args.probe and config.backend != "slurm":
        raise UsageError(
            "--probe: runs a job on Slurm nodes; this config's backend is local (--backend slurm?)"
        )
    report = api.doctor(config, probe=args.probe, probe_timeout_s=args.probe_timeout)
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        print("\n".join(report.lines()))
    return 1 if report.failed else 0


def _print_submission(args: argparse.Namespace, run: Any) -> None:
    job_id = run.job_id()
    if args.json:
        print(json.dumps({"run_id": run.run_id, "job_id": job_id, "run_dir": run.url}))
    else:
        print(
            f"submitted run {run.run_id} as Slurm job {job_id}\nrun dir {run.url}\n"
            f"follow with: orch status {run.run_id}; orch logs {run.run_id} -f"
        )


def cmd_cancel(args: argparse.Namespace) -> int:
    from orchestrator import api

    print(api.get_run(args.run, config=args.config).cancel())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from orchestrator import api

    if args.resume:
        if not args.run_id:
            raise UsageError("--resume: name the run to continue with --run-id ID")
        from orchestrator.spec.config import load_config
        from orchestrator.storage.rundir import RunDir, join_url

        # A sweep's config finds its points too (--run-id SWEEP/N): its section is left out here.
        root = (
            _load(args).storage_root
            if _is_quick_start(args)
            else load_config(args.config, _overrides(args), backend=args.backend, sweep="ignore").storage_root
        )
        run = RunDir(join_url(root, args.run_id))
        if not run.exists():
            raise UsageError(f"--resume: no run {args.run_id} at {run.url}")
        return _resume(args, api.Run(run))
    _refuse_sweep(args, "run")
    config = _load(args)
    api.backend_for(config, "run")  # the same checks api.run makes, in the order users meet them
    api.check_pass_env(config)
    show = _shown_ranks(args, config)  # bad input fails before the run directory exists
    run = api.run(
        config,
        run_id=args.run_id,
        config_file=_config_file(args),
        show_ranks=show,
        ranks_to_stdout=not args.json,
    )
    return _print_result(args, run.result)


def cmd_resume(args: argparse.Namespace) -> int:
    from orchestrator import api

    found = api.get_run(args.run, config=args.config)
    if isinstance(found, api.Sweep):
        if args.overrides or args.ranks or args.job_args is not None:
            raise UsageError(
                "resume: a sweep resumes as it was; --set, --ranks and job arguments apply to one"
                " point (SWEEP/N)"
            )
        return _finish_sweep(args, found.resume())
    return _resume(args, found)


def _resume(args: argparse.Namespace, run: Any) -> int:
    """The run's next attempt, from its newest checkpoint, with the config it was started with."""
    show = () if args.quiet else _parse_ranks(args.ranks)
    run.resume(_overrides(args), show_ranks=show, ranks_to_stdout=not args.json)
    if run.result is None:  # submitted to a scheduler
        _print_submission(args, run)
        return 0
    return _print_result(args, run.result)


def _print_result(args: argparse.Namespace, result: Any) -> int:
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


def cmd_sweep(args: argparse.Namespace) -> int:
    from orchestrator import api

    spec = api.load_sweep(
        args.config, args.overrides, grid=args.grid, max_parallel=args.max_parallel, backend=args.backend
    )
    swept = api.sweep(spec, sweep_id=args.sweep_id, config_file=args.config, check=not args.no_check)
    return _finish_sweep(args, swept)


def _finish_sweep(args: argparse.Namespace, sweep: Any) -> int:
    """After a local sweep ran (or a Slurm one was submitted): its table and an exit status
    (0: every point succeeded or was submitted; 1: a point failed; 130: stopped)."""
    st = sweep.status()
    if args.json:
        print(json.dumps(st.to_json(), indent=1))
    else:
        from orchestrator.supervision.sweep_status import format_sweep_status

        print(format_sweep_status(st))
        print(f"follow with: orch status {sweep.sweep_id}; orch ls")
    if not sweep.outcome:
        return 0
    states = set(sweep.outcome.values())
    if states <= {"succeeded"}:
        return 0
    return 1 if "failed" in states or "lost" in states else 130


def cmd_status(args: argparse.Namespace) -> int:
    from orchestrator import api
    from orchestrator.supervision.status import format_status

    found = api.get_run(args.run, config=args.config)
    if isinstance(found, api.Sweep):
        from orchestrator.supervision.sweep_status import format_sweep_status, sort_rows

        st = sort_rows(found.status(), args.sort, descending=args.reverse)
        print(json.dumps(st.to_json(), indent=1) if args.json else format_sweep_status(st))
        return 0
    if args.sort:
        raise UsageError("--sort: orders a sweep's points; this is one run")
    st = found.status()
    print(json.dumps(st.to_json(), indent=1) if args.json else format_status(st))
    return 0


def _one_run(args: argparse.Namespace) -> Any:
    from orchestrator import api

    found = api.get_run(args.run, config=args.config)
    if isinstance(found, api.Sweep):
        raise UsageError(
            f"{args.command}: {args.run} is a sweep; name one of its points, e.g. {found.sweep_id}/0"
        )
    return found


def cmd_logs(args: argparse.Namespace) -> int:
    run = _one_run(args)
    if args.follow:
        run.logs(args.rank, follow=True, out=sys.stdout)
        return 0
    for line in run.logs(args.rank, attempt=args.attempt):
        print(line)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from orchestrator import api

    root = api.storage_root_of(args.config)
    rows = api.list_runs(root)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no runs under {root}")
        return 0
    print(f"{'RUN':48} {'STATE':10} {'ATTEMPTS':8} STARTED")
    sweeps_seen: set[str] = set()
    for r in rows:
        if r.get("sweep") in sweeps_seen:
            continue
        members = [r] if "sweep" not in r else [m for m in rows if m.get("sweep") == r["sweep"]]
        if "sweep" in r:
            sweeps_seen.add(r["sweep"])
            counts: dict[str, int] = {}
            for m in members:
                counts[m["state"]] = counts.get(m["state"], 0) + 1
            summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            print(f"{r['sweep']:48} sweep of {len(members)} point(s): {summary}")
        for m in sorted(members, key=lambda m: int(m["run_id"].rsplit("/", 1)[-1]) if "sweep" in m else 0):
            started = (
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["started"])) if m["started"] else "-"
            )
            name = f"  {m['run_id']}" if "sweep" in m else m["run_id"]
            values = "  " + " ".join(f"{k}={v}" for k, v in m["values"].items()) if "sweep" in m else ""
            print(f"{name:48} {m['state']:10} {m['attempts']:<8} {started}{values}")
    return 0


def cmd_checkpoints(args: argparse.Namespace) -> int:
    run = _one_run(args)
    rows = run.checkpoints(verify=args.verify)
    # Any checkpoint that fails verification fails the command: scripts check before they copy.
    exit_status = 1 if any(r["verified"] is False for r in rows) else 0
    if args.json:
        print(json.dumps(rows, indent=1))
        return exit_status
    if not rows:
        from orchestrator.storage.ckpt_store import CheckpointStore

        print(f"no committed checkpoints in {CheckpointStore(run.dir.child('ckpt')).url}")
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


def cmd_export(args: argparse.Namespace) -> int:
    from orchestrator.export import export_run

    result = export_run(_one_run(args), fmt=args.format, step=args.step, out=args.out)
    print(json.dumps(result.to_json(), indent=1) if args.json else "\n".join(result.lines()))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from orchestrator.storage.profiles import format_top_ops, read_top_ops, trace_folder

    run = _one_run(args)
    profiles = read_top_ops(run.dir)
    if not profiles:
        raise OrchError(
            f"run {run.run_id} has no profile: run it with `orch run --profile` (profile.enabled)"
        )
    attempt = args.attempt if args.attempt is not None else max(profiles)
    if attempt not in profiles:
        raise OrchError(f"attempt {attempt} has no profile; profiled attempts: {sorted(profiles)}")
    ranks = {r: rec for r, rec in sorted(profiles[attempt].items()) if not args.rank or r in args.rank}
    if not ranks:
        raise OrchError(f"--rank: attempt {attempt} profiled rank(s) {sorted(profiles[attempt])}")
    folder = trace_folder(run.dir, attempt)
    if args.json:
        print(json.dumps({"attempt": attempt, "traces": folder, "ranks": ranks}, indent=1))
        return 0
    for rank, record in ranks.items():
        print(f"rank {rank}, attempt {attempt}: top ops over {record.get('steps')} profiled step(s)")
        print(format_top_ops(record))
        print()
    print(
        f"traces: {folder} (tensorboard --logdir {folder.rsplit('/', 1)[0]}; or a .pt.trace.json in Perfetto)"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from orchestrator import api
    from orchestrator.report import write_report

    result = write_report(api.get_run(args.run, config=args.config), out=args.out)
    print(json.dumps(result.to_json(), indent=1) if args.json else "\n".join(result.lines()))
    return 0


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
    "sweep": cmd_sweep,
    "doctor": cmd_doctor,
    "export": cmd_export,
    "profile": cmd_profile,
    "report": cmd_report,
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
    except NotPrivate as exc:  # a folder or file another user made or could aim (storage/private.py)
        print(f"orch {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"orch {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
