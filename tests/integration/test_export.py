"""`orch export` on a real run of the example job: every format, each file loaded on its own
(torch.load, torch.jit.load, onnxruntime, torch.export.load) and run against the eager model
built from the checkpoint's weights, as the commands a user types."""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from ..conftest import JOBS, run_orch, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUN_ID = "exp"
# Checkpoints at 250 and 500: the docs' example exports step 500.
ARGS = ["--steps", "500", "--log-every", "250", "--dataset-size", "1024"]
FACTORY = f"{JOBS / 'train_ddp.py'}:export_model"


@dataclass(frozen=True)
class Trained:
    folder: Path  # holds cluster.yaml, and runs/ under it
    config: Path

    @property
    def run_dir(self) -> Path:
        return self.folder / "runs" / RUN_ID


def example_job():
    spec = importlib.util.spec_from_file_location("example_job_for_export_test", JOBS / "train_ddp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def eager(run_dir: Path, step: int) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], torch.Tensor]:
    """The example job's model with the weights committed at `step`, read straight from the
    checkpoint, its example inputs and its output on them."""
    model, inputs = example_job().export_model([])
    state = torch.load(run_dir / "ckpt" / f"step-{step:08d}" / "state.pt", weights_only=True)
    model.load_state_dict(state["model"])
    model.eval()
    with torch.no_grad():
        return model, inputs, model(*inputs)


def exported_ok(proc) -> list[str]:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("verified: max |exported - eager| = "), proc.stdout
    return lines


def one_line_error(proc) -> str:
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    folder = tmp_path_factory.mktemp("export")
    config = write_config(
        folder,
        JOBS / "train_ddp.py",
        args=ARGS,
        job={"model_factory": FACTORY},
        storage={"checkpoint_interval": 250},
    )
    proc = run_orch("run", str(config), "--run-id", RUN_ID, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (folder / "runs" / RUN_ID / "ckpt").glob("step-*")) == [
        "step-00000250",
        "step-00000500",
    ]
    return Trained(folder, config)


def test_onnx_as_in_the_docs(trained, monkeypatch):
    import onnxruntime

    monkeypatch.chdir(trained.folder)  # where cluster.yaml is, as for a user in their project
    exported_ok(run_orch("export", RUN_ID, "--format", "onnx", "--out", "model.onnx"))
    model, (x,), want = eager(trained.run_dir, 500)
    session = onnxruntime.InferenceSession(
        str(trained.folder / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    (got,) = session.run(None, {name: x.numpy()})
    assert np.abs(got - want.numpy()).max() <= 1e-4
    # The batch dimension is dynamic: another batch size runs too.
    bigger = torch.randn(7, *x.shape[1:])
    (got,) = session.run(None, {name: bigger.numpy()})
    with torch.no_grad():
        assert np.abs(got - model(bigger).numpy()).max() <= 1e-4


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_of_step_500_as_in_the_docs(trained, monkeypatch):
    monkeypatch.chdir(trained.folder)
    exported_ok(run_orch("export", RUN_ID, "--format", "torchscript", "--step", "500", "--out", "model.ts"))
    _, inputs, want = eager(trained.run_dir, 500)
    loaded = torch.jit.load(str(trained.folder / "model.ts"))
    with torch.no_grad():
        assert (loaded(*inputs) - want).abs().max().item() <= 1e-5


def test_pt2_runs_as_the_eager_model(trained, tmp_path):
    out = tmp_path / "model.pt2"
    exported_ok(
        run_orch("export", RUN_ID, "--config", str(trained.config), "--format", "pt2", "--out", str(out))
    )
    _, inputs, want = eager(trained.run_dir, 500)
    module = torch.export.load(str(out)).module()
    with torch.no_grad():
        assert (module(*inputs) - want).abs().max().item() <= 1e-5


def test_state_dict_by_default_into_the_run_directory_with_json(trained):
    proc = run_orch("export", RUN_ID, "--config", str(trained.config), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    out = trained.run_dir / "export" / "model-500.pt"
    assert result["out"] == str(out) and result["size"] == out.stat().st_size
    assert (result["run_id"], result["step"], result["format"]) == (RUN_ID, 500, "state_dict")
    assert 0 <= result["max_abs_diff"] <= result["tolerance"] and result["seconds"] > 0
    model, inputs, want = eager(trained.run_dir, 500)
    fresh, _ = example_job().export_model([])
    fresh.load_state_dict(torch.load(out, weights_only=True))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(*inputs), want)


def test_an_older_step_exports_its_own_weights(trained, tmp_path):
    out = tmp_path / "older.pt"
    lines = exported_ok(
        run_orch("export", RUN_ID, "--config", str(trained.config), "--step", "250", "--out", str(out))
    )
    assert f"step 250 as state_dict to {out}" in lines[0]
    _, inputs, at_250 = eager(trained.run_dir, 250)
    _, _, at_500 = eager(trained.run_dir, 500)
    fresh, _ = example_job().export_model([])
    fresh.load_state_dict(torch.load(out, weights_only=True))
    with torch.no_grad():
        got = fresh.eval()(*inputs)
    assert torch.equal(got, at_250) and not torch.allclose(got, at_500)


def test_a_step_that_is_not_committed_lists_the_committed_ones(trained, tmp_path):
    proc = run_orch(
        "export", RUN_ID, "--config", str(trained.config), "--step", "300", "--out", str(tmp_path / "m.pt")
    )
    assert (
        one_line_error(proc)
        == f"--step 300: not a committed checkpoint of run {RUN_ID} (committed: 250, 500)"
    )
    assert not list(tmp_path.iterdir())


def test_a_corrupt_checkpoint_is_one_line_naming_its_step(trained, tmp_path):
    # A copy of the run, so the other tests keep their checkpoints.
    shutil.copytree(trained.run_dir, tmp_path / "runs" / RUN_ID, ignore=shutil.ignore_patterns("export"))
    config = write_config(tmp_path, JOBS / "train_ddp.py", args=ARGS, job={"model_factory": FACTORY})
    state = tmp_path / "runs" / RUN_ID / "ckpt" / "step-00000500" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    proc = run_orch("export", RUN_ID, "--config", str(config), "--format", "pt2")
    assert "checkpoint step 500 is corrupt: step-00000500/state.pt: checksum mismatch" in one_line_error(proc)
    exports = tmp_path / "runs" / RUN_ID / "export"
    assert not exports.exists() or not list(exports.iterdir())
