"""The batch step's check before submitit loads the submitted job (issue 28): unpickling
`slurm/<job>_submitted.pkl` runs whatever the pickle names, as you, so it must be your file, in
folders no one else can swap.

submitit's batch command is `PYTHON -u -m submitit.core._submit FOLDER`, where PYTHON is a shell
command of the caller's (SlurmExecutor's `python`, "singularity exec ... python" in its docs). orch
hands it `guarded_python()`: `PYTHON -m orchestrator.backends.slurm.batch_guard FOLDER && PYTHON`,
so the batch script runs this check first and submitit's loader only if it passes. A refusal is
one line in the batch log and exit status 1; nothing is unpickled.

What is checked, on the path submitit loads (its own JobEnvironment names it):
- the pickle: a regular file (not a link) of this user's that no one else can write (or reach);
- its folder (slurm/) and that folder's parent (the run's or the sweep's directory): this user's
  folders, not links;
- every folder a lookup of the pickle reads, up to `/`: none in which another user may rename
  entries (storage/root_safety.py).
Once these hold, only root and those folders' owners can change what the path names, so the file
submitit opens next is the file checked. `orch submit` refused such a root before submitting;
this catches a folder opened since, or a run directory swapped through one.
"""

from __future__ import annotations

import os
import shlex
import stat
import sys
import time

from orchestrator.storage.root_safety import hidden_from_others, open_folder_above, user_name

MODULE = "orchestrator.backends.slurm.batch_guard"
# submitit names the pickle after the job id, so it writes it once sbatch has answered: a job that
# starts at once may look before it is there. submitit itself waits as long.
PICKLE_WAIT_S = 60.0


class UnsafePickle(Exception):
    """A submitted job that is not this user's, or that another user could have swapped."""


def guarded_python(python: str, folder: str) -> str:
    """The `python` to give submitit's SlurmExecutor so that its batch command checks FOLDER's
    pickle first: `PYTHON -m MODULE FOLDER && PYTHON` (submitit appends `-u -m ... FOLDER`)."""
    py = shlex.quote(python)
    return f"{py} -m {MODULE} {shlex.quote(os.path.abspath(folder))} && {py}"


def submitted_pickle(folder: str) -> str:
    """The pickle submitit's batch step loads from `folder` for this Slurm job (or array task)."""
    from submitit.core.job_environment import JobEnvironment
    from submitit.core.utils import JobPaths

    job = JobEnvironment()  # the job id from Slurm's variables (array tasks: ARRAY_TASK)
    return str(JobPaths(folder, job_id=job.job_id, task_id=job.global_rank).submitted_pickle)


def check_submitted_pickle(path: str, wait_s: float = PICKLE_WAIT_S) -> None:
    """UnsafePickle, one line, unless `path` is safe to unpickle as this user (see the module)."""
    me = os.getuid()
    info = _wait_for(path, wait_s)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode):
        raise UnsafePickle(f"{path} is not a regular file")
    _check_mine(path, info, me)
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not hidden_from_others(path):
        raise UnsafePickle(f"{path} has mode {stat.S_IMODE(info.st_mode):04o}: others can write it")
    folder = os.path.dirname(path)
    for own in (folder, os.path.dirname(folder)):
        held = os.lstat(own)
        if not stat.S_ISDIR(held.st_mode):
            raise UnsafePickle(f"{own} is not a directory (a link?)")
        _check_mine(own, held, me)
    found = open_folder_above(path)
    if found is not None:
        raise UnsafePickle(found.detail(path))


def _wait_for(path: str, wait_s: float) -> os.stat_result:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return os.lstat(path)
        except FileNotFoundError:
            if time.monotonic() >= deadline:
                raise UnsafePickle(f"{path} is not there after {wait_s:g}s") from None
            time.sleep(1.0)


def _check_mine(path: str, info: os.stat_result, me: int) -> None:
    if info.st_uid != me:
        raise UnsafePickle(f"{path} belongs to {user_name(info.st_uid)}, not to this user ({user_name(me)})")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(f"usage: python -m {MODULE} SUBMITIT_FOLDER", file=sys.stderr)
        return 2
    try:
        path = submitted_pickle(argv[0])
        check_submitted_pickle(path)
    except (UnsafePickle, OSError) as exc:
        why = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) else str(exc)
        print(f"orch: refusing to load the submitted job: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
