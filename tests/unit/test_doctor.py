"""`orch doctor`'s pure parts and its local checks, in-process: Slurm's time and field formats,
the probe's srun line, the storage checks' verdicts, the report's lines and JSON."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple

import pytest

from orchestrator.doctor import DoctorReport, Status, run_checks
from orchestrator.doctor import storage as storage_checks
from orchestrator.doctor.check import fail, ok, warn
from orchestrator.doctor.probe import probe_argv
from orchestrator.doctor.slurm import parse_fields, slurm_minutes
from orchestrator.spec.config import load_config


@pytest.fixture
def config_of(tmp_path):
    (tmp_path / "train.py").write_text("")

    def make(*overrides: str):
        path = tmp_path / "cluster.yaml"
        path.write_text(f"job: {{script: train.py}}\nstorage: {{root: {tmp_path / 'runs'}}}\n")
        return load_config(str(path), list(overrides))

    return make


@pytest.mark.parametrize(
    "text,minutes",
    [
        ("UNLIMITED", None),
        ("INFINITE", None),
        ("30", 30),
        ("10:00", 10),
        ("10:30", 11),  # MM:SS, a started minute counts
        ("01:00:00", 60),
        ("1-00:00:00", 1440),
        ("2-12", 3600),
        ("0-00:10:00", 10),
    ],
)
def test_slurm_times_in_minutes(text, minutes):
    assert slurm_minutes(text) == minutes


def test_scontrol_one_line_records():
    line = "PartitionName=short AllowAccounts=ALL MaxTime=00:10:00 State=UP TotalNodes=3 JobDefaults=(null)"
    assert parse_fields(line) == {
        "PartitionName": "short",
        "AllowAccounts": "ALL",
        "MaxTime": "00:10:00",
        "State": "UP",
        "TotalNodes": "3",
        "JobDefaults": "(null)",
    }


def test_the_probe_asks_for_the_runs_shape_with_its_flags_and_setup(config_of):
    config = config_of(
        "backend=slurm",
        "resources.nodes=3",
        "resources.gpus_per_node=2",
        "resources.ranks_per_node=2",
        "resources.time_limit=90",
        "slurm.partition=gpu",
        "slurm.account=proj",
        "slurm.extra_flags=[--constraint=a100]",
        "slurm.setup=[module load cuda]",
    )
    argv = probe_argv(config, "/venv/bin/python", "/shared/runs/.orch-doctor/probe-1")
    assert argv[:7] == [
        "srun", "--nodes=3", "--ntasks-per-node=1", "--job-name=orch-doctor", "--time=5", "--label",
        "--kill-on-bad-exit=0",
    ]  # fmt: skip
    assert argv[7:11] == ["--gres=gpu:2", "--partition=gpu", "--account=proj", "--constraint=a100"]
    # The setup lines run first, as in the batch script; the probe is exec'd with its own argv.
    assert argv[11:14] == ["/bin/bash", "-c", 'module load cuda\nexec "$@"']
    assert argv[14:] == [
        "orch-doctor", "/venv/bin/python", "-m", "orchestrator.doctor.probe_node",
        "/shared/runs/.orch-doctor/probe-1", "2",
    ]  # fmt: skip


def test_a_report_prints_one_line_per_check_and_the_fix_under_it():
    report = DoctorReport(
        (
            ok("storage", "root writable", "/runs: a file written"),
            warn("local", "cores", "8 asked, 2 here", "lower the rank count"),
            fail("slurm", "partition", "no partition 'x'", "set slurm.partition"),
        )
    )
    assert report.lines() == [
        "ok    storage     root writable: /runs: a file written",
        "warn  local       cores: 8 asked, 2 here",
        "                  fix: lower the rank count",
        "fail  slurm       partition: no partition 'x'",
        "                  fix: set slurm.partition",
        "1 ok, 1 warn, 1 fail",
    ]
    data = json.loads(json.dumps(report.to_json()))
    assert data["ok"] is False and [c["status"] for c in data["checks"]] == ["ok", "warn", "fail"]


def test_a_local_setup_is_checked_end_to_end(config_of):
    from pathlib import Path

    config = config_of()
    report = run_checks(config)
    assert not report.failed, report.lines()
    areas = {c.area for c in report.checks}
    assert areas == {"environment", "config", "storage", "local"}
    names = [c.name for c in report.checks]
    assert {"torch", "MASTER_PORT", "cores", "root writable", "create-only writes"} <= set(names)
    root = Path(config.storage_root)
    assert root.is_dir() and not list(root.glob(".orch-doctor*")), "the probe file is removed"


def test_free_space_and_the_preemption_lead_against_the_newest_checkpoint(monkeypatch):
    usage = namedtuple("usage", "total used free")
    newest = {"run": "r", "step": 100, "size": 10 * 2**30, "write_s": 70.0}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(0, 0, 5 * 2**30))
    check = storage_checks._free_space("/runs", newest)
    assert (
        check.status is Status.FAIL
        and "5.0 GiB free; the newest checkpoint (r step 100) is 10.0 GiB" in check.detail
    )
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(0, 0, 25 * 2**30))
    assert storage_checks._free_space("/runs", newest).status is Status.WARN  # room for fewer than 3
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(0, 0, 100 * 2**30))
    assert storage_checks._free_space("/runs", newest).status is Status.OK

    class Config:
        class slurm:
            signal_lead_s = 120

    assert storage_checks._lead_time(Config, newest).status is Status.WARN  # 70 s of 120: under twice
    assert storage_checks._lead_time(Config, {**newest, "write_s": 130.0}).status is Status.FAIL
    assert storage_checks._lead_time(Config, {**newest, "write_s": 20.0}).status is Status.OK
    assert "raise slurm.signal_lead_s to at least 140s" in storage_checks._lead_time(Config, newest).fix


def test_an_object_store_root_is_written_with_create_only_semantics(config_of):
    import fsspec

    fsspec.filesystem("memory").mkdir("/doctor-test")
    checks = storage_checks.storage_checks(config_of("storage.root=memory://doctor-test"))
    by_name = {c.name: c for c in checks}
    assert by_name["root writable"].status is Status.OK
    assert by_name["create-only writes"].status is Status.OK, by_name["create-only writes"]
    assert by_name["free space"].detail == "an object store: no free-space limit to check"


# ---------------------------------------------------------------------------- the probe's output


def test_the_probes_output_is_put_back_together_per_task():
    from orchestrator.doctor.probe import parse_probe_output
    from orchestrator.doctor.probe_node import pieces

    long = {
        "node": "n1",
        "task": 0,
        "checks": [{"name": "x", "status": "ok", "detail": "d" * 1500, "fix": None}],
    }
    lines = pieces(long)
    assert len(lines) >= 3 and all(len(line) < 1024 for line in lines)  # under slurmstepd's messages
    short = {"node": "n2", "task": 1, "checks": []}
    # srun --label pads labels, and the tasks' lines interleave.
    out = [f" 0: {lines[0]}", f" 1: {pieces(short)[0]}", *[f" 0: {line}" for line in lines[1:]], "10: stray"]
    err = [
        "srun: error: n3: task 2: Exited with exit code 2",
        " 2: slurmstepd-n3: error: execve(): /nope/python: No such file or directory",
    ]
    reports, errors, by_task = parse_probe_output("\n".join(out), "\n".join(err))
    assert reports == {0: long, 1: short}
    assert errors == {2: ("n3", "Exited with exit code 2")}
    assert by_task == {2: ["slurmstepd-n3: error: execve(): /nope/python: No such file or directory"]}
    # A report cut short (a timeout) is named as such, not a crash.
    reports, _, _ = parse_probe_output("\n".join(f"0: {line}" for line in lines[:-1]), "")
    assert reports[0] == f"its report was cut short ({len(lines) - 1} of {len(lines)} pieces)"


def test_a_node_without_a_report_and_a_timeout_are_named(config_of, tmp_path):
    import subprocess

    import fsspec

    from orchestrator.doctor.probe import _read
    from orchestrator.doctor.probe_node import pieces

    config = config_of("backend=slurm", "resources.nodes=3")
    fs = fsspec.filesystem("file")
    good = {"node": "n1", "task": 0, "checks": [
        {"name": "python", "status": "ok", "detail": "3.11", "fix": None},
        {"name": "run directory writable", "status": "ok", "detail": "a file written", "fix": None},
    ]}  # fmt: skip
    (tmp_path / "node-0.json").write_text("{}")
    out = "\n".join(f"0: {line}" for line in pieces(good))
    err = (
        "srun: error: n3: task 2: Exited with exit code 2\n"
        "2: slurmstepd-n3: error: execve(): /x: No such file"
    )
    checks = _read(config, subprocess.CompletedProcess([], 124, out, err), fs, str(tmp_path), 9.0, 60.0)
    lines = [(c.status.value, c.name, c.detail) for c in checks]
    assert lines[0] == ("fail", "probe job", "1 of 3 node(s) reported in 9.0s; 2 problem(s) below")
    assert lines[1] == ("ok", "node n1", "3.11")
    assert lines[2] == ("fail", "node of task 1", "no report within 60s")
    assert lines[3] == (
        "fail",
        "node n3",
        "the probe did not run: slurmstepd-n3: error: execve(): /x: No such file",
    )


# ---------------------------------------------------------------------------- the partition


PARTITIONS = "\n".join(
    [
        "PartitionName=debug AllowAccounts=ALL AllowQos=ALL Default=YES MaxNodes=UNLIMITED MaxTime=UNLIMITED"
        " State=UP TotalNodes=3",
        "PartitionName=gpu AllowAccounts=proj,Other DenyQos=free Hidden=YES MaxNodes=2 MaxTime=1-00:00:00"
        " State=UP TotalNodes=8",
        "PartitionName=old AllowAccounts=ALL MaxTime=UNLIMITED State=DOWN TotalNodes=4",
    ]
)


@pytest.fixture
def scheduler(monkeypatch):
    """Canned answers of the Slurm commands, by their first two words."""
    from orchestrator.doctor import slurm

    answers: dict[tuple[str, ...], str] = {}

    def query(*argv: str) -> slurm.Answer:
        for key, out in answers.items():
            if tuple(argv[: len(key)]) == key:
                return slurm.Answer(0, out, "")
        return slurm.Answer(1, "", f"unexpected {argv}")

    monkeypatch.setattr(slurm, "query", query)
    answers[("scontrol", "--all")] = PARTITIONS
    return answers


def details(checks) -> list[tuple[str, str]]:
    return [(c.status.value, c.detail) for c in checks]


def test_a_hidden_partition_and_its_limits(config_of, scheduler):
    from orchestrator.doctor.slurm import partition_checks

    good = partition_checks(
        config_of(
            "backend=slurm",
            "slurm.partition=gpu",
            "slurm.account=PROJ",
            "resources.nodes=2",
            "resources.time_limit=12:00:00",
        )
    )
    assert details(good) == [("ok", "gpu: UP, 8 node(s), MaxTime 1-00:00:00, 2 node(s) asked")]
    bad = partition_checks(
        config_of(
            "backend=slurm",
            "slurm.partition=gpu",
            "slurm.account=mine",
            "slurm.qos=free",
            "resources.nodes=3",
            "resources.time_limit=2-00:00:00",
        )
    )
    assert [d for s, d in details(bad)] == [
        "resources.nodes 3: partition gpu allows at most 2 per job",
        "resources.time_limit 2-00:00:00 (2880 min) is over partition gpu's MaxTime 1-00:00:00 (1440 min)",
        "slurm.account 'mine' is not allowed on partition gpu (AllowAccounts=proj,Other)",
        "slurm.qos 'free' is denied on partition gpu (DenyQos=free)",
    ]
    down = partition_checks(config_of("backend=slurm", "slurm.partition=old", "resources.time_limit=10"))
    assert details(down) == [("fail", "partition old is DOWN")]
    default = partition_checks(config_of("backend=slurm"))  # no time limit on an unlimited partition: fine
    assert details(default) == [
        ("ok", "debug (the default): UP, 3 node(s), MaxTime UNLIMITED, 1 node(s) asked")
    ]


def test_gpus_accounts_and_qos_against_the_scheduler(config_of, scheduler):
    from orchestrator.doctor.slurm import _account, _gpus, _qos

    scheduler[("sinfo",)] = "n1 gpu:a100:4(S:0-1)\nn2 gpu:a100:4(S:0-1)\nn3 gpu:2\nn4 (null)\n"
    assert _gpus("gpu", 4, 2).status is Status.OK
    three = _gpus("gpu", 4, 3)
    assert three.status is Status.FAIL and "(the most on one node: 4)" in three.detail
    scheduler[("sacctmgr", "-n", "-P", "show", "assoc")] = ""
    assert "no association of user" in _account("nope", True).detail
    assert _account("proj", False).status is Status.WARN  # without accounting: cannot say
    scheduler[("sacctmgr", "-n", "-P", "show", "qos")] = "normal|\nlong|2-00:00:00\n"
    assert (
        _qos(config_of("backend=slurm", "slurm.qos=long", "resources.time_limit=10"), True).status
        is Status.OK
    )
    over = _qos(config_of("backend=slurm", "slurm.qos=normal", "resources.time_limit=10"), True)
    assert over.status is Status.OK and over.detail == "normal exists"
    assert (
        _qos(config_of("backend=slurm", "slurm.qos=long", "resources.time_limit=3-00:00:00"), True).status
        is Status.FAIL
    )
    assert (
        _qos(config_of("backend=slurm", "slurm.qos=gold"), True).detail
        == "slurm.qos: no QOS 'gold' on this cluster"
    )
