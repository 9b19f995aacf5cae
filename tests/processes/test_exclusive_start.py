"""One starter per run (issue 27, point 7): whoever starts or resumes a run holds an exclusive
claim on its directory from before the state check until it stops acting on the run, so two
`orch resume RUN` at once start it once; the other refuses in one line naming the holder."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from orchestrator import api
from orchestrator.contract import ENV_FAULT
from orchestrator.storage.faults import ENV_FAULT_RECORD, read_record

from ..conftest import TEST_JOBS, orch_cmd, read_events, run_orch, wait_for, write_config

pytestmark = pytest.mark.integration


def test_two_resumes_of_one_stopped_run_start_it_once(tmp_path):
    cfg = write_config(
        tmp_path,
        TEST_JOBS / "brief.py",
        args=["--live-s", "30"],
        resources={"nodes": 1, "ranks_per_node": 1, "cpus_per_rank": 1},
        launch={"mode": "subprocess"},
    )
    r = api.run(api.load_config(str(cfg)), run_id="once", wait=False)
    r.cancel()
    assert r.wait(timeout=60).state == "cancelled"
    resume = ("resume", r.url, "--set", "job.args=[--live-s,0]", "--quiet")
    # The first resume is held between its state check and its start...
    record = tmp_path / "fired"
    first = subprocess.Popen(
        orch_cmd(*resume),
        env={**os.environ, ENV_FAULT: "resume.checked:sleep=6", ENV_FAULT_RECORD: str(record)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: read_record(record) or first.poll() is not None, 60, "the first resume held")
    # ...while a second one tries.
    second = run_orch(*resume)
    _, err = first.communicate(timeout=120)
    assert read_record(record) == ["resume.checked@1"]  # the hold fired, once
    assert first.returncode == 0, err
    kinds = [e["event"] for e in read_events(Path(r.url))]
    assert kinds.count("resumed") == 1 and kinds.count("run_started") == 2, kinds  # the run, one resume
    assert second.returncode == 2, second.stderr
    (line,) = second.stderr.strip().splitlines()
    assert f"run once is running (started or supervised by pid {first.pid}" in line, line
