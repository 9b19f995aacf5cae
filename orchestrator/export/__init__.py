"""After training: a run's committed checkpoint -> a model file others can load (`orch export`).

    from orchestrator import get_run
    from orchestrator.export import export_run

    result = export_run(get_run("mnist-20261130-101500-ab12"), fmt="onnx", out="model.onnx")
    result.max_abs_diff, result.tolerance    # how close the file is to the eager model

The job names its model in cluster.yaml (job.model_factory); every export is checked against
the eager model on the factory's example inputs before it is written.
"""

from __future__ import annotations

from .formats import ExportFormat
from .pipeline import export_run
from .result import ExportResult

__all__ = ["ExportFormat", "ExportResult", "export_run"]
