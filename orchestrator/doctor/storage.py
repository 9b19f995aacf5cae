"""The storage root, checked the way runs use it: a file written, read back and removed (the
credentials of an object store included), the folder modes (no other user can swap a run
directory: a local root and every folder above it), the create-only write that checkpoint
commits rely on, free space against the newest checkpoint's size, and the preemption warning's
lead against how long that checkpoint took to write."""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from typing import Any

from orchestrator.contract import Event
from orchestrator.doctor.check import Check, Status, fail, ok, warn
from orchestrator.spec.config import ClusterConfig
from orchestrator.storage.catalog import list_entries
from orchestrator.storage.causes import storage_cause
from orchestrator.storage.ckpt_store import newest_committed
from orchestrator.storage.root_safety import open_folder_above
from orchestrator.storage.rundir import RunDir, is_local_url, url_to_fs

AREA = "storage"
NEWEST_RUNS_SEARCHED = 10  # runs looked at for the newest checkpoint (newest first)


STORAGE_S = 30.0  # a hung mount or an endpoint that never answers is a finding, not a hang


def storage_checks(config: ClusterConfig) -> list[Check]:
    root = config.storage_root
    written = _bounded(lambda: _writable(root), "root writable", root)
    checks = [written]
    if written.status is not Status.OK:
        return checks  # nothing else can be learned from a root that cannot be written
    if is_local_url(root):  # an object store has no folder modes (nor anyone to rename in it)
        checks.append(_bounded(lambda: _folder_modes(root), "folder modes", root))
    checks.append(_bounded(lambda: _create_only(root), "create-only writes", root))
    newest = _newest_checkpoint(root, config.job_name)
    checks.append(_free_space(root, newest))
    if config.backend == "slurm":
        checks.append(_lead_time(config, newest))
    return checks


def _bounded(check: Any, name: str, root: str) -> Check:
    """`check()` in a thread of its own, for at most STORAGE_S."""
    found: list[Check] = []
    thread = threading.Thread(target=lambda: found.append(check()), daemon=True)
    thread.start()
    thread.join(STORAGE_S)
    if not found:
        return fail(
            AREA,
            name,
            f"{root}: no answer within {STORAGE_S:g}s",
            "check the mount (a hung NFS server?) or the object store's endpoint and network",
        )
    return found[0]


def _fix_for(root: str, cause: str) -> str:
    if "credentials" in cause:
        return (
            "export the store's credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
            " and list them in job.pass_env so every rank gets them"
        )
    if "unreachable" in cause:
        return "check the endpoint (AWS_ENDPOINT_URL / FSSPEC_S3_ENDPOINT_URL) and the network"
    return f"make {root} writable for this user, or set storage.root to a writable shared path"


def _writable(root: str) -> Check:
    probe = f".orch-doctor-{uuid.uuid4().hex[:12]}"
    body = b"orch doctor: a run directory's files are written here\n"
    try:
        if is_local_url(root):
            path = root.removeprefix("file://")
            os.makedirs(path, exist_ok=True)
            target = os.path.join(path, probe)
            with open(target, "xb") as fh:
                fh.write(body)
            with open(target, "rb") as fh:
                back = fh.read()
            os.unlink(target)
        else:
            fs, path = url_to_fs(root)
            target = f"{path.rstrip('/')}/{probe}"
            fs.pipe_file(target, body)
            back = fs.cat_file(target)
            fs.rm_file(target)
    except Exception as exc:  # noqa: BLE001 - any storage's error, in words
        cause = storage_cause(exc)
        return fail(AREA, "root writable", f"{root}: {cause}", _fix_for(root, cause))
    if back != body:
        return fail(
            AREA,
            "root writable",
            f"{root}: a file read back differs from what was written",
            "check the storage",
        )
    return ok(AREA, "root writable", f"{root}: a file written, read back and removed")


def _folder_modes(root: str) -> Check:
    """No other user may rename entries in the root or in any folder above it: they could swap a
    run directory for one of theirs, whose config or Slurm pickle then runs as you (root_safety)."""
    path = os.path.abspath(root.removeprefix("file://"))
    try:
        found = open_folder_above(path)
    except OSError as exc:
        return fail(AREA, "folder modes", f"{path}: {storage_cause(exc)}", "check the folders' permissions")
    if found is not None:
        return fail(AREA, "folder modes", found.detail(path), found.fix)
    return ok(AREA, "folder modes", f"{path} and every folder above it: no other user can swap a run there")


