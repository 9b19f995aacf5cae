"""A second Unix user for the security tests (issue 28): the suite runs as root, the victim's
runs are ours, and the attacker is another uid doing what an attacker on a shared login node or
cluster would. The attacker runs shell scripts or the system's Python (/usr/bin/python3: the
venv is ours, and an attacker has a Python of their own)."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys

import pytest

ATTACKER = "orch-attacker"
SYSTEM_PYTHON = "/usr/bin/python3"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to act as a second user")


def attacker_uid() -> int:
    """The attacker's uid, the user made on first use (no home, no login shell)."""
    try:
        return pwd.getpwnam(ATTACKER).pw_uid
    except KeyError:
        proc = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", ATTACKER],
            capture_output=True,
            text=True,
        )
        # 9: made meanwhile by another test process.
        assert proc.returncode in (0, 9), proc.stderr
        return pwd.getpwnam(ATTACKER).pw_uid


def _argv(argv: list[str]) -> list[str]:
    attacker_uid()
    return ["runuser", "-u", ATTACKER, "--", *argv]


def as_attacker(script: str) -> subprocess.CompletedProcess[str]:
    """A shell script run as the attacker, to its end; it must succeed (the attack was made)."""
    proc = subprocess.run(_argv(["sh", "-ec", script]), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


def attacker_python(code: str, *args: str) -> subprocess.Popen[str]:
    """Python code run as the attacker, in the background (a flood, a listener...): the caller
    waits for it or kills it."""
    python = SYSTEM_PYTHON if os.path.exists(SYSTEM_PYTHON) else sys.executable
    return subprocess.Popen(
        _argv([python, "-c", code, *args]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
