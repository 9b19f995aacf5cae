"""The formats `orch export` writes: their names, file extensions and optional packages (no torch)."""

from __future__ import annotations

import importlib.util
from enum import StrEnum

from orchestrator.errors import UsageError


class ExportFormat(StrEnum):
    STATE_DICT = "state_dict"  # the weights alone (torch.save), for a model built from source
    TORCHSCRIPT = "torchscript"  # torch.jit.trace: runs without the model's Python source
    ONNX = "onnx"  # torch.onnx (the dynamo exporter), checked with onnxruntime
    PT2 = "pt2"  # torch.export: an ExportedProgram (torch.export.load)

    @property
    def ext(self) -> str:
        return _EXTENSIONS[self]

    @property
    def extra(self) -> tuple[str, ...]:
        """The packages of the optional extra this format needs (importable names)."""
        return _EXTRAS.get(self, ())


_EXTENSIONS = {
    ExportFormat.STATE_DICT: ".pt",
    ExportFormat.TORCHSCRIPT: ".ts",
    ExportFormat.ONNX: ".onnx",
    ExportFormat.PT2: ".pt2",
}
# pyproject.toml's `onnx` extra: the exporter needs onnx and onnxscript, the check onnxruntime.
_EXTRAS = {ExportFormat.ONNX: ("onnx", "onnxscript", "onnxruntime")}


def parse_format(name: str) -> ExportFormat:
    """The format named on the command line, with its optional packages present."""
    try:
        fmt = ExportFormat(name)
    except ValueError:
        choices = ", ".join(f.value for f in ExportFormat)
        raise UsageError(f"--format: {name!r} is not one of {choices}") from None
    # find_spec looks the packages up without importing them: the answer comes before any work.
    if any(importlib.util.find_spec(package) is None for package in fmt.extra):
        raise UsageError(f"--format {fmt} needs the {fmt} extra: pip install 'orchestrator[{fmt}]'")
    return fmt
