"""The developer commands the README shows, run as a contributor types them."""

from __future__ import annotations

import subprocess

from ..conftest import REPO


def test_lint_passes_on_the_tree() -> None:
    proc = subprocess.run(["scripts/lint.sh"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_import_graph_prints_the_parts_and_their_edges() -> None:
    proc = subprocess.run(
        ["python3", "scripts/import_graph.py"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    edges = {
        part.strip(): targets for part, targets in (line.split(" -> ") for line in proc.stdout.splitlines())
    }
    assert set(edges) >= {
        "contract",
        "spec",
        "storage",
        "runtime",
        "launch",
        "supervision",
        "backends",
        "cli",
    }
    assert edges["contract"] == "-" and edges["runtime"] == "contract, storage"
    assert "0 problem(s)" in proc.stderr
    modules = subprocess.run(
        ["python3", "scripts/import_graph.py", "--modules"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "orchestrator.runtime.heartbeat -> orchestrator.contract" in modules.stdout
