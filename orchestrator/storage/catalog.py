"""Finding runs: a reference typed by a user (a run id, a sweep id, a point's `sweep-id/index`,
or a directory) and the runs and sweeps under a root. Used by the API; the directories
themselves are storage.rundir and storage.sweepdir."""

from __future__ import annotations

import os

from orchestrator.errors import RunNotFound
from orchestrator.storage.rundir import RunDir, is_local_url, join_url, safe_fs_ls, safe_listdir, url_to_fs
from orchestrator.storage.runid import is_valid_run_id, split_point_id
from orchestrator.storage.sweepdir import SWEEP_FILE, SweepDir


def resolve(ref: str, storage_root: str) -> RunDir | SweepDir:
    """A run id, sweep id or point id (under storage_root), or a run or sweep directory (path
    or URL) -> an existing RunDir or SweepDir."""
    if names_a_directory(ref):
        url = ref if "://" in ref else os.path.abspath(ref)
    elif split_point_id(ref) is not None:
        url = join_url(storage_root, ref)
    else:
        if not is_valid_run_id(ref):
            raise RunNotFound(f"{ref!r} is neither a run id nor a run directory")
        url = join_url(storage_root, ref)
    run = RunDir(url)
    if run.exists():
        return run
    folder = SweepDir(url)
    if folder.exists():
        return folder
    raise RunNotFound(f"no run at {url} (no run.yaml); `orch ls` lists runs under {storage_root}")


def names_a_directory(ref: str) -> bool:
    """Whether `ref` is a directory's path or URL rather than an id under a storage root."""
    if split_point_id(ref) is not None and not os.path.isdir(ref):
        return False
    return "://" in ref or os.sep in ref or ref in (".", "..") or _is_local_dir(ref)


def _is_local_dir(ref: str) -> bool:
    return os.path.isdir(ref) and (
        os.path.isfile(os.path.join(ref, "run.yaml")) or os.path.isfile(os.path.join(ref, SWEEP_FILE))
    )


def resolve_run(ref: str, storage_root: str) -> RunDir:
    """Like resolve, for commands that take one run (a sweep is refused in one line)."""
    found = resolve(ref, storage_root)
    if isinstance(found, SweepDir):
        raise RunNotFound(f"{ref} is a sweep; name one of its points, e.g. {found.sweep_id}/0")
    return found


def list_entries(storage_root: str) -> list[RunDir | SweepDir]:
    """The runs and sweeps directly under storage_root (a sweep's points are in its record)."""
    out: list[RunDir | SweepDir] = []
    if is_local_url(storage_root):
        root = storage_root.removeprefix("file://")
        for name in safe_listdir(root):
            path = os.path.join(root, name)
            if os.path.isfile(os.path.join(path, "run.yaml")):
                out.append(RunDir(path))
            elif os.path.isfile(os.path.join(path, SWEEP_FILE)):
                out.append(SweepDir(path))
        return out
    fs, path = url_to_fs(storage_root)
    for name in safe_fs_ls(fs, path):
        if fs.exists(f"{path}/{name}/run.yaml"):
            out.append(RunDir(join_url(storage_root, name)))
        elif fs.exists(f"{path}/{name}/{SWEEP_FILE}"):
            out.append(SweepDir(join_url(storage_root, name)))
    return out
