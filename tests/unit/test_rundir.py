"""The run directory's log listing, which `orch logs` reads."""

from __future__ import annotations

from pathlib import Path

from orchestrator.storage.rundir import RunDir


def test_log_files_skip_what_is_not_an_attempt_folder(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path / "run"))
    run.create({"run_id": "run"})
    logs = tmp_path / "run" / "logs"
    (logs / "forkserver.log").write_text("fork server ready\n")  # the default launcher's own log
    for attempt in (0, 1):
        folder = Path(run.logs_dir(attempt))
        for name in ("rank-0.log", "rank-1.log", "rank-1.error.json", "rank-1.heartbeat", "node-0.log"):
            (folder / name).write_text("x")
    (logs / "attempt-x").mkdir()
    files = run.log_files()
    assert sorted(files) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert files[(1, 1)] == str(logs / "attempt-1" / "rank-1.log")
    assert sorted(run.log_files(attempt=1)) == [(1, 0), (1, 1)]
