"""`orch export` without processes: the model factory's errors, the step and the weights, the
tolerance, the onnx extra, and nothing written when the check fails."""

from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path

import pytest
import torch

from orchestrator import export
from orchestrator.api import Run
from orchestrator.errors import OrchError, UsageError
from orchestrator.export.exporters import EXPORTERS, Exporter
from orchestrator.export.factory import model_factory
from orchestrator.export.verify import TOLERANCES, Tolerance, agreement
from orchestrator.export.weights import choose_step, load_weights, read_model_state
from orchestrator.spec.config import config_from_run_record, config_to_dict, parse_config
from orchestrator.storage.ckpt_store import CheckpointStore, make_token
from orchestrator.storage.rundir import RunDir

MODEL_PY = """
import torch
from torch import nn


def good(args):
    torch.manual_seed(len(args))
    return nn.Linear(3, 2), (torch.linspace(-1, 1, 12).reshape(4, 3),)


def wider(args):
    return nn.Linear(3, 5), (torch.ones(4, 3),)


def renamed(args):
    return nn.Sequential(nn.Linear(3, 2)), (torch.ones(4, 3),)


def no_tuple(args):
    return nn.Linear(3, 2)


def bare_tensor(args):
    return nn.Linear(3, 2), torch.ones(4, 3)


def not_a_model(args):
    return "linear", (torch.ones(4, 3),)


def boom(args):
    raise ValueError("no data here\\nsecond line")


not_callable = 3
"""
TRAINS_ON_IMPORT = """
import sys
sys.exit(2)
"""


def weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2).state_dict()


def make_run(
    tmp_path: Path,
    factory: str | None = "model.py:good",
    steps: tuple[int, ...] = (10, 20),
    root: str | None = None,
) -> Run:
    """A run directory as `orch run` leaves it: run.yaml (config and base_dir) and checkpoints
    committed the way the runtime commits them (a state file with "model", a small rank file)."""
    (tmp_path / "model.py").write_text(MODEL_PY)
    job = {"script": "train.py", **({"model_factory": factory} if factory else {})}
    config = parse_config({"job": job}, base_dir=str(tmp_path), check_files=False)
    run_dir = RunDir(f"{root}/r1" if root else str(tmp_path / "runs" / "r1"))
    run_dir.create({"run_id": "r1", "base_dir": config.base_dir, "config": config_to_dict(config)})
    store = CheckpointStore(run_dir.child("ckpt"))
    for step in steps:
        token = make_token(0)
        tmp = store.tmp_dir(step, token)
        state = io.BytesIO()
        torch.save({"model": weights(step), "progress": {"step": step}}, state)
        rank = io.BytesIO()
        torch.save({"rng": torch.zeros(2)}, rank)
        entries = [
            store.write_file(tmp, "state.pt", state.getvalue()),
            store.write_file(tmp, "rank-00000.pt", rank.getvalue()),
        ]
        store.commit(tmp, step, token, entries, {})
    return Run(run_dir)


def factory_of(run: Run):
    return model_factory(config_from_run_record(run.dir.read_run_config()), "run.yaml")


# ---------------------------------------------------------------------------- the factory


def test_a_relative_file_resolves_against_the_recorded_cluster_yaml_folder(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    monkeypatch.chdir("/")  # not where cluster.yaml was
    model, inputs = factory_of(run).build()
    assert isinstance(model, torch.nn.Linear) and inputs[0].shape == (4, 3)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("missing.py:good", r"job.model_factory: missing.py:good: .*missing.py does not exist"),
        ("model.py:absent", r"job.model_factory: model.py:absent: model.py has no function 'absent'"),
        ("model.py:not_callable", r"has no function 'not_callable'"),
        (
            "no_such_pkg.models:build",
            r"job.model_factory: no_such_pkg.models:build: no module named 'no_such_pkg'",
        ),
    ],
)
def test_a_factory_that_cannot_be_found_is_one_line(tmp_path, factory, message):
    run = make_run(tmp_path, factory=factory)
    with pytest.raises(OrchError, match=message) as err:
        factory_of(run)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("no_tuple", r"must return \(model, example_inputs\).*; it returned a Linear"),
        ("bare_tensor", r"its example_inputs are a Tensor"),
        ("not_a_model", r"its model is a str"),
        ("boom", r"job.model_factory: model.py:boom raised ValueError: no data here$"),
    ],
)
def test_a_factory_that_returns_the_wrong_thing_is_one_line(tmp_path, function, message):
    run = make_run(tmp_path, factory=f"model.py:{function}")
    with pytest.raises(OrchError, match=message) as err:
        factory_of(run).build()
    assert "\n" not in str(err.value)


