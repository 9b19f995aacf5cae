"""`orch doctor` as a user types it, on the default cluster.yaml (local backend)."""

from __future__ import annotations

import json

from ..conftest import REPO, run_orch


def test_doctor_on_the_default_job_is_all_ok(tmp_path):
    proc = run_orch("doctor", str(REPO / "cluster.yaml"), "--set", f"storage.root={tmp_path / 'runs'}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert not [line for line in lines if line.startswith("fail")]
    assert lines[-1].endswith(", 0 fail")
    expected = (
        "ok    environment torch:",
        "ok    config      launch: local: world size 2 = 1 node(s) x 2",
        "ok    storage     root writable:",
        "ok    local       MASTER_PORT:",
    )
    for start in expected:
        assert any(line.startswith(start) for line in lines), start
    data = json.loads(
        run_orch("doctor", str(REPO / "cluster.yaml"), "--json", "--set", f"storage.root={tmp_path}").stdout
    )
    assert data["ok"] is True


def test_a_failing_check_exits_1_and_says_the_fix(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = run_orch("doctor", str(REPO / "cluster.yaml"), "--set", f"storage.root={blocker}/runs")
    assert proc.returncode == 1
    fails = [line for line in proc.stdout.splitlines() if line.startswith("fail")]
    assert fails == [f"fail  storage     root writable: {blocker}/runs: Not a directory"], fails
    assert "fix: make" in proc.stdout


def test_probe_is_for_slurm(tmp_path):
    proc = run_orch("doctor", str(REPO / "cluster.yaml"), "--probe")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "--probe: runs a job on Slurm nodes; this config's backend is local (--backend slurm?)"
    )
