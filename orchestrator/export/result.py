"""What `orch export` did, for people (lines) and for scripts (to_json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .formats import ExportFormat


@dataclass(frozen=True)
class ExportResult:
    run_id: str
    step: int
    format: ExportFormat
    out: str  # the file written (path or URL)
    size: int  # bytes written (with any file beside it, such as ONNX external data)
    max_abs_diff: float  # max |exported - eager| on the example inputs (the worst output)
    tolerance: float  # the bound it had to stay within (verify.Tolerance)
    seconds: float  # from reading the checkpoint to the verified file in place
    checked_with: str  # how the written file was loaded and run for the check

    def lines(self) -> list[str]:
        return [
            f"exported run {self.run_id} step {self.step} as {self.format} to {self.out}"
            f" ({self.size:,} bytes, {self.seconds:.1f}s)",
            f"verified: max |exported - eager| = {self.max_abs_diff:.1e} <= {self.tolerance:.1e}"
            f" on the example inputs ({self.checked_with})",
        ]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "format": str(self.format)}