def test_a_script_that_exits_on_import_is_one_line(tmp_path):
    run = make_run(tmp_path, factory="train_now.py:build")
    (tmp_path / "train_now.py").write_text(TRAINS_ON_IMPORT)
    with pytest.raises(OrchError, match=r"train_now.py exited \(2\): does it train on import\?"):
        factory_of(run)


def test_a_run_without_a_factory_says_where_to_set_it(tmp_path):
    run = make_run(tmp_path, factory=None)
    with pytest.raises(
        UsageError, match=r"job.model_factory is not set.*\(FILE.py:FUNCTION\) in cluster.yaml"
    ):
        export.export_run(run)


# ---------------------------------------------------------------------------- the step and the weights


def test_the_newest_step_by_default_and_a_named_one_must_be_committed(tmp_path):
    store = CheckpointStore(make_run(tmp_path).dir.child("ckpt"))
    assert choose_step(store, "r1", None) == 20
    assert choose_step(store, "r1", 10) == 10
    with pytest.raises(
        UsageError, match=r"^--step 15: not a committed checkpoint of run r1 \(committed: 10, 20\)$"
    ):
        choose_step(store, "r1", 15)


def test_a_run_without_checkpoints_is_one_line(tmp_path):
    run = make_run(tmp_path, steps=())
    with pytest.raises(OrchError, match=r"^run r1 has no committed checkpoint to export"):
        export.export_run(run)


def test_the_weights_come_from_the_state_file_checked_against_the_manifest(tmp_path):
    store = CheckpointStore(make_run(tmp_path).dir.child("ckpt"))
    state = read_model_state(store, 10)
    assert all(torch.equal(state[k], v) for k, v in weights(10).items())
    Path(store.local_path(10, "state.pt")).write_bytes(b"not the bytes that were committed")
    with pytest.raises(
        OrchError, match=r"^checkpoint step 10 is corrupt: step-00000010/state.pt: size"
    ) as err:
        read_model_state(store, 10)
    assert "\n" not in str(err.value)


def built(tmp_path: Path, function: str) -> torch.nn.Module:
    job = {"script": "train.py", "model_factory": f"model.py:{function}"}
    config = parse_config({"job": job}, base_dir=str(tmp_path), check_files=False)
    return model_factory(config, "run.yaml").build()[0]


def test_weights_that_do_not_fit_the_model_name_the_keys(tmp_path):
    make_run(tmp_path)
    state = weights(20)
    with pytest.raises(OrchError, match=r"shape \(checkpoint vs model\): weight \[2, 3\] vs \[5, 3\], bias"):
        load_weights(built(tmp_path, "wider"), state, 20, "model.py:wider")
    with pytest.raises(
        OrchError, match=r"missing from the checkpoint: 0.weight, 0.bias; not in the model: weight, bias$"
    ):
        load_weights(built(tmp_path, "renamed"), state, 20, "model.py:renamed")
    load_weights(built(tmp_path, "good"), state, 20, "model.py:good")


# ---------------------------------------------------------------------------- tolerance


def test_the_tolerance_scales_with_the_outputs_and_onnx_is_looser():
    eager = [torch.tensor([[-3.0, 1.0]])]
    tol = TOLERANCES[export.ExportFormat.PT2]
    assert tol.bound(eager[0]) == pytest.approx(1e-5 + 1e-5 * 3.0)
    near = agreement([eager[0] + 2e-5], eager, tol)
    assert near.ok and near.max_abs_diff == pytest.approx(2e-5, rel=1e-2)
    far = agreement([eager[0] + 1e-3], eager, tol)
    assert not far.ok and far.tolerance == pytest.approx(4e-5)
    assert agreement([eager[0] + 1e-4], eager, TOLERANCES[export.ExportFormat.ONNX]).ok
    assert TOLERANCES[export.ExportFormat.ONNX].atol > tol.atol


