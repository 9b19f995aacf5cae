"""Checkpoint layout on storage and its commit protocol, without torch.

    ckpt/step-00000100.tmp-<token>/   files being written by incarnation <token>
    ckpt/step-00000100/               committed: files + manifest.json + COMMITTED

A checkpoint exists only when it is committed (renamed into place on filesystems that rename
atomically; a create-only COMMITTED object written last elsewhere) and its manifest verifies
(every file present with the listed size and sha256). The controller (`orch status`,
`orch checkpoints`) reads checkpoints through this module, so it never imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Iterable

MANIFEST = "manifest.json"
COMMITTED = "COMMITTED"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_TMP_DIR = re.compile(r"^step-(\d{8,})\.tmp-([A-Za-z0-9_.-]+)$")


class CorruptCheckpoint(Exception):
    pass


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    url: str
    manifest: dict[str, Any]

    @property
    def size(self) -> int:
        return sum(int(f["size"]) for f in self.manifest.get("files", {}).values())

    @property
    def model_digest(self) -> str | None:
        return self.manifest.get("model_digest")

    @property
    def created(self) -> float | None:
        return self.manifest.get("created")


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


class CheckpointStore:
    """The `ckpt/` directory of one run, on any fsspec filesystem."""

    def __init__(self, url: str) -> None:
        import fsspec  # lazy

        self.url = url.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.url)
        from fsspec.implementations.local import LocalFileSystem

        self.local = isinstance(self.fs, LocalFileSystem)

    # ------------------------------------------------------------------ writing

    def tmp_dir(self, step: int, token: str) -> str:
        path = f"{self.path}/{step_dir_name(step)}.tmp-{token}"
        if self.local:
            os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def write_file(self, directory: str, name: str, data: bytes | memoryview) -> FileEntry:
        """Write one file durably (fsync on local filesystems) and describe it for the manifest."""
        target = f"{directory}/{name}"
        if self.local:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            self.fs.pipe_file(target, bytes(data))
        return FileEntry(name=name, size=len(data), sha256=sha256_bytes(data))

    def commit(self, tmp: str, step: int, entries: Iterable[FileEntry], meta: dict[str, Any]) -> str:
        """Write the manifest and make the checkpoint visible in one atomic step."""
        manifest = {
            "format": 1,
            "step": step,
            "created": time.time(),
            **meta,
            "files": {e.name: {"size": e.size, "sha256": e.sha256} for e in sorted(entries, key=lambda e: e.name)},
        }
        body = json.dumps(manifest, indent=1, sort_keys=True).encode()
        final = f"{self.path}/{step_dir_name(step)}"
        if self.local:
            self.write_file(tmp, MANIFEST, body)
            self.write_file(tmp, COMMITTED, b"")
            _fsync_dir(tmp)
            if os.path.exists(final):
                raise FileExistsError(f"checkpoint {step_dir_name(step)} already committed")
            os.rename(tmp, final)  # the commit point
            _fsync_dir(self.path)
        else:
            # Object stores cannot rename a prefix atomically: copy into place, then the
            # create-only COMMITTED marker is the commit point.
            for name in [*manifest["files"], MANIFEST]:
                if name == MANIFEST:
                    self.fs.pipe_file(f"{final}/{MANIFEST}", body)
                else:
                    self.fs.copy(f"{tmp}/{name}", f"{final}/{name}")
            self._create_only(f"{final}/{COMMITTED}")
            self.fs.rm(tmp, recursive=True)
        return final

    def _create_only(self, path: str) -> None:
        if self.fs.exists(path):
            raise FileExistsError(f"{path} already committed")
        self.fs.pipe_file(path, b"")

    # ------------------------------------------------------------------ reading

    def committed_steps(self) -> list[int]:
        """Steps with a commit marker, newest first (not yet verified)."""
        steps = []
        for name in self._names():
            m = _STEP_DIR.match(name)
            if m and self.fs.exists(f"{self.path}/{name}/{COMMITTED}"):
                steps.append(int(m.group(1)))
        return sorted(steps, reverse=True)

    def _names(self) -> list[str]:
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False)]
        except FileNotFoundError:
            return []

    def read_manifest(self, step: int) -> dict[str, Any]:
        try:
            return json.loads(self.fs.cat_file(f"{self.path}/{step_dir_name(step)}/{MANIFEST}"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptCheckpoint(f"{step_dir_name(step)}: manifest unreadable ({exc.__class__.__name__})") from None

    def read_file(self, step: int, name: str, expect: dict[str, Any] | None = None) -> bytes:
        """Read one file; with `expect` (its manifest entry) check size and checksum."""
        path = f"{self.path}/{step_dir_name(step)}/{name}"
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{step_dir_name(step)}/{name}: missing") from None
        if expect is not None:
            if len(data) != int(expect["size"]):
                raise CorruptCheckpoint(f"{step_dir_name(step)}/{name}: size {len(data)} != {expect['size']} (truncated?)")
            if sha256_bytes(data) != expect["sha256"]:
                raise CorruptCheckpoint(f"{step_dir_name(step)}/{name}: checksum mismatch")
        return data

    def verify(self, step: int) -> CheckpointInfo:
        """Check every file of a committed checkpoint against its manifest."""
        manifest = self.read_manifest(step)
        for name, entry in manifest.get("files", {}).items():
            self.read_file(step, name, entry)
        return CheckpointInfo(step=step, url=f"{self.url}/{step_dir_name(step)}", manifest=manifest)

    def info(self, step: int) -> CheckpointInfo:
        """Manifest only, no checksum pass (cheap, for listings)."""
        return CheckpointInfo(step=step, url=f"{self.url}/{step_dir_name(step)}", manifest=self.read_manifest(step))

    # ------------------------------------------------------------------ retention

    def prune(self, keep: int, protect: Iterable[str] = ()) -> list[str]:
        """Delete committed checkpoints beyond the newest `keep`; never touch `protect`."""
        protected = set(protect)
        removed = []
        for step in self.committed_steps()[keep:]:
            name = step_dir_name(step)
            if name in protected:
                continue
            self.fs.rm(f"{self.path}/{name}", recursive=True)
            removed.append(name)
        return removed


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def newest_committed(url: str) -> CheckpointInfo | None:
    """Newest committed checkpoint's manifest (unverified) under a ckpt/ URL, or None."""
    store = CheckpointStore(url)
    for step in store.committed_steps():
        try:
            return store.info(step)
        except CorruptCheckpoint:
            continue
    return None
