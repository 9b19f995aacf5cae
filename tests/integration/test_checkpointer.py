"""The runtime Checkpointer with a real (one-rank, then multi-rank gloo) process group, on
every storage backend: exact state round trips, refusal of pickled objects, injected I/O errors,
corruption fallback, fencing, async saves."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from orchestrator import runtime
from orchestrator.runtime.checkpoint import CheckpointError, DeferredCopies, StaleIncarnationError
from orchestrator.storage.ckpt_store import CheckpointStore, make_token


@pytest.fixture(scope="module")
def ctx():
    context = runtime.init(backend="gloo")
    yield context


def make_parts(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    sampler = runtime.ResumableDistributedSampler(64, rank=0, world_size=1, seed=3)
    return model, opt, sched, sampler


def train(model, opt, sched, sampler, steps):
    for _ in range(steps):
        x = torch.randn(4, 8)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        sampler.advance(4)


def test_round_trip_restores_everything_exactly(ctx, url):
    model, opt, sched, sampler = make_parts()
    ckpt = runtime.Checkpointer(
        ctx, model=model, optimizer=opt, scheduler=sched, sampler=sampler, url=url, interval=5
    )
    train(model, opt, sched, sampler, 5)
    ckpt.save(5, epoch=0, extra={"note": "hello", "best": 1.5})
    train(model, opt, sched, sampler, 3)
    expected = runtime.state_digest(model.state_dict())
    # A fresh process's view: new objects, restore, replay the same 3 steps.
    model2, opt2, sched2, sampler2 = make_parts(seed=99)
    ckpt2 = runtime.Checkpointer(
        ctx, model=model2, optimizer=opt2, scheduler=sched2, sampler=sampler2, url=url, interval=5
    )
    progress = ckpt2.restore()
    assert progress == runtime.Progress(step=5, epoch=0, extra={"note": "hello", "best": 1.5})
    assert sampler2.consumed == 20 and sched2.last_epoch == 5
    train(model2, opt2, sched2, sampler2, 3)  # uses the restored torch RNG
    assert runtime.state_digest(model2.state_dict()) == expected


def test_pickled_objects_are_refused(ctx, tmp_path):
    url = str(tmp_path / "ckpt")
    store = CheckpointStore(url)
    token = make_token(0)
    tmp = store.tmp_dir(1, token)

    evil = {
        "model": {},
        "progress": {"step": 1, "epoch": 0},
        "payload": pickle.loads(pickle.dumps(Path("/etc/passwd"))),
    }
    entries = [
        store.write_stream(tmp, "state.pt", lambda fh: torch.save(evil, fh)),
        store.write_stream(tmp, "rank-00000.pt", lambda fh: torch.save({"rng": {}}, fh)),
    ]
    store.commit(tmp, 1, token, entries, {"world_size": 1})
    model, opt, sched, sampler = make_parts()
    ckpt = runtime.Checkpointer(ctx, model=model, url=url)
    with pytest.raises(
        CheckpointError, match=r"step-00000001/state.pt: refused to load.*weights_only=True"
    ) as err:
        ckpt.restore()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("fault", ["ckpt.write@2:enospc", "ckpt.write@1:eio", "ckpt.before_fsync@2:enospc"])
def test_io_errors_during_save_leave_the_previous_checkpoint(ctx, tmp_path, monkeypatch, fault):
    url = str(tmp_path / "ckpt")
    model, opt, sched, sampler = make_parts()
    ckpt = runtime.Checkpointer(ctx, model=model, optimizer=opt, sampler=sampler, url=url)
    ckpt.save(10)
    monkeypatch.setenv("ORCH_FAULT", fault)
    from orchestrator.storage import faults

    faults.reset()
    with pytest.raises(CheckpointError) as err:
        ckpt.save(20)
    message = str(err.value)
    assert "\n" not in message and message.startswith("checkpoint step-00000020 not saved: rank 0:")
    assert ("No space left on device" in message) or ("Input/output error" in message)
    store = CheckpointStore(url)
    assert store.committed_steps() == [10]
    store.verify(10)
    assert [n for n in os.listdir(url) if n.startswith("step-")] == ["step-00000010"], (
        "leftovers of the failed save"
    )


def test_corrupt_newest_falls_back_to_previous(ctx, url, capfd):
    model, opt, sched, sampler = make_parts()
    ckpt = runtime.Checkpointer(ctx, model=model, optimizer=opt, url=url, keep=3)
    ckpt.save(10)
    good = runtime.state_digest(model.state_dict())
    train(model, opt, sched, sampler, 2)
    ckpt.save(20)
    store = CheckpointStore(url)
    path = f"{store.data_dir(20)}/state.pt"
    data = bytearray(store.fs.cat_file(path))
    data[len(data) // 2] ^= 0x01  # one flipped bit
    store.fs.pipe_file(path, bytes(data))
    fresh, *_ = make_parts(seed=5)
    progress = runtime.Checkpointer(ctx, model=fresh, url=url).restore()
    assert progress.step == 10
    assert runtime.state_digest(fresh.state_dict()) == good
    assert "skipping corrupt checkpoint: step-00000020/state.pt: checksum mismatch" in capfd.readouterr().err


def test_stale_incarnation_cannot_commit(ctx, url):
    model, *_ = make_parts()
    old = runtime.Checkpointer(ctx, model=model, url=url, incarnation=0)
    old.save(10)
    new = runtime.Checkpointer(ctx, model=model, url=url, incarnation=1)
    with pytest.raises(StaleIncarnationError, match="incarnation 0 is stale"):
        old.save(20)
    new.save(20)
    store = CheckpointStore(url)
    assert store.committed_steps() == [20, 10]
    assert store.info(20).incarnation == 1


def test_async_save_returns_before_the_commit(ctx, url, monkeypatch):
    # The background save writes nothing until the test lets it go (no fixed window to race):
    # save() must return while it waits, and what training does meanwhile must not reach the
    # checkpoint.
    go = threading.Event()
    write_stream = CheckpointStore.write_stream

    def gated(store, *args, **kwargs):
        assert threading.current_thread() is not threading.main_thread(), "save() wrote in the caller"
        assert go.wait(60), "the test never let the save go on"
        return write_stream(store, *args, **kwargs)

    monkeypatch.setattr(CheckpointStore, "write_stream", gated)
    model, opt, *_ = make_parts()
    ckpt = runtime.Checkpointer(ctx, model=model, optimizer=opt, url=url, async_save=True)
    ckpt.save(10)
    store = CheckpointStore(url)
    assert store.committed_steps() == []
    before = runtime.state_digest(model.state_dict())
    sampler = runtime.ResumableDistributedSampler(64, rank=0, world_size=1, seed=3)
    train(model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2), sampler, 2)  # training goes on
    assert runtime.state_digest(model.state_dict()) != before
    go.set()
    ckpt.close()
    assert store.committed_steps() == [10]
    assert store.info(10).model_digest == before  # the snapshot did not see it


def hold_deferred_copies(monkeypatch) -> threading.Event:
    """The async save's deferred copies start only once the returned event is set."""
    go = threading.Event()
    run = DeferredCopies.run

    def held(self):
        assert go.wait(60), "the test never let the copies go on"
        return run(self)

    monkeypatch.setattr(DeferredCopies, "run", held)
    return go


