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
SLURM_TESTS = "tests/slurm/"


def work_unit(nodeid: str) -> str:
    """The unit of work of a test under `pytest -n 2` (scripts/test.sh): the whole Slurm group is
    one (one test cluster, started once on a fixed port); any other module is one, so its
    module-scoped fixtures (reference runs) are built once."""
    return "slurm" if nodeid.startswith(SLURM_TESTS) else nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The Slurm group first: it is the longest and mostly waits on the scheduler, so one worker
    runs it while the other runs every other module. Then the quick unit modules: xdist queues
    one unit behind the Slurm group before it starts, and that one should be short."""
    first = (SLURM_TESTS, "tests/unit/")
    for item in items:
        if item.nodeid.startswith(SLURM_TESTS):  # a real cluster: never in `scripts/test.sh --fast`
            item.add_marker(pytest.mark.slow)
    # stable: each group keeps its own order
    items.sort(key=lambda item: next((i for i, p in enumerate(first) if item.nodeid.startswith(p)), 2))


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook; without xdist, never called
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    # xdist's own `--dist loadgroup` renames node ids, which pytest 9 no longer allows: a
    # scheduler of work units by scope does the same without renaming.
    from xdist.scheduler import LoadScopeScheduling

    class ByWorkUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return ByWorkUnit(config, log)


def write_config(
    tmp_path: Path, script: str | Path, *, args: list[str] | None = None, **sections: Any
) -> Path:
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


def run_orch(
    *args: str, timeout: float = 240, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        orch_cmd(*args), capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


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


# ---------------------------------------------------------------------------- S3 on loopback


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_BUCKET = "orch-test"


def start_moto(bucket: str) -> tuple[subprocess.Popen, dict[str, str]]:
    """A real S3 API server (moto in server mode) on a free port of 127.0.0.1 with one bucket:
    its process, and the env that points s3fs/botocore at it."""
    import shutil
    import urllib.request

    port = _free_port()
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
    }
    import boto3

    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=bucket)
    return proc, env


@pytest.fixture(scope="session")
def s3_server():
    """The session's S3 API server (start_moto) with the bucket S3_BUCKET.

    Yields the env that points s3fs/botocore at it; the fixture also sets that env in this
    process so s3:// URLs work in-process and in every subprocess a test starts.
    """
    proc, env = start_moto(S3_BUCKET)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
