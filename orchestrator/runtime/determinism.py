"""One switch for bitwise-reproducible training (job.deterministic, or init(deterministic=True)).

Exact resume does not need it on CPU, where torch's kernels are deterministic already. On GPUs
several kernels are not (atomics in cuDNN's convolution backward, index_add, scatter, cuBLAS
with a workspace that splits reductions differently run to run), so a resumed run can differ
from an uninterrupted one in the last bits even when every state was restored. This turns them
all to their deterministic versions, and makes an op without one raise instead of silently
differing. The cost is speed: measured by scripts/gpu-check.sh (docs/runtime.md has the figure).
"""

from __future__ import annotations

import os

# cuBLAS reproducibility needs a fixed workspace configuration, set before cuBLAS starts.
CUBLAS_WORKSPACE = ("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def make_deterministic() -> None:
    """Call before any CUDA work (init() does)."""
    import torch

    os.environ.setdefault(*CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False  # autotuning may pick a different algorithm per run