def test_the_optimizers_step_waits_for_the_async_saves_copies(ctx, url, monkeypatch):
    # Parameters and optimizer state are copied beside the next forward/backward; the
    # optimizer's step, which changes them, must wait until they are copied.
    go = hold_deferred_copies(monkeypatch)
    model, opt, *_ = make_parts()
    ckpt = runtime.Checkpointer(ctx, model=model, optimizer=opt, url=url, async_save=True)
    train(model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2), make_parts()[3], 1)
    before = runtime.state_digest(model.state_dict())
    ckpt.save(1)  # returns with the copies still to do
    model(torch.randn(4, 8)).pow(2).mean().backward()  # forward and backward go on meanwhile
    stepper = threading.Thread(target=opt.step)
    stepper.start()
    stepper.join(timeout=1.0)
    assert stepper.is_alive(), "the optimizer's step did not wait for the copies"
    assert runtime.state_digest(model.state_dict()) == before
    go.set()
    stepper.join(timeout=60)
    assert not stepper.is_alive()
    ckpt.close()
    store = CheckpointStore(url)
    assert store.committed_steps() == [1] and store.info(1).model_digest == before
    assert ckpt.last_block_s is not None and ckpt.last_block_s > 0.5  # the wait counts as blocked


def test_a_parameter_changed_before_its_deferred_copy_skips_that_save(ctx, url, monkeypatch, capsys):
    # User code that writes a parameter in place outside the optimizer's step, before the
    # background copy reached it: that save is skipped (never committed torn), and later saves
    # copy every tensor before save() returns.
    go = hold_deferred_copies(monkeypatch)
    model, opt, *_ = make_parts()
    ckpt = runtime.Checkpointer(ctx, model=model, optimizer=opt, url=url, async_save=True)
    ckpt.save(1)
    with torch.no_grad():
        model[0].weight.mul_(0.5)  # not through the optimizer
    go.set()
    ckpt.wait()
    store = CheckpointStore(url)
    assert store.committed_steps() == []
    # wait() is local: every rank learns of the skip in the next save(), which sets
    # last_saved_step back there (the step may be saved again).
    assert ckpt.last_saved_step == 1
    ckpt.save(2)  # copies everything before returning now
    err = capsys.readouterr().err
    assert (
        "checkpoint step-00000001 skipped: rank 0: model/0.weight changed in place before the async save"
        in err
    )
    with torch.no_grad():
        model[0].weight.mul_(0.5)
    ckpt.close()
    assert store.committed_steps() == [2]


