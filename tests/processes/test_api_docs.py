"""docs/api.md's notebook session, run as written: its Python blocks, in order, in one
interpreter (as a notebook's cells share one kernel), on a copy of the default job."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from ..conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def doc_blocks() -> list[str]:
    text = (REPO / "docs" / "api.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_api_docs_notebook_runs_as_written(tmp_path):
    blocks = doc_blocks()
    assert len(blocks) == 3
    shutil.copy(REPO / "cluster.yaml", tmp_path / "cluster.yaml")
    shutil.copytree(REPO / "jobs", tmp_path / "jobs", ignore=shutil.ignore_patterns("__pycache__"))
    cells = "\n".join(f"print('--- cell {i}', flush=True)\n{block}" for i, block in enumerate(blocks))
    proc = subprocess.run(
        [sys.executable, "-c", cells], cwd=tmp_path, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    first, second, third = out.split("--- cell ")[1:]
    lines = first.splitlines()
    assert lines[1].startswith("train_ddp-") and lines[1].endswith(" succeeded 60")
    assert re.fullmatch(r"[0-9a-f]{16}", lines[2])
    assert lines[3].startswith("[rank 0] done: 60 steps, model digest")
    lines = second.splitlines()
    assert lines[1].startswith("asked the supervisor of run ") and lines[2:] == ["cancelled", "succeeded"]
    lines = third.splitlines()
    assert all(
        re.fullmatch(r"train_ddp-\S+/\d \{'lr': [0-9.]+\} succeeded [0-9.]+", line) for line in lines[1:4]
    )
    assert lines[4].startswith("best: {'lr': ")
    assert lines[5:] == ["['succeeded', 'succeeded', 'succeeded']", "60"]
    # What the notebook left behind is what the CLI sees.
    ls = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "ls"], cwd=tmp_path, capture_output=True, text=True
    )
    assert ls.returncode == 0 and "sweep of 3 point(s): 3 succeeded" in ls.stdout
