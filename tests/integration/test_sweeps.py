"""Local sweeps with real gloo ranks: points run concurrently up to max_parallel, each a whole
run (own run directory, port lease, fork server, checkpoints) that ends exactly where the same
point run alone ends; Ctrl-C stops every point with a checkpoint; `orch cancel SWEEP`,
`orch resume SWEEP` and `orch resume SWEEP/N`; two sweeps of eight points at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from ..conftest import JOBS, TEST_JOBS, orch_cmd, read_events, run_orch, wait_for, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRAIN = ["--steps", "40", "--log-every", "10", "--dataset-size", "512", "--lr", "{lr}"]


def config(tmp_path: Path, args: list[str], script: Path = JOBS / "train_ddp.py", **sections) -> Path:
    return write_config(
        tmp_path,
        script,
        args=args,
        resources={"nodes": 1, "ranks_per_node": 1, "cpus_per_rank": 1},
        storage={"checkpoint_interval": 20},
        **sections,
    )


def digest(cfg: Path, run: str) -> tuple[int, str]:
    rows = json.loads(run_orch("checkpoints", run, "--config", str(cfg), "--json").stdout)
    return rows[-1]["step"], rows[-1]["model_digest"]


def sweep_json(cfg: Path, sweep_id: str) -> dict:
    proc = run_orch("status", sweep_id, "--config", str(cfg), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def span(run_dir: Path, since: str = "attempt_started") -> tuple[float, float, int]:
    """(the first `since` event's time: the supervisor's start, or its first attempt's, which
    holds the port lease; the run's end; the first attempt's master port)."""
    events = read_events(run_dir)
    start = next(e for e in events if e["event"] == since)
    attempt = next(e for e in events if e["event"] == "attempt_started")
    end = [e for e in events if e["event"] == "run_finished"][-1]
    return start["time"], end["time"], attempt["master_port"]


def test_points_run_concurrently_each_a_whole_run_equal_to_the_point_run_alone(tmp_path):
    cfg = config(tmp_path, ["--steps", "40"])
    proc = run_orch(
        "sweep", str(cfg), "--grid", "lr=1.0e-3,3.0e-3,1.0e-2",
        "--set", "job.args=" + json.dumps(TRAIN), "--sweep-id", "s", "--json", timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # One rank per point on two cores: two points at once by default.
    assert "3 point(s), up to 2 at once" in proc.stderr
    table = json.loads(proc.stdout)
    assert [(r["run_id"], r["state"], r["attempts"], r["step"]) for r in table["rows"]] == [
        (f"s/{i}", "succeeded", 1, 40) for i in range(3)
    ]
    assert [r["values"] for r in table["rows"]] == [{"lr": 0.001}, {"lr": 0.003}, {"lr": 0.01}]
    assert all(r["scalars"]["loss"] > 0 for r in table["rows"])
    root = tmp_path / "runs" / "s"
    # Both supervisors ran at once (one's ranks may end before the other's fork server is warm).
    (a0, b0, _), (a1, b1, _) = span(root / "0", "run_started"), span(root / "1", "run_started")
    assert a0 < b1 and a1 < b0, "points 0 and 1 ran at the same time"
    (a0, b0, port0), (a1, b1, port1) = span(root / "0"), span(root / "1")
    assert port0 != port1 or not (a0 < b1 and a1 < b0), "attempts at the same time share no port"
    for i in range(3):
        run = yaml.safe_load((root / str(i) / "run.yaml").read_text())
        assert run["run_id"] == f"s/{i}" and run["config"]["job"]["args"][-1] == str([0.001, 0.003, 0.01][i])
        log = (root / str(i) / "logs" / "attempt-0" / "rank-0.log").read_text()
        assert "done: 40 steps" in log

    # Seen by the user: orch ls groups the points; orch status is the table.
    ls = run_orch("ls", "--config", str(cfg)).stdout.splitlines()
    assert ls[1].split()[:5] == ["s", "sweep", "of", "3", "point(s):"] and "3 succeeded" in ls[1]
    assert ls[2].split()[:3] == ["s/0", "succeeded", "1"] and ls[2].endswith("lr=0.001")
    text = run_orch("status", "s", "--config", str(cfg), "--sort", "loss").stdout.splitlines()
    assert text[1].split()[:6] == ["POINT", "LR", "STATE", "ATTEMPTS", "STEP", "LOSS"]
    losses = [float(line.split()[5]) for line in text[2:5]]
    assert losses == sorted(losses)
    text = run_orch("status", "s", "--config", str(cfg), "--sort", "loss", "--reverse").stdout.splitlines()
    assert [float(line.split()[5]) for line in text[2:5]] == sorted(losses, reverse=True)

    # TensorBoard: every point's values as hparams beside its scalars.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(root / "2" / "tb"))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert info.hparams["lr"].number_value == 0.01 and "loss" in acc.Tags()["scalars"]

    # The same point run alone: the same weights.
    args = json.dumps([*TRAIN[:-1], "0.003"])
    alone = run_orch(
        "run", str(cfg), "--set", f"job.args={args}", "--run-id", "alone", "--quiet", timeout=300
    )
    assert alone.returncode == 0, alone.stderr
    assert digest(cfg, "alone") == digest(cfg, "s/1")


def test_ctrl_c_cancel_and_resume_a_sweep_end_in_the_uninterrupted_weights(tmp_path):
    slow = [
        "--steps",
        "120",
        "--log-every",
        "10",
        "--dataset-size",
        "512",
        "--step-sleep",
        "0.05",
        "--lr",
        "{lr}",
    ]
    cfg = config(tmp_path, slow)
    data = yaml.safe_load(cfg.read_text())
    data["sweep"] = {"grid": {"lr": [0.001, 0.003, 0.01]}, "max_parallel": 2}
    cfg.write_text(yaml.safe_dump(data))
    root = tmp_path / "runs" / "c"

    def checkpointed(i: int) -> bool:
        return any(e["event"] == "checkpoint_committed" for e in read_events(root / str(i)))

    # A terminal's Ctrl-C: SIGINT to the foreground process group.
    proc = subprocess.Popen(
        orch_cmd("sweep", str(cfg), "--sweep-id", "c"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    wait_for(lambda: checkpointed(0) and checkpointed(1), 120, "points 0 and 1 checkpointed")
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopping: asking 2 running point(s) to checkpoint and stop" in err  # the stop fired
    st = sweep_json(cfg, "c")
    assert [r["state"] for r in st["rows"]] == ["stopped", "stopped", "created"], st
    assert all(r["step"] is not None and r["step"] < 120 for r in st["rows"][:2])

    # `orch resume SWEEP` in the background, then `orch cancel SWEEP` while it runs.
    proc = subprocess.Popen(
        orch_cmd("resume", "c", "--config", str(cfg)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: sweep_json(cfg, "c")["rows"][0]["state"] == "running", 120, "point 0 running again")
    time.sleep(1)
    cancel = run_orch("cancel", "c", "--config", str(cfg))
    assert cancel.returncode == 0 and "asked sweep c" in cancel.stdout, cancel.stderr
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "stopping: asking" in err, err
    states = [r["state"] for r in sweep_json(cfg, "c")["rows"]]
    assert "running" not in states and "cancelled" in states, states  # as `orch cancel POINT` ends it

    # One point by its id, then the rest of the sweep.
    one = run_orch("resume", "c/1", "--config", str(cfg), "--quiet", timeout=300)
    assert one.returncode == 0, one.stderr
    assert "resuming run c/1" in one.stderr or "starting run c/1" in one.stderr
    rest = run_orch("resume", "c", "--config", str(cfg), timeout=400)
    assert rest.returncode == 0, rest.stderr
    assert [r["state"] for r in sweep_json(cfg, "c")["rows"]] == ["succeeded"] * 3
    again = run_orch("resume", "c", "--config", str(cfg))
    assert again.returncode == 2 and "every point of sweep c succeeded" in again.stderr

    # Exact: each point ends in the weights of the same point never interrupted.
    for i, lr in enumerate(["0.001", "0.003", "0.01"]):
        args = json.dumps([*slow[:-1], lr])
        alone = run_orch(
            "run", str(cfg), "--set", "sweep=null", "--set", f"job.args={args}",
            "--run-id", f"alone-{i}", "--quiet", timeout=300,
        )  # fmt: skip
        assert alone.returncode == 0, alone.stderr
        assert digest(cfg, f"alone-{i}") == digest(cfg, f"c/{i}"), i


def test_two_sweeps_of_eight_points_at_once_keep_every_point_apart(tmp_path):
    cfg = config(tmp_path, ["--point", "{i}"], script=TEST_JOBS / "env_dump.py")
    procs = [
        subprocess.Popen(
            orch_cmd("sweep", str(cfg), "--grid", "i=" + ",".join(str(k) for k in range(8)), "--json"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    tables = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        tables.append(json.loads(out))
    assert len({t["sweep_id"] for t in tables}) == 2
    spans = []
    for table in tables:
        assert [r["state"] for r in table["rows"]] == ["succeeded"] * 8
        for row in table["rows"]:
            run_dir = Path(row["run_dir"])
            seen = json.loads((run_dir / "env-0.json").read_text())
            # Each point's rank saw its own run id, directory and value: nothing mixed up.
            assert seen["ORCH_RUN_ID"] == row["run_id"] == f"{table['sweep_id']}/{row['point']}"
            assert seen["ORCH_RUN_DIR"] == str(run_dir) and seen["argv"] == ["--point", str(row["point"])]
            start, end, port = span(run_dir)
            assert int(seen["MASTER_PORT"]) == port
            spans.append((start, end, port, row["run_id"]))
    # Points that ran at the same time never shared a port.
    overlapping = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1 :] if a[0] < b[1] and b[0] < a[1]]
    assert overlapping, "the two sweeps ran at the same time"
    assert all(a[2] != b[2] for a, b in overlapping), [(a[3], b[3]) for a, b in overlapping if a[2] == b[2]]
    ls = json.loads(run_orch("ls", "--config", str(cfg), "--json").stdout)
    assert sorted(r["run_id"] for r in ls) == sorted(r["run_id"] for t in tables for r in t["rows"])


def test_two_resumes_of_one_sweep_run_every_point_once(tmp_path):
    """Two `orch resume SWEEP` at once on points still queued: one runner takes the sweep, the
    other refuses in one line naming it (issue 27, point 7)."""
    from orchestrator import api

    cfg = write_config(
        tmp_path,
        TEST_JOBS / "brief.py",
        args=["--live-s", "{s}"],
        resources={"nodes": 1, "ranks_per_node": 1, "cpus_per_rank": 1},
        launch={"mode": "subprocess"},
        sweep={"grid": {"s": [0, 0.1, 0.2]}, "max_parallel": 1},
    )
    api.create_sweep(api.load_sweep(str(cfg)), sweep_id="twice")  # every point queued
    procs = [
        subprocess.Popen(
            orch_cmd("resume", "twice", "--config", str(cfg)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    ends = [(proc, *proc.communicate(timeout=180)) for proc in procs]
    kinds = [[e["event"] for e in read_events(tmp_path / "runs" / "twice" / str(i))] for i in range(3)]
    starts = [(k.count("run_started"), k.count("attempt_started")) for k in kinds]
    assert starts == [(1, 1)] * 3, "every point ran exactly once"
    (runner, _, _), (refused, _, said) = sorted(ends, key=lambda end: end[0].returncode)
    assert runner.returncode == 0 and refused.returncode == 2, said
    (line,) = said.strip().splitlines()
    assert f"sweep twice is running (run or submitted by pid {runner.pid}" in line, line
    assert [r["state"] for r in sweep_json(cfg, "twice")["rows"]] == ["succeeded"] * 3


def readme_sweep_commands() -> list[list[str]]:
    """The `orch ...` lines of README.md's "Sweeps" section, as a shell splits them."""
    import re
    import shlex

    from ..conftest import REPO

    section = (REPO / "README.md").read_text().split("## Sweeps", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [shlex.split(line.split("  #")[0]) for block in blocks for line in block.splitlines() if line]


def default_job_copy(tmp_path: Path) -> Path:
    import shutil

    from ..conftest import REPO

    shutil.copy(REPO / "cluster.yaml", tmp_path / "cluster.yaml")
    shutil.copytree(REPO / "jobs", tmp_path / "jobs", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_the_readmes_local_sweep_commands_on_the_default_job(tmp_path):
    local, status, _slurm = readme_sweep_commands()
    assert (
        local[:2] == ["orch", "sweep"]
        and "--backend" not in local
        and status[:3] == ["orch", "status", "SWEEP"]
    )
    work = default_job_copy(tmp_path)
    proc = subprocess.run(orch_cmd(*local[1:]), cwd=work, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    sweep_id = next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("sweep "))
    assert "4 points, 4 succeeded" in proc.stdout
    shown = subprocess.run(
        orch_cmd(*[sweep_id if a == "SWEEP" else a for a in status[1:]]),
        cwd=work,
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0, shown.stderr
    rows = shown.stdout.splitlines()[2:6]
    assert shown.stdout.splitlines()[1].split()[:7] == [
        "POINT",
        "LR",
        "SEED",
        "STATE",
        "ATTEMPTS",
        "STEP",
        "LOSS",
    ]
    losses = [float(row.split()[6]) for row in rows]
    assert losses == sorted(losses) and all(row.split()[3:6] == ["succeeded", "1", "100"] for row in rows)
