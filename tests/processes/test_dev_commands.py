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


def test_the_fast_inner_loop_leaves_out_the_cluster_and_the_long_jobs() -> None:
    # `scripts/test.sh --fast` as the README shows it, collecting only (running it is the inner
    # loop itself): no Slurm test, no test marked slow, and the quick groups all there.
    proc = subprocess.run(
        ["scripts/test.sh", "--fast", "--collect-only", "-p", "no:cacheprovider"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert ids and not [i for i in ids if i.startswith("tests/slurm/")]
    assert "tests/integration/test_load.py::test_twenty_concurrent_runs_of_eight_ranks" not in ids
    assert any(i.startswith("tests/unit/") for i in ids)
    assert any(i.startswith("tests/integration/test_checkpointer.py::") for i in ids)
    assert "deselected" in proc.stdout
