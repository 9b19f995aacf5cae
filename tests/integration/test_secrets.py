"""Secrets are never at rest in clear: a secret-looking name in job.env is refused before anything
is written, and a job.pass_env value reaches every rank but no file of the run directory (on
local disk or on the S3 API server on 127.0.0.1), nor orch's own output, even when the job
prints it or dies of an exception that holds it: it is masked as `<redacted>`."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from orchestrator.spec.plan import REDACTED
from orchestrator.storage.rundir import RunDir

from ..conftest import S3_BUCKET, TEST_JOBS, read_events, run_orch, write_config

pytestmark = pytest.mark.integration

SECRET_NAME = "ORCH_TEST_API_KEY"
SECRET = "sk-live-5ecre7-9f1c2b7d"  # what must never be found at rest
DIGEST = hashlib.sha256(SECRET.encode()).hexdigest()

# Prints a digest of the variable, never the value. Rank 1 fails its first attempt, so that error
# records, a restart and a second attempt's events and logs are written too.
JOB = f"""\
import hashlib, os, sys
value = os.environ.get({SECRET_NAME!r}, "")
print(f"rank {{os.environ['RANK']}} sees digest {{hashlib.sha256(value.encode()).hexdigest()}}", flush=True)
if os.environ["RANK"] == "1" and os.environ["ORCH_ATTEMPT"] == "0":
    raise RuntimeError("failing once on purpose")
