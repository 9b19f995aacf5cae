"""A Lightning Fabric training script as its users write it: nothing of the orchestrator in it.
Fabric finds out how it was launched from the environment (torchrun's variables)."""

import json
import os

import lightning as L
import torch

fabric = L.Fabric(accelerator="cpu", strategy="ddp", devices=2, num_nodes=2)
fabric.launch()
fabric.seed_everything(0)
model = torch.nn.Linear(8, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
model, optimizer = fabric.setup(model, optimizer)
for _ in range(5):
    x = torch.randn(16, 8)
    loss = model(x).pow(2).mean()
    optimizer.zero_grad()
    fabric.backward(loss)
    optimizer.step()
total = fabric.all_reduce(torch.tensor(float(fabric.global_rank + 1)), reduce_op="sum")
report = {
    "global_rank": fabric.global_rank,
    "local_rank": fabric.local_rank,
    "node_rank": fabric.node_rank,
    "world_size": fabric.world_size,
    "environment": type(fabric.strategy.cluster_environment).__name__,
    "all_reduce": total.item(),
    "weight": model.weight.detach().sum().item(),
}
out = os.environ.get("FABRIC_REPORT_DIR", ".")
with open(os.path.join(out, f"fabric-{fabric.global_rank}.json"), "w") as fh:
    json.dump(report, fh)
print("fabric rank", fabric.global_rank, "of", fabric.world_size, flush=True)
