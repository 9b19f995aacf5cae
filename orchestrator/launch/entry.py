"""A rank's entrypoint in its own process, with its uncaught exception recorded from the job's
first line on.

    python -m orchestrator.launch.entry SCRIPT ARGS...     (or: -m MODULE ARGS...)

runs the job as `python SCRIPT ARGS` would, and the fork server runs the same code in each rank
it forks (forkserver._run_entrypoint). Why: the runtime records an uncaught exception in the
rank's error file (ORCH_ERROR_FILE) only once the job has imported it, so a job that cannot
start (an import that fails, a syntax error, a bad argument to init_process_group) left only
"exit code 1" and a traceback in its log. The supervisor's policy decides on the exception's
class, carried as a field of the record, never on the words of a log (supervision/policy.py:
such a job is not retried). When the runtime's own hook has recorded the exception already,
that record stands.

Stdlib and orchestrator.contract only: this runs before anything of the job.
"""

from __future__ import annotations

import os
import runpy
import sys
import time
from types import TracebackType

from orchestrator.contract import (
    ENV_ERROR_FILE,
    exception_record,
    passed_secrets,
    read_error_record,
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


def record(exc: BaseException) -> None:
    """Write the rank's error record of `exc`, unless the rank has one already (the runtime's
    hook, which runs before this one, wrote it); job.pass_env values in it are redacted."""
    path = os.environ.get(ENV_ERROR_FILE)
    if not path or read_error_record(path) is not None:
        return
    rank = os.environ.get("RANK", "")
    write_error_record(
        path,
        exception_record(
            exc,
            rank=int(rank) if rank.isdecimal() else -1,
            time=time.time(),
            pid=os.getpid(),
            secrets=passed_secrets(os.environ),
        ),
    )


def install_recorder() -> None:
    """sys.excepthook: record an uncaught exception, then print it as Python does (without the
    launch frames on top)."""
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        tb = from_the_job(tb)
        exc.__traceback__ = tb  # the interpreter prints the exception's own traceback
        if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            try:
                record(exc)
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
