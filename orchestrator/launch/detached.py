"""`orch` in a process of its own: a run or sweep supervised in the background (the API's
wait=False) and each point of a local sweep. A new session, so a terminal's Ctrl-C reaches it
only through whoever started it; its console appended to a private file."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

SUPERVISOR_LOG = "supervisor.log"


def console_log(url: str, name: str) -> str:
    """Where a background supervisor's console goes: supervisor.log in its directory (a local
    one), else a private file in the temp directory named after the run or sweep."""
    if "://" not in url or url.startswith("file://"):
        return os.path.join(url.removeprefix("file://"), SUPERVISOR_LOG)
    import hashlib

    # Named by the URL too: two roots may hold runs of one name.
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:12]
    folder = os.path.join(tempfile.gettempdir(), f"orch-{os.getuid()}", f"{name.replace('/', '-')}-{digest}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    return os.path.join(folder, SUPERVISOR_LOG)


def start_detached(orch_args: list[str], log_path: str) -> subprocess.Popen:
    """`orch ARGS` (this interpreter) in a new session, its console appended to `log_path`."""
    # O_NOFOLLOW: a link put where the log goes (by another user, in a shared temp folder) is
    # refused, not appended to.
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", *orch_args],
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        os.close(fd)
