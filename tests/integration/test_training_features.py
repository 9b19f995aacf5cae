"""The example job's training features on real gloo ranks: gradient accumulation with exact
resume (a kill and a preemption in the middle of an optimizer step's micro-batches),
activation checkpointing, torch.compile, and the divergence guard with and without rollback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestrator.runtime.sampler import ResumableDistributedSampler

from ..conftest import JOBS, TEST_JOBS, read_events, run_orch, write_config
from .test_exact_resume import final_digest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS, ACCUM, INTERVAL = 40, 3, 8
FACTORY = f"{JOBS / 'train_ddp.py'}:export_model"  # job.model_factory, for `orch export`
ARGS = ["--steps", str(STEPS), "--grad-accum", str(ACCUM), "--log-every", "4", "--dataset-size", "1024"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[int, str]:
    """The uninterrupted run with 3 micro-batches per optimizer step."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = write_config(tmp, JOBS / "train_ddp.py", args=ARGS, storage={"checkpoint_interval": INTERVAL})
    proc = run_orch("run", str(cfg), "--run-id", "ref", "--quiet")
    assert proc.returncode == 0, proc.stderr
    return final_digest("ref", cfg)


@pytest.mark.parametrize("fault", ["kill", "preempt"])
def test_a_fault_mid_accumulation_resumes_to_the_uninterrupted_weights(tmp_path, reference, fault):
    # Micro-batch 41 is the 2nd of optimizer step 14's three: one micro-batch's gradients are
    # accumulated, none applied. A kill loses them (the run resumes from step 8); a preemption
    # signal is honoured only once step 14 is complete, and the checkpoint is of a whole step.
    micro = 13 * ACCUM + 2
    cfg = write_config(
        tmp_path,
        TEST_JOBS / "accum_fault_train.py",
        args=[*ARGS, "--step-sleep", "0.02"],
        job={"env": {"FAULT": fault, "FAULT_MICRO": str(micro)}},
        storage={"checkpoint_interval": INTERVAL},
    )
    proc = run_orch("run", str(cfg), "--run-id", "faulty")
    assert proc.returncode == 0, proc.stderr
    assert f"fault: {fault} at micro-batch {micro} (mid-accumulation)" in proc.stdout  # it fired
    events = read_events(tmp_path / "runs" / "faulty")
    ended = [e["status"] for e in events if e["event"] == "attempt_ended"]
    restored = [e["step"] for e in events if e["event"] == "restored"]
    if fault == "kill":
        assert ended == ["failed", "succeeded"]
        assert restored == [None, INTERVAL]
    else:
        assert ended == ["preempted", "succeeded"]
        # The stop came at an optimizer step after the signal: 14 or a little later, never 13.
        assert restored[0] is None and 14 <= restored[1] < STEPS
        committed = [e["step"] for e in events if e["event"] == "checkpoint_committed"]
        assert restored[1] in committed
    assert final_digest("faulty", cfg) == reference


