"""A small training loop under the runtime; in attempt 0, rank HANG_RANK stops making progress
at step HANG_STEP: HANG_HOW=sleep sleeps before the step's collective (the other ranks then
wait inside it), HANG_HOW=stop SIGSTOPs itself, HANG_HOW=stop-saving does so with its heartbeat
in the save phase (whose own allowance, save_timeout_s, is long)."""

import os
import signal
import time

import torch

from orchestrator import runtime
from orchestrator.contract import Phase
from orchestrator.runtime import heartbeat

ctx = runtime.init()
torch.manual_seed(0)
model = torch.nn.Linear(16, 16).to(ctx.device)  # a GPU under NCCL (scripts/gpu-check.sh)
ddp = runtime.wrap_ddp(model, ctx)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
ckpt = runtime.Checkpointer(ctx, model=model, optimizer=opt)
progress = ckpt.restore()
step = progress.step if progress else 0
hang_step, hang_rank = int(os.environ.get("HANG_STEP", "10")), int(os.environ.get("HANG_RANK", "1"))
while step < int(os.environ.get("STEPS", "40")):
    if ctx.attempt == 0 and ctx.rank == hang_rank and step == hang_step:
        if os.environ.get("HANG_HOW", "sleep") == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif os.environ.get("HANG_HOW") == "stop-saving":  # stopped while its heartbeat says save
            heartbeat.beat(step, Phase.SAVE)
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            time.sleep(1000)
    loss = ddp(torch.randn(8, 16).to(ctx.device)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    step += 1
    time.sleep(0.02)
    ckpt.step_end(step)
ckpt.save(step)  # a no-op if step_end saved it; made again if that save was skipped
ckpt.close()
print(f"rank {ctx.rank} done at step {step}", flush=True)
runtime.shutdown()
