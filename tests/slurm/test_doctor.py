"""`orch doctor` on the real test cluster: a good setup is all ok, on the login node and (with
--probe) on every node; each broken setup gives its own `fail` line with its fix; and `orch
submit` refuses a setup that fails, unless --no-check."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from ..conftest import JOBS, S3_BUCKET, orch_cmd, run_orch, write_config

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("slurm_cluster")]


def slurm_config(tmp_path: Path, **sections) -> Path:
    base = {
        "resources": {"nodes": 3, "ranks_per_node": 1, "cpus_per_rank": 1, "time_limit": "5"},
        "slurm": {"partition": "debug"},
    }
    for key, value in sections.items():
        base.setdefault(key, {}).update(value)
    return write_config(tmp_path, JOBS / "train_ddp.py", backend="slurm", **base)


def outcome(proc: subprocess.CompletedProcess) -> tuple[list[str], list[str]]:
    """(the fail lines, every warn line) of a doctor's report, as printed."""
    lines = proc.stdout.splitlines()
    return [line for line in lines if line.startswith("fail")], [
        line for line in lines if line.startswith("warn")
    ]


def test_a_good_setup_is_all_ok_here_and_on_every_node(tmp_path):
    cfg = slurm_config(tmp_path)
    proc = run_orch("doctor", str(cfg), "--backend", "slurm", "--probe", "--probe-timeout", "120")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert outcome(proc) == ([], [])
    out = proc.stdout
    assert "ok    slurm       partition: debug: UP, 3 node(s)" in out
    assert "ok    slurm       accounting: sacct answers" in out
    assert "ok    probe       probe job: 3 of 3 node(s) reported" in out
    for node in ("n1", "n2", "n3"):
        assert f"ok    probe       node {node}: " in out
    assert "reached n1:" in out and "2 of 2 other node(s) reached it" in out
    report = json.loads(run_orch("doctor", str(cfg), "--json").stdout)
    assert report["ok"] is True
    assert {c["area"] for c in report["checks"]} == {"environment", "config", "storage", "slurm"}
    assert not list((tmp_path / "runs").glob(".orch-doctor/*")), "the probe's folder is removed"


def test_an_unknown_partition(tmp_path):
    proc = run_orch("doctor", str(slurm_config(tmp_path)), "--set", "slurm.partition=nope")
    assert proc.returncode == 1
    fails, _ = outcome(proc)
    assert fails == ["fail  slurm       partition: slurm.partition: no partition 'nope' on this cluster"]
    assert "fix: set slurm.partition to one of: debug, short, urgent" in proc.stdout


def test_a_time_limit_over_the_partitions_maximum(tmp_path):
    cfg = slurm_config(tmp_path, slurm={"partition": "short"}, resources={"time_limit": "01:00:00"})
    proc = run_orch("doctor", str(cfg))
    assert proc.returncode == 1
    fails, _ = outcome(proc)
    assert fails == [
        "fail  slurm       partition: resources.time_limit 01:00:00 (60 min) is over partition short's"
        " MaxTime 00:10:00 (10 min)"
    ]


def test_accounting_off(tmp_path, slurm_cluster):
    # The client's slurm.conf without accounting, as on a cluster without slurmdbd: sacct refuses.
    conf = Path(slurm_cluster) / "etc" / "slurm-noacct.conf"
    text = (Path(slurm_cluster) / "etc" / "slurm.conf").read_text()
    lines = [
        "AccountingStorageType=accounting_storage/none" if line.startswith("AccountingStorageType=") else line
        for line in text.splitlines()
    ]
    conf.write_text("\n".join(lines) + "\n")
    proc = run_orch("doctor", str(slurm_config(tmp_path)), env={"SLURM_CONF": str(conf)})
    assert proc.returncode == 1
    fails, _ = outcome(proc)
    assert fails == ["fail  slurm       accounting: sacct fails: Slurm accounting storage is disabled"]
    assert "ask the admins to enable accounting" in proc.stdout


