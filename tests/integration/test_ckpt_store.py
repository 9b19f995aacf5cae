"""The torch-free commit protocol on every storage backend: local filesystem, memory://, and a
real S3 API server on 127.0.0.1. Crash tests kill a real writer process at every I/O boundary
and at random instants."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from orchestrator.storage.causes import storage_cause
from orchestrator.storage.ckpt_store import (
    AlreadyCommitted,
    CheckpointStore,
    CorruptCheckpoint,
    StaleIncarnation,
    make_token,
    newest_committed,
)
from orchestrator.storage.faults import CRASH_EXIT_CODE, ENV_FAULT_RECORD, read_record

from ..conftest import TEST_JOBS
from .conftest import storage_url

# Every I/O boundary of a save on each storage, in the order a save passes them: a crash test
# per (storage, boundary) pair asserts that its fault fired, so a point renamed or moved away
# from a backend turns its case red instead of leaving it testing nothing.
BOUNDARIES = {
    "local": [
        "ckpt.tmp_created",
        "ckpt.write",
        "ckpt.before_fsync",
        "ckpt.file_written",
        "ckpt.manifest_written",
        "ckpt.before_commit",  # the rename into step-s/
        "ckpt.after_commit",
        "ckpt.prune_uncommitted",  # retention: renamed aside, files not yet deleted
        "ckpt.prune_leftover",  # a dead incarnation's leftover, about to be deleted
    ],
    "s3": [
        "ckpt.object_put",  # before each file's PUT: the 2nd pass lies between two PUTs
        "ckpt.write",
        "ckpt.file_written",
        "ckpt.manifest_written",
        "ckpt.before_commit",  # the create-only PUT of the COMMITTED marker
        "ckpt.after_commit",
        "ckpt.prune_uncommitted",  # retention: marker deleted, files not yet
        "ckpt.prune_leftover",
    ],
}


@pytest.fixture(params=["local", "memory", "s3"])
def store(request, tmp_path):
    if request.param == "s3":
        request.getfixturevalue("s3_server")
    return CheckpointStore(storage_url(request.param, tmp_path))


def save(store, step, payload=b"weights", incarnation=0):
    token = make_token(incarnation)
    tmp = store.tmp_dir(step, token)
    entries = [store.write_file(tmp, "state.pt", payload), store.write_file(tmp, "rank-00000.pt", b"rng")]
    store.commit(tmp, step, token, entries, {"model_digest": f"d{step}"})
    return tmp


def assert_all_committed_verify(store):
    for step in store.committed_steps():
        info = store.verify(step)
        assert info.manifest["step"] == step


def test_uncommitted_writes_are_invisible(store):
    tmp = store.tmp_dir(5, make_token(0))
    store.write_file(tmp, "state.pt", b"half")
    assert store.committed_steps() == []
    assert newest_committed(store.url) is None


def test_commit_verify_and_newest_first(store):
    save(store, 10)
    save(store, 20, payload=b"newer")
    assert store.committed_steps() == [20, 10]
    info = store.verify(20)
    assert info.model_digest == "d20" and info.size == len(b"newer") + 3
    assert store.read_file(20, "state.pt") == b"newer"
    assert newest_committed(store.url).step == 20


def test_flipped_byte_and_truncation_are_detected(store):
    save(store, 10, payload=b"abcdef")
    path = f"{store.data_dir(10)}/state.pt"
    store.fs.pipe_file(path, b"abcdeX")
    with pytest.raises(CorruptCheckpoint, match="checksum"):
        store.verify(10)
    store.fs.pipe_file(path, b"abc")
    with pytest.raises(CorruptCheckpoint, match="truncated"):
        store.verify(10)


def test_at_most_one_commit_per_step(store):
    save(store, 10, payload=b"first")
    with pytest.raises(AlreadyCommitted):
        save(store, 10, payload=b"second")
    assert store.read_file(10, "state.pt") == b"first"


def test_stale_incarnation_is_fenced(store):
    store.register_incarnation(0)
    save(store, 10, incarnation=0)
    store.register_incarnation(1)  # a restart or requeue began
    with pytest.raises(StaleIncarnation, match="incarnation 0 is stale"):
        save(store, 20, payload=b"stale", incarnation=0)
    assert store.committed_steps() == [10]
    save(store, 20, payload=b"new", incarnation=1)
    assert store.read_file(20, "state.pt") == b"new"


def test_newer_incarnation_displaces_a_commit_that_slipped_in_before_it_registered(store):
    save(store, 30, payload=b"old", incarnation=0)
    store.register_incarnation(1)
    save(store, 30, payload=b"new", incarnation=1)
    assert store.committed_steps() == [30]
    assert store.read_file(30, "state.pt") == b"new"
    assert_all_committed_verify(store)


def test_retention_keeps_newest_k_and_never_the_one_being_written(store):
    for step in (10, 20, 30, 40):
        save(store, step, incarnation=1)
    dead = store.tmp_dir(50, make_token(0))  # left over by a dead incarnation
    store.write_file(dead, "state.pt", b"x")
    live = store.tmp_dir(60, make_token(1))  # being written right now by us
    store.write_file(live, "state.pt", b"y")
    removed = store.prune(2, incarnation=1)
    assert "step-00000020" in removed and "step-00000010" in removed
    assert store.committed_steps() == [40, 30]
    names = set(store.names())
    assert live.rsplit("/", 1)[-1] in names
    assert dead.rsplit("/", 1)[-1] not in names
    assert_all_committed_verify(store)


def _writer(mode, url, step, incarnation, size, fault=None, record=None):
    env = {**os.environ}
    env.pop("ORCH_FAULT", None)
    if fault:
        env["ORCH_FAULT"] = fault
        env[ENV_FAULT_RECORD] = str(record)
    return [
        sys.executable,
        str(TEST_JOBS / "store_writer.py"),
        mode,
        url,
        str(step),
        str(incarnation),
        str(size),
    ], env


def _crash_case(url: str) -> CheckpointStore:
    """Two commits of incarnation 0 and a leftover of it: the writer (incarnation 1) then
    passes every boundary of a save, and of retention (it deletes step 5 and the leftover)."""
    store = CheckpointStore(url)
    save(store, 5, payload=b"oldest" * 1000)
    save(store, 10, payload=b"previous" * 1000)
    store.write_file(store.tmp_dir(15, make_token(0)), "state.pt", b"left over")
    return store


@pytest.mark.parametrize(
    "kind,boundary", [(kind, b) for kind, points in BOUNDARIES.items() for b in points], ids=str
)
def test_crash_at_every_io_boundary_leaves_a_loadable_checkpoint(request, tmp_path, kind, boundary):
    if kind == "s3":
        request.getfixturevalue("s3_server")
    for nth in (1, 2):
        store = _crash_case(storage_url(kind, tmp_path / f"n{nth}"))
        record = tmp_path / f"fired-{nth}"
        cmd, env = _writer("once", store.url, 20, 1, 3 << 20, fault=f"{boundary}@{nth}", record=record)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        fired = read_record(record) == [f"{boundary}@{nth}"]
        # A first pass happens on this storage, or the case tests nothing; a second may not
        # (the writer then finishes: exit 0).
        assert fired or nth == 2, f"{boundary} never fired on {kind}: {proc.stderr}"
        assert proc.returncode == (CRASH_EXIT_CODE if fired else 0), proc.stderr
        steps = store.committed_steps()
        assert steps[0] in (10, 20) and 10 in steps
        assert_all_committed_verify(store)


@pytest.mark.slow
def test_sigkill_at_random_instants_never_leaves_a_bad_checkpoint(shared_url):
    store = CheckpointStore(shared_url)
    rng = random.Random(1234)
    step = 1
    on_s3 = shared_url.startswith("s3://")
    kills, window = (8, (0.3, 2.5)) if on_s3 else (25, (0.0, 0.4))  # S3 saves take longer
    for _ in range(kills):
        cmd, env = _writer("loop", shared_url, step, 0, 1 << 20)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "looping"
        time.sleep(rng.uniform(*window))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert_all_committed_verify(store)
        steps = store.committed_steps()
        step = (steps[0] + 1) if steps else 1
    assert step > 1, "no save ever committed: the kills came too early to test anything"


def test_fencing_sees_a_newer_incarnation_registered_by_another_process(shared_url):
    store = CheckpointStore(shared_url)
    store.register_incarnation(0)
    save(store, 10, incarnation=0)
    assert store.newest_incarnation() == 0  # warms any per-process listing cache
    code = (
        "from orchestrator.storage.ckpt_store import CheckpointStore;"
        f" CheckpointStore({shared_url!r}).register_incarnation(1)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    with pytest.raises(StaleIncarnation):
        save(store, 20, incarnation=0)
    assert store.committed_steps() == [10]


def test_storage_failures_are_named_in_words():
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError, ReadTimeoutError

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert storage_cause(full) == "storage full: No space left on device"
    assert storage_cause(OSError(errno.EROFS, "Read-only file system")).startswith("storage is read-only: ")
    down = EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b/k")
    assert storage_cause(down).startswith("storage unreachable: EndpointConnectionError: Could not connect")
    assert storage_cause(ReadTimeoutError(endpoint_url="u")).startswith("storage unreachable: ")
    assert storage_cause(NoCredentialsError()).startswith("storage credentials missing: NoCredentialsError")
    # Not a storage failure: the class and its first line, as before.
    assert storage_cause(RuntimeError("bad\nworse")) == "RuntimeError: bad"
    assert storage_cause(MemoryError()) == "MemoryError"
