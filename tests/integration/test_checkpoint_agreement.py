"""What the ranks agree on after a checkpoint operation (issue 27, points 2, 4 and 5): an async
save skipped as torn changes `last_saved_step` on every rank at once, never from rank 0's
background thread; an in-place write that overlaps the background copy is caught; a restore
whose newest checkpoint cannot even be verified falls back on every rank instead of raising on
rank 0 alone; and a rollback without a sampler says what it does (nothing skipped).

The follow-up (issue 27, second review, points 4, 5, 7, 9): an async save commits as soon as
the training thread passes any of the runtime's entry points after its copies (a forward is
one), and its write time leaves out that wait; a save skipped and never made again fails
close(); wait() is local to its rank; a rollback is recorded once, not by every later restore
of a checkpoint saved after the divergence."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from orchestrator import runtime
from orchestrator.contract import Event
from orchestrator.runtime.checkpoint import CheckpointError, DeferredCopies
from orchestrator.storage.ckpt_store import CheckpointStore
from orchestrator.storage.rundir import RunDir


@pytest.fixture(scope="module")
def ctx():
    return runtime.init(backend="gloo")


def make_parts(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(4, 8)).pow(2).mean().backward()
    opt.step()


def hold_copies(monkeypatch: pytest.MonkeyPatch | None = None) -> tuple[threading.Event, threading.Event]:
    """The async save's deferred copies start once the first event is set; the second is set
    when they have all been made."""
    go, copied = threading.Event(), threading.Event()
    run = DeferredCopies.run

    def held(self: DeferredCopies):  # noqa: ANN202 - whatever run() returns
        assert go.wait(60), "the test never let the copies go on"
        try:
            return run(self)
        finally:
            copied.set()

    if monkeypatch is None:
        DeferredCopies.run = held  # type: ignore[method-assign]  # a spawned rank of its own
    else:
        monkeypatch.setattr(DeferredCopies, "run", held)
    return go, copied


# ---------------------------------------------------------------- point 2: two ranks, one outcome


def _join_background_save(timeout_s: float) -> bool:
    """Wait for this process's background save thread to end; whether it did."""
    for thread in threading.enumerate():
        if thread.name == "orch-ckpt-save":
            thread.join(timeout_s)
            return not thread.is_alive()
    return True


def _torn_save_rank(rank: int, world: int, url: str, port: int, out: str) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    ctx = runtime.init(backend="gloo")
    go, copied = hold_copies()
    model, opt = make_parts()
    ckpt = runtime.Checkpointer(ctx, model=model, optimizer=opt, url=url, async_save=True, interval=10**6)
    step = 1
    train_step(model, opt)
    ckpt.save(step)  # rank 0's parameter copies wait for `go`
    with torch.no_grad():  # the job swaps in its EMA weights, in place, before the copy
        for p in model.parameters():
            p.copy_(p * 0.5)
    go.set()
    # Rank 0's training thread stays away from the optimizer and the Checkpointer (as in a long
    # evaluation) until rank 1's background save has ended: none of its collectives waits for
    # rank 0's check of the copies, which only rank 0's training thread can make.
    ended_alone = rank == 0 or _join_background_save(60)
    dist.barrier()
    train_step(model, opt)  # the optimizer's step waits for the copies and checks them
    assert _join_background_save(60)
    seen: list[int | None] = [None] * world
    dist.all_gather_object(seen, ckpt.last_saved_step)
    # The example job's final save (jobs/train_ddp.py), unconditional: it learns that step 1
    # was skipped (every rank at once) and saves it again, copying every tensor first.
    ckpt.save(step)
    ckpt.close()
    result = {
        "seen": seen,
        "after_close": ckpt.last_saved_step,
        "held": copied.is_set() or rank != 0,
        "ended_alone": ended_alone,
    }
    Path(out, f"rank-{rank}.json").write_text(json.dumps(result))
    runtime.shutdown()
    # Leave without the interpreter's teardown: rank 0 of this test aborted there ("terminate
    # called without an active exception", SIGABRT) in 2 of 3 loaded full-suite runs, after its
    # work and its results were done, and never when run alone; what this test checks is the
    # ranks' agreement above. The teardown abort is followed up on its own (see the issue notes).
    os._exit(0)


