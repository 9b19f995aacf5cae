"""A checkpoint's manifest fields beside its files (epoch, created, model_digest, ...) are
information, not integrity (issue 27, point 4): a save with a float epoch commits and restores,
and restore loads a checkpoint whose such fields are of an odd type instead of calling it
corrupt, un-committing (deleting) it and starting the run over from an older one."""

from __future__ import annotations

import json

import pytest
import torch

from orchestrator import runtime
from orchestrator.storage.ckpt_store import CheckpointStore


@pytest.fixture(scope="module")
def ctx():
    return runtime.init(backend="gloo")


def test_a_float_epoch_saves_and_restores(ctx, url):
    ckpt = runtime.Checkpointer(ctx, model=torch.nn.Linear(4, 4), url=url)
    ckpt.save(10, epoch=1.5)  # used to fail the run: "not committing a malformed manifest"
    ckpt.close()
    assert CheckpointStore(url).verify(10).manifest["epoch"] == 1.5
    progress = runtime.Checkpointer(ctx, model=torch.nn.Linear(4, 4), url=url).restore()
    assert progress is not None and progress.step == 10


def _restore_with_odd_fields(ctx, url: str, **odd) -> None:
    """Saves steps 10 and 20, gives step 20's manifest the `odd` fields, and restores step 20."""
    model = torch.nn.Linear(4, 4)
    ckpt = runtime.Checkpointer(ctx, model=model, url=url)
    ckpt.save(10)
    with torch.no_grad():
        model.weight.add_(1.0)
    ckpt.save(20)
    ckpt.close()
    store = CheckpointStore(url)
    path = f"{store.data_dir(20)}/manifest.json"
    manifest = json.loads(store.fs.cat_file(path))
    manifest.update(odd)
    store.fs.pipe_file(path, json.dumps(manifest).encode())

    restored = torch.nn.Linear(4, 4)
    progress = runtime.Checkpointer(ctx, model=restored, url=url).restore()
    assert progress is not None and progress.step == 20  # was: un-committed, restored step 10
    assert torch.equal(restored.weight, model.weight)
    assert CheckpointStore(url).committed_steps() == [20, 10]


def test_restore_loads_a_checkpoint_whose_meta_fields_are_odd(ctx, url):
    _restore_with_odd_fields(ctx, url, created="yesterday", model_digest=5, epoch="one", write_s=-1)


def test_restore_loads_a_checkpoint_whose_fields_restore_reads_are_odd(ctx, url):
    # world_size (same world: each rank's own RNG file) and incarnation (rollback) are read by
    # restore itself: of an odd type, they read as unknown (ckpt_store.manifest_int).
    _restore_with_odd_fields(ctx, url, world_size="x", incarnation="x")
