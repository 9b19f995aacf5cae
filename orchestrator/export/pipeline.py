"""`orch export RUN`: a committed checkpoint -> a verified model file.

The model comes from the job's factory with the checkpoint's weights; the chosen format's file is
written into a private folder, loaded back and run on the factory's example inputs, and moved to
--out only if its outputs match the eager model's within the format's tolerance.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from orchestrator.errors import OrchError
from orchestrator.spec.config import config_from_run_record
from orchestrator.storage.ckpt_store import CheckpointStore

from .destination import resolve_out, staged
from .exporters import EXPORTERS, quiet
from .factory import model_factory
from .formats import parse_format
from .result import ExportResult
from .verify import TOLERANCES, agreement, output_tensors
from .weights import choose_step, load_weights, read_model_state


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def export_run(
    run: Any, *, fmt: str = "state_dict", step: int | None = None, out: str | None = None
) -> ExportResult:
    """Export `run`'s checkpoint at `step` (default: the newest committed) in `fmt` to `out`
    (default: RUN_DIR/export/model-STEP.EXT). Errors are OrchError, one line; on any error
    nothing is written."""
    fmt_ = parse_format(fmt)  # before any work: a missing extra is said at once
    started = time.monotonic()
    factory = model_factory(config_from_run_record(run.dir.read_run_config()), run.dir.child("run.yaml"))
    store = CheckpointStore(run.dir.child("ckpt"))
    step = choose_step(store, run.run_id, step)
    state = read_model_state(store, step)
    model, inputs = factory.build()
    load_weights(model, state, step, factory.spec)
    model.eval()
    try:
        with torch.no_grad():
            output = model(*inputs)
    except Exception as exc:  # noqa: BLE001 - the job's model on the job's inputs: one line
        raise OrchError(
            f"job.model_factory: {factory.spec}: the model fails on its example inputs: {_one_line(exc)}"
        ) from None
    eager = output_tensors(output)
    if not eager:
        raise OrchError(
            f"job.model_factory: {factory.spec}: the model returns no tensor on the example inputs"
        )

    exporter = EXPORTERS[fmt_]
    target = resolve_out(out, run.dir, step, fmt_)
    with staged(target) as staging:
        try:
            with quiet():
                exporter.write(model, inputs, staging.path)
        except OrchError:
            raise
        except Exception as exc:  # noqa: BLE001 - the exporter's own errors (unsupported ops...)
            raise OrchError(f"--format {fmt_}: the model does not export: {_one_line(exc)}") from None
        try:
            with quiet(), torch.no_grad():
                loaded = output_tensors(exporter.run(staging.path, inputs, lambda: factory.build()[0]))
        except OrchError:
            raise
        except Exception as exc:  # noqa: BLE001 - the written file does not load or run
            raise OrchError(
                f"--format {fmt_}: the exported file does not run ({exporter.checked_with}):"
                f" {_one_line(exc)}; nothing written"
            ) from None
        try:
            check = agreement(loaded, eager, TOLERANCES[fmt_])
        except OrchError as exc:
            raise OrchError(f"--format {fmt_}: {exc}; nothing written") from None
        if not check.ok:
            raise OrchError(
                f"--format {fmt_}: the export does not match the eager model: max |exported - eager|"
                f" = {check.max_abs_diff:.1e} > {check.tolerance:.1e} on the example inputs; nothing written"
            )
        size = staging.publish()
    return ExportResult(
        run_id=run.run_id,
        step=step,
        format=fmt_,
        out=target,
        size=size,
        max_abs_diff=check.max_abs_diff,
        tolerance=check.tolerance,
        seconds=round(time.monotonic() - started, 3),
        checked_with=exporter.checked_with,
    )
