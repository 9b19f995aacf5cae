"""The project installs as a wheel: built from the checkout, installed into a fresh virtualenv
outside it, and used from there, with the Slurm templates inside the installed package.

The fresh venv gets the wheel itself with --no-deps; its dependencies (torch, submitit, ...) come
from the test environment's site-packages through a .pth line, which adds that folder to sys.path
without running its .pth files, so the checkout's editable install stays invisible there."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from ..conftest import REPO

pytestmark = pytest.mark.slow  # builds a wheel and a fresh venv


def _run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    # The venv's own setuptools builds it (no download); the result is a plain wheel.
    proc = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(REPO),
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = next(dist.glob("orchestrator-*.whl"))

    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path).returncode == 0
    python = venv / "bin" / "python"
    site = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path
        ).stdout.strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        tmp_path,
    )
    if "no such option: --python" in proc.stderr:  # pip < 22.3: install into the target's site by prefix
        proc = _run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--prefix", str(venv), str(wheel)],
            tmp_path,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]

    where = _run(
        [
            str(python),
            "-c",
            (
                "import orchestrator, orchestrator.backends.slurm.render as r;"
                " print(orchestrator.__file__); print(r.NODE_SCRIPT)"
            ),
        ],
        tmp_path,
    )
    package_file, node_script = where.stdout.split()
    assert package_file.startswith(str(venv)) and not package_file.startswith(str(REPO)), where.stdout
    assert node_script.startswith(str(venv)) and Path(node_script).is_file()

    orch = venv / "bin" / "orch"
    job = tmp_path / "tiny.py"
    job.write_text(
        "import os\nprint('rank', os.environ['RANK'], 'of', os.environ['WORLD_SIZE'], flush=True)\n"
    )
    (tmp_path / "cluster.yaml").write_text(
        yaml.safe_dump(
            {
                "job": {"script": str(job)},
                "resources": {"nodes": 1, "ranks_per_node": 2},
                "storage": {"root": str(tmp_path / "runs")},
            }
        )
    )
    render = _run([str(orch), "render", "--backend", "slurm"], tmp_path)
    assert render.returncode == 0, render.stderr
    assert "#SBATCH --nodes=1" in render.stdout and f"/bin/bash {node_script} " in render.stdout

    run = _run([str(orch), "run", "--run-id", "fromwheel"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "[rank 1] rank 1 of 2" in run.stdout and "run fromwheel succeeded" in run.stderr
