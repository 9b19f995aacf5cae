"""The run directory on storage (a path or any fsspec URL): run.yaml, events, logs.

    <root>/<run-id>/run.yaml  events.jsonl  ckpt/  logs/attempt-N/rank-R.log  tb/

Events are an append-only ledger. On a local or shared filesystem they are lines of
events.jsonl, each written with one O_APPEND write; object stores cannot append, so there each
event is one object under events/ and readers merge them in name order.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterator

import yaml

from orchestrator.errors import RunNotFound
from orchestrator.spec.runid import is_valid_run_id


def _url_to_fs(url: str) -> tuple[Any, str]:
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
        return self.url.rstrip("/").rsplit("/", 1)[-1]

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
        if self.is_local:
            root = self.local_path
            os.makedirs(os.path.dirname(root) or ".", exist_ok=True)
            os.makedirs(root, mode=0o700, exist_ok=False)
            os.chmod(root, 0o700)  # umask may have widened it
            for sub in ("ckpt", "logs", "tb"):
                os.makedirs(os.path.join(root, sub), mode=0o700, exist_ok=True)
            _write_local_atomic(os.path.join(root, "run.yaml"), yaml.safe_dump(run_config, sort_keys=False).encode())
        else:
            fs, path = _url_to_fs(self.url)
            if fs.exists(f"{path}/run.yaml"):
                raise FileExistsError(f"run directory already exists: {self.url}")
            fs.makedirs(path, exist_ok=True)
            fs.pipe_file(f"{path}/run.yaml", yaml.safe_dump(run_config, sort_keys=False).encode())

    def exists(self) -> bool:
        if self.is_local:
            return os.path.isfile(os.path.join(self.local_path, "run.yaml"))
        fs, path = _url_to_fs(self.url)
        return fs.exists(f"{path}/run.yaml")

    def read_run_config(self) -> dict[str, Any]:
        return yaml.safe_load(self.read_bytes("run.yaml")) or {}

    def read_bytes(self, name: str) -> bytes:
        if self.is_local:
            with open(os.path.join(self.local_path, name), "rb") as fh:
                return fh.read()
        fs, path = _url_to_fs(self.url)
        return fs.cat_file(f"{path}/{name}")

    # ------------------------------------------------------------------ events

    def append_event(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"time": round(time.time(), 6), "event": event, **fields}
        line = json.dumps(record, sort_keys=False, separators=(",", ":")) + "\n"
        if self.is_local:
            fd = os.open(os.path.join(self.local_path, "events.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            fs, path = _url_to_fs(self.url)
            name = f"{time.time_ns():020d}-{secrets.token_hex(4)}.json"
            fs.pipe_file(f"{path}/events/{name}", line.encode())
        return record

    def events(self) -> list[dict[str, Any]]:
        return list(self._iter_events())

    def _iter_events(self) -> Iterator[dict[str, Any]]:
        if self.is_local:
            try:
                with open(os.path.join(self.local_path, "events.jsonl"), encoding="utf-8") as fh:
                    lines = fh.read().splitlines()
            except FileNotFoundError:
                return
        else:
            fs, path = _url_to_fs(self.url)
            fs.invalidate_cache()  # a cached listing would hide new events
            try:
                names = sorted(fs.ls(f"{path}/events", detail=False))
            except FileNotFoundError:
                return
            lines = [fs.cat_file(n).decode() for n in names]
        for line in lines:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write: the rest of the ledger still counts

    # ------------------------------------------------------------------ logs

    def logs_dir(self, attempt: int) -> str:
        """Local directory for this attempt's rank logs (a staging dir for remote run dirs)."""
        if self.is_local:
            base = os.path.join(self.local_path, "logs")
        else:
            base = os.path.join(tempfile.gettempdir(), f"orch-{os.getuid()}", self.run_id, "logs")
        path = os.path.join(base, f"attempt-{attempt}")
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def publish_logs(self, attempt: int) -> None:
        """Copy a remote run's staged logs of one attempt into the run directory."""
        if self.is_local:
            return
        fs, path = _url_to_fs(self.url)
        local = self.logs_dir(attempt)
        for name in sorted(os.listdir(local)):
            fs.put_file(os.path.join(local, name), f"{path}/logs/attempt-{attempt}/{name}")

    def log_files(self, attempt: int | None = None) -> dict[tuple[int, int], str]:
        """{(attempt, rank): url} of every rank log in the run directory."""
        out: dict[tuple[int, int], str] = {}
        if self.is_local:
            base = os.path.join(self.local_path, "logs")
            entries = [(a, os.listdir(os.path.join(base, a))) for a in _safe_listdir(base)]
            joiner = lambda a, n: os.path.join(base, a, n)  # noqa: E731
        else:
            fs, path = _url_to_fs(self.url)
            entries = []
            for a in _safe_fs_ls(fs, f"{path}/logs"):
                entries.append((a, _safe_fs_ls(fs, f"{path}/logs/{a}")))
            joiner = lambda a, n: f"{path}/logs/{a}/{n}"  # noqa: E731
        for a, names in entries:
            if not a.startswith("attempt-"):
                continue
            n_attempt = int(a.split("-", 1)[1])
            if attempt is not None and n_attempt != attempt:
                continue
            for name in names:
                if name.startswith("rank-") and name.endswith(".log"):
                    out[(n_attempt, int(name[5:-4]))] = joiner(a, name)
        return out


def _safe_listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def _safe_fs_ls(fs: Any, path: str) -> list[str]:
    try:
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def _write_local_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def resolve_run(ref: str, storage_root: str) -> RunDir:
    """A run id (under storage_root) or a run directory (path or URL) -> an existing RunDir."""
    if "://" in ref or os.sep in ref or ref in (".", "..") or os.path.isdir(ref) and os.path.isfile(os.path.join(ref, "run.yaml")):
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
        return [RunDir(os.path.join(root, n)) for n in _safe_listdir(root) if os.path.isfile(os.path.join(root, n, "run.yaml"))]
    fs, path = _url_to_fs(storage_root)
    return [RunDir(join_url(storage_root, n)) for n in _safe_fs_ls(fs, path) if fs.exists(f"{path}/{n}/run.yaml")]


def this_host() -> str:
    return socket.gethostname()
