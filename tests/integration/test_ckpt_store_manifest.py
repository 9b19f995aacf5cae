"""A manifest that parses but is malformed where integrity needs it (format, step, the file
entries: names, sizes, checksums) is a corrupt checkpoint (issue 27, point 4), named by step, file
and field, through every reader of the store, on local disk, memory:// and the S3 API server:
never a KeyError or ValueError that restore, `orch resume` or `orch checkpoints` would not catch.

The other fields (created, epoch, world_size, model_digest, ...) are information, not integrity:
one of an odd type is read defensively and never makes a checkpoint corrupt. Restore un-commits
(deletes) a corrupt checkpoint, so calling one corrupt for its epoch would lose a good one."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from orchestrator.storage.ckpt_store import CheckpointStore, CorruptCheckpoint, make_token, newest_committed

PAYLOAD = b"weights" * 100

# (case, how the good manifest is damaged, the field the error must name)
MALFORMED = {
    "missing checksum": (lambda m: m["files"]["state.pt"].pop("crc32"), "files['state.pt']"),
    "size as a string": (lambda m: m["files"]["state.pt"].update(size=str(len(PAYLOAD))), "size"),
    "negative size": (lambda m: m["files"]["state.pt"].update(size=-1), "size"),
    "size as a bool": (lambda m: m["files"]["state.pt"].update(size=True), "size"),
    "files not a mapping": (lambda m: m.update(files=[["state.pt", len(PAYLOAD)]]), "files"),
    "entry a list": (lambda m: m["files"].update({"state.pt": [len(PAYLOAD), "00000000"]}), "state.pt"),
    "an unknown entry key": (lambda m: m["files"]["state.pt"].update(mode=0o600), "files['state.pt']"),
    "checksum not hex": (lambda m: m["files"]["state.pt"].update(crc32=12), "crc32"),
    "a path for a name": (
        lambda m: m["files"].update({"../state.pt": m["files"]["state.pt"]}),
        "../state.pt",
    ),
    "a checksum of the other format": (
        lambda m: m["files"].update({"state.pt": {"size": len(PAYLOAD), "sha256": "0" * 64}}),
        "files['state.pt']",
    ),
    "unknown format": (lambda m: m.update(format=3), "format"),
    "step a string": (lambda m: m.update(step="20"), "step"),
    "step missing": (lambda m: m.pop("step"), "step"),
}

# Fields beside the files, of a type no writer of this tree gives them: all still load.
ODD_META = {
    "epoch a float": lambda m: m.update(epoch=1.5),
    "epoch a string": lambda m: m.update(epoch="one"),
    "world_size a string": lambda m: m.update(world_size="2"),
    "created a string": lambda m: m.update(created="yesterday"),
    "created null": lambda m: m.update(created=None),
    "model_digest a number": lambda m: m.update(model_digest=5),
    "token a number": lambda m: m.update(token=7),
    "incarnation a string": lambda m: m.update(incarnation="x"),
    "write_s negative": lambda m: m.update(write_s=-1),
    "ddp_bucket_layout a string": lambda m: m.update(ddp_bucket_layout="buckets"),
    "an unknown field": lambda m: m.update(note={"any": ["thing"]}),
}


def _commit(store: CheckpointStore, step: int) -> None:
    token = make_token(0)
    tmp = store.tmp_dir(step, token)
    entries = [store.write_file(tmp, "state.pt", PAYLOAD)]
    store.commit(tmp, step, token, entries, {"model_digest": f"d{step}", "world_size": 1, "epoch": 0})


def _damage(store: CheckpointStore, step: int, how) -> None:
    path = f"{store.data_dir(step)}/manifest.json"
    manifest = json.loads(store.fs.cat_file(path))
    how(manifest)
    store.fs.pipe_file(path, json.dumps(manifest).encode())


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_manifest_is_a_corrupt_checkpoint_for_every_reader(url, case):
    how, field = MALFORMED[case]
    store = CheckpointStore(url)
    _commit(store, 10)
    _commit(store, 20)
    _damage(store, 20, how)
    fresh = CheckpointStore(url)  # nothing cached: as `orch checkpoints` would read it
    for read in (
        lambda: fresh.read_manifest(20),
        lambda: fresh.info(20),
        lambda: fresh.verify(20),
        lambda: fresh.verify(20, keep=["state.pt"]),
    ):
        with pytest.raises(CorruptCheckpoint) as caught:
            read()
        message = str(caught.value)
        assert "step-00000020" in message and "manifest.json" in message and field in message, message
    # Listings and retention read it as corrupt, not as a crash; the older checkpoint stays usable.
    assert newest_committed(url).step == 10
    assert fresh.committed_steps() == [20, 10]
    fresh.prune(1, 0, known_good=[10])
    assert fresh.verify(10).manifest["step"] == 10


@pytest.mark.parametrize("case", list(ODD_META))
def test_an_odd_meta_field_is_not_a_corrupt_checkpoint(url, case):
    store = CheckpointStore(url)
    _commit(store, 10)
    _commit(store, 20)
    _damage(store, 20, ODD_META[case])
    fresh = CheckpointStore(url)
    for info in (fresh.info(20), fresh.verify(20), fresh.verify(20, keep=["state.pt"])):
        assert info.step == 20 and info.size == len(PAYLOAD)
        # What the store's readers hand on has the type they promise, whatever the field holds.
        assert info.created is None or type(info.created) is float, info.created
        assert info.model_digest is None or isinstance(info.model_digest, str), info.model_digest
        assert type(info.incarnation) is int
    assert fresh.verify(20, keep=["state.pt"]).data["state.pt"] == PAYLOAD
    assert newest_committed(url).step == 20
    assert fresh.committed_steps() == [20, 10] and fresh.fenced_steps() == []
    fresh.prune(1, 0, known_good=[20])  # retention keeps it, as the newest good one
    assert fresh.committed_steps() == [20]


def test_a_float_epoch_saves_commits_and_loads(url):
    store = CheckpointStore(url)
    token = make_token(0)
    tmp = store.tmp_dir(10, token)
    entries = [store.write_file(tmp, "state.pt", PAYLOAD)]
    store.commit(tmp, 10, token, entries, {"epoch": 1.5, "world_size": 1, "created": "caller's"})
    fresh = CheckpointStore(url)
    manifest = fresh.verify(10, keep=["state.pt"]).manifest
    assert manifest["epoch"] == 1.5 and manifest["step"] == 10
    assert type(manifest["created"]) is float  # the protocol's own fields are the store's to write


def test_meta_never_overrides_what_integrity_needs(url):
    # A caller's meta naming the protocol's own fields cannot make the commit malformed.
    store = CheckpointStore(url)
    token = make_token(0)
    tmp = store.tmp_dir(10, token)
    entries = [store.write_file(tmp, "state.pt", PAYLOAD)]
    store.commit(tmp, 10, token, entries, {"format": 9, "step": 3, "files": {}, "token": "x"})
    manifest = CheckpointStore(url).verify(10).manifest
    assert (manifest["format"], manifest["step"], manifest["token"]) == (2, 10, token)
    assert list(manifest["files"]) == ["state.pt"]


def test_entries_handed_to_the_readers_are_checked_too(url):
    # open_verified and read_file take an entry from the caller (a manifest rank 0 broadcast).
    store = CheckpointStore(url)
    _commit(store, 10)
    directory = store.data_dir(10)
    for bad in ({"size": "700"}, {"size": 700}, [700, "x"], {"size": -1, "crc32": "00000000"}):
        with pytest.raises(CorruptCheckpoint, match=r"step-00000010/state.pt"):
            store.read_file(10, "state.pt", bad, directory=directory)
        if store.renames:
            with pytest.raises(CorruptCheckpoint, match=r"step-00000010/state.pt"):
                store.open_verified(directory, "state.pt", bad, "step-00000010/state.pt")


def test_orch_checkpoints_lists_a_malformed_manifest_as_corrupt(tmp_path):
    run = tmp_path / "runs" / "r1"
    (run / "ckpt").mkdir(parents=True)
    (run / "run.yaml").write_text(yaml.safe_dump({"run_id": "r1"}))
    store = CheckpointStore(str(run / "ckpt"))
    _commit(store, 10)
    _commit(store, 20)
    _damage(store, 20, MALFORMED["size as a string"][0])
    listed = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "checkpoints", str(run), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 1, listed.stderr  # a corrupt checkpoint fails the command
    rows = json.loads(listed.stdout)
    assert [(r["step"], r["verified"]) for r in rows] == [(20, False), (10, None)]
    assert "step-00000020" in rows[0]["error"] and "size" in rows[0]["error"]


def test_orch_checkpoints_lists_odd_meta_fields_as_verified(tmp_path):
    run = tmp_path / "runs" / "r1"
    (run / "ckpt").mkdir(parents=True)
    (run / "run.yaml").write_text(yaml.safe_dump({"run_id": "r1"}))
    store = CheckpointStore(str(run / "ckpt"))
    _commit(store, 10)
    _damage(store, 10, lambda m: m.update(created="yesterday", model_digest=5, epoch=0.5))
    command = [sys.executable, "-m", "orchestrator.cli", "checkpoints", str(run), "--verify"]
    listed = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["step"], r["verified"], r["created"], r["model_digest"]) for r in rows] == [
        (10, True, None, None)
    ]
    table = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    assert "yes" in table.stdout.splitlines()[1], table.stdout