def test_activation_checkpointing_trains_bitwise_the_same_weights(tmp_path, reference):
    cfg = write_config(
        tmp_path,
        JOBS / "train_ddp.py",
        args=[*ARGS, "--activation-checkpointing"],
        storage={"checkpoint_interval": INTERVAL},
    )
    proc = run_orch("run", str(cfg), "--run-id", "ac", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert final_digest("ac", cfg) == reference  # recomputed activations are the same numbers on CPU


def trained_weights(config: Path, run_id: str, out: Path) -> dict[str, torch.Tensor]:
    """The run's newest weights, as `orch export` writes them (a state_dict)."""
    proc = run_orch("export", run_id, "--config", str(config), "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    return torch.load(out, weights_only=True)


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < tol, worst


def test_k_micro_batches_make_the_step_of_one_k_times_larger_batch(tmp_path):
    # 3 micro-batches of 8 per rank against one batch of 24: the same samples in the same order
    # (the sampler, the flips' random draws), the same mean loss, the same update, up to the
    # order of float sums. A wrong loss scale (no / K) would triple the gradients.
    common = ["--steps", "6", "--log-every", "3", "--dataset-size", "1024", "--clip", "100"]
    runs, logged = {}, {}
    for name, extra in (
        ("accum", ["--batch-size", "8", "--grad-accum", "3"]),
        ("big", ["--batch-size", "24"]),
    ):
        folder = tmp_path / name
        folder.mkdir()
        cfg = write_config(
            folder,
            JOBS / "train_ddp.py",
            args=[*common, *extra],
            job={"model_factory": FACTORY},
            storage={"checkpoint_interval": 6},
        )
        proc = run_orch("run", str(cfg), "--run-id", name, "--ranks", "0")
        assert proc.returncode == 0, proc.stderr
        logged[name] = [line.split("lr")[0] for line in proc.stdout.splitlines() if "/6 epoch" in line]
        runs[name] = trained_weights(cfg, name, folder / "weights.pt")
    # AdamW's update hardly depends on the gradients' scale: the logged loss and gradient norm
    # (before clipping) are what show it. Equal to their 4 printed decimals.
    assert logged["accum"] == logged["big"] and len(logged["big"]) == 2, logged
    assert_close(runs["accum"], runs["big"], 1e-5)


def test_compile_trains_through_inductor_as_eager_does(tmp_path):
    cache = tmp_path / "inductor"
    args = ["--steps", "6", "--log-every", "3", "--grad-accum", "2"]  # no_sync under a compiled DDP too
    cfg = write_config(
        tmp_path,
        JOBS / "train_ddp.py",
        args=[*args, "--compile"],
        job={"env": {"TORCHINDUCTOR_CACHE_DIR": str(cache)}, "model_factory": FACTORY},
        storage={"checkpoint_interval": 3},
    )
    proc = run_orch("run", str(cfg), "--run-id", "compiled")
    assert proc.returncode == 0, proc.stderr
    assert "done: 6 steps" in proc.stdout
    # inductor generated and built code for the model (not a silent fall-back to eager)
    assert any(p.suffix in (".py", ".so") for p in cache.rglob("*")), sorted(cache.rglob("*"))[:10]
    eager = tmp_path / "eager"
    eager.mkdir()
    eager_cfg = write_config(
        eager,
        JOBS / "train_ddp.py",
        args=args,
        job={"model_factory": FACTORY},
        storage={"checkpoint_interval": 3},
    )
    assert run_orch("run", str(eager_cfg), "--run-id", "eager", "--quiet").returncode == 0
    # Fused kernels sum in another order: close, not bitwise.
    assert_close(
        trained_weights(cfg, "compiled", tmp_path / "c.pt"),
        trained_weights(eager_cfg, "eager", eager / "e.pt"),
        1e-4,
    )


# ---------------------------------------------------------------------------- divergence

DIVERGE_ARGS = ["--steps", "40", "--batch-size", "16", "--dataset-size", "2048", "--log-every", "5"]


def poisoned_config(tmp_path: Path, **restart) -> tuple[Path, int]:
    """The example job with one NaN sample, drawn in optimizer step 21 of epoch 0 (2 ranks x 16
    per step), after the checkpoint of step 20; 40 steps end before epoch 1 draws it again."""
    order = ResumableDistributedSampler(2048, rank=0, world_size=2, seed=0).global_order(0)
    poison = int(order[20 * 32 + 10])
    cfg = write_config(
        tmp_path,
        TEST_JOBS / "poisoned_train.py",
        args=[*DIVERGE_ARGS, "--step-sleep", "0.03"],
        job={"env": {"POISON_INDEX": str(poison)}},
        storage={"checkpoint_interval": 10},
        restart={"max_restarts": 2, "backoff_s": 0.1, **restart},
    )
    return cfg, poison


def test_a_divergence_fails_the_run_at_once_with_the_guides_hints(tmp_path):
    cfg, poison = poisoned_config(tmp_path)
    proc = run_orch("run", str(cfg), "--run-id", "nan")
    assert f"poisoned sample {poison} drawn" in proc.stdout  # the fault fired
    assert proc.returncode == 1
    events = read_events(tmp_path / "runs" / "nan")
    assert [e["status"] for e in events if e["event"] == "attempt_ended"] == ["failed"]  # not retried
    (diverged,) = [e for e in events if e["event"] == "diverged"]
    assert diverged["first_step"] == 21 and diverged["last_step"] >= 21
    # Nothing diverged was saved: the newest checkpoint is the one before the poisoned step.
    committed = [e["step"] for e in events if e["event"] == "checkpoint_committed"]
    assert committed == [10, 20]
    status = run_orch("status", "nan", "--config", str(cfg))
    assert "DivergenceError: training diverged" in status.stdout
    # The guard knows the step to within a vote interval: on a busy machine the vote can catch
    # the divergence on the very step it happened, and `orch status` then names one step.
    last = diverged["last_step"]
    span = "step 21" if last == 21 else f"steps 21-{last}"
    assert f"diverged   {span} (attempt 0)" in status.stdout
    console = proc.stdout + proc.stderr
    assert "lower the learning rate" in console and "restart.on_divergence: rollback" in console
    st = json.loads(run_orch("status", "nan", "--config", str(cfg), "--json").stdout)
    assert st["state"] == "failed" and st["newest_checkpoint"] == 20
    # What the hint suggests: resume with rollback. The next attempt skips the bad data.
    resumed = run_orch("resume", "nan", "--config", str(cfg), "--set", "restart.on_divergence=rollback")
    assert resumed.returncode == 0, resumed.stderr
    assert f"poisoned sample {poison} drawn" not in resumed.stdout and "done: 40 steps" in resumed.stdout
    rolled = [e for e in read_events(tmp_path / "runs" / "nan") if e["event"] == "rolled_back"]
    assert [(e["attempt"], e["step"]) for e in rolled] == [(1, 20)]


def test_rollback_restores_the_checkpoint_before_and_skips_the_bad_data(tmp_path):
    cfg, poison = poisoned_config(tmp_path, on_divergence="rollback")
    proc = run_orch("run", str(cfg), "--run-id", "rb")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(f"poisoned sample {poison} drawn") == 1  # fired once, then skipped
    assert "rollback 1/2" in proc.stdout + proc.stderr and "done: 40 steps" in proc.stdout
    events = read_events(tmp_path / "runs" / "rb")
    (diverged,) = [e for e in events if e["event"] == "diverged"]
    (scheduled,) = [e for e in events if e["event"] == "rollback_scheduled"]
    (rolled,) = [e for e in events if e["event"] == "rolled_back"]
    assert scheduled == {**scheduled, "attempt": 1, "to_step": 20}
    assert rolled["step"] == 20 and rolled["attempt"] == 1
    # The skipped window runs from the checkpoint's data position to the divergence's, which
    # holds the poisoned sample (position 650 of epoch 0).
    skipped_to = diverged["sampler"]["consumed"]
    assert rolled["skipped"] == skipped_to - 20 * 32 and 20 * 32 <= 650 < skipped_to
    status = run_orch("status", "rb", "--config", str(cfg))
    assert f"rolled back to step 20, skipped {rolled['skipped']} samples" in status.stdout
    st = json.loads(run_orch("status", "rb", "--config", str(cfg), "--json").stdout)
    assert st["state"] == "succeeded" and st["newest_checkpoint"] == 40


# ---------------------------------------------------------------------------- profiling


def test_profile_writes_traces_tensorboard_and_perfetto_open_and_a_top_ops_table(tmp_path):
    cfg = write_config(
        tmp_path,
        JOBS / "train_ddp.py",
        args=["--steps", "30", "--log-every", "10"],
        profile={"wait": 5, "warmup": 1, "active": 3, "memory": True},
    )
    proc = run_orch("run", str(cfg), "--run-id", "prof", "--profile", "--quiet")
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "runs" / "prof" / "profile" / "attempt-0"
    # TensorBoard's profiler plugin: one run per folder, one worker per `<worker>.<id>.pt.trace.json`.
    traces = sorted(folder.glob("*.pt.trace.json"))
    assert [t.name.split(".")[0] for t in traces] == ["rank-0"]  # profile.ranks defaults to [0]
    trace = json.loads(traces[0].read_text())  # Chrome trace JSON: what Perfetto opens
    steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")}
    assert len(steps) == 3  # the active steps only: the warmup step is discarded
    assert any(e.get("name") == "[memory]" for e in trace["traceEvents"])  # profile.memory
    log = (tmp_path / "runs" / "prof" / "logs" / "attempt-0" / "rank-0.log").read_text()
    assert "top ops by self time" in log and "aten::" in log
    shown = run_orch("profile", "prof", "--config", str(cfg))
    assert shown.returncode == 0, shown.stderr
    assert "rank 0, attempt 0: top ops over 3 profiled step(s)" in shown.stdout
    assert "aten::convolution_backward" in shown.stdout and str(folder) in shown.stdout
    record = json.loads(run_orch("profile", "prof", "--config", str(cfg), "--rank", "0", "--json").stdout)
    assert record["attempt"] == 0 and record["ranks"]["0"]["steps"] == 3
    assert any(op["self_cpu_memory_bytes"] for op in record["ranks"]["0"]["ops"])
    assert run_orch("profile", "prof", "--config", str(cfg), "--attempt", "0").stdout == shown.stdout
    other = run_orch("profile", "prof", "--config", str(cfg), "--attempt", "3")
    assert other.returncode == 1
    assert other.stderr.strip() == "orch profile: attempt 3 has no profile; profiled attempts: [0]"


def test_profile_of_an_unprofiled_run_says_how_to_profile(tmp_path):
    cfg = write_config(tmp_path, JOBS / "train_ddp.py", args=["--steps", "2"])
    assert run_orch("run", str(cfg), "--run-id", "plain", "--quiet").returncode == 0
    proc = run_orch("profile", "plain", "--config", str(cfg))
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "orch profile: run plain has no profile: run it with `orch run --profile` (profile.enabled)"
    )
