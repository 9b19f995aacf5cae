"""A sweep on this machine: its points run as separate supervised runs, up to max_parallel at
once, each an `orch resume POINT_DIR` process of its own (its own port lease, fork server,
restarts and checkpoints: a point is a whole run). The terminal's Ctrl-C reaches only this
runner, which asks every running point to stop (SIGTERM: a checkpoint first, as `orch cancel`)
and starts no more; `orch resume SWEEP` continues the points that did not succeed.

The process that runs this runner holds the sweep's claim for the runner's life (api.py), so a
second `orch resume SWEEP` is refused while points wait in this queue; each point's own
`orch resume` takes the point's claim before it starts it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import IO, Any

from orchestrator.contract import Event
from orchestrator.launch.detached import console_log, start_detached
from orchestrator.storage.rundir import RunDir, this_host
from orchestrator.storage.runid import point_index_of_path
from orchestrator.storage.sweepdir import SweepDir
from orchestrator.supervision.status import summarize

from .liveness import process_start_time, supervisor_alive

POLL_S = 0.2


def available_cores() -> int:
    return len(os.sched_getaffinity(0))


def default_max_parallel(configs: Sequence[Any], cores: int, gpus: int) -> int:
    """As many points as the cores hold (each point's ranks x cpus_per_rank), and the GPUs
    (each point's nodes x gpus_per_node), at least one. Pure."""
    per_point = max(c.resources.world_size * c.resources.cpus_per_rank for c in configs)
    fits = cores // per_point
    gpus_per_point = max(c.resources.nodes * c.resources.gpus_per_node for c in configs)
    if gpus_per_point:
        fits = min(fits, gpus // gpus_per_point)
    return max(1, fits)


class SweepRunner:
    def __init__(
        self, sweep: SweepDir, points: Sequence[RunDir], max_parallel: int, console: IO[str]
    ) -> None:
        self.sweep, self.points, self.max_parallel, self.console = sweep, list(points), max_parallel, console
        self.running: dict[int, tuple[RunDir, subprocess.Popen, float]] = {}
        self.stop_signal: int | None = None  # set by the signal handler; acted on by the loop
        self.told: set[int] = set()  # points already asked to stop

    def request_stop(self, signum: int) -> None:
        """Ctrl-C (SIGINT): the points stop; `orch cancel SWEEP` (SIGTERM): they are cancelled.
        Only a flag: the loop, which also starts points, asks each one (none can slip by)."""
        if self.stop_signal is None:
            self.stop_signal = signum

    def _say(self, text: str) -> None:
        print(f"[orch] sweep {self.sweep.sweep_id}: {text}", file=self.console, flush=True)

    def _tell_running_to_stop(self) -> None:
        untold = [i for i in self.running if i not in self.told]
        if not untold:
            return
        if not self.told:
            self._say(f"stopping: asking {len(self.running)} running point(s) to checkpoint and stop")
        for index in untold:
            run, proc, _ = self.running[index]
            self.told.add(index)
            if proc.poll() is not None:
                continue
            if self.stop_signal == signal.SIGTERM:  # a cancel, as `orch cancel POINT` records it
                run.append_event(Event.CANCEL_REQUESTED, pid=proc.pid, by="sweep")
            proc.send_signal(signal.SIGTERM)

    def run(self) -> dict[int, str]:
        """Every point to its end (or until stopped); point index -> final state."""
        queue = list(self.points)
        outcome: dict[int, str] = {}
        total = len(queue)
        self.sweep.append_event(
            Event.SWEEP_STARTED,
            backend="local",
            host=this_host(),
            pid=os.getpid(),
            pid_started=process_start_time(os.getpid()),
            points=[point_index_of_path(p.url) for p in queue],
            max_parallel=self.max_parallel,
        )
        try:
            self._say(f"{total} point(s), up to {self.max_parallel} at once")
            while queue or self.running:
                while queue and self.stop_signal is None and len(self.running) < self.max_parallel:
                    run = queue.pop(0)
                    console = console_log(run.url, run.run_id)
                    proc = start_detached(["resume", run.url, "--quiet"], console)
                    self.running[point_index_of_path(run.url)] = (run, proc, time.monotonic())
                    self._say(f"point {run.run_id} started (pid {proc.pid}; its console: {console})")
                if self.stop_signal is not None:
                    self._tell_running_to_stop()
                for index, (run, proc, started) in list(self.running.items()):
                    if proc.poll() is None:
                        continue
                    del self.running[index]
                    outcome[index] = self._final_state(run, proc)
                    self._say(
                        f"point {run.run_id} {outcome[index]} after {time.monotonic() - started:.1f}s"
                        f" ({len(outcome)}/{total} done, {len(self.running)} running)"
                    )
                if self.stop_signal is not None and not self.running:
                    break
                time.sleep(POLL_S)
        finally:
            for run in queue:
                outcome[point_index_of_path(run.url)] = (
                    "created"  # never started: `orch resume SWEEP` starts it
                )
            self.sweep.append_event(
                Event.SWEEP_FINISHED, outcome={str(k): v for k, v in sorted(outcome.items())}
            )
        return outcome

    @staticmethod
    def _final_state(run: RunDir, proc: subprocess.Popen) -> str:
        """The point's state once its `orch resume` has exited: `lost` if the supervisor it
        recorded died before recording an end (this one, killed); `running` if another process
        supervises it (a point resumed on its own holds its claim, and this one was refused);
        `created` if it never started (stopped before it could)."""
        events = run.events()
        starts = [e for e in events if e.get("event") == Event.RUN_STARTED]
        alive = supervisor_alive(starts[-1]) if starts and starts[-1].get("host") == this_host() else None
        return summarize(events, supervisor_alive=alive)["state"]
