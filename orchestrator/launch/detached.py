"""`orch` in a process of its own: a run or sweep supervised in the background (the API's
wait=False) and each point of a local sweep. A new session, so a terminal's Ctrl-C reaches it
only through whoever started it; its console appended to a private file."""

from __future__ import annotations

import os
import subprocess
import sys

from orchestrator.storage.private import open_private_file, user_temp_dir

SUPERVISOR_LOG = "supervisor.log"


def console_log(url: str, name: str) -> str:
    """Where a background supervisor's console goes: supervisor.log in its directory (a local
    one), else a file in this user's private folder of the temp directory (storage/private.py:
    NotPrivate if another user made it or could write in it), named after the run or sweep."""
    if "://" not in url or url.startswith("file://"):
        return os.path.join(url.removeprefix("file://"), SUPERVISOR_LOG)
    import hashlib

    # Named by the URL too: two roots may hold runs of one name.
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:12]
    return os.path.join(user_temp_dir(f"{name.replace('/', '-')}-{digest}"), SUPERVISOR_LOG)


def start_detached(orch_args: list[str], log_path: str) -> subprocess.Popen:
    """`orch ARGS` (this interpreter) in a new session, its console appended to `log_path`."""
    # A link put where the log goes, or a file someone else made there (to read what we write),
    # is refused (NotPrivate), not appended to.
    fd = open_private_file(log_path, os.O_WRONLY | os.O_APPEND)
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