def test_a_torn_async_save_changes_last_saved_step_on_every_rank_at_once(tmp_path, capfd):
    from orchestrator.launch.ports import lease_port

    url = str(tmp_path / "ckpt")
    with lease_port() as lease:
        mp.start_processes(
            _torn_save_rank,
            args=(2, url, lease.port, str(tmp_path)),
            nprocs=2,
            start_method="spawn",
            join=True,
        )
    results = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert all(r["held"] for r in results), "rank 0's copies were never held"
    assert all(r["ended_alone"] for r in results), results
    # Until a point that every rank passes (the final save, close), every rank says step 1 was
    # saved; rank 0's background thread alone used to set it back to None.
    assert [r["seen"] for r in results] == [[1, 1], [1, 1]], results
    # The final save learnt the save was skipped, on both ranks, and made it again: the step is
    # committed, from copies made after the in-place write.
    assert [r["after_close"] for r in results] == [1, 1], results
    assert CheckpointStore(url).committed_steps() == [1]
    assert (
        "checkpoint step-00000001 skipped: rank 0: model/0.weight changed in place" in capfd.readouterr().err
    )


# ---------------------------------------------------------------- point 2: a write overlapping the copy


def test_an_in_place_write_that_overlaps_the_background_copy_is_never_committed(
    ctx, tmp_path, monkeypatch, capfd
):
    # PyTorch bumps a tensor's version counter when an in-place kernel returns, so a kernel
    # running while the background copy reads the tensor leaves the counter as it was until
    # after the copy. Forced here: the kernel's first half lands before the copy, its second
    # half and its version bump after it.
    go, copied = hold_copies(monkeypatch)
    model, opt = make_parts()
    train_step(model, opt)
    url = str(tmp_path / "ckpt")
    ckpt = runtime.Checkpointer(ctx, model=model, optimizer=opt, url=url, async_save=True)
    weight = model[0].weight
    ckpt.save(1)
    weight.data[:8].mul_(0.5)  # the kernel writes (through .data: no version bump yet)
    go.set()
    assert copied.wait(60)
    weight.data[8:].mul_(0.5)
    torch.autograd.graph.increment_version(weight)  # ... and returns
    ckpt.wait()
    assert CheckpointStore(url).committed_steps() == []  # a torn copy was never committed
    ckpt.save(2)  # every rank learns of the skip here; later saves copy first, and commit
    assert (
        "checkpoint step-00000001 skipped: rank 0: model/0.weight changed in place" in capfd.readouterr().err
    )
    ckpt.close()
    assert CheckpointStore(url).committed_steps() == [2]


# ---------------------------------------------------------------- point 4: rank 0 never raises alone


def _open_files_under(path: Path) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(path)):
            found.append(target)
    return found


def _damage_entry(manifest: dict, name: str, how: str) -> None:
    entry = manifest["files"][name]
    if how == "no checksum":
        entry.pop("crc32")
    else:
        entry["size"] = "many"


@pytest.mark.parametrize(
    ("name", "how"),
    [("rank-00000.pt", "no checksum"), ("rank-00000.pt", "size not an integer"), ("state.pt", "no checksum")],
)
def test_a_checkpoint_whose_manifest_entry_is_malformed_falls_back_to_the_older_one(
    ctx, tmp_path, name, how, capfd
):
    url = tmp_path / "ckpt"
    model, opt = make_parts()
    ckpt = runtime.Checkpointer(ctx, model=model, optimizer=opt, url=str(url))
    train_step(model, opt)
    ckpt.save(10)
    expected = runtime.state_digest(model.state_dict())
    train_step(model, opt)
    ckpt.save(20)
    ckpt.close()
    manifest_path = url / "step-00000020" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    _damage_entry(manifest, name, how)  # valid JSON, an entry the verification cannot use
    manifest_path.write_text(json.dumps(manifest))

    model2, opt2 = make_parts(seed=5)
    progress = runtime.Checkpointer(ctx, model=model2, optimizer=opt2, url=str(url)).restore()
    assert progress is not None and progress.step == 10
    assert runtime.state_digest(model2.state_dict()) == expected
    assert "step-00000020" in capfd.readouterr().err
    assert _open_files_under(url) == []  # the files verified before the bad entry are closed


