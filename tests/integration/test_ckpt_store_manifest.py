"""A manifest that parses but is malformed (issue 27, point 4) is a corrupt checkpoint, named by
step, file and field, through every reader of the store, on local disk, memory:// and the S3 API
server: never a KeyError or ValueError that restore, `orch resume` or `orch checkpoints` would
not catch."""

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
    "world_size a string": (lambda m: m.update(world_size="2"), "world_size"),
    "created a string": (lambda m: m.update(created="yesterday"), "created"),
    "model_digest a number": (lambda m: m.update(model_digest=5), "model_digest"),
    "token a number": (lambda m: m.update(token=7), "token"),
    "unknown format": (lambda m: m.update(format=3), "format"),
    "step a string": (lambda m: m.update(step="20"), "step"),
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