def test_the_worst_output_is_reported_and_integers_must_match_exactly():
    tol = Tolerance(atol=1e-5, rtol=0.0)
    logits, classes = torch.zeros(2, 3), torch.tensor([1, 2])
    check = agreement([logits + 1e-6, classes], [logits, classes], tol)
    assert check.ok and check.max_abs_diff == pytest.approx(1e-6)
    check = agreement([logits + 1e-6, classes + 1], [logits, classes], tol)
    assert not check.ok and (check.max_abs_diff, check.tolerance) == (1.0, 0.0)


def test_low_precision_outputs_get_a_wider_floor_and_nan_agrees_only_with_nan():
    half = torch.ones(3, dtype=torch.bfloat16)
    assert agreement([half + 0.005], [half], TOLERANCES[export.ExportFormat.PT2]).ok
    nan = torch.tensor([float("nan"), 1.0])
    assert agreement([nan.clone()], [nan], Tolerance(0.0, 0.0)).ok
    assert not agreement([torch.tensor([0.0, 1.0])], [nan], Tolerance(1.0, 0.0)).ok


def test_outputs_of_another_shape_or_count_are_errors():
    tol = Tolerance(1e-5, 1e-5)
    with pytest.raises(OrchError, match=r"output 0: the export returns shape \[2\], the eager model \[3\]"):
        agreement([torch.zeros(2)], [torch.zeros(3)], tol)
    with pytest.raises(OrchError, match=r"returns 2 output\(s\), the eager model 1"):
        agreement([torch.zeros(3), torch.zeros(3)], [torch.zeros(3)], tol)


# ---------------------------------------------------------------------------- the formats


class Untouchable:
    def __getattr__(self, name):
        raise AssertionError(f"export_run touched run.{name} before checking the format")


def test_onnx_without_its_extra_is_one_line_before_any_work(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a)
    )
    with pytest.raises(UsageError) as err:
        export.export_run(Untouchable(), fmt="onnx")
    assert str(err.value) == "--format onnx needs the onnx extra: pip install 'orchestrator[onnx]'"


def test_an_unknown_format_is_a_usage_error():
    with pytest.raises(
        UsageError, match=r"--format: 'tflite' is not one of state_dict, torchscript, onnx, pt2"
    ):
        export.export_run(Untouchable(), fmt="tflite")


def test_state_dict_export_by_default_into_the_run_directory(tmp_path):
    run = make_run(tmp_path)
    result = export.export_run(run)
    assert (result.step, result.format, result.max_abs_diff) == (20, "state_dict", 0.0)
    assert result.out == str(tmp_path / "runs" / "r1" / "export" / "model-20.pt")
    saved = torch.load(result.out, weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in weights(20).items())
    assert result.size == os.path.getsize(result.out)
    assert set(result.to_json()) == {
        "run_id",
        "step",
        "format",
        "out",
        "size",
        "max_abs_diff",
        "tolerance",
        "seconds",
        "checked_with",
    }
    assert result.lines()[1].startswith("verified: max |exported - eager| = 0.0e+00 <= ")


def test_a_failed_check_writes_nothing(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    honest = EXPORTERS[export.ExportFormat.STATE_DICT]
    off = Exporter(honest.write, lambda *a: honest.run(*a) + 1.0, honest.checked_with)
    monkeypatch.setitem(EXPORTERS, export.ExportFormat.STATE_DICT, off)
    out = tmp_path / "out" / "model.pt"
    with pytest.raises(
        OrchError,
        match=r"^--format state_dict: the export does not match the eager model: .*"
        r"= 1\.0e\+00 > .*; nothing written$",
    ):
        export.export_run(run, out=str(out))
    assert os.listdir(out.parent) == []  # neither the file nor its staging folder


def test_a_run_on_an_object_store_is_read_verified_and_its_export_uploaded(tmp_path):
    import fsspec

    root = f"memory://export-test-{os.getpid()}"
    result = export.export_run(make_run(tmp_path, root=root), fmt="state_dict")
    assert result.out == f"{root}/r1/export/model-20.pt"
    with fsspec.open(result.out, "rb") as fh:
        saved = torch.load(io.BytesIO(fh.read()), weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in weights(20).items())
