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