def test_a_verification_that_fails_unexpectedly_falls_back_and_closes_what_it_opened(
    ctx, tmp_path, monkeypatch, capfd
):
    # Whatever the store raises while one step is verified (here: a client library's error on
    # the second of rank 0's own files), restore goes on with the older checkpoint.
    url = tmp_path / "ckpt"
    model, opt = make_parts()
    ckpt = runtime.Checkpointer(ctx, model=model, optimizer=opt, url=str(url))
    ckpt.save(10)
    ckpt.save(20)
    ckpt.close()
    open_verified = CheckpointStore.open_verified
    failed = []

    def failing(store, directory, name, expect, where):
        if where == "step-00000020/rank-00000.pt":
            failed.append(where)
            raise RuntimeError("the client library broke")
        return open_verified(store, directory, name, expect, where)

    monkeypatch.setattr(CheckpointStore, "open_verified", failing)
    progress = runtime.Checkpointer(ctx, model=make_parts()[0], url=str(url)).restore()
    assert failed == ["step-00000020/rank-00000.pt"]
    assert progress is not None and progress.step == 10
    assert "the client library broke" in capfd.readouterr().err
    assert _open_files_under(url) == []
    assert CheckpointStore(str(url)).committed_steps() == [20, 10]  # kept: it may be sound


def test_a_listing_that_fails_is_one_error_on_every_rank(ctx, tmp_path, monkeypatch):
    url = str(tmp_path / "ckpt")
    runtime.Checkpointer(ctx, model=make_parts()[0], url=url).save(10)

    def unreachable(store):
        raise ConnectionError("the storage went away")

    monkeypatch.setattr(CheckpointStore, "committed_steps", unreachable)
    with pytest.raises(CheckpointError, match="the storage went away"):
        runtime.Checkpointer(ctx, model=make_parts()[0], url=url).restore()


# ---------------------------------------------------------------- point 5: a rollback without a sampler


@pytest.mark.parametrize("without", ["sampler in the Checkpointer", "position in the divergence"])
def test_a_rollback_that_cannot_skip_goes_on_in_the_checkpoints_epoch_and_says_so(
    ctx, tmp_path, without, capfd
):
    run = RunDir(str(tmp_path / "run"))
    run.create({"run_id": "run", "config": {}})

    def checkpointer(context):
        model, opt = make_parts()
        sampler = None
        if without != "sampler in the Checkpointer":
            sampler = runtime.ResumableDistributedSampler(64, rank=0, world_size=1, seed=3)
        return runtime.Checkpointer(
            context, model=model, optimizer=opt, sampler=sampler, url=run.child("ckpt")
        ), sampler

    first, sampler = checkpointer(ctx)
    if sampler is not None:
        sampler.set_epoch(2)
        sampler.advance(8)
    first.save(10, epoch=2)  # a checkpoint in epoch 2
    first.close()
    position = {"epoch": 4, "consumed": 24, "seed": 3, "dataset_len": 64}
    recorded = None if without == "position in the divergence" else position
    run.append_event(Event.DIVERGED, attempt=0, first_step=31, last_step=34, epoch=4, sampler=recorded)
    run.append_event(Event.ROLLBACK_SCHEDULED, attempt=0, to_step=10)

    again, sampler = checkpointer(dataclasses.replace(ctx, run_dir=run.url, attempt=1))
    progress = again.restore()
    again.close()
    # Nothing was skipped, so the data goes on where the checkpoint left it: epoch 2, not 4.
    assert progress is not None and (progress.step, progress.epoch) == (10, 2)
    if sampler is not None:
        assert (sampler.epoch, sampler.consumed) == (2, 8)
    (rolled,) = [e for e in run.events() if e["event"] == Event.ROLLED_BACK]
    assert (rolled["step"], rolled["skipped"], rolled["epoch"]) == (10, 0, 2)
    assert "without skipping any data" in capfd.readouterr().err


# ---------------------------------------------------------------- follow-up: the check's settle points


