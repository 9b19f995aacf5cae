"""The exclusive claim on a run's or sweep's directory (issue 27, point 7): one holder at a time,
named to whoever is refused, dropped with its holder however it ends; for a directory on an
object store, a lock file of this host's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

import pytest

from orchestrator.storage.rundir import CLAIM_FILE, DirectoryClaimed, RunDir, claim_directory, claim_path


def test_a_claim_refuses_a_second_one_naming_its_holder_until_released(tmp_path):
    with RunDir(str(tmp_path)).claim():
        # A second claim refuses even in the holder's own process (another thread's resume).
        with pytest.raises(DirectoryClaimed) as refused:
            claim_directory(str(tmp_path))
        assert refused.value.holder["pid"] == os.getpid() and refused.value.holder["host"]
    assert os.path.exists(tmp_path / CLAIM_FILE)
    claim_directory(str(tmp_path)).release()  # free again


def test_a_claim_ends_with_its_holder_however_it_dies(tmp_path):
    code = (
        "import sys, time; from orchestrator.storage.rundir import claim_directory;"
        f" c = claim_directory({str(tmp_path)!r}); print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DirectoryClaimed) as refused:
            claim_directory(str(tmp_path))
        assert refused.value.holder["pid"] == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    claim_directory(str(tmp_path)).release()


def test_an_object_store_directorys_claim_is_this_hosts():
    url = "s3://bucket/runs/r1"
    path = claim_path(url)
    assert path.startswith(tempfile.gettempdir()) and path != claim_path("s3://bucket/runs/r2")
    assert claim_path(url + "/") == path  # one directory, one lock
    with claim_directory(url):  # nothing on the store is read or written
        with pytest.raises(DirectoryClaimed):
            claim_directory(url)
