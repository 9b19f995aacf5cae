"""What training scripts import: process-group start-up, a resumable sampler, checkpoints,
metrics. Everything works under `orch run`, under Slurm, under torchrun, or as a plain
one-process `python train.py`."""

from .accumulation import GradientAccumulation
from .checkpoint import Checkpointer, CheckpointError, Progress, state_digest
from .dist import DistContext, init, shutdown, wrap_ddp
from .divergence import DivergenceError
from .errorfile import install_excepthook, write_error_file
from .metrics import Metrics
from .progress import declare_total_steps
from .sampler import ResumableDistributedSampler

__all__ = [
    "Checkpointer",
    "CheckpointError",
    "DistContext",
    "DivergenceError",
    "GradientAccumulation",
    "Metrics",
    "Progress",
    "ResumableDistributedSampler",
    "declare_total_steps",
    "init",
    "install_excepthook",
    "shutdown",
    "state_digest",
    "write_error_file",
    "wrap_ddp",
]
