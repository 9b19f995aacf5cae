"""Checkpoint layout on storage and its commit protocol, without torch.

Filesystems that rename atomically (local and shared filesystems):

    ckpt/step-00000100.tmp-<token>/   being written by incarnation <token>
    ckpt/step-00000100/               committed by rename: files + manifest.json + COMMITTED
    ckpt/step-00000100.displaced-<token>/
                                      an older incarnation's commit that a newer commit of the
                                      step replaces; the step's commit while step-00000100/ is
                                      missing (a crash between the two renames)

Every name the protocol relies on (registrations, seals, commits, un-commits) has its directory
fsync'd once made: a file's own fsync does not make its name survive a power loss.

Object stores (s3://, memory://, ...), which cannot rename a prefix:

    ckpt/step-00000100.tmp-<token>/   files + manifest.json, never moved
    ckpt/step-00000100/COMMITTED      created last and create-only; names the data prefix

A checkpoint exists only when committed and its manifest verifies (every file present with the
listed size and checksum). A manifest whose format, step or file entries (names, sizes,
checksums) are malformed is a corrupt checkpoint for every reader (`manifest_problem`); its other
fields (created, epoch, world_size, ...) are information that readers take defensively, never a
reason to call a checkpoint corrupt (restore deletes corrupt ones).

At most one commit per step: rename refuses an existing directory and the marker is
create-only. Incarnations (attempts, requeued Slurm jobs) register under `ckpt/incarnations/`; a
writer that sees a newer one registered is stale and may not commit (fencing). The controller
reads checkpoints through this module, so it never imports torch.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import re
import secrets
import socket
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable

from orchestrator.storage.faults import fault_point
from orchestrator.storage.rundir import write_new_file

MANIFEST = "manifest.json"
COMMITTED = "COMMITTED"
INCARNATIONS = "incarnations"
_SEAL_SUFFIX = ".seal"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
# Beside a step's directory: `tmp` being written, `stale` being deleted, `displaced` an older
# incarnation's commit moved aside by a newer commit of the same step (local filesystems).
_SIDE_DIR = re.compile(r"^step-(?P<step>\d{8,})\.(?P<kind>tmp|stale|displaced)-i(?P<inc>\d+)-[0-9a-f]+$")
_DISPLACE_TRIES = 5
_HASH_OVERLAP_MIN = 1 << 20
_SMALL_WRITES_MAX = 1 << 20
_READ_CHUNK = 32 << 20
_process_ids: dict[int, str] = {}


def process_id() -> str:
    """Who registers an incarnation: host, pid and a random part (pids are reused). Made per
    pid, so that processes forked from one server (ranks) never share it."""
    pid = os.getpid()
    if pid not in _process_ids:
        _process_ids[pid] = f"{socket.gethostname()}:{pid}:{secrets.token_hex(4)}"
    return _process_ids[pid]


class CorruptCheckpoint(Exception):
    pass


class StaleIncarnation(Exception):
    """A newer incarnation of this run exists; this one must not commit."""


class AlreadyCommitted(Exception):
    """The step is committed by this incarnation or a newer one: not ours to displace."""

    def __init__(self, step: int, incarnation: int) -> None:
        super().__init__(f"{step_dir_name(step)} is already committed by incarnation {incarnation}")
        self.incarnation = incarnation


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def make_token(incarnation: int) -> str:
    # Never negative: "i-00001" would not match _SIDE_DIR, and retention would never find it.
    return f"i{max(incarnation, 0):06d}-{secrets.token_hex(4)}"


def token_incarnation(token: Any) -> int:
    """The incarnation a token names; -1 for anything that is not a token (a manifest's field)."""
    m = re.match(r"^i(\d+)-", token) if isinstance(token, str) else None
    return int(m.group(1)) if m else -1


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    checksum: str
    algorithm: str = "crc32"

    def manifest_entry(self) -> dict[str, Any]:
        return {"size": self.size, self.algorithm: self.checksum}


class Crc32:
    """zlib's CRC-32 as a hashlib-like object. It runs at ~3.8 GB/s on one core here (sha256:
    ~1.7 GB/s, below the disk's fsync'd write speed) and releases the GIL on large buffers;
    it detects the accidental damage a checkpoint can suffer (torn writes, flipped bits,
    truncation). Manifests of format 1 list sha256 instead, and still verify."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: Any) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


def checksum_for(entry: dict[str, Any]) -> tuple[Any, str]:
    """A fresh checksum object for a manifest entry, and the value it must reach."""
    if "crc32" in entry:
        return Crc32(), str(entry["crc32"])
    return hashlib.sha256(), str(entry["sha256"])


# ------------------------------------------------------------------ the manifest's shape
# Readers index a manifest's files freely (restore, export, `orch checkpoints`), so the store
# checks what integrity needs where it reads one: format, step and the file entries. A manifest
# malformed there is a corrupt checkpoint, which every reader handles (restore falls back to an
# older one and un-commits it), never a KeyError or ValueError. The other fields are information
# (when, by whom, which epoch): one of an odd type never makes a good checkpoint corrupt, which
# would get it deleted; their readers check each one's type (CheckpointInfo's properties).

_CHECKSUM_OF_FORMAT = {1: "sha256", 2: "crc32"}  # what a format's entries list besides "size"
_CHECKSUM_HEX = {"crc32": re.compile(r"^[0-9a-f]{8}$"), "sha256": re.compile(r"^[0-9a-f]{64}$")}
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")  # in the step's directory: never a path


def _is_int(value: Any) -> bool:
    return type(value) is int  # True is an int to isinstance, never to a manifest


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def entry_problem(entry: Any, checksums: tuple[str, ...] = ("crc32", "sha256")) -> str | None:
    """What is wrong with one file's manifest entry, or None. An entry is what
    `FileEntry.manifest_entry` writes: exactly a size and one checksum of `checksums`."""
    if not isinstance(entry, dict):
        return f"a {type(entry).__name__}, not a mapping"
    algorithm = next((a for a in checksums if a in entry), None)
    if algorithm is None or set(entry) != {"size", algorithm}:
        wanted = " or ".join(f"['size', {a!r}]" for a in checksums)
        return f"keys {sorted(str(k) for k in entry)}, not {wanted}"
    size, checksum = entry["size"], entry[algorithm]
    if not _is_int(size) or size < 0:
        return f"size is {size!r}, not an integer >= 0"
    if not isinstance(checksum, str) or not _CHECKSUM_HEX[algorithm].match(checksum):
        return f"{algorithm} is {checksum!r}, not a {algorithm} in hex"
    return None


def manifest_problem(manifest: Any, step: int) -> str | None:
    """What makes `step`'s manifest unfit to verify the checkpoint by, naming the field, or None:
    its format, step and file entries. Other fields are never a problem (see above)."""
    if not isinstance(manifest, dict):
        return f"a {type(manifest).__name__}, not a mapping"
    fmt = manifest.get("format")
    if not _is_int(fmt) or fmt not in _CHECKSUM_OF_FORMAT:
        return f"format is {fmt!r}, not one of {sorted(_CHECKSUM_OF_FORMAT)}"
    if not _is_int(manifest.get("step")) or manifest["step"] != step:
        return f"step is {manifest.get('step')!r}, not {step}"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return f"files is a {type(files).__name__}, not a mapping of file names to entries"
    for name, entry in files.items():
        if not _FILE_NAME.match(name):
            return f"files: {name!r} is not a file name"
        problem = entry_problem(entry, (_CHECKSUM_OF_FORMAT[fmt],))
        if problem:
            return f"files[{name!r}]: {problem}"
    return None


def manifest_int(manifest: dict[str, Any], key: str) -> int | None:
    """An integer information field of a manifest (world_size, incarnation, ...), or None when
    it is absent or of another type: such fields are not checked (see above)."""
    value = manifest.get(key)
    return value if _is_int(value) else None


def _checked_entry(entry: Any, where: str) -> dict[str, Any]:
    """A caller's manifest entry (open_verified, read_file), checked like a manifest's own."""
    problem = entry_problem(entry)
    if problem:
        raise CorruptCheckpoint(f"{where}: manifest entry: {problem}")
    return entry


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    url: str
    manifest: dict[str, Any]
    data: dict[str, bytearray] = field(default_factory=dict, repr=False, compare=False)
    directory: str = ""  # where the files were read (object stores: the prefix the marker named)

    @property
    def size(self) -> int:
        return sum(int(f["size"]) for f in self.manifest.get("files", {}).values())

    # Information fields, of the type promised whatever the manifest holds (None: unknown).

    @property
    def model_digest(self) -> str | None:
        digest = self.manifest.get("model_digest")
        return digest if isinstance(digest, str) else None

    @property
    def created(self) -> float | None:
        created = self.manifest.get("created")
        return float(created) if _is_number(created) else None

    @property
    def incarnation(self) -> int:
        return token_incarnation(self.manifest.get("token"))


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


class HashingWriter:
    """A write-only file that computes size and checksum as data passes through.

    The checksum of a large buffer runs on a helper thread while the same buffer is written
    (both release the GIL), so it costs little extra time on big tensors. Small writes (a
    serializer's headers) are gathered into one buffer instead of one syscall each. On a file
    descriptor, the kernel is asked to start writing each large buffer back at once
    (sync_file_range), so the final fsync finds little left to do.
    """

    _pool: ThreadPoolExecutor | None = None
    _pool_lock = threading.Lock()

    def __init__(self, raw: Any, name: str, fd: int | None = None) -> None:
        self._raw = raw
        self._fd = fd
        self.name = name
        self._hash = Crc32()
        self.size = 0
        self._small = bytearray()  # small writes not yet passed on
        # The first I/O error: serializers (torch.save) may wrap or mask it on their way out.
        self.error: OSError | None = None

    @classmethod
    def _hasher(cls) -> ThreadPoolExecutor:
        with cls._pool_lock:
            if cls._pool is None:
                cls._pool = ThreadPoolExecutor(1, thread_name_prefix="orch-hash")
            return cls._pool

    def write(self, data: Any) -> int:
        if self.error is not None:
            raise self.error
        try:
            return self._write(data)
        except OSError as exc:
            self.error = exc
            raise

    def _write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        if n >= _HASH_OVERLAP_MIN:
            self._pass_small()
            pending = self._hasher().submit(self._hash.update, view)
            start = self.size
            self._write_all(view)
            pending.result()
            if self._fd is not None:
                _start_writeback(self._fd, start, n)
        else:
            self._hash.update(view)
            self._small += view
            if len(self._small) >= _SMALL_WRITES_MAX:
                self._pass_small()
        self.size += n
        return n

    def _pass_small(self) -> None:
        if self._small:
            self._write_all(memoryview(self._small))
            self._small = bytearray()

    def _write_all(self, view: memoryview) -> None:
        fault_point("ckpt.write")
        if self._fd is not None:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        else:
            self._raw.write(view)

    def flush(self) -> None:
        self._pass_small()
        if self._fd is None:
            self._raw.flush()

    def writable(self) -> bool:
        return True

    def entry(self) -> FileEntry:
        return FileEntry(name=self.name, size=self.size, checksum=self._hash.hexdigest())


class CheckpointStore:
    """The `ckpt/` directory of one run, on any fsspec filesystem."""

    def __init__(self, url: str) -> None:
        import fsspec  # lazy
        from fsspec.implementations.local import LocalFileSystem

        self.url = url.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.url)
        self.renames = isinstance(self.fs, LocalFileSystem)
        # Steps with a displaced directory in the newest listing of ckpt/ (None: not listed yet).
        # A commit looks for displaced commits to put back only for these (see _rename_into_place).
        self._displaced_seen: set[int] | None = None

    # ------------------------------------------------------------------ writing

    def tmp_dir(self, step: int, token: str) -> str:
        path = f"{self.path}/{step_dir_name(step)}.tmp-{token}"
        if self.renames:
            _make_dirs_durable(self.path)
            # Not fsync'd into ckpt/ here: the commit's rename moves it, and that is fsync'd.
            os.makedirs(path, mode=0o700, exist_ok=True)
            fault_point("ckpt.tmp_created")
        return path

    def write_stream(self, directory: str, name: str, produce: Any) -> FileEntry:
        """Create `name` in `directory`, let `produce(fileobj)` fill it, make it durable."""
        target = f"{directory}/{name}"
        if self.renames:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                writer = HashingWriter(None, name, fd=fd)
                _produce(writer, produce)
                writer.flush()
                fault_point("ckpt.before_fsync")
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            # Object stores: each file is one PUT (or one multipart upload) when it closes, so
            # this point lies between two files' PUTs.
            fault_point("ckpt.object_put")
            with self.fs.open(target, "wb") as raw:
                writer = HashingWriter(raw, name)
                _produce(writer, produce)
                writer.flush()
        fault_point("ckpt.file_written")
        return writer.entry()

    def write_file(self, directory: str, name: str, data: bytes | memoryview) -> FileEntry:
        return self.write_stream(directory, name, lambda fh: fh.write(data))

    def commit(
        self, tmp: str, step: int, token: str, entries: Iterable[FileEntry], meta: dict[str, Any]
    ) -> str:
        """Write the manifest, check the fence, and make the checkpoint visible atomically.

        `meta` is information for readers, of any JSON type: the protocol's own fields (format,
        step, created, token, files) are the store's, written after it so that it cannot
        override them."""
        manifest = {
            **meta,
            "format": 2,  # 1: sha256 per file; 2: crc32
            "step": step,
            "created": time.time(),
            "token": token,
            "files": {e.name: e.manifest_entry() for e in sorted(entries, key=lambda e: e.name)},
        }
        problem = manifest_problem(manifest, step)
        if problem:  # a file name that is a path: never commit what every reader calls corrupt
            raise ValueError(f"{step_dir_name(step)}: not committing a malformed manifest: {problem}")
        body = json.dumps(manifest, indent=1, sort_keys=True).encode()
        self.write_file(tmp, MANIFEST, body)
        fault_point("ckpt.manifest_written")
        self.check_fence(token_incarnation(token))
        final = f"{self.path}/{step_dir_name(step)}"
        if self.renames:
            self.write_file(tmp, COMMITTED, b"")
            _fsync_dir(tmp)
            fault_point("ckpt.before_commit")
            self._rename_into_place(tmp, final, step, token)
            _fsync_dir(self.path)  # committed only once the rename is on disk
            fault_point("ckpt.after_commit")
        else:
            marker = json.dumps({"dir": tmp.rsplit("/", 1)[-1], "token": token}).encode()
            fault_point("ckpt.before_commit")
            try:
                self.fs.pipe_file(f"{final}/{COMMITTED}", marker, mode="create")
            except FileExistsError:
                # A client that retried a PUT whose response was lost gets 412 for its own
                # marker: then this commit did land. Only another commit may be displaced.
                if not self.commits_dir(step, tmp):
                    self._displace_marker(final, step, token, marker)
            except OSError:
                if not self.commits_dir(step, tmp):  # the PUT may have landed all the same
                    raise
            fault_point("ckpt.after_commit")
        return final

    def _rename_into_place(self, tmp: str, final: str, step: int, token: str) -> None:
        """Rename `tmp` to `final`, displacing an older incarnation's commit of the step (one
        that slipped in before our registration made it stale). A directory cannot be renamed
        over a full one, so a displacement is two renames: the old commit to
        `step-s.displaced-<its token>`, then ours into place. At every instant the step stays
        committed: between the two (a crash), readers take the displaced directory as the
        step's commit, and the next commit of the step first puts it back.

        Putting one back needs a listing of ckpt/ (a displaced name holds a random part), which
        a commit does not pay for on every save: the first try looks only when the store's
        newest listing showed a displaced directory of the step, or when it has listed nothing
        yet. One displaced after that listing was either an older incarnation's commit, moved by
        a writer older than this one (this commit would displace it in turn: the plain rename
        into the empty name comes to the same), or moved by a newer incarnation: then this
        writer is stale, and its fence check (just before) or, past it, the newer incarnation's
        seal keeps this commit out. Every later try looks."""
        for attempt in range(_DISPLACE_TRIES):
            if attempt > 0 or self._displaced_seen is None or step in self._displaced_seen:
                self._restore_displaced(step)
            if _renamed_into_empty(tmp, final):
                return
            existing = self._existing_incarnation(step)
            if existing >= token_incarnation(token):
                raise AlreadyCommitted(step, existing)
            try:
                os.rename(final, f"{self.path}/{step_dir_name(step)}.displaced-{make_token(existing)}")
            except FileNotFoundError:
                continue  # un-committed or displaced by another writer meanwhile: look again
            if self._displaced_seen is not None:
                self._displaced_seen.add(step)  # left there if the rename below fails
            fault_point("ckpt.displaced")
            if _renamed_into_empty(tmp, final):
                return
            # Another writer put its commit (or the displaced one) back meanwhile: look again.
        raise OSError(errno.EBUSY, f"{step_dir_name(step)}: its commit kept changing; not committing")

    def _restore_displaced(self, step: int) -> None:
        """Put a displaced commit back as `step-s/` when `step-s/` is missing (a crash between
        a displacement's renames): then no commit can take the step without the incarnation
        check, which a plain rename into the empty name would skip."""
        final = f"{self.path}/{step_dir_name(step)}"
        if os.path.lexists(final):
            return
        holder = _commit_candidates(self.names()).get(step)  # names only: no stat per step
        if holder is None or holder == step_dir_name(step):
            return
        try:
            if not _renamed_into_empty(f"{self.path}/{holder}", final):
                return  # another writer's commit is in place
        except FileNotFoundError:
            return  # another writer moved it first
        _fsync_dir(self.path)

    def _displace_marker(self, final: str, step: int, token: str, marker: bytes) -> None:
        existing = self._existing_incarnation(step)
        if existing >= token_incarnation(token):
            raise AlreadyCommitted(step, existing)
        self.fs.pipe_file(f"{final}/{COMMITTED}", marker)

    def _existing_incarnation(self, step: int, directory: str | None = None) -> int:
        """The incarnation that committed `step` (-1 when unreadable); local filesystems read
        it from `directory` when given (where the commit is), else from data_dir(step)."""
        try:
            if self.renames:
                return token_incarnation(self.read_manifest(step, directory).get("token", ""))
            marker = json.loads(self.fs.cat_file(f"{self.path}/{step_dir_name(step)}/{COMMITTED}"))
            return token_incarnation(str(marker["token"]))
        except (CorruptCheckpoint, FileNotFoundError, ValueError, KeyError, TypeError):
            return -1

    # ------------------------------------------------------------------ fencing

    def register_incarnation(self, incarnation: int) -> None:
        """Announce that `incarnation` is alive; older ones become stale from now on.

        Create-only, so a number is held by one process: a second process that registers the
        same number (two incarnations that counted alike) is refused with StaleIncarnation
        rather than share the fence with the first. The same process may register again.
        """
        path = f"{self.path}/{INCARNATIONS}/{incarnation:010d}"
        body = f"{process_id()} {time.time()}".encode()
        try:
            self._create(path, body)
        except FileExistsError:
            try:
                holder = self.fs.cat_file(path).decode("utf-8", "replace").split(" ", 1)[0]
            except (OSError, FileNotFoundError):
                holder = "?"
            if holder != process_id():
                raise StaleIncarnation(
                    f"incarnation {incarnation} is already registered by another process ({holder});"
                    " two incarnations of this run counted alike"
                ) from None
        self._seal(incarnation)

    def _seal(self, incarnation: int) -> None:
        """Record the commits that exist now that `incarnation` is registered.

        The fence check and the commit are two steps with no lease between them: an older
        incarnation paused after its check can still commit. Readers close that gap: a commit
        by an older incarnation counts only if the first sealed incarnation after it lists it,
        that is, if it landed before that incarnation could have looked for a checkpoint.
        """
        commits = {str(step): inc for step, inc in self._commit_records()}
        try:
            self._create(self._seal_path(incarnation), json.dumps({"commits": commits}).encode())
        except FileExistsError:
            pass  # this process sealed it already (a registration repeated)

    def _seal_path(self, incarnation: int) -> str:
        return f"{self.path}/{INCARNATIONS}/{incarnation:010d}{_SEAL_SUFFIX}"

    def _create(self, path: str, body: bytes) -> None:
        """Create-only write: FileExistsError when `path` exists."""
        if self.renames:
            _make_dirs_durable(os.path.dirname(path))
            # fsspec's local "create" mode checks, then writes: O_EXCL is the atomic form.
            write_new_file(path, body)
            # The file is fsync'd, its name is not: without this a power loss could take a
            # seal away and keep the commits after it (and accept a stale writer's late one).
            _fsync_dir(os.path.dirname(path))
        else:
            self.fs.pipe_file(path, body, mode="create")

    def _incarnation_names(self) -> list[str]:
        self.fs.invalidate_cache()
        try:
            return [
                p.rstrip("/").rsplit("/", 1)[-1]
                for p in self.fs.ls(f"{self.path}/{INCARNATIONS}", detail=False)
            ]
        except FileNotFoundError:
            return []

    def _sealed_incarnations(self, names: list[str] | None = None) -> list[int]:
        return sorted(
            int(n.removesuffix(_SEAL_SUFFIX))
            for n in (self._incarnation_names() if names is None else names)
            if n.endswith(_SEAL_SUFFIX) and n.removesuffix(_SEAL_SUFFIX).isdigit()
        )

    def _read_seal(self, incarnation: int) -> dict[str, int] | None:
        try:
            commits = json.loads(self.fs.cat_file(self._seal_path(incarnation)))["commits"]
            return {str(k): int(v) for k, v in commits.items()}
        except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
            return None  # unreadable: as if that incarnation never sealed

    def newest_incarnation(self, names: list[str] | None = None) -> int:
        names = self._incarnation_names() if names is None else names
        return max((int(n) for n in names if n.isdigit()), default=-1)

    def check_fence(self, incarnation: int) -> None:
        newest = self.newest_incarnation()
        if newest > incarnation:
            raise StaleIncarnation(
                f"incarnation {incarnation} is stale: incarnation {newest} of this run has started;"
                " not committing"
            )

    # ------------------------------------------------------------------ reading

    def names(self) -> list[str]:
        """The names in ckpt/, listed afresh."""
        # Object-store filesystems cache listings per process; a stale listing would hide new
        # commits and, worse, a newer incarnation's registration (fencing).
        self.fs.invalidate_cache()
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False)]
        except FileNotFoundError:
            names = []
        self._displaced_seen = {
            int(m["step"]) for n in names if (m := _SIDE_DIR.match(n)) and m["kind"] == "displaced"
        }
        return names

    def committed_steps(self) -> list[int]:
        """Committed steps, newest first (not yet verified); without fenced commits."""
        return self._split_fenced()[0]

    def fenced_steps(self) -> list[int]:
        """Commits a stale incarnation made after a newer one sealed: never loaded, and
        removed by the newest incarnation's retention pass."""
        return self._split_fenced()[1]

    def _commit_dirs(
        self, names: list[str] | None = None, marked: dict[str, bool] | None = None
    ) -> dict[int, str]:
        """step -> the name in ckpt/ that holds its commit: `step-s` (with its commit marker),
        or on local filesystems a displaced directory that a crash left without `step-s`.
        From `names` (a listing in hand) or a fresh listing; `marked` remembers, per name,
        whether it holds a commit marker, so that a caller asks once per name."""
        names = self.names() if names is None else names
        marked = {} if marked is None else marked
        found = {}
        for step, name in _commit_candidates(names).items():
            if name not in marked:
                marked[name] = self.fs.exists(f"{self.path}/{name}/{COMMITTED}")
            if marked[name]:
                found[step] = name
        return found

    def _commit_records(self, commit_dirs: dict[int, str] | None = None) -> list[tuple[int, int]]:
        """(step, committing incarnation) for each committed step, newest first. An
        unreadable manifest or marker reads as incarnation -1: restore's verification deals
        with it, as with any corrupt checkpoint."""
        records = []
        for step, name in (self._commit_dirs() if commit_dirs is None else commit_dirs).items():
            directory = f"{self.path}/{name}" if self.renames else None
            records.append((step, self._existing_incarnation(step, directory)))
        return sorted(records, reverse=True)

    def _split_fenced(
        self, commit_dirs: dict[int, str] | None = None, sealed: list[int] | None = None
    ) -> tuple[list[int], list[int]]:
        records = self._commit_records(commit_dirs)
        sealed = self._sealed_incarnations() if sealed is None else sealed
        seals: dict[int, dict[str, int] | None] = {}
        accepted, fenced = [], []
        for step, by in records:
            # The first incarnation after the committer that sealed judges: listed, it counts.
            seal = next((s for j in sealed if j > by and (s := self._seal_of(j, seals)) is not None), None)
            if by < 0 or seal is None or seal.get(str(step)) == by:
                accepted.append(step)
            else:
                fenced.append(step)
        return accepted, fenced

    def _seal_of(self, incarnation: int, cache: dict[int, dict[str, int] | None]) -> dict[str, int] | None:
        if incarnation not in cache:
            cache[incarnation] = self._read_seal(incarnation)
        return cache[incarnation]

    def commits_dir(self, step: int, directory: str) -> bool:
        """Whether `step` is committed with `directory` as its data: true after a commit whose
        reply was lost, which must then never be discarded as a failed save."""
        if self.renames:
            return False  # a committed directory was renamed away: `directory` is never it
        self.fs.invalidate_cache()
        try:
            return self.data_dir(step) == directory
        except CorruptCheckpoint:
            return False

    def uncommit(self, step: int, incarnation: int) -> None:
        """Take a checkpoint out of the committed set, atomically (its files go after): what
        restore does to one that failed verification, so that retention never counts it."""
        name = step_dir_name(step)
        if self.renames:
            doomed = f"{self.path}/{name}.stale-{make_token(incarnation)}"
            os.rename(self.data_dir(step), doomed)
            _fsync_dir(self.path)  # un-committed on disk before any file goes
            self._rm_quietly(doomed)
            return
        data = self._data_name_or_none(step)
        self._rm_quietly(f"{self.path}/{name}/{COMMITTED}")
        self._rm_quietly(f"{self.path}/{name}")
        if data:
            self._rm_quietly(f"{self.path}/{data}")

    def data_dir(self, step: int) -> str:
        """Where a committed checkpoint's files are."""
        final = f"{self.path}/{step_dir_name(step)}"
        if self.renames:
            if os.path.lexists(final):
                return final
            holder = self._commit_dirs().get(step)  # a displacement's two renames, half done
            return f"{self.path}/{holder}" if holder else final
        try:
            marker = json.loads(self.fs.cat_file(f"{final}/{COMMITTED}"))
            name = marker["dir"]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            raise CorruptCheckpoint(f"{step_dir_name(step)}: commit marker unreadable") from None
        if not re.match(r"^step-\d{8,}\.tmp-[A-Za-z0-9-]+$", str(name)):
            raise CorruptCheckpoint(f"{step_dir_name(step)}: commit marker names {name!r}")
        return f"{self.path}/{name}"

    def read_manifest(self, step: int, directory: str | None = None) -> dict[str, Any]:
        try:
            manifest = json.loads(self.fs.cat_file(f"{directory or self.data_dir(step)}/{MANIFEST}"))
        except (FileNotFoundError, ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise CorruptCheckpoint(
                f"{step_dir_name(step)}: manifest unreadable ({exc.__class__.__name__})"
            ) from None
        problem = manifest_problem(manifest, step)
        if problem:
            raise CorruptCheckpoint(f"{step_dir_name(step)}/{MANIFEST}: {problem}")
        return manifest

    def local_path(self, step: int, name: str) -> str | None:
        """The OS path of a committed file on a local filesystem (None on object stores)."""
        return f"{self.data_dir(step)}/{name}" if self.renames else None

    def open_verified(self, directory: str, name: str, expect: dict[str, Any], where: str) -> int:
        """Local filesystems: open `directory/name`, check its size and checksum through that
        open file, and return the descriptor. A loader that maps /proc/self/fd/N then loads
        exactly the bytes that were verified, even if the path is displaced meanwhile."""
        expect = _checked_entry(expect, where)
        try:
            fd = os.open(f"{directory}/{name}", os.O_RDONLY)
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{where}: missing") from None
        try:
            size = expect["size"]
            buffers = [bytearray(min(max(size, 1), _READ_CHUNK)) for _ in range(2)]
            digest, expected = checksum_for(expect)
            pending = None
            pos = 0
            while pos < size:
                target = memoryview(buffers[(pos // _READ_CHUNK) % 2])[: min(_READ_CHUNK, size - pos)]
                n = os.preadv(fd, [target], pos)
                if not n:
                    break
                if pending is not None:
                    pending.result()  # frees the other buffer for the next read
                pending = HashingWriter._hasher().submit(digest.update, target[:n])
                pos += n
            if pending is not None:
                pending.result()
            longer = bool(os.pread(fd, 1, pos))
            if pos != size or longer:
                raise CorruptCheckpoint(
                    f"{where}: size {'>' if longer else pos} != {size} (truncated or overwritten)"
                )
            if digest.hexdigest() != expected:
                raise CorruptCheckpoint(f"{where}: checksum mismatch")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read_file(
        self,
        step: int,
        name: str,
        expect: dict[str, Any] | None = None,
        *,
        keep: bool = True,
        directory: str | None = None,
    ) -> bytearray | None:
        """Read one file; with `expect` (its manifest entry) check size and checksum.

        Reads in chunks and hashes each chunk on a helper thread while the next one is read,
        so verification costs about one pass over the data. With keep=False only the check is
        done, through one small reused buffer (no page faults on a file-sized allocation).
        """
        where = f"{step_dir_name(step)}/{name}"
        if expect is not None:
            expect = _checked_entry(expect, where)
        path = f"{directory or self.data_dir(step)}/{name}"
        try:
            fh = self.fs.open(path, "rb")
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{where}: missing") from None
        with fh:
            if expect is None:
                return bytearray(fh.read())
            size = expect["size"]
            buffers = [bytearray(size)] if keep else [bytearray(min(size, _READ_CHUNK)) for _ in range(2)]
            digest, expected = checksum_for(expect)
            pending = None
            pos = 0
            chunk_no = 0
            while pos < size:
                if keep:
                    target = memoryview(buffers[0])[pos : pos + _READ_CHUNK]
                else:
                    target = memoryview(buffers[chunk_no % 2])[: min(_READ_CHUNK, size - pos)]
                n = fh.readinto(target)
                if not n:
                    break
                if pending is not None:
                    pending.result()  # also frees the other buffer for the next read
                pending = HashingWriter._hasher().submit(digest.update, target[:n])
                pos += n
                chunk_no += 1
            longer = bool(fh.read(1))
            if pending is not None:
                pending.result()
        if pos != size or longer:
            raise CorruptCheckpoint(
                f"{where}: size {'>' if longer else pos} != {size} (truncated or overwritten)"
            )
        if digest.hexdigest() != expected:
            raise CorruptCheckpoint(f"{where}: checksum mismatch")
        return buffers[0] if keep else None

    def verify(self, step: int, keep: Iterable[str] = (), skip: Iterable[str] = ()) -> CheckpointInfo:
        """Check every file of a committed checkpoint against its manifest (but `skip`, which
        the caller checks itself), all in the data directory resolved once, at the start.

        The verified bytes of the files named in `keep` are returned in `info.data`, so a loader
        does not read them twice; `info.directory` is where they were read.
        """
        directory = self.data_dir(step)
        manifest = self.read_manifest(step, directory)
        wanted, skipped = set(keep), set(skip)
        data = {}
        for name, entry in manifest["files"].items():
            if name in skipped:
                continue
            content = self.read_file(step, name, entry, keep=name in wanted, directory=directory)
            if content is not None:
                data[name] = content
        return CheckpointInfo(
            step=step,
            url=f"{self.url}/{step_dir_name(step)}",
            manifest=manifest,
            data=data,
            directory=directory,
        )

    def info(self, step: int) -> CheckpointInfo:
        """Manifest only, no checksum pass (cheap, for listings)."""
        return CheckpointInfo(
            step=step, url=f"{self.url}/{step_dir_name(step)}", manifest=self.read_manifest(step)
        )

    # ------------------------------------------------------------------ retention

    def prune(
        self,
        keep: int,
        incarnation: int,
        protect: Iterable[int] = (),
        known_good: Iterable[int] | None = None,
    ) -> list[str]:
        """Keep the newest `keep` committed checkpoints; delete older ones and leftovers of
        incarnations older than `incarnation`. Never touches `protect` or live writers' files.

        With `known_good` (steps this writer committed or verified), only those count toward
        `keep`: a checkpoint nobody has verified since its commit may be corrupt, and counting
        it could delete the only good one. Nothing is deleted until `keep` good ones exist.

        It runs after every save, so it lists ckpt/ (and incarnations/) once and asks once
        per commit for its marker: on Lustre each is a request to the metadata server. What
        appears after that listing is left to the next pass.
        """
        registered = self._incarnation_names()
        if self.newest_incarnation(registered) > incarnation:
            return []  # a stale writer (paused past the fence check) deletes nothing
        protected = set(protect)
        removed = []
        listing = self.names()
        marked: dict[str, bool] = {}
        commit_dirs = self._commit_dirs(listing, marked)
        steps, fenced = self._split_fenced(commit_dirs, self._sealed_incarnations(registered))
        gone = set()  # names in the listing that this pass took away
        for step in fenced:  # a stale writer's late commit: never loaded, so never kept
            # Its data: the directory itself, or on object stores the prefix its marker names.
            gone.add(commit_dirs[step] if self.renames else self._data_name_or_none(step) or "")
            self.uncommit(step, incarnation)
            removed.append(step_dir_name(step))
        doomed = steps[keep:]
        if known_good is not None:
            good_set = set(known_good)
            good = [s for s in steps if s in good_set]
            doomed = [s for s in steps if len(good) >= keep and s < good[keep - 1]] if keep > 0 else []
        # Directories that hold a commit: an object store's data prefixes, and a displaced
        # directory that holds its step's commit (a crash between a displacement's renames).
        live_dirs = set()
        if self.renames:
            # Without the fenced commits just taken away: a displaced commit they had superseded
            # is its step's commit again.
            live_dirs.update(self._commit_dirs([n for n in listing if n not in gone], marked).values())
        else:
            for step in steps:
                try:
                    live_dirs.add(self.data_dir(step).rsplit("/", 1)[-1])
                except CorruptCheckpoint:
                    pass
        for step in doomed:
            if step in protected:
                continue
            name = step_dir_name(step)
            # Un-commit first, atomically and durably, so a crash (or a power loss) halfway
            # through a delete never leaves a committed checkpoint with files missing.
            if self.renames:
                aside = f"{self.path}/{name}.stale-{make_token(incarnation)}"
                os.rename(f"{self.path}/{commit_dirs[step]}", aside)
                gone.add(commit_dirs[step])
                _fsync_dir(self.path)
                fault_point("ckpt.prune_uncommitted")
                self.fs.rm(aside, recursive=True)
            else:
                data = self._data_name_or_none(step)
                self.fs.rm(f"{self.path}/{name}/{COMMITTED}")
                fault_point("ckpt.prune_uncommitted")
                self._rm_quietly(f"{self.path}/{name}")  # object stores: gone with its last key
                if data:
                    self._rm_quietly(f"{self.path}/{data}")
                    live_dirs.discard(data)
                    gone.add(data)
            removed.append(name)
        for name in listing:
            m = _SIDE_DIR.match(name)
            if not m or name in live_dirs or name in gone:
                continue
            # Stale and superseded displaced directories always go; a tmp directory only when
            # an older incarnation (dead, or stale and fenced) was writing it.
            if m["kind"] != "tmp" or int(m["inc"]) < incarnation:
                path = f"{self.path}/{name}"
                if self.renames and m["kind"] != "stale":
                    # Moved aside first: a stale owner renaming it into a step at this moment
                    # (or a writer putting a displaced commit back) then fails, the directory
                    # being gone, instead of committing a directory whose files are going.
                    aside = f"{self.path}/{step_dir_name(int(m['step']))}.stale-{make_token(incarnation)}"
                    try:
                        os.rename(path, aside)
                    except FileNotFoundError:
                        continue  # its owner renamed it into place (or deleted it) first
                    path = aside
                fault_point("ckpt.prune_leftover")
                self._rm_quietly(path)
                removed.append(name)
        return removed

    def _rm_quietly(self, path: str) -> None:
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    def _data_name_or_none(self, step: int) -> str | None:
        try:
            return self.data_dir(step).rsplit("/", 1)[-1]
        except CorruptCheckpoint:
            return None


def _produce(writer: HashingWriter, produce: Any) -> None:
    try:
        produce(writer)
    except Exception:
        if writer.error is not None:
            raise writer.error from None
        raise


try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _sync_file_range = _libc.sync_file_range
    _sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
except (OSError, AttributeError):  # pragma: no cover - not Linux/glibc
    _sync_file_range = None
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing this range to disk now, without waiting for it: the
    write-back overlaps the rest of the save instead of all of it waiting for fsync."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def _fsync_dir(path: str) -> None:
    """Make the names in directory `path` durable: a file's own fsync does not (local
    filesystems; object stores have no directories)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs_durable(path: str) -> None:
    """os.makedirs(path, exist_ok=True), with each directory it creates fsync'd into its
    parent: the protocol relies on ckpt/ and ckpt/incarnations/ surviving a power loss."""
    missing = []
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700 if directory == missing[0] else 0o777)
        except FileExistsError:
            pass  # made meanwhile by another rank or process: fsync'd again below all the same
        _fsync_dir(os.path.dirname(directory) or ".")


def _renamed_into_empty(source: str, target: str) -> bool:
    """Rename directory `source` to `target`; False when `target` exists and is not empty."""
    try:
        os.rename(source, target)
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise


def _commit_candidates(names: Iterable[str]) -> dict[int, str]:
    """step -> the name that holds its commit, from the names in ckpt/: `step-s`, or when it
    is missing the displaced directory with the newest incarnation (a displacement that
    crashed between its renames; the step's commit is still the one it moved aside)."""
    finals: dict[int, str] = {}
    displaced: dict[int, tuple[int, str]] = {}
    for name in names:
        if m := _STEP_DIR.match(name):
            finals[int(m.group(1))] = name
        elif (m := _SIDE_DIR.match(name)) and m["kind"] == "displaced":
            step, candidate = int(m["step"]), (int(m["inc"]), name)
            displaced[step] = max(displaced.get(step, candidate), candidate)
    return {**{step: name for step, (_, name) in displaced.items()}, **finals}


def newest_committed(url: str) -> CheckpointInfo | None:
    """Newest committed checkpoint's manifest (unverified) under a ckpt/ URL, or None."""
    store = CheckpointStore(url)
    for step in store.committed_steps():
        try:
            return store.info(step)
        except CorruptCheckpoint:
            continue
    return None
