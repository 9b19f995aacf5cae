"""Another local user cannot aim a claim's lock file at one of ours (issue 27, second review,
point 1). The lock file of a run directory on an object store lives in this host's temp
directory, at a path anyone can compute; a second Unix user who makes that folder first, with a
link where the lock file goes, must not get our file truncated and rewritten, nor hold our
claims: the claim refuses in one line naming the folder, and the linked file is unchanged."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from orchestrator.storage.private import NotPrivate
from orchestrator.storage.rundir import claim_directory

from ..attacker import as_attacker, attacker_uid, needs_root

URL = "s3://bucket/runs/r1"

pytestmark = needs_root


@pytest.fixture
def shared_tmp(monkeypatch):
    """A temp directory like /tmp (sticky, everyone may write), in place of this process's
    tempfile.gettempdir(): other tests' real /tmp/orch-0 stays out of it."""
    folder = Path(tempfile.mkdtemp(prefix="orch-claims-attack-", dir="/tmp"))
    folder.chmod(0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_lock_file_linked_to_a_victims_file_by_another_user_is_refused_and_the_file_kept(shared_tmp):
    victim = shared_tmp / "victim-bashrc"
    victim.write_text("export PATH=$HOME/bin:$PATH\n")
    claims = shared_tmp / f"orch-{os.getuid()}" / "claims"
    digest = hashlib.sha256(URL.encode()).hexdigest()[:16]
    as_attacker(
        f"mkdir -p '{claims}'; chmod 777 '{claims.parent}' '{claims}';"
        f" ln -s '{victim}' '{claims}/{digest}.lock'"
    )
    assert (claims / f"{digest}.lock").is_symlink()  # the trap is set
    with pytest.raises(NotPrivate) as refused:
        claim_directory(URL)
    (line,) = str(refused.value).splitlines()
    assert str(claims.parent) in line and f"belongs to uid {attacker_uid()}" in line, line
    assert victim.read_text() == "export PATH=$HOME/bin:$PATH\n"


def test_a_claims_folder_another_user_made_private_to_itself_is_refused(shared_tmp):
    # The same folder, 0700 but the attacker's: it could hold every lock file in it forever.
    top = shared_tmp / f"orch-{os.getuid()}"
    as_attacker(f"mkdir -m 700 '{top}'; mkdir -m 700 '{top}/claims'")
    with pytest.raises(NotPrivate) as refused:
        claim_directory(URL)
    assert f"{top} belongs to uid {attacker_uid()}" in str(refused.value)
