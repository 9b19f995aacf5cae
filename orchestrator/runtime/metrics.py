"""TensorBoard scalars from rank 0 into the run directory's tb/ (other ranks write nothing),
and the last of them into metrics.json, which `orch status SWEEP` reads without TensorBoard."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from orchestrator.contract import METRICS_WRITE_S
from orchestrator.storage.goodput import ledger
from orchestrator.storage.private import user_temp_dir
from orchestrator.storage.rundir import RunDir, upload_own_file, url_to_fs, write_metrics

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
            elif run_dir:
                # TensorBoard writes through local files; remote run dirs get a copy of them at
                # close and at exit (a preemption stop exits from step_end), for `orch report`.
                # Staged in a fresh folder of this attempt's own (mkdtemp: 0700, a name no one
                # can have taken first), so no other user can read the scalars or plant a file;
                # removed once copied, on either path (one per attempt would pile up in /tmp).
                logdir = tempfile.mkdtemp(prefix=f"orch-tb-{ctx.run_id.replace('/', '-')}-")
                self._publish_to = f"{run_dir.rstrip('/')}/tb"
                atexit.register(self._end_at_exit)
            else:
                # No run directory: where the user looks for them, checked private to this user.
                logdir = user_temp_dir(ctx.run_id, "tb")
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
            self._end()

    def _end(self) -> None:
        """The writer closed; for a remote run directory, its files copied there and the staged
        copy removed once they are (else kept: the exit tries again)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._publish_to is not None and self._publish(self._publish_to):
            shutil.rmtree(self._logdir, ignore_errors=True)
            self._publish_to = None  # nothing left for the exit to do

    def _end_at_exit(self) -> None:
        """At the exit of a rank that did not close(): as close() ends it; when the store did not
        take the files, the staged copy is their only one, and the rank's log says where."""
        self._end()
        if self._publish_to is not None:
            print(
                f"orch: TensorBoard scalars of attempt {self._ctx.attempt} not copied to"
                f" {self._publish_to}: kept in {self._logdir}",
                file=sys.stderr,
                flush=True,
            )

    def _publish(self, to: str) -> bool:
        """Copy this attempt's event file to `to`, a remote run directory's tb/ (best effort, like
        metrics.json: a storage hiccup costs the report its curves, not the run). Only regular
        files of this user's are copied (upload_own_file); False if the storage failed."""
        try:
            fs, path = url_to_fs(to)
            for name in os.listdir(self._logdir):
                upload_own_file(fs, os.path.join(self._logdir, name), f"{path}/{name}")
        except Exception:  # noqa: BLE001 - any storage's error
            return False
        return True