def test_an_async_save_commits_while_the_job_only_evaluates(ctx, tmp_path, monkeypatch):
    # Save at the end of an epoch, then validate: forward passes only, no optimizer step. The
    # copies are done; the first forward after them checks them, and the save commits then,
    # not at the next optimizer step (which may be many minutes of evaluation away).
    go, copied = hold_copies(monkeypatch)
    model, opt = make_parts()
    train_step(model, opt)
    url = str(tmp_path / "ckpt")
    ckpt = runtime.Checkpointer(ctx, model=model, optimizer=opt, url=url, async_save=True)
    ckpt.save(1)
    go.set()
    assert copied.wait(60)
    with torch.no_grad():
        model(torch.randn(4, 8))  # one evaluation batch
    assert _join_background_save(10), "the save waits for the optimizer's next step"
    assert CheckpointStore(url).committed_steps() == [1]
    assert ckpt.last_saved_step == 1
    ckpt.close()


def test_close_leaves_no_save_thread_running(ctx, tmp_path, monkeypatch):
    # The background save's thread still has its own frames to leave after it hands over its
    # result; a daemon thread that the interpreter's shutdown finds running may abort the
    # process. Slowed here: the thread lingers half a second after its result.
    run_into = runtime.Checkpointer._run_into
    lingered = threading.Event()

    def lingering(future, fn, *args):  # noqa: ANN001, ANN202 - as Checkpointer._run_into
        run_into(future, fn, *args)
        if threading.current_thread().name == "orch-ckpt-save":
            time.sleep(0.5)
            lingered.set()

    monkeypatch.setattr(runtime.Checkpointer, "_run_into", staticmethod(lingering))
    model, opt = make_parts()
    train_step(model, opt)
    ckpt = runtime.Checkpointer(ctx, model=model, optimizer=opt, url=str(tmp_path / "ckpt"), async_save=True)
    ckpt.save(1)
    train_step(model, opt)
    ckpt.close()
    assert lingered.is_set(), "the save thread never lingered"
    assert not [t for t in threading.enumerate() if t.name == "orch-ckpt-save"]


def test_an_evaluation_that_holds_the_check_is_not_counted_as_write_time(ctx, tmp_path, monkeypatch):
    # write_s is what a preemption warning must leave time for (the lead-time check, doctor):
    # the time the commit waited for the training thread's check is not writing.
    run = RunDir(str(tmp_path / "run"))
    run.create({"run_id": "run", "config": {}})
    go, copied = hold_copies(monkeypatch)
    model, opt = make_parts()
    train_step(model, opt)
    url = run.child("ckpt")
    context = dataclasses.replace(ctx, run_dir=run.url)
    ckpt = runtime.Checkpointer(context, model=model, optimizer=opt, url=url, async_save=True)
    ckpt.save(1)
    go.set()
    assert copied.wait(60)
    evaluation_s = 1.0
    time.sleep(evaluation_s)  # an evaluation that reaches none of the runtime's settle points
    ckpt.close()
    (committed,) = [e for e in run.events() if e["event"] == Event.CHECKPOINT_COMMITTED]
    manifest = CheckpointStore(url).info(1).manifest
    assert committed["write_s"] < evaluation_s and manifest["write_s"] < evaluation_s, (committed, manifest)


def a_skipped_async_save(ctx, tmp_path, monkeypatch) -> tuple[runtime.Checkpointer, str]:
    """An async save of step 1 whose parameter is written in place before its held copy runs:
    that save is skipped. Returns the Checkpointer and its storage URL."""
    go, _copied = hold_copies(monkeypatch)
    model, opt = make_parts()
    train_step(model, opt)
    url = str(tmp_path / "ckpt")
    ckpt = runtime.Checkpointer(ctx, model=model, optimizer=opt, url=url, async_save=True)
    ckpt.save(1)
    with torch.no_grad():
        model[0].weight.mul_(0.5)  # an in-place write before the copy
    go.set()
    return ckpt, url


# ---------------------------------------------------------------- follow-up: a skipped final save


def test_close_raises_when_the_save_it_waits_for_was_skipped(ctx, tmp_path, monkeypatch, capfd):
    # Nothing saves again after close(): a run that ended there without its final checkpoint
    # would succeed with older state than it trained, silently.
    ckpt, url = a_skipped_async_save(ctx, tmp_path, monkeypatch)
    with pytest.raises(CheckpointError, match=r"step-00000001 skipped: .* the run ends without it"):
        ckpt.close()
    assert CheckpointStore(url).committed_steps() == []
    assert ckpt.last_saved_step is None