"""


def job_config(tmp_path: Path, **sections) -> Path:
    script = tmp_path / "show_digest.py"
    script.write_text(JOB)
    return write_config(tmp_path, script, **sections)


def assert_not_at_rest(files: dict[str, bytes], *outputs: str) -> None:
    assert files, "no run directory files to check"
    for name, data in files.items():
        assert SECRET.encode() not in data, f"{name} holds the secret in clear"
    for text in outputs:
        assert SECRET not in text


@pytest.mark.parametrize("command", ["run", "render", "submit"])
def test_secret_in_job_env_is_refused_before_anything_is_written(tmp_path, command):
    cfg = job_config(tmp_path, job={"env": {"WANDB_API_KEY": SECRET, "MODE": "fast"}})
    proc = run_orch(command, str(cfg), "--run-id", "refused")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"{cfg}: job.env.WANDB_API_KEY: looks like a secret and job.env is stored in clear in run.yaml;"
        " export WANDB_API_KEY and list it in job.pass_env instead"
    ]
    assert SECRET not in proc.stdout + proc.stderr
    assert not (tmp_path / "runs").exists()


def test_secret_set_on_the_command_line_is_refused(tmp_path):
    cfg = job_config(tmp_path)
    proc = run_orch("run", str(cfg), "--set", f"job.env.HF_TOKEN={SECRET}")
    assert proc.returncode == 2 and "job.env.HF_TOKEN: looks like a secret" in proc.stderr
    assert SECRET not in proc.stdout + proc.stderr and not (tmp_path / "runs").exists()


def _local_files(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _s3_files(url: str) -> dict[str, bytes]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return {name: fs.cat_file(name) for name in fs.find(path)}


@pytest.mark.parametrize("where, mode", [("local", "auto"), ("s3", "subprocess")])
def test_pass_env_secret_reaches_every_rank_and_no_file(tmp_path, request, where, mode):
    if where == "s3":
        request.getfixturevalue("s3_server")
        root = f"s3://{S3_BUCKET}/secrets-{os.getpid()}-{tmp_path.name}"
    else:
        root = str(tmp_path / "runs")
    cfg = job_config(
        tmp_path,
        job={"pass_env": [SECRET_NAME], "env": {"MODE": "fast"}},
        storage={"root": root},
        launch={"mode": mode},
    )
    env = {SECRET_NAME: SECRET}
    proc = run_orch("run", str(cfg), "--run-id", "passed", env=env)
    assert proc.returncode == 0, proc.stderr
    logs = run_orch("logs", "passed", "--config", str(cfg), env=env)
    assert logs.returncode == 0, logs.stderr
    for rank in (0, 1):
        assert f"[rank {rank}] rank {rank} sees digest {DIGEST}" in logs.stdout
    assert "failing once on purpose" in logs.stdout + proc.stdout + proc.stderr  # a restart happened
    run_url = f"{root}/passed"
    files = _s3_files(run_url) if where == "s3" else _local_files(Path(run_url))
    assert any(name.endswith("run.yaml") for name in files)
    assert any("events" in name for name in files) and any(name.endswith(".log") for name in files)
    # Staged logs of a remote run directory are files at rest too.
    staging = Path(RunDir(run_url).logs_path(0)).parent
    staged = _local_files(staging) if where == "s3" and staging.exists() else {}
    assert_not_at_rest({**files, **staged}, proc.stdout, proc.stderr, logs.stdout, logs.stderr)


def test_staged_logs_of_two_remote_runs_with_one_id_stay_apart():
    # A rank log is staged locally and uploaded at the end of each attempt; staged by run id
    # alone, a second run with the same id under another root appended to the first one's logs
    # and uploaded them (whatever they held) into its own run directory.
    one, other = RunDir(f"s3://{S3_BUCKET}/a/run-1"), RunDir(f"s3://{S3_BUCKET}/b/run-1")
    assert one.run_id == other.run_id and one.logs_path(0) != other.logs_path(0)
    assert RunDir(f"s3://{S3_BUCKET}/a/run-1/").logs_path(0) == one.logs_path(0)


@pytest.mark.parametrize("mode, hook", [("auto", "--runtime-hook"), ("subprocess", None)])
def test_a_job_that_prints_its_secret_leaves_it_redacted_everywhere(tmp_path, mode, hook):
    # tests/jobs/leak_secret.py: rank 0 prints the value whole, in two writes half a second
    # apart, on stderr, and dies of an exception that holds it (recorded by the runtime's hook,
    # or by the launcher's entry); rank 1 is killed while writing its first 6 characters.
    cfg = write_config(
        tmp_path,
        TEST_JOBS / "leak_secret.py",
        args=[SECRET_NAME, *([hook] if hook else [])],
        job={"pass_env": [SECRET_NAME]},
        launch={"mode": mode},
        restart={"max_restarts": 0},
    )
    env = {SECRET_NAME: SECRET}
    proc = run_orch("run", str(cfg), "--run-id", "leaky", env=env)
    assert proc.returncode == 1, proc.stderr
    report = run_orch("report", "leaky", "--config", str(cfg), env=env)
    assert report.returncode == 0, report.stderr
    run_dir = tmp_path / "runs" / "leaky"
    files = _local_files(run_dir)
    # The job did leak it, and every way in was masked.
    logs = run_dir / "logs" / "attempt-0"
    assert (logs / "rank-0.log").read_text().splitlines()[:3] == [
        f"rank 0 prints token={REDACTED}",
        f"rank 0 writes token={REDACTED} in two writes",
        f"rank 0 on stderr token={REDACTED}",
    ]
    assert f"RuntimeError: could not log in with token={REDACTED}" in (logs / "rank-0.log").read_text()
    assert (logs / "rank-1.log").read_text().strip() == f"rank 1 dies writing token={REDACTED}"
    assert REDACTED in json.loads((logs / "rank-0.error.json").read_text())["traceback"]
    causes = [e["root_cause"] for e in read_events(run_dir) if e.get("root_cause")]
    assert causes and all(
        c["message"] == f"RuntimeError: could not log in with token={REDACTED}" for c in causes
    )
    assert f"[rank 0] rank 0 writes token={REDACTED} in two writes" in proc.stdout
    assert f"could not log in with token={REDACTED}" in proc.stderr
    assert any(name.endswith("report.html") for name in files)
    assert_no_trace_at_rest(files, proc.stdout, proc.stderr, report.stdout, report.stderr)


def assert_no_trace_at_rest(files: dict[str, bytes], *outputs: str) -> None:
    """Neither the secret nor its start (where a write or a record was cut) in any file."""
    assert_not_at_rest(files, *outputs)
    for name, data in files.items():
        assert SECRET[:6].encode() not in data, f"{name} holds the secret's start"


@pytest.mark.parametrize(
    "job, mode, hook",
    [
        ("record_secret.py", "auto", None),
        ("popped_secret.py", "subprocess", None),
        ("popped_secret.py", "auto", "--runtime-hook"),
    ],
)
def test_an_error_record_holds_no_secret_however_the_job_recorded_or_hid_it(tmp_path, job, mode, hook):
    # record_secret.py: torch's @record writes the rank's error file itself, message and
    # traceback as they are, before orch's entry sees the exception. popped_secret.py removes
    # the variable before it raises: a redaction that reads the environment then finds nothing.
    cfg = write_config(
        tmp_path,
        TEST_JOBS / job,
        args=[SECRET_NAME, *([hook] if hook else [])],
        job={"pass_env": [SECRET_NAME]},
        launch={"mode": mode},
        resources={"ranks_per_node": 1},
        restart={"max_restarts": 0},
    )
    env = {SECRET_NAME: SECRET}
    proc = run_orch("run", str(cfg), "--run-id", "recorded", env=env)
    assert proc.returncode == 1, proc.stderr
    run_dir = tmp_path / "runs" / "recorded"
    logs = run_dir / "logs" / "attempt-0"
    message = f"could not log in with token={REDACTED}"
    # The job did raise with the secret (masked in its log on the way)...
    assert f"RuntimeError: {message}" in (logs / "rank-0.log").read_text()
    record = json.loads((logs / "rank-0.error.json").read_text())
    if job == "record_secret.py":  # ...and torch wrote the record, redacted in its own structure
        assert record["message"]["message"] == f"RuntimeError: {message}"
        assert REDACTED in record["message"]["extraInfo"]["py_callstack"]
    else:
        assert record["message"] == message and REDACTED in record["traceback"]
    causes = [e["root_cause"] for e in read_events(run_dir) if e.get("root_cause")]
    assert causes and all(c["message"] == f"RuntimeError: {message}" for c in causes)
    assert_no_trace_at_rest(_local_files(run_dir), proc.stdout, proc.stderr)
