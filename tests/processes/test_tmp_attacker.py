"""Another local user cannot take over the folders orch keeps in the host's temp directory
(issue 28, point 2): port leases, a background supervisor's console, the staged logs of a run
directory on an object store, TensorBoard's staged files. Their paths are fixed and anyone can
compute them; a second Unix user who makes them first (open to all, private to itself, or a link
to a folder of ours), or plants files in them (a link to one of our files, a file open to all, a
forged error record), must get a one-line refusal naming the folder, or nothing at all: never a
file of ours it can read or swap, never a file of ours uploaded through its link."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
import torch

from orchestrator.launch.detached import console_log, start_detached
from orchestrator.launch.ports import lease_port
from orchestrator.runtime import Metrics
from orchestrator.runtime.dist import DistContext
from orchestrator.storage.private import NotPrivate
from orchestrator.storage.rundir import RunDir, claim_directory

from ..attacker import as_attacker, attacker_python, attacker_uid, needs_root
from ..conftest import S3_BUCKET, TEST_JOBS, run_orch, write_config

pytestmark = needs_root

SECRET = f"-----BEGIN OPENSSH PRIVATE KEY----- {uuid.uuid4().hex}"
PLANTED_CAUSE = "PlantedByAnotherUser"


@pytest.fixture
def shared_tmp(tmp_path, monkeypatch):  # tmp_path first: it stays out of the shared folder
    """A temp directory like /tmp (sticky, everyone may write) in place of this process's
    tempfile.gettempdir() and, through TMPDIR, of every `orch` it starts."""
    folder = Path(tempfile.mkdtemp(prefix="orch-tmp-attack-", dir="/tmp"))
    folder.chmod(0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setenv("TMPDIR", str(folder))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def secret_key(tmp_path) -> Path:
    """A file of ours the attacker cannot read (~/.ssh/id_ed25519): its folder is ours, 0700."""
    key = tmp_path / "home" / ".ssh" / "id_ed25519"
    key.parent.mkdir(parents=True, mode=0o700)
    key.write_text(SECRET + "\n")
    key.chmod(0o600)
    (tmp_path / "home").chmod(0o700)
    tmp_path.chmod(0o700)
    cannot = attacker_python(f"open({str(key)!r}).read()")
    cannot.wait(timeout=60)
    assert cannot.returncode != 0, "the attacker could read the key without orch's help"
    return key


def top(shared_tmp: Path) -> Path:
    return shared_tmp / f"orch-{os.getuid()}"


def ours_in(folder: Path) -> list[str]:
    """Everything of this user's (the victim's) in the attacker's folder, links not followed."""
    found = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            if os.lstat(path).st_uid == os.getuid():
                found.append(path)
    return found


