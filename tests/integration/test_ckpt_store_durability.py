"""Durability of the commit protocol on local filesystems (issue 27, point 8).

A file's fsync does not make its directory entry durable: after a power loss a registration, a
seal or an un-commit can vanish while later changes survive. Every entry the protocol relies on
is followed by an fsync of its directory (checked here by watching the real system calls), and
the displacement of a step's commit is recoverable at every instant (a real writer process
crashed by a failpoint between its two renames), at no cost to the saves that displace nothing:
a commit does not list ckpt/, and retention lists it once (each a readdir on Lustre's metadata
server, and retention's look at each commit a stat there)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.storage.ckpt_store import AlreadyCommitted, CheckpointStore, make_token
from orchestrator.storage.faults import CRASH_EXIT_CODE, ENV_FAULT_RECORD, read_record


class Syscalls:
    """os.open/os.mkdir/os.rename/os.fsync as they happen, with the path each fsync'd fd names."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.log: list[tuple[str, str]] = []
        self._fd_paths: dict[int, str] = {}
        real_open, real_mkdir, real_rename, real_fsync = os.open, os.mkdir, os.rename, os.fsync

        def watched_open(path, flags, *args, **kwargs):
            fd = real_open(path, flags, *args, **kwargs)
            if kwargs.get("dir_fd") is None:
                self._fd_paths[fd] = os.path.abspath(path)
                if flags & os.O_CREAT:
                    self.log.append(("create", os.path.abspath(path)))
            return fd

        def watched_mkdir(path, *args, **kwargs):
            real_mkdir(path, *args, **kwargs)
            self.log.append(("create", os.path.abspath(path)))

        def watched_rename(src, dst, *args, **kwargs):
            real_rename(src, dst, *args, **kwargs)
            self.log.append(("rename", os.path.abspath(src)))  # gone from its directory
            self.log.append(("create", os.path.abspath(dst)))

        def watched_fsync(fd):
            real_fsync(fd)
            self.log.append(("fsync", self._fd_paths.get(fd, "?")))

        monkeypatch.setattr(os, "open", watched_open)
        monkeypatch.setattr(os, "mkdir", watched_mkdir)
        monkeypatch.setattr(os, "rename", watched_rename)
        monkeypatch.setattr(os, "fsync", watched_fsync)

    def mark(self) -> int:
        return len(self.log)

    def assert_durable(self, since: int, what: str, path: str) -> None:
        """The last time `path` appeared or vanished after `since`, its directory was fsync'd."""
        path = os.path.abspath(path)
        calls = self.log[since:]
        changed = [i for i, (kind, p) in enumerate(calls) if kind in ("create", "rename") and p == path]
        assert changed, f"{what}: {path} was never created or renamed: {calls}"
        parent = os.path.dirname(path)
        assert ("fsync", parent) in calls[changed[-1] :], f"{what}: {parent} not fsync'd after {path}"


def _save(store: CheckpointStore, step: int, incarnation: int, payload: bytes = b"w") -> str:
    token = make_token(incarnation)
    tmp = store.tmp_dir(step, token)
    store.commit(tmp, step, token, [store.write_file(tmp, "state.pt", payload)], {})
    return tmp


def test_every_entry_the_protocol_relies_on_has_its_directory_fsynced(tmp_path, monkeypatch):
    url = str(tmp_path / "run" / "ckpt")
    store = CheckpointStore(url)
    calls = Syscalls(monkeypatch)

    mark = calls.mark()
    store.register_incarnation(0)
    calls.assert_durable(mark, "the ckpt directory", url)
    calls.assert_durable(mark, "the incarnations directory", f"{url}/incarnations")
    calls.assert_durable(mark, "a registration", f"{url}/incarnations/{0:010d}")
    calls.assert_durable(mark, "a seal", f"{url}/incarnations/{0:010d}.seal")

    mark = calls.mark()
    _save(store, 10, 0, b"old")
    calls.assert_durable(mark, "a commit", f"{url}/step-00000010")

    store.register_incarnation(1)
    mark = calls.mark()
    tmp = _save(store, 10, 1, b"new")  # displaces incarnation 0's commit of the same step
    calls.assert_durable(mark, "a displacing commit", f"{url}/step-00000010")
    calls.assert_durable(mark, "a displacing commit's source", tmp)
    assert store.read_file(10, "state.pt") == b"new"

    # An un-commit (retention, a checkpoint that failed verification) is durable before any of
    # its files is deleted: otherwise a power loss could bring back a commit with files missing.
    deleted_at = []
    real_rm = store.fs.rm
    monkeypatch.setattr(store.fs, "rm", lambda *a, **k: (deleted_at.append(calls.mark()), real_rm(*a, **k)))
    _save(store, 20, 1)
    mark = calls.mark()
    store.uncommit(10, 1)
    assert deleted_at, "the un-committed checkpoint was never deleted"
    calls.log = calls.log[: deleted_at[0]]  # what happened before its files went
    calls.assert_durable(mark, "an un-commit", f"{url}/step-00000010")


