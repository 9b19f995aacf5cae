"""Backends: where ranks run. One folder per backend (local/, slurm/), each exporting `BACKEND`,
an object that satisfies `orchestrator.backends.api.Backend`; adding a backend is adding a
folder. Backends are imported only when used, so `orch --help` stays instant."""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.backends.api import Backend


def backend_names() -> tuple[str, ...]:
    """Every backend folder under orchestrator/backends/, without importing any."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg))


def get_backend(name: str) -> Backend:
    if name not in backend_names():
        raise ValueError(f"unknown backend {name!r} (one of: {', '.join(backend_names())})")
    return importlib.import_module(f"{__name__}.{name}").BACKEND