def test_crash_during_background_save_keeps_previous(tmp_path):
    script = f"""
import os, torch
from orchestrator import runtime
ctx = runtime.init(backend="gloo")
model = torch.nn.Linear(4, 4)
ckpt = runtime.Checkpointer(ctx, model=model, url={str(tmp_path / "ckpt")!r}, async_save=True)
ckpt.save(1)
ckpt.wait()
os.environ["ORCH_FAULT"] = "ckpt.before_commit:exit"
ckpt.save(2)
ckpt.close()
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 86, proc.stderr
    store = CheckpointStore(str(tmp_path / "ckpt"))
    assert store.committed_steps() == [1]
    store.verify(1)


# ---------------------------------------------------------------------------- other world size


def _sampler_rank(rank, world, url, port, steps, out, incarnation):
    os.environ.update(
        {
            "ORCH_INCARNATION": str(incarnation),
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    ctx = runtime.init(backend="gloo")
    model = torch.nn.Linear(2, 2)
    sampler = runtime.ResumableDistributedSampler(96, rank=rank, world_size=world, seed=11)
    ckpt = runtime.Checkpointer(ctx, model=model, sampler=sampler, url=url)
    progress = ckpt.restore()
    sampler.set_epoch(progress.epoch if progress else 0)
    seen = []
    batch = 4
    it = iter(sampler)
    for _step in range(steps or 10**9):
        chunk = [next(it, None) for _ in range(batch)]
        if None in chunk:
            break
        seen.extend(chunk)
        sampler.advance(batch)
    if steps:
        ckpt.save((progress.step if progress else 0) + steps)
    with open(os.path.join(out, f"seen-{world}-{rank}.txt"), "w") as fh:
        fh.write(" ".join(map(str, seen)))
    runtime.shutdown()


def _spawn(world, url, steps, out, incarnation):
    from orchestrator.launch.ports import lease_port

    with lease_port() as lease:
        mp.start_processes(
            _sampler_rank,
            args=(world, url, lease.port, steps, out, incarnation),
            nprocs=world,
            start_method="spawn",
            join=True,
        )


def test_resume_on_another_world_size_sees_every_sample_once(tmp_path):
    url = str(tmp_path / "ckpt")
    _spawn(4, url, 3, str(tmp_path), 0)  # 4 ranks x 3 steps x 4 samples = 48 of 96
    _spawn(2, url, 0, str(tmp_path), 1)  # the next incarnation: 2 ranks finish the epoch
    seen = []
    for path in tmp_path.glob("seen-*.txt"):
        seen += [int(x) for x in path.read_text().split()]
    assert sorted(seen) == list(range(96))


# ---------------------------------------------------------------------------- the stop vote


def _vote_rank(rank, world, url, port, out):
    import json
    import time

    from orchestrator.runtime import preemption

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
    ckpt = runtime.Checkpointer(ctx, model=torch.nn.Linear(2, 2), url=url, interval=10**6)
    ckpt.vote_period_s = 0.1
    step_s = 0.02 if rank == 2 else 0.002  # rank 2's steps are the slow ones
    stopped = None
    for step in range(1, 1000):
        time.sleep(step_s)
        if rank == 1 and step == 60:
            preemption.request()  # only rank 1 is asked to stop
        try:
            ckpt.step_end(step)
        except SystemExit as exc:
            assert exc.code == 75
            stopped = step
            break
    with open(os.path.join(out, f"vote-{rank}.json"), "w") as fh:
        json.dump({"stopped": stopped, "vote_every": ckpt.vote_every, "saved": ckpt.last_saved_step}, fh)


def test_the_stop_vote_runs_every_period_and_stops_every_rank_at_the_same_step(tmp_path):
    import json

    from orchestrator.launch.ports import lease_port

    with lease_port() as lease:
        mp.start_processes(
            _vote_rank,
            args=(3, str(tmp_path / "ckpt"), lease.port, str(tmp_path)),
            nprocs=3,
            start_method="spawn",
            join=True,
        )
    results = [json.loads((tmp_path / f"vote-{r}.json").read_text()) for r in range(3)]
    # Every rank adopted the one interval the slowest rank proposed: 0.1 s / (0.02 s + its
    # overheads) = 4 or 5 steps, fewer on a loaded machine (the fast ranks alone: every 20).
    every = {r["vote_every"] for r in results}
    assert len(every) == 1 and every <= {2, 3, 4, 5}, results
    # The stop reached every rank at one step, within two vote intervals of the request.
    stopped = {r["stopped"] for r in results}
    assert len(stopped) == 1 and 60 < stopped.pop() <= 60 + 2 * every.pop() + 1, results
    assert {r["saved"] for r in results} == {results[0]["stopped"]}


@pytest.mark.parametrize("async_save", [False, True])
def test_saving_the_step_just_saved_again_is_a_no_op(ctx, url, async_save):
    # A periodic save at the last step, then the script's own final save of the same step:
    # that used to fail the run as a "stale incarnation".
    model, opt, sched, sampler = make_parts()
    ckpt = runtime.Checkpointer(
        ctx, model=model, optimizer=opt, url=url, incarnation=0, async_save=async_save
    )
    ckpt.save(10)
    ckpt.save(10)
    ckpt.wait()
    store = CheckpointStore(url)
    assert store.committed_steps() == [10]
    ckpt.save(20)
    with pytest.raises(CheckpointError) as err:  # not StaleIncarnationError: nothing is fenced
        ckpt.save(10)
        ckpt.wait()
    assert not isinstance(err.value, StaleIncarnationError)
    assert "already committed by incarnation 0" in str(err.value)
    assert store.committed_steps() == [20, 10]


def test_saves_and_step_ends_between_micro_batches_are_refused(ctx, tmp_path):
    model, opt, sched, sampler = make_parts()
    accum = runtime.GradientAccumulation(model, steps=2)
    ckpt = runtime.Checkpointer(
        ctx, model=model, optimizer=opt, sampler=sampler, url=str(tmp_path / "ckpt"), interval=1,
        accumulation=accum,
    )  # fmt: skip
    with accum.micro_step():
        model(torch.randn(4, 8)).pow(2).mean().backward()
    for call in (lambda: ckpt.step_end(1), lambda: ckpt.save(1)):
        with pytest.raises(RuntimeError, match="between the micro-batches of an optimizer step"):
            call()
    with accum.micro_step():
        model(torch.randn(4, 8)).pow(2).mean().backward()
    opt.step()
    ckpt.step_end(1)  # at the boundary: saved (interval 1)
    assert ckpt.last_saved_step == 1
    ckpt.close()


def test_a_non_finite_value_is_never_saved(ctx, tmp_path):
    model, opt, sched, sampler = make_parts()
    ckpt = runtime.Checkpointer(
        ctx, model=model, optimizer=opt, sampler=sampler, url=str(tmp_path / "c"), interval=2
    )
    ckpt.step_end(1, loss=torch.tensor(1.0), grad_norm=torch.tensor(float("inf")))
    # The stop vote of step 1 carried the flag; it is read at step 2, before step 2's save.
    with pytest.raises(runtime.DivergenceError, match="not finite at step 1$"):
        ckpt.step_end(2, loss=torch.tensor(0.5))
    assert CheckpointStore(str(tmp_path / "c")).committed_steps() == []
    ckpt.close()
    # Without a vote in between (its period not yet over), the save itself reads the guard.
    model, opt, sched, sampler = make_parts()
    ckpt = runtime.Checkpointer(
        ctx, model=model, optimizer=opt, sampler=sampler, url=str(tmp_path / "d"), interval=2
    )
    ckpt._vote_group = None  # step_end then only looks at this rank's own stop flag
    ckpt.step_end(1, loss=torch.tensor(float("nan")))
    with pytest.raises(runtime.DivergenceError, match="between steps 1 and 2$"):
        ckpt.step_end(2, loss=torch.tensor(0.5))
    assert CheckpointStore(str(tmp_path / "d")).committed_steps() == []
    ckpt.close()


def test_a_rollback_skips_past_the_divergence_on_every_later_restore(ctx, tmp_path):
    import dataclasses

    from orchestrator.contract import Event
    from orchestrator.storage.rundir import RunDir

    run = RunDir(str(tmp_path / "run"))
    run.create({"run_id": "run", "config": {}})
    model, opt, sched, sampler = make_parts()
    ckpt = runtime.Checkpointer(
        ctx, model=model, optimizer=opt, sampler=sampler, url=run.child("ckpt"), interval=10
    )
    train(model, opt, sched, sampler, 10)
    ckpt.save(10)
    ckpt.close()
    diverged_at = {"epoch": 0, "consumed": 56, "seed": 3, "dataset_len": 64}
    run.append_event(Event.DIVERGED, attempt=0, first_step=11, last_step=14, epoch=0, sampler=diverged_at)

    def restore_as(attempt: int) -> tuple[int, int]:
        later = dataclasses.replace(ctx, run_dir=run.url, attempt=attempt)
        model, opt, sched, sampler = make_parts()
        again = runtime.Checkpointer(
            later, model=model, optimizer=opt, sampler=sampler, url=run.child("ckpt")
        )
        progress = again.restore()
        again.close()
        return progress.step, sampler.consumed

    assert restore_as(1) == (10, 40)  # no rollback scheduled (on_divergence: fail): same data
    run.append_event(Event.ROLLBACK_SCHEDULED, attempt=1, to_step=10)
    assert restore_as(1) == (10, 56)  # the data of steps 11-14 skipped
    assert restore_as(2) == (10, 56)  # and again by a later attempt that restores step 10
    rolled = [e for e in run.events() if e["event"] == Event.ROLLED_BACK]
    assert [(e["attempt"], e["step"], e["skipped"]) for e in rolled] == [(1, 10, 16), (2, 10, 16)]
