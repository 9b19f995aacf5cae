"""Shared helpers: write a cluster.yaml for a test, run `orch` as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
JOBS = REPO / "jobs"
TEST_JOBS = Path(__file__).resolve().parent / "jobs"


def write_config(tmp_path: Path, script: str | Path, *, args: list[str] | None = None, **sections: Any) -> Path:
    """A cluster.yaml under tmp_path whose runs go to tmp_path/runs; sections override defaults."""
    data: dict[str, Any] = {
        "backend": "local",
        "job": {"script": str(script), "args": args or []},
        "resources": {"nodes": 1, "ranks_per_node": 2, "cpus_per_rank": 1},
        "storage": {"root": str(tmp_path / "runs"), "checkpoint_interval": 20, "keep": 2},
        "restart": {"max_restarts": 2, "backoff_s": 0.1, "stop_grace_s": 3},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def orch_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", *args]


def run_orch(*args: str, timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(orch_cmd(*args), capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def tmp_runs(tmp_path: Path) -> Path:
    return tmp_path
