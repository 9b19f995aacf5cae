"""TensorBoard scalars from rank 0 into the run directory's tb/ (other ranks write nothing),
and the last of them into metrics.json, which `orch status SWEEP` reads without TensorBoard."""

from __future__ import annotations

import atexit
import os
import tempfile
import time
from typing import Any

from orchestrator.contract import METRICS_WRITE_S
from orchestrator.storage.goodput import ledger
from orchestrator.storage.rundir import RunDir, write_metrics

from .dist import DistContext


class Metrics:
    def __init__(self, ctx: DistContext, logdir: str | None = None) -> None:
        self._writer: Any = None
        self._last: dict[str, Any] = {}
        self._last_written = 0.0
        self._publish_to: str | None = None  # a remote run dir's tb/: the local files go there
        if not ctx.is_main:
            return
        if logdir is None:
            run_dir = ctx.run_dir or ""
            if run_dir and "://" not in run_dir:
                logdir = os.path.join(run_dir, "tb")
            else:
                # TensorBoard writes through local files; remote run dirs get a copy of them at
                # close and at exit (a preemption stop exits from step_end), for `orch report`.
                logdir = os.path.join(tempfile.gettempdir(), f"orch-{os.getuid()}", ctx.run_id, "tb")
                if run_dir:
                    self._publish_to = f"{run_dir.rstrip('/')}/tb"
                    atexit.register(self._publish)
        from torch.utils.tensorboard import SummaryWriter  # lazy: pulls in tensorboard

        self._writer = SummaryWriter(log_dir=logdir, filename_suffix=f".attempt{ctx.attempt}")
        self._logdir = logdir
        self._ctx = ctx
        self._health_written = False

    def scalars(self, step: int, **values: float) -> None:
        if self._writer is None:
            return
        if not self._health_written:
            self._write_run_health(step)
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)
        self._last = {"step": step, "time": time.time(), "scalars": {k: float(v) for k, v in values.items()}}
        if time.monotonic() - self._last_written >= METRICS_WRITE_S:
            self._write_last()

    def _write_last(self) -> None:
        """metrics.json: best effort (a storage hiccup costs a stale table row, not the run)."""
        self._last_written = time.monotonic()
        if self._last and self._ctx.run_dir:
            try:
                write_metrics(self._ctx.run_dir, self._last)
            except Exception:  # noqa: BLE001 - any storage's error; the next write tries again
                pass

    def _write_run_health(self, step: int) -> None:
        """Restarts so far and the goodput of the run up to this attempt, once per attempt."""
        self._health_written = True
        self._writer.add_scalar("orch/restarts", self._ctx.attempt, step)
        if not self._ctx.run_dir:
            return
        try:
            summary = ledger(RunDir(self._ctx.run_dir).events(), now=time.time())
        except OSError:
            return
        if summary["goodput"] is not None:
            self._writer.add_scalar("orch/goodput", summary["goodput"], step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._write_last()
            self._writer.close()
            self._writer = None
            self._publish()

    def _publish(self) -> None:
        """Copy this attempt's event file to a remote run directory (best effort, like
        metrics.json: a storage hiccup costs the report its curves, not the run)."""
        if self._publish_to is None:
            return
        if self._writer is not None:
            self._writer.flush()
        try:
            import fsspec

            for name in os.listdir(self._logdir):
                with open(os.path.join(self._logdir, name), "rb") as src:
                    with fsspec.open(f"{self._publish_to}/{name}", "wb") as dst:
                        dst.write(src.read())
        except Exception:  # noqa: BLE001 - any storage's error
            pass
