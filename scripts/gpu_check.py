"""The GPU check (scripts/gpu-check.sh runs this): the example job on this host's GPUs with NCCL,
under the faults a cluster gives it, and one table of what held.

Runs, each an `orch run` of jobs/train_ddp.py (1 rank on one GPU; 2 ranks on 2 GPUs or more;
fp16 AMP with a GradScaler; job.deterministic on):
  reference    uninterrupted: its final model digest is what the others must reach
  amp          the reference's checkpoint holds the GradScaler's state (fp16 AMP ran with it)
  preemption   SIGUSR2 to `orch run` mid-run: every rank checkpoints and exits 75, a new attempt
               resumes; the final digest equals the reference's
  rank kill    SIGKILL of rank 0 mid-run: the attempt fails, the next resumes from the newest
               checkpoint; the final digest equals the reference's
  hang         a rank stops making progress: the watchdog dumps its stacks and NCCL's flight
               recorder into its log folder, `orch status` names the dump, a restart finishes
  speed        step time and samples/s of the reference, and of the same run without
               job.deterministic (the switch's cost)
Prints the table and exits 1 if any check failed. `--cpu` runs the same on CPU with gloo (no
AMP): how the check itself is tested on machines without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
JOB = REPO / "jobs" / "train_ddp.py"
HANG_JOB = REPO / "tests" / "jobs" / "hang.py"
RATE = re.compile(r"step (\d+)/\d+ .* ([\d,.]+) samples/s")


@dataclass
class Row:
    check: str
    held: bool | None  # None: not run here
    detail: str


class Check:
    def __init__(self, work: Path, *, cpu: bool, ranks: int, steps: int) -> None:
        self.work, self.cpu, self.ranks, self.steps = work, cpu, ranks, steps
        self.rows: list[Row] = []

    # ------------------------------------------------------------------ plumbing

    def config(self, name: str, *, script: Path = JOB, args: list[str] | None = None, **over: Any) -> Path:
        data: dict[str, Any] = {
            "backend": "local",
            "job": {
                "script": str(script),
                "args": args
                if args is not None
                else ["--steps", str(self.steps), "--log-every", "100", "--amp", "off" if self.cpu else "on"],
                "deterministic": True,
                "env": {},
            },
            "resources": {
                "nodes": 1,
                "ranks_per_node": self.ranks,
                "cpus_per_rank": 1 if self.cpu else 4,
                "gpus_per_node": 0 if self.cpu else self.ranks,
            },
            "distributed": {"backend": "gloo" if self.cpu else "nccl"},
            "storage": {"root": str(self.work / "runs"), "checkpoint_interval": 100, "keep": 2},
            "restart": {"max_restarts": 3, "backoff_s": 0.2, "stop_grace_s": 10},
        }
        for key, value in over.items():
            data.setdefault(key, {}).update(value)
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def orch(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
        )

    def start(self, cfg: Path, run_id: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "run", str(cfg), "--run-id", run_id, "--quiet"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
        )

    def events(self, run_id: str) -> list[dict[str, Any]]:
        path = self.work / "runs" / run_id / "events.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line being written
        return out

    def wait_for(self, run_id: str, event: str, *, step: int = 0, timeout: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events(run_id):
                if e.get("event") == event and int(e.get("step") or 0) >= step:
                    return e
            time.sleep(0.1)
        raise TimeoutError(f"{run_id}: no {event} (step >= {step}) within {timeout:.0f}s")

    def status(self, run_id: str) -> dict[str, Any]:
        out = self.orch("status", run_id, "--config", str(self.work / "reference.yaml"), "--json")
        return json.loads(out.stdout)

    def finish(self, proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str]:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output

    def rate(self, run_id: str) -> float | None:
        """Rank 0's samples/s over its last logged window (all ranks' samples)."""
        log = self.work / "runs" / run_id / "logs" / "attempt-0" / "rank-0.log"
        rates = [float(m.group(2).replace(",", "")) for m in RATE.finditer(log.read_text())]
        return rates[-1] if rates else None

    def add(self, check: str, held: bool | None, detail: str) -> None:
        self.rows.append(Row(check, held, detail))
        mark = {True: "ok", False: "FAILED", None: "not run"}[held]
        print(f"[gpu-check] {check}: {mark} - {detail}", flush=True)

    # ------------------------------------------------------------------ checks

    def reference(self) -> str | None:
        cfg = self.config("reference")
        t0 = time.monotonic()
        proc = self.orch("run", str(cfg), "--run-id", "reference", "--quiet")
        wall = time.monotonic() - t0
        st = self.status("reference")
        digest = st.get("newest_checkpoint_digest")
        log = (self.work / "runs" / "reference" / "logs" / "attempt-0" / "rank-0.log").read_text()
        backend = re.search(r"backend (\w+)", log)
        ok = proc.returncode == 0 and st["state"] == "succeeded" and digest is not None
        ok = ok and backend is not None and backend.group(1) == ("gloo" if self.cpu else "nccl")
        self.add(
            "reference",
            ok,
            f"{self.steps} steps on {self.ranks} rank(s), backend {backend.group(1) if backend else '?'},"
            f" {wall:.1f}s, digest {str(digest)[:16]}" + ("" if ok else f"; {proc.stderr[-600:]}"),
        )
        self.amp_state()
        return digest if ok else None

    def amp_state(self) -> None:
        if self.cpu:
            self.add("fp16 AMP + GradScaler", None, "CPU mode: no AMP")
            return
        sys.path.insert(0, str(REPO))
        import torch

        from orchestrator.storage.ckpt_store import CheckpointStore

        store = CheckpointStore(str(self.work / "runs" / "reference" / "ckpt"))
        step = store.committed_steps()[0]
        info = store.verify(step, keep=["state.pt"])
        import io

        state = torch.load(io.BytesIO(info.data["state.pt"]), weights_only=True, map_location="cpu")
        scaler = state.get("scaler") or {}
        ok = "scale" in scaler and float(scaler["scale"]) > 0
        self.add("fp16 AMP + GradScaler", ok, f"scaler state in the checkpoint: {scaler}")

    def preemption(self, digest: str) -> None:
        cfg = self.config("preempt", job={"args": self._slow_args()})
        proc = self.start(cfg, "preempt")
        try:
            self.wait_for("preempt", "checkpoint_committed", step=100)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGUSR2)  # a preemption drill: checkpoint, exit 75, resume
            code, output = self.finish(proc)
        finally:
            proc.kill()
        events = self.events("preempt")
        preempted = [
            e for e in events if e.get("event") == "attempt_ended" and e.get("status") == "preempted"
        ]
        resumed = [e for e in events if e.get("event") == "restored" and e.get("step") is not None]
        final = self.status("preempt").get("newest_checkpoint_digest")
        ok = code == 0 and bool(preempted) and bool(resumed) and final == digest
        where = resumed[0].get("step") if resumed else None
        self.add(
            "SIGUSR2 preemption + resume",
            ok,
            f"checkpointed and resumed at step {where},"
            f" final digest {'=' if final == digest else '!='} reference"
            + (f" (signal to the run's end {time.monotonic() - t0:.1f}s)" if ok else f"; {output[-600:]}"),
        )

    def rank_kill(self, digest: str) -> None:
        cfg = self.config("kill", job={"args": self._slow_args()})
        proc = self.start(cfg, "kill")
        try:
            started = self.wait_for("kill", "attempt_started")
            self.wait_for("kill", "checkpoint_committed", step=100)
            os.kill(started["pids"][0], signal.SIGKILL)
            code, output = self.finish(proc)
        finally:
            proc.kill()
        events = self.events("kill")
        ended = [e for e in events if e.get("event") == "attempt_ended"]
        failed = ended and ended[0].get("status") == "failed"
        final = self.status("kill").get("newest_checkpoint_digest")
        ok = code == 0 and bool(failed) and len(ended) >= 2 and final == digest
        cause = (ended[0].get("root_cause") or {}).get("class") if ended else None
        resumed = [
            e.get("step") for e in events if e.get("event") == "restored" and e.get("step") is not None
        ]
        self.add(
            "rank SIGKILL + restart",
            ok,
            f"attempt 0 failed ({cause}), resumed at step {resumed[0] if resumed else None},"
            f" {len(ended)} attempts, final digest"
            f" {'=' if final == digest else '!='} reference" + ("" if ok else f"; {output[-600:]}"),
        )

    def hang(self) -> None:
        cfg = self.config(
            "hang",
            script=HANG_JOB,
            args=[],
            job={
                "env": {
                    "HANG_HOW": "sleep",
                    "HANG_STEP": "10",
                    "HANG_RANK": "0",
                    # NCCL ranks record by default; gloo (--cpu) records when asked
                    **({"TORCH_FR_BUFFER_SIZE": "2000"} if self.cpu else {}),
                },
                "deterministic": False,
            },
            storage={"checkpoint_interval": 5},
            watchdog={"hang_timeout_s": 5},
        )
        proc = self.orch("run", str(cfg), "--run-id", "hang", "--quiet")
        dumps = self.status("hang").get("flight_recorder_dumps") or []
        entries: list[Any] = []
        for path in dumps:
            entries += pickle.loads(Path(path).read_bytes()).get("entries", [])
        hangs = [e for e in self.events("hang") if e.get("event") == "hang_detected"]
        names = sorted({str(e.get("profiling_name")) for e in entries})
        ok = proc.returncode == 0 and bool(hangs) and bool(dumps) and bool(entries)
        self.add(
            "hang -> stacks + flight recorder",
            ok,
            f"{len(dumps)} dump(s), {len(entries)} collective(s) recorded ({', '.join(names[:3])})"
            + ("" if ok else f"; {proc.stderr[-600:]}"),
        )

    def speed(self) -> None:
        det = self.rate("reference")
        cfg = self.config("fast", job={"deterministic": False})
        proc = self.orch("run", str(cfg), "--run-id", "fast", "--quiet")
        fast = self.rate("fast") if proc.returncode == 0 else None
        batch = 32 * self.ranks
        if det and fast:
            self.add(
                "speed",
                True,
                f"deterministic: {1000 * batch / det:.2f} ms/step, {det:,.0f} samples/s;"
                f" without: {1000 * batch / fast:.2f} ms/step, {fast:,.0f} samples/s"
                f" (deterministic / without = {fast / det:.2f}x the step time)",
            )
        else:
            self.add("speed", False, f"no rate logged; {proc.stderr[-400:]}")

    def _slow_args(self) -> list[str]:
        # Slowed down so a signal lands mid-run; sleeping changes no arithmetic.
        return [
            "--steps",
            str(self.steps),
            "--log-every",
            "100",
            "--amp",
            "off" if self.cpu else "on",
            "--step-sleep",
            "0.01",
        ]

    def table(self) -> str:
        width = max(len(r.check) for r in self.rows)
        lines = [f"{'check'.ljust(width)}  held     detail", f"{'-' * width}  -------  ------"]
        for r in self.rows:
            mark = {True: "yes", False: "NO", None: "not run"}[r.held]
            lines.append(f"{r.check.ljust(width)}  {mark:<7}  {r.detail}")
        return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run the checks on CPU with gloo (testing)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--report", help="also write the table (and the reference's rank-0 log) here")
    args = parser.parse_args()
    import torch

    gpus = 0 if args.cpu else torch.cuda.device_count()
    if not args.cpu and gpus == 0:
        print("gpu-check: torch sees no GPU (torch.cuda.device_count() is 0)", file=sys.stderr)
        return 2
    ranks = 2 if args.cpu or gpus >= 2 else 1
    work = Path(tempfile.mkdtemp(prefix="orch-gpu-check-"))
    name = "CPU (gloo)" if args.cpu else f"{gpus} x {torch.cuda.get_device_name(0)}"
    print(
        f"[gpu-check] {name}, torch {torch.__version__}, CUDA {torch.version.cuda},"
        f" NCCL {'.'.join(map(str, torch.cuda.nccl.version())) if not args.cpu else '-'};"
        f" {ranks} rank(s); work folder {work}",
        flush=True,
    )
    check = Check(work, cpu=args.cpu, ranks=ranks, steps=args.steps)
    t0 = time.monotonic()
    try:
        digest = check.reference()
        if digest is not None:
            check.preemption(digest)
            check.rank_kill(digest)
        check.hang()
        check.speed()
    except Exception as exc:  # noqa: BLE001 - the table says what ran before the failure
        check.add("driver", False, f"{type(exc).__name__}: {exc}")
    text = f"{check.table()}\n(total {time.monotonic() - t0:.0f}s)"
    print(text, flush=True)
    if args.report:
        os.makedirs(args.report, exist_ok=True)
        Path(args.report, "gpu-check.txt").write_text(text + "\n")
        for run_id in ("reference", "hang"):
            log = work / "runs" / run_id / "logs" / "attempt-0" / "rank-0.log"
            if log.exists():
                shutil.copy(log, Path(args.report, f"{run_id}-rank-0.log"))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.held is not False for r in check.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
