"""The run directory on storage (a path or any fsspec URL): run.yaml, events, logs.

    <root>/<run-id>/run.yaml  events.jsonl  .orch-claim  ckpt/  logs/attempt-N/rank-R.log  tb/

Events are an append-only ledger. On a local or shared filesystem they are lines of
events.jsonl, each written with one O_APPEND write; object stores cannot append, so there each
event is one object under events/ and readers merge them in name order.

Whoever starts or resumes a run (or runs a sweep's queue) first takes the directory's claim
(`claim_directory`: an flock on `.orch-claim` in it) and holds it for as long as it acts on the
run, so a state check and the start it allows are never split by another starter.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import socket
import time
from dataclasses import dataclass
from typing import Any

from orchestrator.contract import METRICS_FILE, Event, attempt_dir_name, attempt_number, rank_of_file
from orchestrator.storage.faults import fault_point
from orchestrator.storage.private import (
    NotPrivate,
    existing_user_temp_dir,
    open_own_file,
    open_private_file,
    user_temp_dir,
    user_temp_path,
)
from orchestrator.storage.runid import run_id_of_path


def _yaml() -> Any:
    import yaml  # lazy: ranks import this module (events, checkpoints) and never read run.yaml

    return yaml


def load_yaml(data: bytes) -> Any:
    """Safe YAML, with libyaml's loader when there is one (10x faster on large records)."""
    yaml = _yaml()
    return yaml.load(data, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def url_to_fs(url: str) -> tuple[Any, str]:
    import fsspec  # lazy: keeps `orch --help` instant

    return fsspec.core.url_to_fs(url)


def is_local_url(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def join_url(base: str, *parts: str) -> str:
    if is_local_url(base):
        return os.path.join(base.removeprefix("file://"), *parts)
    return "/".join([base.rstrip("/"), *parts])


@dataclass(frozen=True)
class RunDir:
    url: str

    @property
    def run_id(self) -> str:
        return run_id_of_path(self.url)

    @property
    def is_local(self) -> bool:
        return is_local_url(self.url)

    @property
    def local_path(self) -> str:
        assert self.is_local
        return os.path.abspath(self.url.removeprefix("file://"))

    def child(self, *parts: str) -> str:
        return join_url(self.url, *parts)

    # ------------------------------------------------------------------ creation

    def create(self, run_config: dict[str, Any]) -> None:
        """Make the directory (private on local filesystems) and freeze run.yaml into it."""
        create_directory(self.url, "run.yaml", run_config, subdirs=("ckpt", "logs", "tb"))

    def replace_run_config(self, run_config: dict[str, Any], keep_as: str) -> None:
        """A resume that changed the config: run.yaml becomes `run_config` (what every later
        reader, the Slurm job included, runs with); the one it replaces is kept as `keep_as`."""
        old = self.read_bytes("run.yaml")
        new = _yaml().safe_dump(run_config, sort_keys=False).encode()
        if self.is_local:
            _write_local_atomic(os.path.join(self.local_path, keep_as), old)
            _write_local_atomic(os.path.join(self.local_path, "run.yaml"), new)
        else:
            fs, path = url_to_fs(self.url)
            fs.pipe_file(f"{path}/{keep_as}", old)
            fs.pipe_file(f"{path}/run.yaml", new)  # one PUT: atomic on object stores

    def exists(self) -> bool:
        if self.is_local:
            return os.path.isfile(os.path.join(self.local_path, "run.yaml"))
        fs, path = url_to_fs(self.url)
        return fs.exists(f"{path}/run.yaml")

    def read_run_config(self) -> dict[str, Any]:
        return load_yaml(self.read_bytes("run.yaml")) or {}

    def read_bytes(self, name: str) -> bytes:
        if self.is_local:
            with open(os.path.join(self.local_path, name), "rb") as fh:
                return fh.read()
        fs, path = url_to_fs(self.url)
        return fs.cat_file(f"{path}/{name}")

    # ------------------------------------------------------------------ events

    def append_event(self, event: Event, **fields: Any) -> dict[str, Any]:
        return append_event(self.url, event, **fields)

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.url)

    def claim(self) -> DirClaim:
        """The run's exclusive claim (claim_directory): held by whoever starts or supervises it."""
        return claim_directory(self.url)

    # ------------------------------------------------------------------ logs

    def logs_path(self, attempt: int) -> str:
        """Local directory of this attempt's rank logs (a staging dir for remote run dirs: on
        the supervisor's machine only)."""
        if self.is_local:
            base = os.path.join(self.local_path, "logs")
        else:
            base = user_temp_path(self._staging, "logs")
        return os.path.join(base, attempt_dir_name(attempt))

    @property
    def _staging(self) -> str:
        """A remote run's folder in this user's temp folder. Named by the run directory's URL
        too: two runs with one id under two roots must not append to one another's staged logs,
        which publish_logs would then upload into the wrong run."""
        digest = hashlib.sha256(self.url.rstrip("/").encode()).hexdigest()[:12]
        return f"{self.run_id.replace('/', '-')}-{digest}"

    def logs_dir(self, attempt: int) -> str:
        """logs_path(attempt), created (a remote run's: in this user's private temp folder, which
        no other user can have made first, or linked elsewhere: storage/private.py)."""
        if self.is_local:
            path = self.logs_path(attempt)
            os.makedirs(path, mode=0o700, exist_ok=True)
            return path
        return user_temp_dir(self._staging, "logs", attempt_dir_name(attempt))

    def staged_logs(self, attempt: int) -> str | None:
        """The folder of this attempt's rank logs if there is one: a local run's, or for a
        remote run the staging folder, only once checked private to this user at every level
        (storage/private.py; NotPrivate if another user made it). Nothing is made."""
        if self.is_local:
            path = self.logs_path(attempt)
            return path if os.path.isdir(path) else None
        return existing_user_temp_dir(self._staging, "logs", attempt_dir_name(attempt))

    def publish_logs(self, attempt: int) -> None:
        """Copy a remote run's staged logs of one attempt into the run directory: only regular
        files of this user's (upload_own_file: a link among them is not followed)."""
        if self.is_local:
            return
        local = self.staged_logs(attempt)
        if local is None:
            return  # published already
        fs, path = url_to_fs(self.url)
        into = f"{path}/logs/{attempt_dir_name(attempt)}"
        for name in sorted(os.listdir(local)):
            upload_own_file(fs, os.path.join(local, name), f"{into}/{name}")
        # Every file is in the run directory now: the staged copy goes (an upload that failed
        # above raised first and kept it; rmtree removes a link, never what it points to).
        shutil.rmtree(local, ignore_errors=True)

    def publish_run_logs(self) -> None:
        """At the end of a remote run: upload the logs that span attempts (logs/forkserver.log),
        then remove the run's staging folder once nothing in it is left unpublished."""
        if self.is_local:
            return
        logs = existing_user_temp_dir(self._staging, "logs")
        if logs is None:
            return
        fs, path = url_to_fs(self.url)
        for name in sorted(safe_listdir(logs)):
            local = os.path.join(logs, name)
            if attempt_number(name) is None and upload_own_file(fs, local, f"{path}/logs/{name}"):
                os.unlink(local)
        for folder in (logs, os.path.dirname(logs)):
            try:
                os.rmdir(folder)
            except OSError:
                return  # not empty: an attempt whose upload failed is still staged there

    def log_files(self, attempt: int | None = None) -> dict[tuple[int, int], str]:
        """{(attempt, rank): url} of every rank log in the run directory."""
        out: dict[tuple[int, int], str] = {}
        if self.is_local:
            base = os.path.join(self.local_path, "logs")
            listdir, join = safe_listdir, os.path.join
        else:
            fs, base = url_to_fs(self.url)
            base = f"{base}/logs"
            listdir, join = (lambda path: safe_fs_ls(fs, path)), (lambda *parts: "/".join(parts))
        for folder in listdir(base):
            n_attempt = attempt_number(folder)
            if n_attempt is None or attempt is not None and n_attempt != attempt:
                continue  # not an attempt folder (logs/forkserver.log), or not the one asked for
            for name in listdir(join(base, folder)):
                rank = rank_of_file(name)
                if rank is not None and name.endswith(".log"):
                    out[(n_attempt, rank)] = join(base, folder, name)
        return out


# ---------------------------------------------------------------------------- claims

CLAIM_FILE = ".orch-claim"
# What a filesystem says when it has no locks to give (an NFS mount without a lock manager,
# Lustre without -o flock): the claim then falls back to this host's own lock file.
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class DirectoryClaimed(Exception):
    """Another process holds the claim on a run's or sweep's directory. `holder`: what it wrote
    (pid, host, since), or {} if it has not written it yet."""

    def __init__(self, url: str, holder: dict[str, Any]) -> None:
        super().__init__(f"{url} is claimed by {holder or 'another process'}")
        self.url, self.holder = url, holder


@dataclass
class DirClaim:
    """A held claim; release() (or leaving the `with`) drops it, and so does the holder's death
    in any way: the kernel drops an flock with the last descriptor of its open file."""

    path: str  # the lock file
    _fd: int

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> DirClaim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim_path(url: str) -> str:
    """The lock file of the directory at `url`: in it on a filesystem (an flock there is seen by
    every process that can see the directory, other hosts too where the filesystem's locks are
    shared: NFS's are), else in this host's temp directory (an object store has no locks, so a
    claim on a remote run directory excludes only starters on this host)."""
    if is_local_url(url):
        return os.path.join(os.path.abspath(url.removeprefix("file://")), CLAIM_FILE)
    return _host_claim_path(url)


def _host_claim_path(url: str) -> str:
    # Anyone can compute this path: its folder must be this user's alone (storage/private.py).
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return os.path.join(user_temp_dir("claims"), f"{digest}.lock")


def claim_directory(url: str) -> DirClaim:
    """Take the exclusive claim on the run or sweep directory at `url`, without waiting:
    DirectoryClaimed (naming the holder) if another process, or another claim of this one,
    holds it. The holder's pid, host and start go into the lock file for that message.
    NotPrivate (an OSError of one line) if the lock file, or this host's folder for it, is a
    link or another user's: nothing is written through it."""
    path = claim_path(url)
    try:
        return _lock(path, url)
    except OSError as exc:
        if exc.errno not in _NO_LOCKS:
            raise
    return _lock(_host_claim_path(url), url)


def _lock(path: str, url: str) -> DirClaim:
    # Never through a link, only a regular file of this user's (a run directory on shared
    # storage may be writable by others); O_CLOEXEC: no process the holder execs (ranks, the
    # fork server, a sweep's points) inherits the claim and keeps it after the holder has gone.
    fd = open_private_file(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise DirectoryClaimed(url, holder) from None
    except BaseException:
        os.close(fd)
        raise
    try:
        fault_point("claim.holder")  # a test fails the holder's write here
        holder = {"pid": os.getpid(), "host": this_host(), "since": round(time.time(), 3)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
    except OSError:
        # A full or failing disk: the lock, not its text, is the claim, so it is kept; a starter
        # refused meanwhile is told "another process" (an empty file) instead of a pid.
        pass
    except BaseException:  # anything else (Ctrl-C, a bug): no claim, and no descriptor, leaks
        os.close(fd)
        raise
    return DirClaim(path, fd)


def _holder(fd: int) -> dict[str, Any]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode())
    except (OSError, ValueError):  # not written yet (the holder is between its flock and write)
        return {}
    return holder if isinstance(holder, dict) else {}


def create_directory(
    url: str, record_name: str, record: dict[str, Any], subdirs: tuple[str, ...] = ()
) -> None:
    """A new run's or sweep's directory (private on local filesystems) holding `record` as YAML
    in `record_name`; FileExistsError if one is there. Locally it appears whole or not at all."""
    data = _yaml().safe_dump(record, sort_keys=False).encode()
    if is_local_url(url):
        root = os.path.abspath(url.removeprefix("file://"))
        _make_closed_folders(os.path.dirname(root) or ".")
        os.makedirs(root, mode=0o700, exist_ok=False)
        try:
            os.chmod(root, 0o700)  # umask may have widened it
            for sub in subdirs:
                os.makedirs(os.path.join(root, sub), mode=0o700, exist_ok=True)
            _write_local_atomic(os.path.join(root, record_name), data)
        except BaseException:
            # No half-made directory (a full disk): the id stays free for the next try.
            shutil.rmtree(root, ignore_errors=True)
            raise
    else:
        fs, path = url_to_fs(url)
        if fs.exists(f"{path}/{record_name}"):
            raise FileExistsError(f"directory already exists: {url}")
        fs.makedirs(path, exist_ok=True)
        fs.pipe_file(f"{path}/{record_name}", data)


def _make_closed_folders(path: str) -> None:
    """os.makedirs(path, exist_ok=True), each folder it makes 0755 at most, whatever the umask:
    with umask 002 and a team's primary group, a storage root made as the umask says would be
    one the team can write, where another user could swap run directories, and every later
    run, resume or submit would refuse it (root_safety). Folders already there keep their mode."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent and parent != path:
        _make_closed_folders(parent)
    try:
        os.mkdir(path, 0o755)  # the umask only takes bits away: never a write bit for others
    except FileExistsError:
        if not os.path.isdir(path):  # made meanwhile by another run: fine, if a folder
            raise


def append_event(url: str, event: Event, **fields: Any) -> dict[str, Any]:
    """One event appended to the ledger of the directory at `url` (a run's or a sweep's)."""
    record = {"time": round(time.time(), 6), "event": event, **fields}
    line = json.dumps(record, sort_keys=False, separators=(",", ":")) + "\n"
    if is_local_url(url):
        path = os.path.join(os.path.abspath(url.removeprefix("file://")), "events.jsonl")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    else:
        fs, path = url_to_fs(url)
        name = f"{time.time_ns():020d}-{secrets.token_hex(4)}.json"
        fs.pipe_file(f"{path}/events/{name}", line.encode())
    return record


def read_events(url: str) -> list[dict[str, Any]]:
    """The ledger of the directory at `url`, in order; a line cut by a crash mid-write is skipped."""
    if is_local_url(url):
        try:
            path = os.path.join(os.path.abspath(url.removeprefix("file://")), "events.jsonl")
            with open(path, encoding="utf-8") as fh:
                lines = fh.read().splitlines()
        except FileNotFoundError:
            return []
    else:
        fs, path = url_to_fs(url)
        fs.invalidate_cache()  # a cached listing would hide new events
        try:
            names = sorted(fs.ls(f"{path}/events", detail=False))
        except FileNotFoundError:
            return []
        lines = [fs.cat_file(n).decode() for n in names]
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # cut by a crash mid-write, or a number past Python's digit limit
            continue  # the rest of the ledger still counts
        if isinstance(record, dict):  # what orch writes; a crafted `[1]` is no event
            out.append(record)
    return out


def write_metrics(url: str, record: dict[str, Any]) -> None:
    """The run's last scalars (contract.METRICS_FILE), replaced whole (atomic on both kinds)."""
    data = json.dumps(record, separators=(",", ":")).encode()
    if is_local_url(url):
        _write_local_atomic(os.path.join(os.path.abspath(url.removeprefix("file://")), METRICS_FILE), data)
    else:
        fs, path = url_to_fs(url)
        fs.pipe_file(f"{path}/{METRICS_FILE}", data)


def read_metrics(run: RunDir) -> dict[str, Any]:
    """{"step", "time", "scalars"} as rank 0 last wrote them; {} before the first."""
    try:
        record = json.loads(run.read_bytes(METRICS_FILE))
    except (OSError, ValueError):  # none yet (FileNotFoundError is an OSError), or cut short
        return {}
    return record if isinstance(record, dict) else {}


# Read and written a piece at a time: a rank's log may be larger than memory would like.
UPLOAD_CHUNK = 4 << 20


def upload_own_file(fs: Any, local: str, remote: str) -> bool:
    """Copy the local file into `remote` on `fs` if it is a regular file of this user's, read
    through a descriptor opened without following links (storage/private.py): False, and
    nothing copied, for a link (whatever it points to, ~/.ssh included, stays on this host),
    another user's file, a folder or a FIFO. In place of fsspec's put_file, which opens the
    path and so follows a link."""
    try:
        fd = open_own_file(local)
    except NotPrivate:
        return False
    with os.fdopen(fd, "rb") as src, fs.open(remote, "wb") as dst:
        shutil.copyfileobj(src, dst, UPLOAD_CHUNK)
    return True


def safe_listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def safe_fs_ls(fs: Any, path: str) -> list[str]:
    try:
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def write_new_file(path: str, data: bytes) -> None:
    """Create `path` (FileExistsError if it exists: O_EXCL, atomic), write `data`, fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_local_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{secrets.token_hex(4)}"
    write_new_file(tmp, data)
    os.replace(tmp, path)


def this_host() -> str:
    return socket.gethostname()