def one_line(proc: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """What `orch` said, asserted to be one line (no traceback) and to exit with `code`."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    (line,) = proc.stderr.strip().splitlines()
    return line


def refused_line(refused: pytest.ExceptionInfo[NotPrivate]) -> str:
    (line,) = str(refused.value).splitlines()
    return line


# ---------------------------------------------------------------------------- port leases


def test_orch_run_refuses_port_lock_folders_another_user_made_open_in_one_line(shared_tmp, tmp_path):
    # The old folder of the leases (orch-ports-UID) and the new one (orch-UID/ports), both the
    # attacker's and open to all: every lock file we made there it could hold, or swap.
    old = shared_tmp / f"orch-ports-{os.getuid()}"
    as_attacker(f"mkdir -m 777 '{top(shared_tmp)}' '{top(shared_tmp)}/ports' '{old}'")
    assert top(shared_tmp).stat().st_uid == old.stat().st_uid == attacker_uid()  # the trap is set
    cfg = write_config(tmp_path, TEST_JOBS / "brief.py", restart={"max_restarts": 0})
    line = one_line(run_orch("run", str(cfg), timeout=120))
    assert f"{top(shared_tmp)} belongs to uid {attacker_uid()}" in line, line
    assert ours_in(shared_tmp) == [], "a file of ours is in the attacker's folder"
    assert not (tmp_path / "runs").exists(), "refused before the run directory was made"


def test_a_port_lock_folder_linked_to_a_folder_of_ours_is_refused(shared_tmp, tmp_path):
    ours = tmp_path / "victim-folder"
    ours.mkdir(mode=0o700)
    for trap in (top(shared_tmp), shared_tmp / f"orch-ports-{os.getuid()}"):
        as_attacker(f"ln -s '{ours}' '{trap}'")
        assert trap.is_symlink()
    with pytest.raises(NotPrivate) as refused:
        lease_port()
    assert f"{top(shared_tmp)} is a symbolic link" in refused_line(refused)
    assert list(ours.iterdir()) == []


def test_a_port_whose_lock_another_user_holds_is_refused_by_name_not_reported_busy(shared_tmp):
    # The attacker's open folder, and its own lock file of the port, held for as long as it likes:
    # that port (every port, with one file each) would never be ours again.
    port = 23456
    folders = [top(shared_tmp) / "ports", shared_tmp / f"orch-ports-{os.getuid()}"]
    as_attacker(f"mkdir -m 777 '{top(shared_tmp)}' '{folders[0]}' '{folders[1]}'")
    holder = attacker_python(
        "import fcntl, os, sys, time\n"
        "for folder in sys.argv[2:]:\n"
        "    fd = os.open(os.path.join(folder, sys.argv[1] + '.lock'), os.O_RDWR | os.O_CREAT, 0o666)\n"
        "    os.fchmod(fd, 0o666)\n"
        "    fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n",
        str(port),
        *map(str, folders),
    )
    try:
        assert holder.stdout.readline().strip() == "held"  # the lock is the attacker's
        with pytest.raises(NotPrivate) as refused:
            lease_port(port)
        assert f"{top(shared_tmp)} belongs to uid {attacker_uid()}" in refused_line(refused)
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------- detached start

URL = f"s3://{S3_BUCKET}/runs/r1"


def console_folder(shared_tmp: Path) -> Path:
    digest = hashlib.sha256(URL.encode()).hexdigest()[:12]
    return top(shared_tmp) / f"r1-{digest}"


def test_a_background_console_in_a_folder_another_user_made_open_is_refused(shared_tmp):
    # The attacker made the folder and an empty supervisor.log, open to all: whatever the victim's
    # background supervisor prints (paths, errors, its job's output) it could read.
    folder = console_folder(shared_tmp)
    as_attacker(
        f"mkdir -m 777 '{top(shared_tmp)}' '{folder}'; touch '{folder}/supervisor.log';"
        f" chmod 666 '{folder}/supervisor.log'"
    )
    assert (folder / "supervisor.log").stat().st_uid == attacker_uid()
    with pytest.raises(NotPrivate) as refused:
        start_detached(["--version"], console_log(URL, "r1"))
    assert f"{top(shared_tmp)} belongs to uid {attacker_uid()}" in refused_line(refused)
    assert (folder / "supervisor.log").read_bytes() == b""
    assert ours_in(top(shared_tmp)) == []


def test_a_background_console_folder_another_user_made_private_to_itself_is_refused(shared_tmp):
    # 0700 but the attacker's: it may rename, remove or replace anything we put there.
    folder = console_folder(shared_tmp)
    as_attacker(f"mkdir -m 700 '{top(shared_tmp)}' '{folder}'")
    assert stat.S_IMODE(top(shared_tmp).stat().st_mode) == 0o700
    with pytest.raises(NotPrivate) as refused:
        console_log(URL, "r1")
    assert f"{top(shared_tmp)} belongs to uid {attacker_uid()}" in refused_line(refused)
    assert ours_in(top(shared_tmp)) == []


# ---------------------------------------------------------------------------- staged logs


def staging(url: str) -> Path:
    run = RunDir(url)
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    return top(Path(tempfile.gettempdir())) / f"{run.run_id}-{digest}" / "logs" / "attempt-0"


def s3_contents(url: str) -> dict[str, bytes]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return {name: fs.cat_file(name) for name in fs.find(path)}


def test_an_s3_run_refuses_a_staging_folder_another_user_made_and_uploads_nothing_it_planted(
    shared_tmp, tmp_path, s3_server, secret_key
):
    root = f"s3://{S3_BUCKET}/tmp-attack-{uuid.uuid4().hex[:8]}"
    staged = staging(f"{root}/r1")
    record = f'{{"exc_type": "{PLANTED_CAUSE}", "message": "preempted"}}'
    as_attacker(
        f"mkdir -p '{staged}'; chmod -R 777 '{top(shared_tmp)}';"
        f" ln -s '{secret_key}' '{staged}/rank-0.log';"
        f" echo '{record}' > '{staged}/rank-0.error.json';"
        f" echo '{{\"step\": 999999}}' > '{staged}/rank-0.heartbeat'"
    )
    assert (staged / "rank-0.log").is_symlink() and (staged / "rank-0.error.json").exists()
    cfg = write_config(tmp_path, TEST_JOBS / "brief.py", storage={"root": root}, restart={"max_restarts": 0})
    line = one_line(run_orch("run", str(cfg), "--run-id", "r1", timeout=120))
    assert f"{top(shared_tmp)} belongs to uid {attacker_uid()}" in line, line
    stored = s3_contents(root)
    assert not any(SECRET.encode() in data or PLANTED_CAUSE.encode() in data for data in stored.values())
    assert not any("/logs/" in name for name in stored), sorted(stored)
    assert ours_in(top(shared_tmp)) == []


def test_only_regular_files_of_ours_among_staged_logs_are_uploaded(shared_tmp, s3_server, secret_key):
    # Our own private staging folder, where no other user can add anything; whatever put a link
    # (to ~/.ssh/id_ed25519) or another user's file in it all the same (the job itself, which
    # runs as us; root), the upload reads only regular files of ours and never follows a link.
    url = f"s3://{S3_BUCKET}/tmp-attack-{uuid.uuid4().hex[:8]}/r1"
    run = RunDir(url)
    staged = Path(run.logs_dir(0))
    (staged / "rank-0.log").write_text("rank 0 says hello\n")
    os.symlink(secret_key, staged / "rank-1.log")
    (staged / "rank-2.error.json").write_text(f'{{"exc_type": "{PLANTED_CAUSE}"}}\n')
    os.chown(staged / "rank-2.error.json", attacker_uid(), attacker_uid())
    logs = staged.parent
    os.symlink(secret_key, logs / "forkserver.log")
    assert (staged / "rank-1.log").is_symlink() and (logs / "forkserver.log").is_symlink()
    run.publish_logs(0)
    run.publish_run_logs()
    stored = s3_contents(url)
    assert stored[f"{url.removeprefix('s3://')}/logs/attempt-0/rank-0.log"] == b"rank 0 says hello\n"
    assert not any(SECRET.encode() in data or PLANTED_CAUSE.encode() in data for data in stored.values())
    assert not any(name.endswith(("rank-1.log", "rank-2.error.json", "forkserver.log")) for name in stored)
    assert secret_key.read_text() == SECRET + "\n"


# ---------------------------------------------------------------------------- TensorBoard


def metrics_for(run_dir: str | None, run_id: str = "r1") -> Metrics:
    """Rank 0's Metrics of a one-rank run in the run directory `run_dir` (None: none)."""
    ctx = DistContext(
        rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0, nnodes=1,
        backend="gloo", device=torch.device("cpu"), run_id=run_id, run_dir=run_dir, attempt=0,
    )  # fmt: skip
    return Metrics(ctx)


def test_tensorboard_files_of_an_s3_run_are_neither_readable_by_nor_planted_by_another_user(
    shared_tmp, s3_server, secret_key
):
    # The folder TensorBoard's files of a remote run used to be staged in, the attacker's and open
    # to all, with a link among them: our scalars readable there, the key uploaded at close.
    tb = top(shared_tmp) / "r1" / "tb"
    as_attacker(
        f"mkdir -p '{tb}'; chmod -R 777 '{top(shared_tmp)}';"
        f" ln -s '{secret_key}' '{tb}/events.out.tfevents.1.planted'"
    )
    assert (tb / "events.out.tfevents.1.planted").is_symlink()
    url = f"s3://{S3_BUCKET}/tmp-attack-{uuid.uuid4().hex[:8]}/r1"
    metrics = metrics_for(url)
    metrics.scalars(1, loss=0.5)
    metrics.close()
    stored = s3_contents(url)
    assert any(name.endswith(".attempt0") for name in stored), sorted(stored)  # published
    assert not any(SECRET.encode() in data for data in stored.values())
    assert ours_in(top(shared_tmp)) == []


def test_tensorboard_without_a_run_directory_refuses_a_folder_another_user_made(shared_tmp):
    as_attacker(f"mkdir -p '{top(shared_tmp)}/standalone/tb'; chmod -R 777 '{top(shared_tmp)}'")
    with pytest.raises(NotPrivate) as refused:
        metrics_for(None, run_id="standalone")
    assert f"{top(shared_tmp)} belongs to uid {attacker_uid()}" in refused_line(refused)
    assert ours_in(top(shared_tmp)) == []


# ---------------------------------------------------------------------------- no attacker


def test_every_folder_orch_makes_in_the_temp_directory_is_0700(shared_tmp):
    # Before: makedirs left the folders above the last one with the umask's mode (0755), so
    # TensorBoard's files under orch-UID/RUN/tb were readable by every user.
    umask = os.umask(0o022)  # the usual one
    try:
        metrics = metrics_for(None, run_id="sweep/3")  # a sweep point's id: two levels
        remote = metrics_for("memory://tmp-attack/r2", run_id="r2")
        console_log(URL, "r1")
        with lease_port():
            pass
        RunDir(URL).logs_dir(0)
        claim_directory(URL).release()
        made = [os.path.join(root, name) for root, dirs, _ in os.walk(shared_tmp) for name in dirs]
        assert len(made) >= 8, made
        assert {path: oct(stat.S_IMODE(os.lstat(path).st_mode)) for path in made} == {
            path: oct(0o700) for path in made
        }
        metrics.close()
        remote.close()
    finally:
        os.umask(umask)
