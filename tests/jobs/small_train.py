"""A small DDP training loop for load tests: a 16x16 linear model, data drawn from a generator
seeded by (step, rank), plain SGD written out (torch.optim would import torch._dynamo in every
rank), and the model digest on rank 0 at the end. Light enough for 160 ranks on 2 cores."""

import sys

import torch

from orchestrator import runtime

STEPS = int(sys.argv[sys.argv.index("--steps") + 1]) if "--steps" in sys.argv else 10

ctx = runtime.init()
torch.manual_seed(0)
model = torch.nn.Linear(16, 16)
ddp = runtime.wrap_ddp(model, ctx)
for step in range(STEPS):
    data = torch.randn(8, 16, generator=torch.Generator().manual_seed(step * 1000 + ctx.rank))
    loss = ddp(data).pow(2).mean()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
            p.grad = None
if ctx.rank == 0:
    print(f"done: {STEPS} steps, model digest {runtime.state_digest(model.state_dict())[:16]}", flush=True)
