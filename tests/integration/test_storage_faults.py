"""Storage that fails under a run, through `orch` as a user runs it: a read-only root, a disk
that fills up mid-run, a wrong S3 endpoint, an S3 server that dies mid-save. Each either stops
before starting in one line (exit 2), or fails the attempt with the storage failure named as
the root cause while the newest committed checkpoint stays loadable, and `orch resume` then
finishes the run with the weights of an uninterrupted one.

Mounts need root (a tmpfs: tests run as root here, and root ignores file permissions, so only
a read-only or a full mount really produces EROFS and ENOSPC); those tests skip without it."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from orchestrator.backends import get_backend
from orchestrator.errors import UsageError
from orchestrator.storage.ckpt_store import CheckpointStore
from orchestrator.storage.rundir import RunDir

from ..conftest import JOBS, S3_BUCKET, orch_cmd, read_events, run_orch, wait_for, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ARGS = ["--steps", "60", "--step-sleep", "0.05", "--dataset-size", "512"]


def config(tmp_path: Path, restarts: int = 0, **storage) -> Path:
    """restarts=0: the attempt that storage failed ends the run, and `orch resume` continues it."""
    return write_config(
        tmp_path,
        JOBS / "train_ddp.py",
        args=ARGS,
        storage={"checkpoint_interval": 10, **storage},
        restart={"max_restarts": restarts},
    )


def one_line_exit(proc: subprocess.CompletedProcess, code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def status(cfg: Path, run_id: str) -> dict:
    proc = run_orch("status", run_id, "--config", str(cfg), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def start(cfg: Path, run_id: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        orch_cmd("run", str(cfg), "--run-id", run_id, "--quiet"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def assert_failed_on_storage(cfg: Path, run_id: str, orch: subprocess.Popen, words: str) -> dict:
    """The attempt failed, `orch` said why in words, and status names it as the root cause."""
    _, err = orch.communicate(timeout=180)
    assert orch.returncode not in (0, None), err
    assert words in err and "Traceback" not in err, err
    st = status(cfg, run_id)
    assert st["state"] == "failed" and words in json.dumps(st["root_cause"]), st
    return st


def resume_and_check(cfg: Path, run_id: str, committed: int, digest: str, env: dict | None = None) -> None:
    resumed = run_orch("resume", run_id, "--config", str(cfg), "--quiet", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"from checkpoint step {committed}" in resumed.stderr
    st = status(cfg, run_id)
    assert st["state"] == "succeeded" and st["newest_checkpoint"] == 60
    assert st["newest_checkpoint_digest"] == digest, "the resumed run's weights differ"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    """The final model digest of the same run, uninterrupted."""
    tmp = tmp_path_factory.mktemp("storage-ref")
    cfg = config(tmp, restarts=2)  # a restart (a rank lost to a busy machine) resumes exactly
    proc = run_orch("run", str(cfg), "--run-id", "ref", "--quiet")
    assert proc.returncode == 0, proc.stderr
    return status(cfg, "ref")["newest_checkpoint_digest"]


# ---------------------------------------------------------------------------- local filesystems


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Fill the filesystem of `directory` to the last byte; the file that did it."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    with contextlib.suppress(OSError):  # and the last pages, a few bytes at a time
        with open(filler, "ab", buffering=0) as fh:
            while True:
                fh.write(b"\0" * 512)
    return filler


def test_a_read_only_root_is_one_line(tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as root:
        line = one_line_exit(run_orch("run", str(config(tmp_path)), "--set", f"storage.root={root}/runs"), 2)
        # The backend's storage check refuses an existing root that takes no writes.
        with pytest.raises(UsageError, match="storage is read-only: Read-only file system") as probe:
            get_backend("local").check_storage(str(root))
    assert line.startswith("storage.root: ") and f"{root}/runs" in line and "Read-only file system" in line
    assert (
        str(probe.value)
        == f"storage.root: cannot write to {root}: storage is read-only: Read-only file system"
    )


def test_a_full_root_is_one_line(tmp_path):
    with tmpfs(tmp_path / "full", "size=64k") as root:
        fill(root)
        line = one_line_exit(run_orch("run", str(config(tmp_path)), "--set", f"storage.root={root}/runs"), 2)
    assert line.startswith("storage.root: ") and f"{root}/runs" in line and "No space left on device" in line


def test_a_full_disk_fails_the_save_by_name_and_resume_finishes_the_run(tmp_path, reference):
    cfg = config(tmp_path)
    with tmpfs(tmp_path / "runs", "size=8m") as root:  # the storage root: the disk that fills up
        run_dir = root / "full"
        orch = start(cfg, "full")
        try:
            ckpt = CheckpointStore(str(run_dir / "ckpt"))
            wait_for(lambda: run_dir.is_dir() and ckpt.committed_steps(), 120, "a committed checkpoint")
            filler = fill(root)
            # The ranks' error records land in space reserved at their start: the root cause is
            # named although nothing more fits on the disk when they fail.
            st = assert_failed_on_storage(cfg, "full", orch, "storage full")
        finally:
            if orch.poll() is None:
                orch.kill()
        committed = ckpt.committed_steps()
        assert committed and st["newest_checkpoint"] == committed[0] < 60
        ckpt.verify(committed[0])  # every file there, every checksum right
        filler.unlink()  # space again
        resume_and_check(cfg, "full", committed[0], reference)
        restored = [e for e in read_events(run_dir) if e["event"] == "restored"]
        assert restored and restored[-1]["step"] == committed[0]


# ---------------------------------------------------------------------------- S3


def test_a_wrong_s3_endpoint_is_one_line_before_anything_starts(tmp_path):
    with socket.socket() as closed:  # a port nobody listens on: connection refused
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    wrong = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL": endpoint,
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
    }
    began = time.monotonic()
    line = one_line_exit(
        run_orch("run", str(config(tmp_path)), "--set", f"storage.root=s3://{S3_BUCKET}/runs", env=wrong), 2
    )
    assert time.monotonic() - began < 60
    assert line.startswith("storage.root: ") and "storage unreachable" in line, line


PROBE = """
import sys
from orchestrator.backends import get_backend
from orchestrator.errors import UsageError
try:
    get_backend("local").check_storage(sys.argv[1])
