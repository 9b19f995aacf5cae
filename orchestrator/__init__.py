"""Run PyTorch training on N nodes x M ranks, locally or on Slurm; supervised and resumable.

The controller (`orch`) lives in this package's top-level modules and never imports torch;
training scripts import `orchestrator.runtime`.
"""

__version__ = "0.1.0"

# The Python API (orchestrator.api), imported on first use: ranks import this package for
# orchestrator.runtime, and `orch --help` must stay instant.
_API = (
    "load_config",
    "load_sweep",
    "run",
    "submit",
    "sweep",
    "doctor",
    "get_run",
    "list_runs",
    "Run",
    "Sweep",
)
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> object:
    if name in _API:
        from orchestrator import api

        return getattr(api, name)
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
