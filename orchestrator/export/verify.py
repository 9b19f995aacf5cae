"""Does the exported model compute what the eager model computes? Its outputs on the example
inputs against the eager model's, within a tolerance named here per format."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from orchestrator.errors import OrchError

from .formats import ExportFormat


@dataclass(frozen=True)
class Tolerance:
    """|exported - eager| <= atol + rtol * max|eager|, for each output tensor."""

    atol: float
    rtol: float

    def bound(self, eager: torch.Tensor) -> float:
        if not (eager.is_floating_point() or eager.is_complex()):
            return 0.0  # integers and booleans (class ids, masks) must match exactly
        magnitudes = eager.abs()
        finite = magnitudes[magnitudes.isfinite()]  # NaN and inf are judged as values, not scale
        scale = finite.max().item() if finite.numel() else 0.0
        floor = _LOW_PRECISION if eager.dtype in (torch.float16, torch.bfloat16) else self
        return max(self.atol, floor.atol) + max(self.rtol, floor.rtol) * scale


# float32 outputs. The weights and the graph are the same, so the torch formats differ from
# eager only where a kernel sums in another order: 1e-5 leaves room for that in deep nets and
# still catches a wrong weight or op. onnxruntime has kernels of its own (its convolutions,
# fused ops): 1e-4. Measured figures for the example job are in the export section of docs/cli.md.
TOLERANCES: Mapping[ExportFormat, Tolerance] = {
    ExportFormat.STATE_DICT: Tolerance(atol=1e-5, rtol=1e-5),
    ExportFormat.TORCHSCRIPT: Tolerance(atol=1e-5, rtol=1e-5),
    ExportFormat.PT2: Tolerance(atol=1e-5, rtol=1e-5),
    ExportFormat.ONNX: Tolerance(atol=1e-4, rtol=1e-4),
}
# float16 / bfloat16 outputs carry ~3 significant digits whatever the format.
_LOW_PRECISION = Tolerance(atol=1e-2, rtol=1e-2)


@dataclass(frozen=True)
class Agreement:
    """The worst output: its largest difference and the bound it had to stay within."""

    max_abs_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def output_tensors(output: Any) -> list[torch.Tensor]:
    """A model's output as a flat list of tensors: a tensor, or tuples, lists and dicts of them
    (dicts in their own order, as torch.export and torch.onnx flatten them)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for value in output.values() for t in output_tensors(value)]
    if isinstance(output, (tuple, list)):
        return [t for value in output for t in output_tensors(value)]
    if output is None:
        return []
    raise OrchError(
        f"the model returns a {type(output).__name__}: export needs tensors (or tuples, lists, dicts of them)"
    )


def agreement(exported: list[torch.Tensor], eager: list[torch.Tensor], tolerance: Tolerance) -> Agreement:
    """How close the exported outputs are to the eager ones; an output of another count or
    shape is an error at once."""
    if len(exported) != len(eager):
        raise OrchError(f"the export returns {len(exported)} output(s), the eager model {len(eager)}")
    worst: Agreement | None = None
    for i, (got, want) in enumerate(zip(exported, eager, strict=True)):
        if tuple(got.shape) != tuple(want.shape):
            raise OrchError(
                f"output {i}: the export returns shape {list(got.shape)}, the eager model {list(want.shape)}"
            )
        wide = torch.complex128 if want.is_complex() or got.is_complex() else torch.float64
        got64, want64 = got.detach().cpu().to(wide), want.detach().cpu().to(wide)
        diff = (got64 - want64).abs()
        # NaN where the eager model has NaN too (and the same infinity) is agreement; elsewhere
        # NaN is not, and inf - inf would read as NaN.
        same = (got64 == want64) | (got64.isnan() & want64.isnan())
        diff = torch.where(same, torch.zeros_like(diff), diff)
        largest = diff.max().item() if diff.numel() else 0.0
        here = Agreement(max_abs_diff=largest, tolerance=tolerance.bound(want.detach().cpu()))
        if worst is None or _ratio(here) > _ratio(worst):
            worst = here
    assert worst is not None  # there is at least one output (checked by the caller)
    return worst


def _ratio(a: Agreement) -> float:
    if a.max_abs_diff != a.max_abs_diff:  # NaN: the worst there is
        return float("inf")
    if a.tolerance == 0:
        return float("inf") if a.max_abs_diff else 0.0
    return a.max_abs_diff / a.tolerance