# ---------------------------------------------------------------- follow-up: wait() is local


def _spawn(fn, args: tuple, nprocs: int, deadline_s: float) -> None:
    """Run `fn` on `nprocs` spawned ranks; fail if they have not all ended by the deadline."""
    context = mp.start_processes(fn, args=args, nprocs=nprocs, start_method="spawn", join=False)
    deadline = time.monotonic() + deadline_s
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, f"the ranks did not end within {deadline_s}s (a hang)"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


def _lone_wait_rank(rank: int, world: int, url: str, port: int, out: str) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    ctx = runtime.init(backend="gloo", timeout_s=15)
    model, opt = make_parts()
    ckpt = runtime.Checkpointer(ctx, model=model, optimizer=opt, url=url, async_save=True, interval=10**6)
    train_step(model, opt)
    ckpt.save(1)
    if rank == 0:
        ckpt.wait()  # rank 0 alone: say, before it logs the checkpoint somewhere
    dist.barrier()  # the training's next collective, on the default group
    train_step(model, opt)
    ckpt.save(2)
    ckpt.close()
    Path(out, f"rank-{rank}.json").write_text(json.dumps({"saved": ckpt.last_saved_step}))
    runtime.shutdown()


def test_wait_on_one_rank_alone_does_not_hang_the_job(tmp_path):
    from orchestrator.launch.ports import lease_port

    url = str(tmp_path / "ckpt")
    with lease_port() as lease:
        _spawn(_lone_wait_rank, (2, url, lease.port, str(tmp_path)), nprocs=2, deadline_s=60)
    results = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [r["saved"] for r in results] == [2, 2]
    assert CheckpointStore(url).committed_steps() == [2, 1]


def test_wait_leaves_last_saved_step_to_the_next_save(ctx, tmp_path, monkeypatch, capfd):
    # A skip found by wait() on one rank must not change what that rank reads before the
    # others learn of it: last_saved_step changes only where every rank is (save, close).
    ckpt, url = a_skipped_async_save(ctx, tmp_path, monkeypatch)
    ckpt.wait()
    assert ckpt.last_saved_step == 1
    assert "skipped" not in capfd.readouterr().err
    ckpt.save(1)  # the job's final save: learns of the skip and saves the step again
    assert "checkpoint step-00000001 skipped" in capfd.readouterr().err
    ckpt.close()
    assert CheckpointStore(url).committed_steps() == [1]
    assert ckpt.last_saved_step == 1


# ---------------------------------------------------------------- follow-up: one rollback, recorded once


@pytest.mark.parametrize("saved_later", [20, 40])
def test_a_rollback_without_a_sampler_is_recorded_once_not_on_every_later_restore(
    ctx, tmp_path, saved_later, capfd
):
    # Attempt 1 rolls back to step 10 (nothing to skip: no sampler) and saves `saved_later`,
    # within the diverged steps 31-34 or past them: attempt 2 restores a checkpoint made after
    # the divergence, and rolls nothing back.
    run = RunDir(str(tmp_path / "run"))
    run.create({"run_id": "run", "config": {}})

    def checkpointer(attempt: int) -> runtime.Checkpointer:
        model, opt = make_parts()
        context = dataclasses.replace(ctx, run_dir=run.url, attempt=attempt)
        return runtime.Checkpointer(context, model=model, optimizer=opt, url=run.child("ckpt"))

    first = checkpointer(0)
    first.save(10)
    first.close()
    run.append_event(Event.DIVERGED, attempt=0, first_step=31, last_step=34, epoch=0, sampler=None)
    run.append_event(Event.ROLLBACK_SCHEDULED, attempt=0, to_step=10)
    rollback = checkpointer(1)
    assert rollback.restore().step == 10
    rollback.save(saved_later)
    rollback.close()
    capfd.readouterr()
    later = checkpointer(2)
    assert later.restore().step == saved_later
    later.close()
    rolled = [(e["attempt"], e["step"]) for e in run.events() if e["event"] == Event.ROLLED_BACK]
    assert rolled == [(1, 10)]
    assert "rolling back" not in capfd.readouterr().err
