"""Example job: DDP training of a small conv net on a deterministic synthetic image data set.

Copy this file to start your own job. It runs unchanged on CPU (gloo) and on GPUs (NCCL):

    orch run cluster.yaml                 # under the orchestrator (N nodes x M ranks)
    torchrun --nproc-per-node 2 jobs/train_ddp.py --steps 100   # or under torchrun
    python jobs/train_ddp.py --steps 20   # or as one process

What it shows: init from the env contract, a resumable distributed sampler, AdamW with gradient
clipping and a cosine LR schedule, AMP with a GradScaler on GPUs, gradient accumulation
(--grad-accum), torch.compile (--compile), activation checkpointing (--activation-checkpointing),
collective checkpoints every N steps (storage.checkpoint_interval) with exact resume, a
coordinated checkpoint and exit on preemption signals (SIGUSR2, SIGTERM), the divergence guard
(a NaN loss or gradient norm stops the run), TensorBoard scalars from rank 0, and the model
factory `orch export` builds the model with (export_model).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, Dataset

from orchestrator import runtime


class SyntheticImages(Dataset):
    """`size` 3x16x16 images in `classes` classes: a fixed per-class pattern plus noise.

    Generated from `seed` alone (no download), identical on every rank and every run.
    """

    def __init__(self, size: int = 4096, classes: int = 10, seed: int = 1234) -> None:
        gen = torch.Generator().manual_seed(seed)
        templates = torch.randn(classes, 3, 16, 16, generator=gen)
        self.labels = torch.randint(0, classes, (size,), generator=gen)
        noise = torch.randn(size, 3, 16, 16, generator=gen)
        self.images = templates[self.labels] + 1.5 * noise

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


class SmallConvNet(nn.Module):
    def __init__(self, classes: int = 10, activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32, classes)
        # Recompute each block's activations in the backward instead of keeping them: less
        # memory for more compute; the same parameters, so checkpoints do not change.
        self.activation_checkpointing = activation_checkpointing

    def _block1(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.conv1(x)), 2)

    def _block2(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in (self._block1, self._block2):
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        # Global average pooling as a mean: adaptive_avg_pool2d's CUDA backward has no
        # deterministic kernel, so job.deterministic would refuse it on GPUs.
        return self.head(x.mean(dim=(2, 3)))


def export_model(args: list[str]) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """`orch export`'s model factory (job.model_factory in cluster.yaml): the architecture this
    job trains, freshly built, and an example batch it accepts. `args` are job.args."""
    del args  # the architecture does not depend on them
    example = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return SmallConvNet(), (example,)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400, help="total optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="samples per rank per micro-batch")
    p.add_argument(
        "--grad-accum",
        type=int,
        default=1,
        metavar="K",
        help="micro-batches per optimizer step (the global batch is K x batch size x world size)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute activations in the backward instead of storing them (less memory)",
    )
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--dataset-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument(
        "--amp", choices=("auto", "on", "off"), default="auto", help="mixed precision (auto: on with CUDA)"
    )
    p.add_argument(
        "--step-sleep",
        type=float,
        default=0.0,
        help="seconds to sleep per step (tests use it to slow a run down)",
    )
    args = p.parse_args()
    if args.grad_accum < 1:
        p.error("--grad-accum must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    ctx = runtime.init()
    runtime.declare_total_steps(args.steps)  # `orch status` shows an ETA
    torch.manual_seed(args.seed)  # same initial weights on every rank

    data = SyntheticImages(args.dataset_size)
    sampler = runtime.ResumableDistributedSampler(
        len(data), rank=ctx.rank, world_size=ctx.world_size, seed=args.seed
    )
    # A private generator: otherwise every new DataLoader iterator draws its base seed from the
    # global torch RNG, and a run resumed mid-epoch would draw once more than an uninterrupted one.
    loader = DataLoader(
        data,
        batch_size=args.batch_size,
        sampler=sampler,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )

    model = SmallConvNet(activation_checkpointing=args.activation_checkpointing).to(ctx.device)
    # DDP whose resumed runs reduce in the uninterrupted run's bucket layout (see wrap_ddp).
    ddp = runtime.wrap_ddp(model, ctx)
    # Compile the DDP module (DDP's own hooks stay in charge of the all-reduce); `model` stays
    # the plain module, so checkpoints keep their names and load without torch.compile.
    forward = torch.compile(ddp) if args.compile else ddp
    # k micro-batches per optimizer step; DDP all-reduces only in the last one's backward.
    accum = runtime.GradientAccumulation(ddp, steps=args.grad_accum)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, args.steps))
    use_amp = args.amp == "on" or (args.amp == "auto" and ctx.device.type == "cuda")
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=use_amp and ctx.device.type == "cuda")
    amp_dtype = torch.float16 if ctx.device.type == "cuda" else torch.bfloat16

    ckpt = runtime.Checkpointer(
        ctx,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        sampler=sampler,
        accumulation=accum,  # saves and preemption stops only between optimizer steps
    )
    metrics = runtime.Metrics(ctx)
    progress = ckpt.restore()
    step = progress.step if progress else 0
    epoch = progress.epoch if progress else 0
    if ctx.is_main:
        where = f"resumed from step {step}" if progress else "fresh start"
        print(
            f"world {ctx.world_size} ({ctx.nnodes} node(s)), backend {ctx.backend},"
            f" attempt {ctx.attempt}: {where}",
            flush=True,
        )

    window_start, window_samples = time.perf_counter(), 0
    step_loss = torch.zeros((), device=ctx.device)  # the mean loss of the step's micro-batches
    t0 = time.perf_counter()
    while step < args.steps:
        sampler.set_epoch(epoch)
        for images, labels in loader:
            images, labels = (
                images.to(ctx.device, non_blocking=True),
                labels.to(ctx.device, non_blocking=True),
            )
            # Random horizontal flips draw from the torch RNG, whose state the checkpoint keeps.
            flip = torch.rand(images.shape[0], device=images.device) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            with accum.micro_step():
                with torch.autocast(ctx.device.type, dtype=amp_dtype, enabled=use_amp):
                    loss = F.cross_entropy(forward(images), labels) / accum.steps
                scaler.scale(loss).backward()
            step_loss += loss.detach()
            sampler.advance(images.shape[0])
            window_samples += images.shape[0] * ctx.world_size
            if not accum.boundary:
                continue  # more micro-batches before this optimizer step
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss, step_loss = step_loss, torch.zeros((), device=ctx.device)
            step += 1
            if args.step_sleep:
                time.sleep(args.step_sleep)
            if step % args.log_every == 0 or step == args.steps:
                elapsed = time.perf_counter() - window_start
                rate = window_samples / elapsed if elapsed > 0 else math.nan
                lr = scheduler.get_last_lr()[0]
                # The norm before clipping (unscaled): the first sign of exploding gradients.
                norm = grad_norm.item()
                metrics.scalars(
                    step,
                    loss=loss.item(),
                    grad_norm=norm,
                    samples_per_s=rate,
                    step_time_s=time.perf_counter() - t0,
                    lr=lr,
                )
                if ctx.is_main:
                    print(
                        f"step {step}/{args.steps} epoch {epoch} loss {loss.item():.4f} grad norm {norm:.4f}"
                        f" lr {lr:.2e} {rate:,.0f} samples/s",
                        flush=True,
                    )
                window_start, window_samples = time.perf_counter(), 0
            # Saves every storage.checkpoint_interval steps; on a preemption signal (any rank)
            # every rank saves this step and exits 75, and the run resumes from here. The loss and
            # gradient norm go to the divergence guard: a NaN or inf on any rank stops the run
            # (DivergenceError) before it is trained on further or saved, without a GPU sync.
            # With fp16 and a GradScaler an inf gradient norm is routine (the scaler skips that
            # step and lowers its scale): then only the loss is checked.
            ckpt.step_end(step, epoch=epoch, loss=loss, grad_norm=None if scaler.is_enabled() else grad_norm)
            t0 = time.perf_counter()
            if step >= args.steps:
                break
        else:
            epoch += 1
            continue
        break

    # The final state, so runs compare by their newest checkpoint. Unconditional: saving the
    # step just saved is a no-op, and a save of it that was skipped (torn) is made again.
    ckpt.save(step, epoch=epoch)
    ckpt.close()
    metrics.close()
    if ctx.is_main:
        digest = runtime.state_digest(model.state_dict())
        print(f"done: {step} steps, model digest {digest[:16]}", flush=True)
    runtime.shutdown()


if __name__ == "__main__":
    main()