def _crash_between_the_renames(url: str, record: Path) -> subprocess.CompletedProcess[str]:
    """Incarnation 1, in a process of its own, displaces step 10 and dies between its renames."""
    code = (
        "from orchestrator.storage.ckpt_store import CheckpointStore, make_token\n"
        f"store = CheckpointStore({url!r})\n"
        "store.register_incarnation(1)\n"
        "token = make_token(1)\n"
        "tmp = store.tmp_dir(10, token)\n"
        "store.commit(tmp, 10, token, [store.write_file(tmp, 'state.pt', b'new')], {})\n"
    )
    env = {**os.environ, "ORCH_FAULT": "ckpt.displaced", ENV_FAULT_RECORD: str(record)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_a_crash_between_the_renames_of_a_displacement_loses_no_commit(tmp_path, monkeypatch):
    url = str(tmp_path / "ckpt")
    store = CheckpointStore(url)
    _save(store, 5, 0, b"older")
    _save(store, 10, 0, b"old")  # slipped in before incarnation 1 registered
    record = tmp_path / "fired"
    crashed = _crash_between_the_renames(url, record)
    assert read_record(record) == ["ckpt.displaced@1"], crashed.stderr
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr
    assert not os.path.exists(f"{url}/step-00000010"), "the crash left the in-between state"

    # A new process sees step 10 still committed, with the old commit's bytes.
    fresh = CheckpointStore(url)
    assert fresh.committed_steps() == [10, 5]
    assert fresh.verify(10, keep=["state.pt"]).data["state.pt"] == b"old"

    # The next incarnation seals it as committed and resumes from it; its retention keeps it
    # (and deletes the crashed writer's files, which never got in).
    fresh.register_incarnation(2)
    assert fresh.committed_steps() == [10, 5] and fresh.fenced_steps() == []
    fresh.prune(1, 2, known_good=[10])
    assert fresh.committed_steps() == [10]
    assert fresh.read_file(10, "state.pt", fresh.info(10).manifest["files"]["state.pt"]) == b"old"
    assert [n for n in fresh.names() if ".tmp-" in n] == []

    # Only a newer incarnation may commit step 10 over it: not incarnation 0 again, paused
    # (here: forever) past its fence check, which a rename into the empty name would let in.
    paused = CheckpointStore(url)
    monkeypatch.setattr(paused, "check_fence", lambda incarnation: None)
    with pytest.raises(AlreadyCommitted):
        _save(paused, 10, 0, b"stale")
    assert fresh.verify(10, keep=["state.pt"]).data["state.pt"] == b"old"
    assert os.path.isdir(f"{url}/step-00000010"), "the refused writer put the displaced commit back first"

    # Its own commit of step 10 displaces it properly; then retention removes every leftover.
    _save(fresh, 10, 2, b"newest")
    assert fresh.committed_steps() == [10] and fresh.read_file(10, "state.pt") == b"newest"
    fresh.prune(1, 2, known_good=[10])
    assert sorted(fresh.names()) == ["incarnations", "step-00000010"]


def test_a_checkpoint_left_in_between_can_be_uncommitted_and_pruned(tmp_path):
    # Retention and restore's un-commit find the commit where the crash left it.
    url = str(tmp_path / "ckpt")
    store = CheckpointStore(url)
    _save(store, 5, 0)
    _save(store, 10, 0, b"old")
    record = tmp_path / "fired"
    crashed = _crash_between_the_renames(url, record)
    assert read_record(record) == ["ckpt.displaced@1"], crashed.stderr
    fresh = CheckpointStore(url)
    fresh.register_incarnation(2)
    _save(fresh, 20, 2)
    assert fresh.committed_steps() == [20, 10, 5]
    fresh.prune(1, 2, known_good=[20, 10])
    assert fresh.committed_steps() == [20]
    fresh.uncommit(20, 2)
    assert fresh.committed_steps() == [] and sorted(fresh.names()) == ["incarnations"]


class Listings:
    """Listings of ckpt/ and looks for a commit marker, as the store asks its filesystem."""

    def __init__(self, store: CheckpointStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.listed: list[str] = []
        self.markers: list[str] = []
        real_ls, real_exists = store.fs.ls, store.fs.exists

        def ls(path, *args, **kwargs):
            if str(path).rstrip("/") == store.path:
                self.listed.append(str(path))
            return real_ls(path, *args, **kwargs)

        def exists(path, *args, **kwargs):
            if str(path).endswith("/COMMITTED"):
                self.markers.append(str(path))
            return real_exists(path, *args, **kwargs)

        # fsspec shares the instance between stores: undone after the test.
        monkeypatch.setattr(store.fs, "ls", ls)
        monkeypatch.setattr(store.fs, "exists", exists)

    def clear(self) -> None:
        self.listed.clear()
        self.markers.clear()


def test_a_commit_lists_nothing_and_retention_lists_once(tmp_path, monkeypatch):
    url = str(tmp_path / "ckpt")
    store = CheckpointStore(url)
    store.register_incarnation(0)
    for step in (10, 20, 30):
        _save(store, step, 0)
    calls = Listings(store, monkeypatch)
    _save(store, 40, 0)
    assert calls.listed == [], "a commit that displaces nothing listed ckpt/"
    assert calls.markers == []

    calls.clear()
    removed = store.prune(2, 0, protect=[40], known_good=[10, 20, 30, 40])
    assert sorted(removed) == ["step-00000010", "step-00000020"]
    assert len(calls.listed) == 1, calls.listed
    assert sorted(calls.markers) == sorted(f"{store.path}/step-{s:08d}/COMMITTED" for s in (10, 20, 30, 40))
    assert store.committed_steps() == [40, 30]

    # A displaced commit in the listing in hand is still put back before a commit of its step.
    os.rename(f"{url}/step-00000030", f"{url}/step-00000030.displaced-{make_token(0)}")
    assert store.committed_steps() == [40, 30]  # the listing that shows it
    paused = store
    monkeypatch.setattr(paused, "check_fence", lambda incarnation: None)
    with pytest.raises(AlreadyCommitted):
        _save(paused, 30, 0, b"again")
    assert os.path.isdir(f"{url}/step-00000030")