except UsageError as exc:
    print(exc)
"""


def test_an_s3_endpoint_that_never_answers_is_refused_within_seconds():
    # Accepts connections and never answers: a client's own timeouts and retries take minutes.
    # In a process of its own: fsspec reads its endpoint from the environment once, at import.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "FSSPEC_S3_ENDPOINT_URL": endpoint}
        env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
        began = time.monotonic()
        probe = subprocess.run(
            [sys.executable, "-c", PROBE, f"s3://{S3_BUCKET}/runs"], env=env, capture_output=True, text=True
        )
        took = time.monotonic() - began
    assert probe.returncode == 0 and "Traceback" not in probe.stderr, probe.stderr
    assert probe.stdout.startswith(f"storage.root: s3://{S3_BUCKET}/runs did not answer within 10s")
    assert "(storage unreachable)" in probe.stdout and len(probe.stdout.splitlines()) == 1
    assert took < 30, took


class KillableS3:
    """What the ranks see as the S3 server: a TCP proxy in front of moto on its own port. It
    dies (stops listening and drops every connection: clients get refused) at the first
    request that matches `kill_at`, and `restart()` brings it back for good on the same port. moto
    behind it keeps its objects: moto_server holds them in memory, so killing moto itself
    would lose every committed checkpoint, which no real S3 outage does."""

    def __init__(self, upstream: str, kill_at: bytes) -> None:
        self.upstream = upstream.removeprefix("http://").split(":")
        self.kill_at: re.Pattern[bytes] | None = re.compile(kill_at)
        self.killed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def restart(self) -> None:
        self.kill_at = None
        self.killed.clear()
        port = int(self.endpoint.rsplit(":", 1)[1])
        self.listener = socket.create_server(("127.0.0.1", port))  # SO_REUSEADDR: the same port
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def kill(self) -> None:
        self.killed.set()
        with self._lock:
            doomed, self._sockets = [self.listener, *self._sockets], []
        for sock in doomed:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # also wakes the accept loop
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while not self.killed.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection((self.upstream[0], int(self.upstream[1])))
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, watch: bool) -> None:
        tail = b""
        try:
            while data := src.recv(65536):
                if watch and self.kill_at is not None:
                    seen, tail = tail + data, (tail + data)[-512:]
                    if self.kill_at.search(seen):
                        self.kill()
                        return
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def rank_pids(run: RunDir) -> list[int]:
    started = [e for e in run.events() if e["event"] == "attempt_started"]
    return started[-1]["pids"] if started else []


def exited(pids: list[int]) -> bool:
    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    return all(gone(p) for p in pids)


def test_an_s3_server_killed_mid_save_fails_the_attempt_by_name_and_resume_finishes(
    tmp_path, reference, s3_server
):
    root = f"s3://{S3_BUCKET}/outage-{uuid.uuid4().hex[:8]}"
    cfg = config(tmp_path, root=root)
    server = KillableS3(s3_server["AWS_ENDPOINT_URL"], rb"PUT /[^ ]*/ckpt/step-00000020\.tmp-")
    via_proxy = {"AWS_ENDPOINT_URL": server.endpoint, "FSSPEC_S3_ENDPOINT_URL": server.endpoint}
    run = RunDir(f"{root}/s3")  # this process reads moto directly, past the proxy
    orch = start(cfg, "s3", env=via_proxy)
    try:
        assert server.killed.wait(180), "the run never reached its second save"
        pids = wait_for(lambda: rank_pids(run), 30, "the attempt's ranks")
        # Down until the ranks gave up on it; back before the supervisor records the attempt's
        # end (the client's own retries carry the supervisor over the gap).
        wait_for(lambda: exited(pids), 120, "the ranks to fail", interval=0.02)
        server.restart()
        assert_failed_on_storage(cfg, "s3", orch, "storage unreachable")
        store = CheckpointStore(f"{root}/s3/ckpt")
        assert store.committed_steps() == [10]
        store.verify(10)  # every file there, every checksum right
        resume_and_check(cfg, "s3", 10, reference, env=via_proxy)
    finally:
        if orch.poll() is None:
            orch.kill()
        server.kill()
