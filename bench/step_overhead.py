"""Steady-state DDP step time under the orchestrator runtime vs the same loop as a bare script.

    .venv/bin/python bench/step_overhead.py [--world 2] [--rounds 40] [--segment 20] [--warmup 50]
        [--breakdown | --training]

Both sides train jobs/train_ddp.py's model (SmallConvNet) on its data (SyntheticImages, 4096
samples) with its defaults: batch 32 per rank, AdamW + gradient clipping + cosine LR, and its
loop body (random flips, the GradScaler and autocast that are off on CPU, a loss print on rank 0
every 100 steps). 2 ranks (--world 4: the 4-rank side, where wrap_ddp used to need
find_unused_parameters for exact resume), gloo on CPU, 1 thread each (OMP_NUM_THREADS=1, set_num_threads(1)),
each side a pair of real processes started with the env contract (orchestrator.spec.plan.contract_env,
a leased MASTER_PORT).

- bare: torch DistributedSampler, plain DistributedDataParallel with its default arguments,
  dist.init_process_group; nothing else.
- runtime: runtime.init, ResumableDistributedSampler (+ advance), runtime.wrap_ddp,
  Checkpointer.step_end after every step (heartbeat, stop vote every ~0.2 s), TensorBoard scalars
  every 100 steps (the job's --log-every), Checkpointer.restore at start-up.

Checkpoints are EXCLUDED from both sides: the interval is set beyond the run, so step_end does
all of its per-step work but never saves (the bare script has no checkpoints to compare with).
Their cost at the usual rate (every 50 steps, synchronous) is the `+ckpt/50` row of --breakdown.

Every side's processes start once and stay up; after `--warmup` untimed steps, the sides take
turns running `--segment` steps each, for `--rounds` rounds, the order reversed every other
round (bare, runtime, bare/2, bare/2, runtime, bare, ...); a side that is not running waits on
a pipe and uses no CPU. Short segments in turns cancel the drift of a shared machine. A side's
step time is the median over its segments of (segment wall time / steps), so slow steps
(epoch starts, logging) count. Also shown: the median over rounds of each segment's ratio to
the bare segment of its round, the median single step, and rank 0's time inside the runtime's
own per-step calls. bare/2 is the bare script once more, as a side of its own (an A/A check):
how far it reads from bare is the resolution of the run, on a busy machine several percent.
A second table compares rank 0's CPU time per step (all its threads; a rank waiting in a
collective blocks and uses none): the runtime's added work, much less disturbed by the
machine's scheduling than wall time, with its own A/A check.
--breakdown adds sides that change one part of the runtime, to show where the overhead goes:
+find_unused (wrap_ddp's find_unused_parameters=True, which it uses on more than 2 ranks),
vote/step (a stop vote on every step instead of every ~0.2 s), beat/step (a heartbeat record
written on every step instead of every ~0.1 s), before (all three: the runtime as it was before
they changed), -vote, -heartbeat (no heartbeat file), -tensorboard, +ckpt/50.
--training compares against the runtime itself instead of the bare script: +profile(idle)
(`profile:` configured, its window never reached), +guard (loss and gradient norm passed to the
divergence guard every step) and runtime/2 (the A/A check).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2  # --world
BATCH = 32
LOG_EVERY = 100
NO_CHECKPOINTS = 10**9  # a checkpoint interval beyond any run

# name -> how the worker sets up the runtime side (None: the bare script)
VARIANTS: dict[str, dict[str, Any] | None] = {
    "bare": None,
    "runtime": {},
    # --breakdown: the runtime with one part changed
    "+find_unused": {"find_unused_parameters": True},  # what wrap_ddp does on > 2 ranks
    "vote/step": {"vote_period_s": 0.0},  # a stop vote on every step
    "beat/step": {"heartbeat_every_s": 0.0},  # a heartbeat record written on every step
    "before": {
        "find_unused_parameters": True,
        "vote_period_s": 0.0,
        "heartbeat_every_s": 0.0,
    },  # the runtime before these changes
    "-vote": {"vote": False},
    "-heartbeat": {"heartbeat": False},
    "-tensorboard": {"tensorboard": False},
    "+ckpt/50": {"ckpt_interval": 50},
    # --training: issue 17's per-step features against the runtime as it is, with an A/A side
    # (profile.enabled with its window beyond the run: configured but never active; the
    # divergence guard fed the loss and the gradient norm every step)
    "+profile(idle)": {"profile": True},
    "+guard": {"guard": True},
    "runtime/2": {},
    # an A/A check of the method: bare once more, as a side of its own
    "bare/2": None,
}
MAIN = ("bare", "runtime", "bare/2")
BREAKDOWN = (
    "+find_unused",
    "vote/step",
    "beat/step",
    "before",
    "-vote",
    "-heartbeat",
    "-tensorboard",
    "+ckpt/50",
)
TRAINING = ("runtime", "+profile(idle)", "+guard", "runtime/2")
DONE = "@@done"
READY = "@@ready"


def _load_job() -> Any:
    spec = importlib.util.spec_from_file_location("train_ddp", ROOT / "jobs" / "train_ddp.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------- worker (one rank)


def worker(variant: str, total_steps: int, out_dir: str) -> None:
    """Set up, then run the number of steps each stdin line asks for; rank 0 writes the stamps."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    torch.set_num_threads(1)
    job = _load_job()
    opts = VARIANTS[variant]
    seed, lr, wd, clip = 0, 3e-3, 0.01, 1.0

    if opts is None:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
        device = torch.device("cpu")
    else:
        from orchestrator import runtime

        ctx = runtime.init()
        rank, world, device = ctx.rank, ctx.world_size, ctx.device
    torch.manual_seed(seed)

    data = job.SyntheticImages(4096)
    if opts is None:
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, seed=seed)
    else:
        sampler = runtime.ResumableDistributedSampler(len(data), rank=rank, world_size=world, seed=seed)
    loader = DataLoader(
        data, batch_size=BATCH, sampler=sampler, drop_last=True, generator=torch.Generator().manual_seed(seed)
    )
    model = job.SmallConvNet().to(device)
    if opts is None:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
    else:
        kwargs = (
            {"find_unused_parameters": opts["find_unused_parameters"]}
            if "find_unused_parameters" in opts
            else {}
        )
        ddp = runtime.wrap_ddp(model, ctx, **kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # the job's scaler and autocast: off on CPU
    ckpt = metrics = None
    if opts is not None:
        ckpt = runtime.Checkpointer(
            ctx, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, sampler=sampler
        )
        if not opts.get("vote", True):
            ckpt._vote_group = None  # step_end then checks only this rank's own flag
        if "vote_period_s" in opts:
            ckpt.vote_period_s = opts["vote_period_s"]
        if "heartbeat_every_s" in opts:
            from orchestrator.runtime import heartbeat

            heartbeat.WRITE_EVERY_S = opts["heartbeat_every_s"]
        metrics = runtime.Metrics(ctx) if opts.get("tensorboard", True) else None
        ckpt.restore()

    def batches() -> Any:
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            for images, labels in loader:
                yield epoch, images, labels
            epoch += 1

    stream = batches()
    step = 0
    window_start = time.perf_counter()
    print(READY, flush=True)
    for segment, line in enumerate(sys.stdin):
        stamps = [time.perf_counter()]
        cpu0 = time.process_time()  # every thread of the rank: gloo's and torch's too
        in_runtime: list[float] = []  # per step: seconds inside the runtime's own calls (this thread)
        for _ in range(int(line)):
            epoch, images, labels = next(stream)
            t0 = time.perf_counter()
            hooks = 0.0
            flip = torch.rand(images.shape[0], device=images.device) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=False):
                loss = F.cross_entropy(ddp(images), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if opts is not None:
                h0 = time.perf_counter()
                sampler.advance(images.shape[0])
                hooks += time.perf_counter() - h0
            step += 1
            if step % LOG_EVERY == 0:
                value = loss.item()
                if metrics is not None:
                    h0 = time.perf_counter()
                    rate = LOG_EVERY * BATCH * world / (h0 - window_start)
                    metrics.scalars(
                        step,
                        loss=value,
                        samples_per_s=rate,
                        step_time_s=h0 - t0,
                        lr=scheduler.get_last_lr()[0],
                    )
                    hooks += time.perf_counter() - h0
                if rank == 0:
                    print(f"step {step} epoch {epoch} loss {value:.4f}", flush=True)
                window_start = time.perf_counter()
            if ckpt is not None:
                h0 = time.perf_counter()
                if opts.get("guard"):
                    ckpt.step_end(step, epoch=epoch, loss=loss, grad_norm=grad_norm)
                else:
                    ckpt.step_end(step, epoch=epoch)
                hooks += time.perf_counter() - h0
            stamps.append(time.perf_counter())
            in_runtime.append(hooks)
        if rank == 0:
            saved = ckpt is not None and ckpt.last_saved_step is not None
            cpu = time.process_time() - cpu0
            Path(out_dir, f"segment-{segment:03d}.json").write_text(
                json.dumps({"stamps": stamps, "cpu": cpu, "in_runtime": in_runtime, "saved": saved})
            )
        print(DONE, flush=True)

    if ckpt is not None:
        ckpt.close()
    if metrics is not None:
        metrics.close()
    if opts is None:
        dist.destroy_process_group()
    else:
        runtime.shutdown()


# ---------------------------------------------------------------------- driver


class Side:
    """One variant's pair of rank processes, driven over their stdin."""

    def __init__(self, variant: str, total_steps: int, base: Path) -> None:
        from orchestrator.launch.ports import lease_port
        from orchestrator.spec.plan import contract_env

        self.variant = variant
        self.dir = base / variant.strip("+-").replace("/", "-")
        self.dir.mkdir()
        self.segments = 0
        self.lease = lease_port()
        opts = VARIANTS[variant]
        self.procs: list[subprocess.Popen] = []
        for rank in range(WORLD):
            env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "TORCHELASTIC_"))}
            env.update(
                contract_env(
                    rank=rank,
                    local_rank=rank,
                    node_rank=0,
                    nnodes=1,
                    ranks_per_node=WORLD,
                    master_addr="127.0.0.1",
                    master_port=self.lease.port,
                    attempt=0,
                    run_id=self.dir.name,
                    run_dir=str(self.dir),
                    max_restarts=0,
                )
            )
            env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
            if opts is not None:
                env.update(
                    ORCH_DIST_BACKEND="gloo",
                    ORCH_CKPT_INTERVAL=str(opts.get("ckpt_interval", NO_CHECKPOINTS)),
                    ORCH_CKPT_KEEP="2",
                    ORCH_CKPT_ASYNC="0",
                )
                if opts.get("heartbeat", True):
                    env["ORCH_HEARTBEAT_FILE"] = str(self.dir / f"heartbeat-{rank}")
                if opts.get("profile"):  # the window starts after 10^9 steps: never, here
                    env["ORCH_PROFILE"] = "wait:1000000000,warmup:2,active:5,repeat:1,ranks:,memory:0"
            cmd = [
                sys.executable,
                __file__,
                f"--worker={variant}",
                "--total-steps",
                str(total_steps),
                "--out",
                str(self.dir),
            ]
            stderr = open(self.dir / f"rank-{rank}.err", "w")
            self.procs.append(
                subprocess.Popen(
                    cmd,
                    env=env,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    text=True,
                    cwd=ROOT,
                )
            )
            stderr.close()

    def _expect(self, marker: str) -> None:
        for rank, proc in enumerate(self.procs):
            assert proc.stdout is not None
            while True:
                line = proc.stdout.readline()
                if not line:
                    proc.wait()
                    tail = (self.dir / f"rank-{rank}.err").read_text()[-3000:]
                    raise SystemExit(f"{self.variant}: rank {rank} exited {proc.returncode}:\n{tail}")
                if line.strip() == marker:
                    break

    def ready(self) -> None:
        self._expect(READY)
        self.lease.release()  # rank 0 has bound the port

    def run(self, steps: int) -> dict[str, Any]:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(f"{steps}\n")
            proc.stdin.flush()
        self._expect(DONE)
        result = json.loads((self.dir / f"segment-{self.segments:03d}.json").read_text())
        self.segments += 1
        return result

    def close(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.lease.release()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2, help="ranks per side (one thread each)")
    p.add_argument("--rounds", type=int, default=40, help="timed segments per side, taken in turns")
    p.add_argument("--segment", type=int, default=20, help="steps per timed segment")
    p.add_argument("--warmup", type=int, default=50, help="untimed steps per side before the first segment")
    p.add_argument(
        "--breakdown", action="store_true", help="also run sides that change one part of the runtime"
    )
    p.add_argument(
        "--training",
        action="store_true",
        help="the per-step training features instead: runtime, +profile(idle), +guard, runtime/2 (A/A)",
    )
    p.add_argument(
        "--only", help="comma-separated sides to run (default: bare,runtime,bare/2[, breakdown sides])"
    )
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--total-steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    global WORLD
    WORLD = args.world
    if args.worker:
        worker(args.worker, args.total_steps, args.out)
        return

    import torch

    if args.only:
        variants = tuple(args.only.split(","))
    elif args.training:
        variants = TRAINING
    else:
        variants = MAIN + (BREAKDOWN if args.breakdown else ())
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown side {v!r}; known: {', '.join(VARIANTS)}")
    total = args.warmup + args.rounds * args.segment
    print(
        f"step overhead: torch {torch.__version__}, {os.cpu_count()} cpus, {WORLD} ranks x 1 thread, gloo,"
        f" batch {BATCH}/rank; "
        f"{args.warmup} warm-up steps, then {args.rounds} x {args.segment} timed steps per side in turns;"
        " checkpoints excluded (except +ckpt/50)",
        flush=True,
    )
    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="orch-step-overhead-"))
    sides: list[Side] = []
    per_seg: dict[str, list[float]] = {v: [] for v in variants}  # wall seconds per step, one per segment
    per_step: dict[str, list[float]] = {v: [] for v in variants}  # every timed step's wall seconds
    hooks: dict[str, list[float]] = {v: [] for v in variants}  # every timed step's seconds in runtime calls
    per_cpu: dict[str, list[float]] = {
        v: [] for v in variants
    }  # rank 0's CPU seconds per step, one per segment
    try:
        for v in variants:  # one side at a time: start-ups do not overlap
            sides.append(Side(v, total, base))
            sides[-1].ready()
            sides[-1].run(args.warmup)
        for r in range(args.rounds):
            for side in sides if r % 2 == 0 else sides[::-1]:  # ABBA: no side always goes first
                res = side.run(args.segment)
                wall = res["stamps"]
                per_seg[side.variant].append((wall[-1] - wall[0]) / args.segment)
                per_step[side.variant].extend(b - a for a, b in zip(wall, wall[1:], strict=False))
                per_cpu[side.variant].append(res["cpu"] / args.segment)
                hooks[side.variant].extend(res["in_runtime"])
                if VARIANTS[side.variant] is not None and "ckpt_interval" not in VARIANTS[side.variant]:  # type: ignore[operator]
                    assert not res["saved"], (
                        f"{side.variant}: a checkpoint was saved in a side that excludes them"
                    )
            if (r + 1) % 10 == 0 or r + 1 == args.rounds:
                print(
                    f"  round {r + 1}/{args.rounds}: "
                    + "  ".join(f"{v} {per_seg[v][-1] * 1e3:.2f}" for v in variants)
                    + " ms/step",
                    flush=True,
                )
    finally:
        for side in sides:
            side.close()
        if args.keep:
            print(f"run directories kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)

    med, paired = _against_bare(per_seg)
    print()
    print(
        "| side | step time | segments min..max | median single step | in runtime calls, mean (median)"
        f" | vs {_baseline(per_seg)} | overhead | overhead, paired by round |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for v in variants:
        print(
            f"| {v} | {med[v] * 1e3:.3f} ms | {min(per_seg[v]) * 1e3:.2f}..{max(per_seg[v]) * 1e3:.2f} ms"
            f" | {statistics.median(per_step[v]) * 1e3:.3f} ms | "
            f"{statistics.mean(hooks[v]) * 1e6:.0f} ({statistics.median(hooks[v]) * 1e6:.0f}) us"
            f" | {_vs_bare_cells(v, med, paired)} |"
        )
    print(
        "step time: median over segments of wall time / steps; in runtime calls: rank 0's time per step"
        " inside sampler.advance, "
        "Metrics.scalars and Checkpointer.step_end (the mean counts the rare votes and logs, and the"
        " preemptions that land there); paired: median over rounds of segment / bare segment of the same"
        " round"
    )
    # CPU time: what the runtime adds to a rank's work, whatever else the machine runs. Waiting
    # in a collective blocks (no CPU), so CPU time is far less sensitive to the scheduling noise
    # that limits the wall-time figures on a shared 2-core machine.
    cpu_med, cpu_paired = _against_bare(per_cpu)
    print()
    print(
        f"| side | CPU per step (rank 0) | segments min..max | vs {_baseline(per_cpu)} | overhead"
        " | overhead, paired by round |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for v in variants:
        print(
            f"| {v} | {cpu_med[v] * 1e3:.3f} ms | {min(per_cpu[v]) * 1e3:.2f}..{max(per_cpu[v]) * 1e3:.2f} ms"
            f" | {_vs_bare_cells(v, cpu_med, cpu_paired)} |"
        )
    print("CPU per step: median over segments of rank 0's process CPU time (all its threads) / steps")
    print()
    for label, m, pair in (("CPU: ", cpu_med, cpu_paired), ("wall: ", med, paired)):
        if "bare" in m and "runtime" in m:
            print(label + _verdict(m, pair))
    print(f"({time.monotonic() - started:.0f} s)")


def _baseline(samples: dict[str, Any]) -> str:
    """What the sides are compared with: the bare script, or (--training) the runtime as it is."""
    return "bare" if "bare" in samples else "runtime"


def _against_bare(samples: dict[str, list[float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Each side's median, and the median over rounds of its segment / the baseline's segment of
    the same round (run next to it, so the machine's drift cancels)."""
    med = {v: statistics.median(values) for v, values in samples.items()}
    base = _baseline(samples)
    paired = (
        {
            v: statistics.median(a / b for a, b in zip(values, samples[base], strict=True))
            for v, values in samples.items()
        }
        if base in samples
        else {}
    )
    return med, paired


def _vs_bare_cells(side: str, med: dict[str, float], paired: dict[str, float]) -> str:
    base = _baseline(med)
    if base not in med:
        return "- | - | -"
    ratio = med[side] / med[base]
    return f"{ratio:.3f} | {(ratio - 1) * 100:+.1f}% | {(paired[side] - 1) * 100:+.1f}%"


def _verdict(med: dict[str, float], paired: dict[str, float]) -> str:
    ratio = med["runtime"] / med["bare"]
    text = (
        f"runtime/bare = {ratio:.3f} ({(ratio - 1) * 100:+.1f}%;"
        f" paired {(paired['runtime'] - 1) * 100:+.1f}%):"
        f" {'meets' if ratio <= 1.02 else 'misses'} the goal of <= 2%"
    )
    if "bare/2" in med:
        text += (
            f"; the A/A check bare/2 vs bare reads {(med['bare/2'] / med['bare'] - 1) * 100:+.1f}%"
            f" (paired {(paired['bare/2'] - 1) * 100:+.1f}%), "
            "the resolution of this run"
        )
    return text


if __name__ == "__main__":
    main()
