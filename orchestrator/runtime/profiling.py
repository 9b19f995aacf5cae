"""torch.profiler over a window of each attempt's steps, driven by Checkpointer.step_end.

The profiler object exists only around its window: until `wait` steps of the attempt have
passed nothing is created or started, and once the last active step is recorded it is stopped
and dropped, so a run with profiling configured costs, outside the window, one integer compare
per step (`bench/step_overhead.py --training` measures it against no profiling). Each finished cycle
writes a trace (Chrome trace JSON: TensorBoard's profiler plugin and Perfetto open it) into
RUN_DIR/profile/attempt-N, and the rank's top ops by self time go to its log and to
rank-R.top_ops.json beside it (the last cycle's; `orch profile RUN` prints them). Nothing here
can stop training: a trace that cannot be written is a warning in the rank's log.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any

import torch

from orchestrator.contract import (
    ENV_PROFILE,
    PROFILE_DIR,
    attempt_dir_name,
    decode_profile,
    profile_worker_name,
    top_ops_name,
)
from orchestrator.storage.profiles import format_top_ops
from orchestrator.storage.rundir import is_local_url, join_url, upload_own_file, url_to_fs

TOP_OPS = 15  # rows of the table in the rank's log and in top_ops.json


def from_env(rank: int, attempt: int, run_dir: str | None) -> StepProfiler | None:
    """The rank's profiler when ORCH_PROFILE is set and names this rank (or every rank)."""
    text = os.environ.get(ENV_PROFILE)
    if not text or not run_dir:
        return None
    settings = decode_profile(text)
    if settings.get("ranks") and rank not in settings["ranks"]:
        return None
    return StepProfiler(
        settings, rank=rank, out_url=join_url(run_dir, PROFILE_DIR, attempt_dir_name(attempt))
    )


class StepProfiler:
    def __init__(self, settings: dict[str, Any], *, rank: int, out_url: str) -> None:
        self.wait = int(settings.get("wait", 10))
        self.warmup = int(settings.get("warmup", 2))
        self.active = int(settings.get("active", 5))
        self.repeat = int(settings.get("repeat", 1))
        self.memory = bool(settings.get("memory", 0))
        self.shapes = bool(settings.get("shapes", 0))
        self.stack = bool(settings.get("stack", 0))
        self.rank = rank
        self.out_url = out_url
        # Traces are written to a local folder first (the run directory may be an object store).
        self.local_dir = out_url if is_local_url(out_url) else tempfile.mkdtemp(prefix="orch-profile-")
        self.steps_seen = 0
        self.finished = False
        self._prof: Any = None
        self._cycles_left = self.repeat

    def step(self, step: int) -> None:
        """After each optimizer step."""
        self.steps_seen += 1
        if self.finished or self.steps_seen < self.wait:
            return
        if self._prof is None:
            self._start()
            return
        self._prof.step()
        if self._cycles_left == 0:
            self._stop()

    def _start(self) -> None:
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        os.makedirs(self.local_dir, exist_ok=True)
        self._prof = profile(
            activities=activities,
            schedule=schedule(wait=0, warmup=self.warmup, active=self.active, repeat=self.repeat),
            on_trace_ready=self._trace_ready,
            profile_memory=self.memory,
            record_shapes=self.shapes,
            with_stack=self.stack,
        )
        self._prof.start()

    def _trace_ready(self, prof: Any) -> None:
        """A cycle ended: its trace and its top ops. Profiling is for looking, never a reason for
        training to stop: a failure to write is a warning in the rank's log."""
        cycle = self.repeat - self._cycles_left
        self._cycles_left -= 1
        try:
            self._write_cycle(prof, cycle)
        except Exception as exc:  # noqa: BLE001 - a full disk, a store's error
            print(
                f"[orch] warning: the profile was not written: {type(exc).__name__}: {exc}", file=sys.stderr
            )

    def _write_cycle(self, prof: Any, cycle: int) -> None:
        from torch.profiler import tensorboard_trace_handler

        tensorboard_trace_handler(self.local_dir, worker_name=profile_worker_name(self.rank))(prof)
        # A window cut short (training ended inside it) recorded fewer steps than `active`.
        into_cycle = self.steps_seen - self.wait - cycle * (self.warmup + self.active)
        recorded = max(1, min(self.active, into_cycle - self.warmup))
        record = {"rank": self.rank, "attempt_step": self.steps_seen, **top_ops(prof, recorded)}
        print(
            f"[orch] profile of rank {self.rank} ({recorded} steps), top ops by self time:\n"
            + format_top_ops(record),
            file=sys.stderr,
            flush=True,
        )
        with open(os.path.join(self.local_dir, top_ops_name(self.rank)), "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=1)

    def _stop(self) -> None:
        prof, self._prof = self._prof, None
        self.finished = True
        try:
            prof.stop()
            if self.local_dir != self.out_url:
                self._upload()
        except Exception as exc:  # noqa: BLE001 - see _trace_ready
            print(
                f"[orch] warning: the profile was not written: {type(exc).__name__}: {exc}", file=sys.stderr
            )

    def close(self) -> None:
        """At the end of training: a window cut short still writes what it recorded."""
        if self._prof is not None:
            self._stop()

    def _upload(self) -> None:
        """The traces, from the private folder mkdtemp made, into the run directory: only
        regular files of this user's, read without following a link (upload_own_file)."""
        fs, path = url_to_fs(self.out_url)
        for name in os.listdir(self.local_dir):
            upload_own_file(fs, os.path.join(self.local_dir, name), f"{path}/{name}")


def top_ops(prof: Any, steps: int, limit: int = TOP_OPS) -> dict[str, Any]:
    """The ops with the most self time (device time first where there is any) over `steps`."""
    averages = prof.key_averages()
    device_key = "self_device_time_total"
    on_device = any(getattr(a, device_key, 0) for a in averages)
    key = device_key if on_device else "self_cpu_time_total"
    rows = []
    for a in sorted(averages, key=lambda a: getattr(a, key, 0), reverse=True)[:limit]:
        rows.append(
            {
                "name": a.key,
                "calls": int(a.count),
                "self_cpu_us": round(float(a.self_cpu_time_total), 1),
                "cpu_total_us": round(float(a.cpu_time_total), 1),
                "self_device_us": round(float(getattr(a, device_key, 0) or 0), 1),
                "self_cpu_memory_bytes": int(getattr(a, "self_cpu_memory_usage", 0) or 0),
            }
        )
    return {
        "steps": steps,
        "sorted_by": key,
        "total_self_cpu_us": round(sum(float(a.self_cpu_time_total) for a in averages), 1),
        "ops": rows,
    }
