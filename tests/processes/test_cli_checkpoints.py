"""`orch checkpoints` and `orch status` read committed checkpoints without torch."""

import json
import subprocess
import sys

import yaml

from orchestrator.storage.ckpt_store import CheckpointStore, make_token


def orch(*args):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True)


def make_run(tmp_path):
    run = tmp_path / "runs" / "r1"
    (run / "ckpt").mkdir(parents=True)
    (run / "run.yaml").write_text(yaml.safe_dump({"run_id": "r1"}))
    store = CheckpointStore(str(run / "ckpt"))
    for step, payload in ((10, b"a" * 100), (20, b"b" * 200)):
        token = make_token(0)
        tmp = store.tmp_dir(step, token)
        store.commit(
            tmp, step, token, [store.write_file(tmp, "state.pt", payload)], {"model_digest": f"digest{step}"}
        )
    return run, store


def test_checkpoints_lists_and_verifies(tmp_path):
    run, store = make_run(tmp_path)
    listed = orch("checkpoints", str(run), "--json", "--verify")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["step"], r["size"], r["model_digest"], r["verified"]) for r in rows] == [
        (20, 200, "digest20", True),
        (10, 100, "digest10", True),
    ]
    (run / "ckpt" / "step-00000020" / "state.pt").write_bytes(b"c" * 200)
    listed = orch("checkpoints", str(run), "--json", "--verify")
    assert listed.returncode == 1, "any corrupt checkpoint fails --verify"
    rows = json.loads(listed.stdout)
    assert rows[0]["verified"] is False and "checksum mismatch" in rows[0]["error"]
    table = orch("checkpoints", str(run), "--verify")
    assert "CORRUPT" in table.stdout and "digest10" in table.stdout and table.returncode == 1
    assert orch("checkpoints", str(run)).returncode == 0  # listing alone reads no data


def test_status_json_has_newest_step_and_digest(tmp_path):
    run, _ = make_run(tmp_path)
    st = json.loads(orch("status", str(run), "--json").stdout)
    assert st["newest_checkpoint"] == 20 and st["newest_checkpoint_digest"] == "digest20"
    assert "checkpoint step 20 (model digest digest20)" in orch("status", str(run)).stdout


def test_verify_reports_a_storage_error_without_a_traceback(tmp_path):
    # A file that cannot be read (here a directory where the file was: EISDIR, as an NFS
    # ESTALE or a file deleted mid-read would be) is one row, not a crash.
    run, _ = make_run(tmp_path)
    target = run / "ckpt" / "step-00000020" / "state.pt"
    target.unlink()
    target.mkdir()
    proc = orch("checkpoints", str(run), "--json", "--verify")
    assert "Traceback" not in proc.stderr, proc.stderr
    rows = json.loads(proc.stdout)
    assert rows[0]["verified"] is False and rows[0]["error"] == "storage error: Is a directory"
    assert rows[1]["verified"] is True