def _create_only(root: str) -> Check:
    """Checkpoint commits and incarnation fences are create-only writes (O_EXCL locally, a
    conditional put on object stores): a second create of the same name must be refused."""
    if is_local_url(root):
        return ok(AREA, "create-only writes", "O_EXCL (local filesystem)")
    fs, path = url_to_fs(root)
    target = f"{path.rstrip('/')}/.orch-doctor-create-{uuid.uuid4().hex[:12]}"
    try:
        fs.pipe_file(target, b"1", mode="create")
        try:
            fs.pipe_file(target, b"2", mode="create")
        except FileExistsError:
            return ok(
                AREA, "create-only writes", "a second create of the same object was refused, as commits need"
            )
        finally:
            fs.rm_file(target)
    except Exception as exc:  # noqa: BLE001 - a store or client without conditional writes
        return fail(
            AREA,
            "create-only writes",
            f"{root}: {storage_cause(exc)}",
            "use a store and client with conditional writes (S3 If-None-Match: s3fs >= 2024.6)",
        )
    return fail(
        AREA,
        "create-only writes",
        f"{root}: a second create of the same object was accepted: two attempts could both commit",
        "use a store with conditional writes (S3 If-None-Match), or a shared filesystem",
    )


def _newest_checkpoint(root: str, job_name: str) -> dict[str, Any] | None:
    """The newest committed checkpoint among the newest runs of this job under root (run ids
    start with the job's name): its size and how long its write took (from its run's events),
    or None."""
    try:
        runs = [
            e for e in list_entries(root) if isinstance(e, RunDir) and e.run_id.startswith(f"{job_name}-")
        ]
    except Exception:  # noqa: BLE001 - an unlistable root was already reported
        return None
    if is_local_url(root):
        runs.sort(key=lambda r: _mtime(r.local_path), reverse=True)
    else:  # default run ids are <name>-<UTC time>-<random>: newest last by name
        runs.sort(key=lambda r: r.run_id, reverse=True)
    for run in runs[:NEWEST_RUNS_SEARCHED]:
        try:
            info = newest_committed(run.child("ckpt"))
        except Exception:  # noqa: BLE001 - a run being written or removed
            continue
        if info is None:
            continue
        write_s = None
        try:
            for event in run.events():
                if event.get("event") == Event.CHECKPOINT_COMMITTED and event.get("step") == info.step:
                    write_s = event.get("write_s")
        except Exception:  # noqa: BLE001
            pass
        return {"run": run.run_id, "step": info.step, "size": info.size, "write_s": write_s}
    return None


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def _free_space(root: str, newest: dict[str, Any] | None) -> Check:
    if not is_local_url(root):
        return ok(AREA, "free space", "an object store: no free-space limit to check")
    free = shutil.disk_usage(root.removeprefix("file://")).free
    if newest is None:
        return ok(AREA, "free space", f"{_size(free)} free; no checkpoint yet to size it against")
    size = int(newest["size"])
    what = (
        f"{_size(free)} free; the newest checkpoint ({newest['run']} step {newest['step']}) is {_size(size)}"
    )
    if free < size:
        return fail(
            AREA, "free space", what, "free space or move storage.root: the next save would fill the disk"
        )
    if free < 3 * size:
        return warn(
            AREA,
            "free space",
            what,
            "a save writes a whole new checkpoint before old ones are removed: leave room for several",
        )
    return ok(AREA, "free space", what)


def _lead_time(config: ClusterConfig, newest: dict[str, Any] | None) -> Check:
    lead = config.slurm.signal_lead_s
    if newest is None or newest.get("write_s") is None:
        return ok(AREA, "preemption lead", f"slurm.signal_lead_s {lead}s; no checkpoint write measured yet")
    write_s = float(newest["write_s"])
    what = (
        f"the newest checkpoint ({_size(int(newest['size']))}) took {write_s:.1f}s to write;"
        f" slurm.signal_lead_s is {lead}s"
    )
    if write_s >= lead:
        return fail(
            AREA, "preemption lead", what, f"raise slurm.signal_lead_s above {2 * write_s:.0f}s, or save less"
        )
    if 2 * write_s >= lead:
        return warn(
            AREA,
            "preemption lead",
            what,
            f"raise slurm.signal_lead_s to at least {2 * write_s:.0f}s (twice the write)",
        )
    return ok(AREA, "preemption lead", what)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
