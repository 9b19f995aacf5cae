"""One exporter per format: write the model to a file, and load that file back the way its users
will and run it (what verify compares with the eager model)."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from orchestrator.errors import OrchError

from .formats import ExportFormat

Inputs = tuple[torch.Tensor, ...]
# ONNX keeps a model in one protobuf, capped at 2 GiB: past this many bytes of weights they go
# to a `.data` file beside it (written, verified and moved with it).
_ONNX_INLINE_MAX = 1 << 30


@dataclass(frozen=True)
class Exporter:
    write: Callable[[nn.Module, Inputs, str], None]  # (eval-mode model, example inputs, path)
    # (path, example inputs, a fresh model from the factory) -> the outputs of the loaded file
    run: Callable[[str, Inputs, Callable[[], nn.Module]], Any]
    checked_with: str  # how the file was loaded and run, in words


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """torch's deprecation notices (torch.jit) and the ONNX exporter's progress logs are about
    torch, not this export: the result's lines say what happened."""
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        onnx_log.setLevel(level)


def _dynamic_batch(inputs: Inputs) -> tuple[Any, ...]:
    # The first dimension of each input is left dynamic where the model allows it (Dim.AUTO
    # specializes silently where it does not), so the file serves any batch size, not only the
    # example's.
    return tuple({0: torch.export.Dim.AUTO} if t.dim() else None for t in inputs)


# ---------------------------------------------------------------------------- state_dict


def _write_state_dict(model: nn.Module, inputs: Inputs, path: str) -> None:
    torch.save(model.state_dict(), path)


def _run_state_dict(path: str, inputs: Inputs, fresh: Callable[[], nn.Module]) -> Any:
    model = fresh()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()(*inputs)


# ---------------------------------------------------------------------------- torchscript


def _write_torchscript(model: nn.Module, inputs: Inputs, path: str) -> None:
    # strict=False: outputs that are lists or dicts trace too.
    torch.jit.save(torch.jit.trace(model, inputs, strict=False), path)


def _run_torchscript(path: str, inputs: Inputs, fresh: Callable[[], nn.Module]) -> Any:
    return torch.jit.load(path, map_location="cpu")(*inputs)


# ---------------------------------------------------------------------------- onnx


def _write_onnx(model: nn.Module, inputs: Inputs, path: str) -> None:
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    torch.onnx.export(
        model,
        inputs,
        path,
        dynamo=True,
        dynamic_shapes=_dynamic_batch(inputs),
        external_data=weights > _ONNX_INLINE_MAX,
        verbose=False,
    )


def _run_onnx(path: str, inputs: Inputs, fresh: Callable[[], nn.Module]) -> Any:
    import onnxruntime  # the onnx extra: checked present before the export began

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise OrchError(f"the ONNX model takes {len(names)} input(s), the example has {len(inputs)}")
    feed = {name: t.detach().cpu().numpy() for name, t in zip(names, inputs, strict=True)}
    return [torch.from_numpy(a) for a in session.run(None, feed)]


# ---------------------------------------------------------------------------- pt2


def _write_pt2(model: nn.Module, inputs: Inputs, path: str) -> None:
    program = torch.export.export(model, inputs, dynamic_shapes=_dynamic_batch(inputs))
    torch.export.save(program, path)


def _run_pt2(path: str, inputs: Inputs, fresh: Callable[[], nn.Module]) -> Any:
    return torch.export.load(path).module()(*inputs)


EXPORTERS: dict[ExportFormat, Exporter] = {
    ExportFormat.STATE_DICT: Exporter(
        _write_state_dict, _run_state_dict, "torch.load(weights_only=True) into a fresh factory model"
    ),
    ExportFormat.TORCHSCRIPT: Exporter(_write_torchscript, _run_torchscript, "torch.jit.load"),
    ExportFormat.ONNX: Exporter(_write_onnx, _run_onnx, "onnxruntime, CPU"),
    ExportFormat.PT2: Exporter(_write_pt2, _run_pt2, "torch.export.load(...).module()"),
}
