"""Run PyTorch training on N nodes x M ranks, locally or on Slurm; supervised and resumable.

The controller (`orch`) lives in this package's top-level modules and never imports torch;
training scripts import `orchestrator.runtime`.
"""

__version__ = "0.1.0"