def test_a_run_directory_the_nodes_cannot_see(tmp_path, slurm_cluster):
    # Each node of the test cluster sees its own empty tmpfs at STATE/node-local: a node-local
    # path. The login node can write there, so only the probe finds the problem.
    seen = subprocess.run(
        ["srun", "-N1", "stat", "-f", "-c", "%T", str(Path(slurm_cluster) / "node-local")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert seen.stdout.strip() == "tmpfs", (
        "scripts/slurm/start.sh gives each node a tmpfs at STATE/node-local (SLURMLAB_HOSTS=auto,"
        f" which needs a mount namespace): {seen.stdout} {seen.stderr}"
    )
    root = Path(slurm_cluster) / "node-local" / f"runs-{os.getpid()}"
    cfg = slurm_config(tmp_path, storage={"root": str(root)}, resources={"nodes": 2})
    proc = run_orch("doctor", str(cfg), "--probe")
    assert proc.returncode == 1
    fails, _ = outcome(proc)
    assert fails[0].startswith("fail  probe       probe job: 2 of 2 node(s) reported")
    for node, line in zip(("n1", "n2"), fails[1:], strict=True):
        assert line.startswith(f"fail  probe       node {node} run directory: {root}/.orch-doctor/probe-")
        assert line.endswith(
            "is not visible here (the login node's marker is missing): not shared with this node"
        )
    assert (
        "set storage.root to a filesystem (or object store) that the login node and every node share"
        in proc.stdout
    )


def test_an_unwritable_storage_root(tmp_path):
    # A read-only mount (as a read-only NFS export): root cannot write there either.
    mount = tmp_path / "readonly"
    mount.mkdir()
    assert subprocess.run(["unshare", "-m", "true"]).returncode == 0, "needs a mount namespace (root)"
    cfg = slurm_config(tmp_path, storage={"root": str(mount / "runs")})
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o ro tmpfs "$0" && exec "$@"', str(mount)]
        + orch_cmd("doctor", str(cfg)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    fails, _ = outcome(proc)
    assert fails == [
        f"fail  storage     root writable: {mount}/runs: storage is read-only: Read-only file system"
    ]


def test_s3_without_credentials(tmp_path, s3_server):
    # Runs on an object store are local ones (Slurm's batch logs need a shared filesystem: the
    # slurm backend refuses such a root, as the end of this test shows).
    cfg = write_config(
        tmp_path, JOBS / "train_ddp.py", storage={"root": f"s3://{S3_BUCKET}/doctor-{os.getpid()}"}
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AWS_ACCESS_KEY") and k != "AWS_SECRET_ACCESS_KEY"
    }
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")  # fmt: skip
    proc = subprocess.run(orch_cmd("doctor", str(cfg)), capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1, proc.stderr
    fails, _ = outcome(proc)
    assert len(fails) == 1 and fails[0].startswith(
        f"fail  storage     root writable: s3://{S3_BUCKET}/doctor-{os.getpid()}: storage credentials missing"
    ), fails
    assert "export the store's credentials (AWS_ACCESS_KEY_ID" in proc.stdout
    # With them, the same root passes, create-only writes included (what commits rely on).
    good = run_orch("doctor", str(cfg))
    assert good.returncode == 0, good.stdout
    assert (
        "ok    storage     create-only writes: a second create of the same object was refused" in good.stdout
    )
    on_slurm = run_orch("doctor", str(cfg), "--backend", "slurm")
    assert on_slurm.returncode == 1
    fails, _ = outcome(on_slurm)
    assert fails[0].startswith("fail  config      storage.root: "), fails


def test_submit_refuses_a_failing_check_unless_told_not_to_check(tmp_path):
    cfg = slurm_config(tmp_path, slurm={"partition": "nope"})
    proc = run_orch("submit", str(cfg), "--run-id", "checked")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "orch submit: slurm partition: slurm.partition: no partition 'nope' on this cluster; fix: set"
        " slurm.partition to one of: debug, short, urgent. `orch doctor` shows every check; --no-check"
        " submits anyway"
    )
    assert not (tmp_path / "runs" / "checked").exists()  # refused before anything was created
    unchecked = run_orch("submit", str(cfg), "--run-id", "unchecked", "--no-check")
    assert unchecked.returncode == 1
    assert "invalid partition specified: nope" in unchecked.stderr  # it went as far as sbatch


def test_gpus_per_node_against_the_partitions_gres(tmp_path):
    cfg = slurm_config(tmp_path)  # the test cluster's nodes have 4 (fake) GPUs each
    four = run_orch(
        "doctor", str(cfg), "--set", "resources.gpus_per_node=4", "--set", "resources.ranks_per_node=4"
    )
    assert four.returncode == 0, four.stdout
    assert (
        "ok    slurm       GPUs: 4 per node asked on 3 node(s); 3 node(s) of debug have that many"
        in four.stdout
    )
    eight = run_orch(
        "doctor", str(cfg), "--set", "resources.gpus_per_node=8", "--set", "resources.ranks_per_node=8"
    )
    assert eight.returncode == 1
    assert outcome(eight)[0] == [
        "fail  slurm       GPUs: 8 per node asked on 3 node(s); 0 node(s) of debug have that many"
        " (the most on one node: 4)"
    ]


def test_a_slurm_sweep_is_checked_as_a_submit_is(tmp_path):
    cfg = slurm_config(tmp_path, slurm={"partition": "nope"}, resources={"nodes": 1})
    sweep = ("--set", "job.args=[--steps,5,--lr,{lr}]", "--grid", "lr=1.0e-3,3.0e-3")
    proc = run_orch("sweep", str(cfg), *sweep, "--sweep-id", "checked")
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith(
        "orch sweep: slurm partition: slurm.partition: no partition 'nope' on this cluster; fix:"
    )
    assert not (tmp_path / "runs" / "checked").exists()
    unchecked = run_orch("sweep", str(cfg), *sweep, "--sweep-id", "unchecked", "--no-check")
    assert unchecked.returncode == 1 and "invalid partition specified: nope" in unchecked.stderr
