"""One starter per run (issue 27, point 7): whoever starts or resumes a run holds an exclusive
claim on its directory from before the state check until it stops acting on the run, so two
`orch resume RUN` at once start it once; the other refuses in one line naming the holder."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from orchestrator import api
from orchestrator.contract import ENV_FAULT
from orchestrator.errors import UsageError
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


# A stand-in sbatch: the first call (the sweep's job array) says it entered, then waits for the
# test's word before it answers; any later call (a point submitted on its own) answers at once.
SBATCH = """\
import os, sys, time
gate = os.environ["STUB_GATE"]
try:
    os.close(os.open(gate + ".entered", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
except FileExistsError:
    print("Submitted batch job 777")
    sys.exit(0)
while not os.path.exists(gate + ".open"):
    time.sleep(0.02)
print("Submitted batch job 4242")
"""


def slurm_stand_ins(tmp_path: Path, monkeypatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch.py").write_text(SBATCH)
    tools = {"sbatch": f'exec "{sys.executable}" "{bin_dir / "sbatch.py"}" "$@"', "scancel": "exit 0"}
    tools.update({name: "exit 1" for name in ("sacct", "squeue", "scontrol")})  # knows nothing
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    gate = tmp_path / "sbatch"
    monkeypatch.setenv("STUB_GATE", str(gate))
    return gate


@pytest.mark.parametrize("verb", ["sweep", "resume"])
def test_a_slurm_sweep_point_cannot_be_resumed_alone_while_its_array_is_submitted(
    tmp_path, monkeypatch, verb
):
    """Issue 27, second review, point 6: `orch sweep` (or `orch resume SWEEP`) on Slurm holds
    every point's claim until the array's `submitted` is in each point's ledger, so an
    `orch resume SWEEP/N` meanwhile is refused instead of submitting point N a second time."""
    cfg = write_config(
        tmp_path,
        TEST_JOBS / "brief.py",
        args=["--live-s", "{s}"],
        backend="slurm",
        resources={"nodes": 1, "ranks_per_node": 1, "cpus_per_rank": 1},
        sweep={"grid": {"s": [0, 1]}},
    )
    gate = slurm_stand_ins(tmp_path, monkeypatch)
    spec = api.load_sweep(str(cfg))
    if verb == "resume":
        handle = api.create_sweep(spec, sweep_id="arr")  # every point `created`, none submitted
        start = handle.resume
    else:
        start = lambda: api.sweep(spec, sweep_id="arr", check=False)  # noqa: E731
    outcome: list[object] = []
    submitter = threading.Thread(target=lambda: outcome.append(start()), daemon=True)
    submitter.start()
    try:
        # The array's sbatch is running: point 1 is `created` in its ledger, not yet submitted.
        wait_for(lambda: Path(f"{gate}.entered").exists(), 60, "the array's sbatch entered")
        point = api.get_run("arr/1", storage_root=str(tmp_path / "runs"))
        with pytest.raises(UsageError) as refused:
            point.resume(wait=False)
    finally:
        Path(f"{gate}.open").touch()
        submitter.join(timeout=60)
    assert len(outcome) == 1, "the sweep was submitted"
    (line,) = str(refused.value).splitlines()
    assert "run arr/1 is running (started or supervised by pid" in line, line
    kinds = [e["event"] for e in read_events(tmp_path / "runs" / "arr" / "1")]
    assert kinds.count("submitted") == 1, kinds  # by the array alone
