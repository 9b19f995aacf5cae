"""What a run directory says is checked before `orch cancel` or `orch status` acts on it (issue 28,
point 4). A run directory may be written by others: a shared folder, or a team's object store,
which has no POSIX permissions. A second Unix user crafts the records there; the victim (this
process, root) runs `orch cancel` on them. A recorded pid is signalled only if it is the run's
supervisor (its start time, and the run directory's claim held by it); a recorded Slurm job id
reaches Slurm's commands only in Slurm's own form, and after `--`.

Each test checks its attack was in place: the files are the attacker's, the forged start time is
the victim process's real one, and the stand-in Slurm commands do record what reaches them."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from orchestrator import api

from ..attacker import attacker_python, attacker_uid, needs_root
from ..conftest import run_orch

pytestmark = needs_root

# The attacker's writer: files under a folder, `PID_STARTED` in them replaced by the start time
# of process `pid`, computed as psutil does (boot time + the start in clock ticks): anyone who
# can read /proc can forge a record that a start-time check alone would take for genuine.
FORGE = r"""
import json, os, sys

folder, spec = sys.argv[1], json.loads(sys.argv[2])

def start_time(pid):
    with open(f"/proc/{pid}/stat") as fh:
        ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/stat") as fh:
        boot = next(int(line.split()[1]) for line in fh if line.startswith("btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")

forged = repr(start_time(spec["pid"])) if spec.get("pid") else "null"
for name, text in spec["files"].items():
    path = os.path.join(folder, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text.replace('"PID_STARTED"', forged))
print(forged)
"""


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder everyone may write in, like a team's shared runs folder."""
    folder = Path(tempfile.mkdtemp(prefix="orch-cancel-attack-", dir="/tmp"))
    folder.chmod(0o1777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def victim_process() -> Iterator[subprocess.Popen]:
    """A process of the victim's that is no orch supervisor."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


def forge(folder: Path, files: dict[str, Any], pid: int | None = None) -> float | None:
    """The attacker writes `files` (name -> text, or a list of events as JSON lines) under
    `folder`; the start time it forged for `pid`."""
    texts = {
        name: "".join(json.dumps(e) + "\n" for e in body) if isinstance(body, list) else body
        for name, body in files.items()
    }
    proc = attacker_python(FORGE, str(folder), json.dumps({"files": texts, "pid": pid}))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    for name in files:
        assert (folder / name).stat().st_uid == attacker_uid(), "the attacker's file"
    return json.loads(out)


def one_line_refusal(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def still_alive(proc: subprocess.Popen) -> bool:
    time.sleep(0.3)  # a SIGTERM sent would have ended `sleep` by now
    return proc.poll() is None


def run_started(pid: Any, pid_started: Any = "PID_STARTED") -> dict[str, Any]:
    record = {"time": time.time() - 30, "event": "run_started", "backend": "local",
              "host": socket.gethostname(), "pid": pid}  # fmt: skip
    if pid_started is not None:
        record["pid_started"] = pid_started
    return record


def local_run(pid: Any, pid_started: Any = "PID_STARTED") -> dict[str, Any]:
    return {
        "runs/x/run.yaml": "run_id: x\nbackend: local\n",
        "runs/x/events.jsonl": [
            run_started(pid, pid_started),
            {"time": time.time() - 29, "event": "attempt_started", "attempt": 0},
        ],
    }


# ---------------------------------------------------------------------------- signals


@pytest.mark.parametrize(
    "pid_started",
    [None, "wrong", "PID_STARTED"],
    ids=["without-pid_started", "wrong-pid_started", "forged-pid_started"],
)
def test_a_forged_run_started_never_gets_a_victims_process_signalled(shared, victim_process, pid_started):
    real = psutil.Process(victim_process.pid).create_time()
    recorded = real - 100 if pid_started == "wrong" else pid_started
    forged = forge(shared, local_run(victim_process.pid, recorded), victim_process.pid)
    if pid_started == "PID_STARTED":
        assert abs(forged - real) < 0.5, "the attacker forged the victim process's real start time"
    line = one_line_refusal(run_orch("cancel", str(shared / "runs" / "x")))
    assert f"pid {victim_process.pid}" in line, line
    assert still_alive(victim_process), "the victim's process was signalled"


@pytest.mark.parametrize("pid", [-1, "1;rm -rf ~"], ids=["minus-one", "text"])
def test_a_recorded_pid_that_is_no_pid_is_refused_in_one_line(shared, pid):
    # os.kill(-1, SIGTERM) would signal every process of the victim's.
    forge(shared, local_run(pid, 1.0))
    line = one_line_refusal(run_orch("cancel", str(shared / "runs" / "x")))
    assert "run x" in line and "pid" in line, line


def test_a_forged_sweep_runner_is_never_signalled(shared, victim_process):
    files = {
        "runs/s/sweep.yaml": "sweep_id: s\nbackend: local\npoints: []\n",
        "runs/s/events.jsonl": [
            {"time": time.time() - 30, "event": "sweep_started", "backend": "local",
             "host": socket.gethostname(), "pid": victim_process.pid, "pid_started": "PID_STARTED",
             "points": [], "max_parallel": 1},
        ],
    }  # fmt: skip
    forged = forge(shared, files, victim_process.pid)
    assert abs(forged - psutil.Process(victim_process.pid).create_time()) < 0.5
    line = one_line_refusal(run_orch("cancel", str(shared / "runs" / "s")))
    assert "sweep s" in line, line
    assert still_alive(victim_process), "the victim's process was signalled"


# ---------------------------------------------------------------------------- Slurm's commands

SLURM_TOOLS = ("scancel", "sacct", "squeue", "scontrol")


@pytest.fixture
def slurm_calls(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """Stand-ins for Slurm's commands, first on PATH, that record their argv (one JSON list a
    call) and know no job; the environment that puts them there, and their record."""
    bin_dir, log = tmp_path / "bin", tmp_path / "slurm-calls.jsonl"
    bin_dir.mkdir()
    for tool in SLURM_TOOLS:
        stub = bin_dir / tool
        stub.write_text(
            f"#!{sys.executable}\nimport json, os, sys\n"
            f"with open({str(log)!r}, 'a') as fh:\n"
            "    fh.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + '\\n')\n"
            f"sys.exit(0 if sys.argv[0].endswith('scancel') else 1)\n"
        )
        stub.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, log


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def slurm_run(job_id: Any) -> dict[str, Any]:
    return {
        "runs/j/run.yaml": "run_id: j\nbackend: slurm\n",
        "runs/j/events.jsonl": [
            {"time": time.time() - 30, "event": "submitted", "backend": "slurm", "job_id": job_id,
             "nodes": 1, "ranks_per_node": 1},
        ],
    }  # fmt: skip


HOSTILE_JOB_IDS = ["--user=root", "1;rm -rf ~", "5 --signal=KILL", "-1", "42\n--user=root", "٣"]


@pytest.mark.parametrize("job_id", HOSTILE_JOB_IDS)
def test_a_crafted_job_id_never_reaches_scancel_nor_a_state_query(shared, slurm_calls, job_id):
    env, log = slurm_calls
    forge(shared, slurm_run(job_id))
    line = one_line_refusal(run_orch("cancel", str(shared / "runs" / "j"), env=env))
    assert "job_id" in line and repr(job_id) in line, line
    shown = run_orch("status", str(shared / "runs" / "j"), env=env)  # its state: unknown
    assert shown.returncode == 0 and "(unknown to the scheduler)" in shown.stdout, shown.stderr
    assert calls(log) == [], "a Slurm command was run with the crafted job id"
    # The stand-ins are in place: a genuine job id reaches them (after `--`).
    forge(shared, slurm_run("4242_3"))
    assert run_orch("cancel", str(shared / "runs" / "j"), env=env).returncode == 0
    assert calls(log)[-1] == ["scancel", "--", "4242_3"]


def slurm_sweep(second_point_events: list[dict]) -> dict[str, object]:
    """A Slurm sweep `s` of two points, as orch records it: point 0 an honest array task
    (4242_0), point 1 with the given events (the attacker's)."""
    return {
        "runs/s/sweep.yaml": yaml.safe_dump(
            {"sweep_id": "s", "backend": "slurm", "points": [{"index": i, "values": {}} for i in (0, 1)]}
        ),
        "runs/s/events.jsonl": [{"time": time.time() - 30, "event": "submitted", "backend": "slurm",
                                 "array_job_id": "4242", "points": ["s/0", "s/1"]}],
        "runs/s/0/run.yaml": "run_id: s/0\nbackend: slurm\n",
        "runs/s/0/events.jsonl": slurm_run("4242_0")["runs/j/events.jsonl"],
        "runs/s/1/run.yaml": "run_id: s/1\nbackend: slurm\n",
        "runs/s/1/events.jsonl": second_point_events,
    }  # fmt: skip


def test_a_crafted_job_id_in_a_sweeps_point_never_reaches_scancel(shared, slurm_calls):
    env, log = slurm_calls
    forge(shared, slurm_sweep(slurm_run("--user=root")["runs/j/events.jsonl"]))
    line = one_line_refusal(run_orch("cancel", str(shared / "runs" / "s"), env=env))
    assert "job_id" in line and "--user=root" in line, line
    assert calls(log) == [], "scancel ran although a point's job id was crafted"
    events = [json.loads(x) for x in (shared / "runs" / "s" / "0" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["submitted"], "no cancel recorded before the refusal"


def sacct_knows(bin_dir: Path, log: Path, states: dict[str, str]) -> None:
    """The stand-in sacct, recording its argv as the others do, answers `states` (job id ->
    Slurm state) for `--jobs=ID`, and knows no other job."""
    (bin_dir / "sacct").write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"with open({str(log)!r}, 'a') as fh:\n"
        "    fh.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + '\\n')\n"
        f"states = {states!r}\n"
        "job = next((a.split('=', 1)[1] for a in sys.argv if a.startswith('--jobs=')), None)\n"
        "print(states[job]) if job in states else sys.exit(1)\n"
    )


def test_a_crafted_job_id_in_one_point_leaves_the_sweeps_status_to_the_others(
    shared, slurm_calls, monkeypatch
):
    # Before: live_state passed the job id to scheduler_state, whose refusal failed `orch status
    # SWEEP` and Sweep.wait() as a whole: one crafted point hid every other point's state.
    env, log = slurm_calls
    sacct_knows(log.parent / "bin", log, {"4242_0": "COMPLETED"})
    crafted = slurm_run("--user=root")["runs/j/events.jsonl"]
    crafted.append({"time": time.time() - 20, "event": "run_finished", "status": "failed"})
    forge(shared, slurm_sweep(crafted))
    sweep = str(shared / "runs" / "s")
    shown = run_orch("status", sweep, "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    rows = {r["point"]: (r["state"], r["job_id"]) for r in json.loads(shown.stdout)["rows"]}
    assert rows == {0: ("succeeded", "4242_0"), 1: ("failed", "--user=root")}, rows
    table = run_orch("status", sweep, env=env)
    assert table.returncode == 0 and "2 points, 1 failed, 1 succeeded" in table.stdout, table.stderr
    monkeypatch.setenv("PATH", env["PATH"])
    settled = api.get_run(sweep).wait(timeout=60, poll_s=0.1)
    assert [r["state"] for r in settled.rows] == ["succeeded", "failed"]
    queried = calls(log)
    assert ["sacct", "-n", "-X", "-P", "--jobs=4242_0", "-o", "State"] in queried, "the stand-ins answer"
    assert not any("--user=root" in arg for call in queried for arg in call), queried
