"""The exclusive claim on a run's or sweep's directory (issue 27, point 7): one holder at a time,
named to whoever is refused, dropped with its holder however it ends; for a directory on an
object store, a lock file of this host's."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from orchestrator.contract import ENV_FAULT
from orchestrator.storage import faults
from orchestrator.storage.private import NotPrivate
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


# ---------------------------------------------------------------- a lock file no one else made
# (issue 27, second review, point 1: the lock file is opened without following a link, checked
# to be a regular file of this user's, in a folder of this user's that no one else can write.)

ELSEWHERE = 65534  # nobody: another user's uid (root may chown to it)


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """A temp directory of this test's own in place of /tmp (tempfile.gettempdir())."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def host_claims(tmp: Path) -> Path:
    return tmp / f"orch-{os.getuid()}" / "claims"


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_a_hosts_claims_folder_that_others_can_write_is_refused_in_one_line(private_tmp, mode):
    folder = host_claims(private_tmp)
    folder.mkdir(parents=True, mode=0o700)
    folder.chmod(mode)
    with pytest.raises(NotPrivate) as refused:
        claim_directory("s3://bucket/runs/r1")
    (line,) = str(refused.value).splitlines()
    assert str(folder) in line and f"mode {mode:04o}" in line, line
    assert list(folder.iterdir()) == []  # nothing made in it


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_hosts_claims_folder_of_another_user_is_refused(private_tmp):
    folder = host_claims(private_tmp)
    folder.mkdir(parents=True, mode=0o700)
    os.chown(folder.parent, ELSEWHERE, -1)
    with pytest.raises(NotPrivate) as refused:
        claim_directory("s3://bucket/runs/r1")
    assert f"{folder.parent} belongs to uid {ELSEWHERE}" in str(refused.value)


def test_a_hosts_claims_folder_that_is_a_link_is_refused(private_tmp, tmp_path):
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    os.symlink(tmp_path / "elsewhere", private_tmp / f"orch-{os.getuid()}")
    with pytest.raises(NotPrivate) as refused:
        claim_directory("s3://bucket/runs/r1")
    assert "is a symbolic link" in str(refused.value)
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_a_private_folder_only_others_could_read_is_made_private(private_tmp):
    # What earlier versions left: makedirs(mode=0o700) made /tmp/orch-UID as an intermediate
    # folder, with the umask's mode (0755). No one else could write in it: it is taken back.
    top = private_tmp / f"orch-{os.getuid()}"
    top.mkdir(mode=0o755)
    top.chmod(0o755)
    claim_directory("s3://bucket/runs/r1").release()
    assert stat.S_IMODE(top.stat().st_mode) == 0o700


def test_a_run_directorys_claim_file_that_is_a_link_is_refused_and_its_target_kept(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(victim, run / CLAIM_FILE)
    with pytest.raises(NotPrivate) as refused:
        claim_directory(str(run))
    (line,) = str(refused.value).splitlines()
    assert str(run / CLAIM_FILE) in line, line
    assert victim.read_text() == "precious\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_run_directorys_claim_file_of_another_user_is_refused_and_kept(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / CLAIM_FILE).write_text("theirs")
    os.chown(run / CLAIM_FILE, ELSEWHERE, -1)
    with pytest.raises(NotPrivate) as refused:
        claim_directory(str(run))
    assert f"belongs to uid {ELSEWHERE}" in str(refused.value)
    assert (run / CLAIM_FILE).read_text() == "theirs"


# ---------------------------------------------------------------- a holder that cannot be written
# (point 8: the holder's line is what a refused starter is told; failing to write it must not
# leak the descriptor, and with it the lock, for the rest of the process's life.)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_full_disk_while_writing_the_holder_keeps_the_claim_and_leaks_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_FAULT, "claim.holder:enospc")
    faults.reset()
    before = open_fds()
    claim = claim_directory(str(tmp_path))
    assert faults.fired() == ["claim.holder@1"]
    with pytest.raises(DirectoryClaimed) as refused:  # held: the holder's line is only for messages
        claim_directory(str(tmp_path))
    assert refused.value.holder == {}
    claim.release()
    assert open_fds() == before
    claim_directory(str(tmp_path)).release()


def test_any_other_failure_after_the_lock_releases_it(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_FAULT, "claim.holder:runtime")
    faults.reset()
    before = open_fds()
    with pytest.raises(RuntimeError):
        claim_directory(str(tmp_path))
    assert faults.fired() == ["claim.holder@1"]
    assert open_fds() == before  # the descriptor, and with it the lock, went
    claim_directory(str(tmp_path)).release()
