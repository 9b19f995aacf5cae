"""The runtime's training helpers, in-process: gradient accumulation (which micro-batches skip
DDP's all-reduce), the divergence guard, and how `orch status` shows a divergence."""

from __future__ import annotations

import contextlib

import pytest
import torch

from orchestrator.contract import Event
from orchestrator.runtime.accumulation import GradientAccumulation
from orchestrator.runtime.divergence import DivergenceGuard, message
from orchestrator.supervision.status import format_status, run_status, summarize


class FakeDDP(torch.nn.Module):
    """Records which micro-batches ran inside no_sync (DDP's skip of the all-reduce)."""

    def __init__(self) -> None:
        super().__init__()
        self.synced: list[bool] = []
        self.in_no_sync = False

    @contextlib.contextmanager
    def no_sync(self):
        self.in_no_sync = True
        try:
            yield
        finally:
            self.in_no_sync = False


def test_only_the_last_micro_batch_of_each_step_all_reduces() -> None:
    ddp = FakeDDP()
    accum = GradientAccumulation(ddp, steps=3)
    boundaries = []
    for _ in range(7):
        with accum.micro_step():
            ddp.synced.append(not ddp.in_no_sync)
        boundaries.append(accum.boundary)
    assert ddp.synced == [False, False, True, False, False, True, False]
    assert boundaries == [False, False, True, False, False, True, False]


def test_one_micro_batch_per_step_always_syncs_and_a_plain_module_works() -> None:
    ddp = FakeDDP()
    accum = GradientAccumulation(ddp, steps=1)
    for _ in range(3):
        with accum.micro_step():
            ddp.synced.append(not ddp.in_no_sync)
        assert accum.boundary
    assert ddp.synced == [True, True, True]
    plain = GradientAccumulation(torch.nn.Linear(2, 2), steps=2)  # no no_sync: nothing to skip
    with plain.micro_step():
        pass
    assert not plain.boundary
    with pytest.raises(ValueError, match=">= 1"):
        GradientAccumulation(ddp, steps=0)


def test_the_guard_finds_any_non_finite_value_once_and_resets() -> None:
    guard = DivergenceGuard()
    guard.observe(torch.tensor(2.0), None, 0.5)
    assert guard.read() is False
    guard.observe(torch.tensor(1.0), torch.tensor(float("nan")))
    guard.observe(torch.tensor(1.0))  # a finite value later does not clear it
    assert guard.read() is True
    assert guard.read() is False  # read resets
    guard.observe(torch.tensor([1.0, float("inf")]))
    assert guard.read() is True
    guard.observe(float("-inf"))
    assert guard.read() is True
    assert message(21, 23).endswith("between steps 21 and 23")
    assert message(7, 7).endswith("at step 7")


def test_status_shows_a_divergence_and_its_rollback(tmp_path) -> None:
    from orchestrator.storage.rundir import RunDir

    events = [
        {"event": Event.RUN_STARTED, "time": 1.0, "backend": "local"},
        {"event": Event.ATTEMPT_STARTED, "attempt": 0, "time": 1.0},
        {"event": Event.DIVERGED, "attempt": 0, "first_step": 21, "last_step": 23, "time": 2.0},
        {"event": Event.ATTEMPT_ENDED, "attempt": 0, "status": "failed", "time": 2.0},
        {"event": Event.ROLLBACK_SCHEDULED, "attempt": 1, "to_step": 20, "time": 2.0},
        {"event": Event.ATTEMPT_STARTED, "attempt": 1, "time": 2.1},
        {"event": Event.ROLLED_BACK, "attempt": 1, "step": 20, "skipped": 256, "time": 2.5},
        {"event": Event.RUN_FINISHED, "status": "succeeded", "time": 3.0},
    ]
    fields = summarize(events)
    assert fields["divergences"] == (
        {
            "attempt": 0,
            "first_step": 21,
            "last_step": 23,
            "rolled_back_to": 20,
            "skipped_samples": 256,
            "rollback_attempt": 1,
        },
    )
    from orchestrator.supervision.status import LiveState

    run = RunDir(str(tmp_path / "r"))
    text = format_status(run_status(run, events, LiveState()))
    assert "diverged   steps 21-23 (attempt 0); rolled back to step 20, skipped 256 samples" in text


def test_the_profile_section_reaches_ranks_as_one_safe_variable(tmp_path) -> None:
    from orchestrator.contract import ENV_PROFILE, decode_profile
    from orchestrator.errors import ConfigError
    from orchestrator.spec.config import load_config
    from orchestrator.spec.plan import runtime_env

    (tmp_path / "train.py").write_text("")
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text("job: {script: train.py}\nresources: {ranks_per_node: 2}\n")
    assert ENV_PROFILE not in runtime_env(load_config(str(cfg), []))  # off: not even set
    config = load_config(str(cfg), ["profile.enabled=true", "profile.ranks=[0,1]", "profile.memory=true"])
    value = runtime_env(config)[ENV_PROFILE]
    assert value == "wait:10,warmup:2,active:5,repeat:1,ranks:0+1,memory:1,shapes:0,stack:0"
    assert decode_profile(value)["ranks"] == (0, 1)
    assert decode_profile("wait:3,ranks:")["ranks"] == ()  # every rank
    with pytest.raises(ConfigError, match=r"profile\.ranks: rank 2 is outside the world of 2 ranks"):
        load_config(str(cfg), ["profile.ranks=[2]"])
    with pytest.raises(ConfigError, match=r"profile\.ranks\[0\]: expected an integer"):
        load_config(str(cfg), ["profile.ranks=[x]"])


def test_the_profiler_exists_only_for_its_window(tmp_path) -> None:
    from orchestrator.runtime.profiling import StepProfiler

    prof = StepProfiler({"wait": 3, "warmup": 1, "active": 2}, rank=0, out_url=str(tmp_path / "p"))
    model = torch.nn.Linear(4, 4)
    alive = []
    for step in range(1, 11):
        model(torch.randn(2, 4)).sum().backward()
        prof.step(step)
        alive.append(prof._prof is not None)
    # Created at the 3rd step's end, traces the 4th (warmup) and 5th-6th (active), then gone.
    assert alive == [False, False, True, True, True, False, False, False, False, False]
    assert prof.finished
    names = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert names[-1] == "rank-0.top_ops.json" and names[0].endswith(".pt.trace.json")
