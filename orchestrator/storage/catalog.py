"""Finding runs: a run reference typed by a user (an id under storage.root, or a run directory)
and the runs under a root. Used by the CLI; the run directory itself is storage.rundir."""

from __future__ import annotations

import os

from orchestrator.errors import RunNotFound
from orchestrator.storage.rundir import RunDir, is_local_url, join_url, safe_fs_ls, safe_listdir, url_to_fs
from orchestrator.storage.runid import is_valid_run_id


def resolve_run(ref: str, storage_root: str) -> RunDir:
    """A run id (under storage_root) or a run directory (path or URL) -> an existing RunDir."""
    if (
        "://" in ref
        or os.sep in ref
        or ref in (".", "..")
        or os.path.isdir(ref)
        and os.path.isfile(os.path.join(ref, "run.yaml"))
    ):
        run = RunDir(ref if "://" in ref else os.path.abspath(ref))
    else:
        if not is_valid_run_id(ref):
            raise RunNotFound(f"{ref!r} is neither a run id nor a run directory")
        run = RunDir(join_url(storage_root, ref))
    if not run.exists():
        raise RunNotFound(f"no run at {run.url} (no run.yaml); `orch ls` lists runs under {storage_root}")
    return run


def list_runs(storage_root: str) -> list[RunDir]:
    if is_local_url(storage_root):
        root = storage_root.removeprefix("file://")
        return [
            RunDir(os.path.join(root, n))
            for n in safe_listdir(root)
            if os.path.isfile(os.path.join(root, n, "run.yaml"))
        ]
    fs, path = url_to_fs(storage_root)
    return [
        RunDir(join_url(storage_root, n)) for n in safe_fs_ls(fs, path) if fs.exists(f"{path}/{n}/run.yaml")
    ]
