"""A rank's entrypoint in its own process, with its uncaught exception recorded from the job's
first line on.

    python -m orchestrator.launch.entry SCRIPT ARGS...     (or: -m MODULE ARGS...)

runs the job as `python SCRIPT ARGS` would, and the fork server runs the same code in each rank
it forks (forkserver._run_entrypoint). Why: the runtime records an uncaught exception in the
rank's error file (ORCH_ERROR_FILE) only once the job has imported it, so a job that cannot
start (an import that fails, a syntax error, a bad argument to init_process_group) left only
"exit code 1" and a traceback in its log. The supervisor's policy decides on the exception's
class, carried as a field of the record, never on the words of a log (supervision/policy.py:
such a job is not retried). When the runtime's own hook, or torch elastic's `@record`, has
recorded the exception already, that record stands, with the job.pass_env values it holds
redacted: the values as the rank saw them at its start, for a job may remove a variable once
read.

Stdlib and orchestrator.contract only: this runs before anything of the job.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from orchestrator.contract import (
    ENV_ERROR_FILE,
    SeenSecrets,
    exception_record,
    passed_secrets,
    redact_json,
    write_error_record,
)


def run(argv: list[str]) -> None:
    """Run `SCRIPT ARGS` or `-m MODULE ARGS` (argv without the interpreter) as `__main__`, with
    the sys.argv and sys.path[0] that `python` would give it."""
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        sys.path[0] = os.getcwd()
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        script = os.path.abspath(argv[0])
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(script)
        runpy.run_path(script, run_name="__main__")


def from_the_job(tb: TracebackType | None) -> TracebackType | None:
    """The traceback without its top frames from this package's launch code and runpy: what
    `python train.py` prints, so a rank's error reads the same however it was started."""
    launch = os.path.dirname(os.path.abspath(__file__))
    runpy_files = {os.path.abspath(runpy.__file__), "<frozen runpy>"}
    while tb is not None and tb.tb_next is not None:
        name = tb.tb_frame.f_code.co_filename
        if name not in runpy_files and os.path.dirname(os.path.abspath(name)) != launch:
            break
        tb = tb.tb_next
    return tb


def record(exc: BaseException, secrets: Sequence[str] | None = None) -> None:
    """Write the rank's error record of `exc` with `secrets` (the job.pass_env values the rank
    has seen; by default those it has now) redacted. A record there already (the runtime's
    hook, which runs before this one, or torch elastic's `@record`, which wrote before the
    exception left the job) stands, redacted if it holds one of them: `@record` writes the
    message and traceback as they are."""
    path = os.environ.get(ENV_ERROR_FILE)
    if not path:
        return
    if secrets is None:
        secrets = passed_secrets(os.environ)
    existing = read_json(path)
    if isinstance(existing, dict):
        redacted = redact_json(existing, secrets)
        if redacted != existing:
            write_error_record(path, redacted)
        return
    rank = os.environ.get("RANK", "")
    write_error_record(
        path,
        exception_record(
            exc,
            rank=int(rank) if rank.isdecimal() else -1,
            time=time.time(),
            pid=os.getpid(),
            secrets=secrets,
        ),
    )


def read_json(path: str) -> Any:
    """The JSON at `path`, or None (absent, blank as reserved, or not JSON)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None


def install_recorder() -> None:
    """sys.excepthook: record an uncaught exception, then print it as Python does (without the
    launch frames on top). Called at the rank's start, before the job runs: the job.pass_env
    values are read now, and again when recording."""
    previous = sys.excepthook
    seen = SeenSecrets()
    seen.look(os.environ)

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        tb = from_the_job(tb)
        exc.__traceback__ = tb  # the interpreter prints the exception's own traceback
        if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            try:
                record(exc, seen.look(os.environ))
            except Exception:  # noqa: BLE001 - the error itself must still be printed
                pass
        previous(exc_type, exc, tb)

    sys.excepthook = hook


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m orchestrator.launch.entry SCRIPT ARGS... | -m MODULE ARGS...")
    install_recorder()
    # An uncaught exception goes on to the interpreter, which calls the hook and exits 1 after
    # its usual shutdown (threads, atexit, flushing files the job left open).
    run(sys.argv[1:])


if __name__ == "__main__":
    main()
