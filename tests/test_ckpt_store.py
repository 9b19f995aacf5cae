"""The torch-free checkpoint layout: commit, verify, corruption, retention (local + memory://)."""

import uuid

import pytest

from orchestrator.ckpt_store import CheckpointStore, CorruptCheckpoint, newest_committed


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        return CheckpointStore(str(tmp_path / "ckpt"))
    return CheckpointStore(f"memory://ckpt-{uuid.uuid4().hex}")


def save(store, step, payload=b"weights", token="t1"):
    tmp = store.tmp_dir(step, token)
    entries = [store.write_file(tmp, "state.pt", payload), store.write_file(tmp, "rank-00000.pt", b"rng")]
    store.commit(tmp, step, entries, {"model_digest": f"d{step}"})


def test_uncommitted_writes_are_invisible(store):
    tmp = store.tmp_dir(5, "x")
    store.write_file(tmp, "state.pt", b"half")
    assert store.committed_steps() == []
    assert newest_committed(store.url) is None


def test_commit_verify_and_newest_first(store):
    save(store, 10)
    save(store, 20, payload=b"newer")
    assert store.committed_steps() == [20, 10]
    info = store.verify(20)
    assert info.model_digest == "d20" and info.size == len(b"newer") + 3
    assert newest_committed(store.url).step == 20


def test_flipped_byte_and_truncation_are_detected(store):
    save(store, 10, payload=b"abcdef")
    path = f"{store.path}/step-00000010/state.pt"
    store.fs.pipe_file(path, b"abcdeX")
    with pytest.raises(CorruptCheckpoint, match="checksum"):
        store.verify(10)
    store.fs.pipe_file(path, b"abc")
    with pytest.raises(CorruptCheckpoint, match="truncated"):
        store.verify(10)


def test_a_step_commits_once(store):
    save(store, 10)
    with pytest.raises(FileExistsError):
        save(store, 10, token="t2")


def test_retention_keeps_newest_k_and_the_protected_one(store):
    for step in (10, 20, 30, 40):
        save(store, step)
    assert store.prune(2) == ["step-00000020", "step-00000010"]
    assert store.committed_steps() == [40, 30]
