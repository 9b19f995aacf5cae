"""Which folders another user could rename a run directory out of (storage/root_safety.py), and
the Slurm batch step's check of the pickle it is about to load (backends/slurm/batch_guard.py):
real folders, modes, links, an ACL and a second Unix user, no mocks (issue 28, point 3)."""

from __future__ import annotations

import errno
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest

from orchestrator.backends.slurm.batch_guard import (
    UnsafePickle,
    check_submitted_pickle,
    guarded_python,
    submitted_pickle,
)
from orchestrator.errors import UsageError
from orchestrator.storage.root_safety import (
    check_run_directory,
    check_storage_root,
    lookup_folders,
    open_folder_above,
)

from ..attacker import ATTACKER, as_attacker, attacker_uid, needs_root


@pytest.fixture
def reachable():
    """A folder in /tmp that the attacker can enter (pytest's tmp_path is closed to others)."""
    folder = Path(tempfile.mkdtemp(prefix="orch-root-safety-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def folder(parent: Path, name: str, mode: int) -> Path:
    made = parent / name
    made.mkdir()
    made.chmod(mode)  # mkdir's mode goes through the umask
    return made


# ---------------------------------------------------------------------------- the lookup


def test_the_lookup_follows_links_as_the_kernel_does_and_keeps_the_folder_of_each_link(tmp_path):
    a, b = folder(tmp_path, "a", 0o755), folder(tmp_path, "b", 0o755)
    target = folder(b, "target", 0o755)
    (a / "link").symlink_to("../b/target")
    # runs/ is not there yet: the lookup stops where the run directory's creation goes on.
    found = lookup_folders(f"{a}/link/runs/new")
    assert found[:4] == [str(target), str(b), str(a), str(tmp_path)] and found[-1] == "/", found
    # `..` after a link leaves the link's target, not the folder the link is in.
    folder(b, "c", 0o755), folder(a, "c", 0o755)
    assert lookup_folders(f"{a}/link/../c")[0] == str(b / "c")


def test_a_loop_of_links_is_an_error_not_a_hang(tmp_path):
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(OSError) as looped:
        lookup_folders(f"{tmp_path}/loop/runs")
    assert looped.value.errno == errno.ELOOP


# ---------------------------------------------------------------------------- modes


@pytest.mark.parametrize(
    ("mode", "letters"),
    [
        (0o700, None),
        (0o755, None),
        (0o1777, None),
        (0o777, "o"),
        (0o757, "o"),
        # The group is the owner's private group (root's): its write bit lets no one else in.
        pytest.param(0o770, None, marks=needs_root),
    ],
)
def test_who_else_can_rename_in_a_folder_by_its_mode(reachable, mode, letters):
    root = folder(reachable, "runs", mode)
    found = open_folder_above(str(root))
    assert (found.letters if found else None) == letters
    if found:
        assert found.folder == str(root) and found.mode == mode and found.writers == "others"


def test_a_folder_inside_one_only_this_user_can_enter_is_out_of_others_reach(reachable):
    mine = folder(reachable, "mine", 0o700)
    inside = folder(mine, "runs", 0o777)
    assert open_folder_above(str(inside)) is None
    mine.chmod(0o711)  # others may pass through it now, and so reach the open folder
    found = open_folder_above(str(inside))
    assert found is not None and found.folder == str(inside)
    inside.chmod(0o776)  # writable, but without the search bit no one can rename in it
    assert open_folder_above(str(inside)) is None


def test_the_refusal_is_one_line_naming_the_folder_and_the_fix(reachable):
    above = folder(reachable, "shared", 0o777)
    with pytest.raises(UsageError) as refused:
        check_storage_root(f"file://{above}/alice/runs")  # not made yet: its parent decides
    assert str(refused.value) == (
        f"storage.root: {above} (above {above}/alice/runs) has mode 0777: others can write in it"
        " and it has no sticky bit, so they can rename what is in it and put their own in its place,"
        f" a run directory included; fix: chmod o-w {above}, or chmod +t {above} (as its owner),"
        " or set storage.root outside it"
    )
    above.chmod(0o1777)
    check_storage_root(f"{above}/alice/runs")  # sticky and root's: others rename only their own


@needs_root
def test_a_sticky_folder_of_another_user_is_refused_its_owner_renames_what_is_in_it(reachable):
    squatted = folder(reachable, "runs", 0o1777)  # /tmp/runs, made first by someone else
    os.chown(squatted, attacker_uid(), -1)
    (squatted / "victim").mkdir(mode=0o700)
    found = open_folder_above(str(squatted))
    assert found is not None and found.sticky_owner == f"user {ATTACKER}", found
    assert found.fix == f"set storage.root outside {squatted}"
    as_attacker(f"mv '{squatted}/victim' '{squatted}/aside'")  # the sticky bit did not stop its owner
    assert (squatted / "aside").stat().st_uid == 0


@needs_root
def test_a_group_write_bit_that_is_an_acls_mask_is_refused(reachable):
    shared = folder(reachable, "runs", 0o755)
    _grant_write(shared, attacker_uid())  # setfacl -m u:orch-attacker:rwx, by its xattr
    assert shared.stat().st_mode & 0o777 == 0o775  # the group bits show the ACL's mask
    found = open_folder_above(str(shared))
    assert found is not None and found.writers == "users its ACL names" and found.letters == "g"
    as_attacker(f"mkdir '{shared}/planted'")  # the ACL does let the attacker in
    assert (shared / "planted").stat().st_uid == attacker_uid()


def _grant_write(path: Path, uid: int) -> None:
    """A POSIX access ACL (its xattr's binary form): owner rwx, user `uid` rwx, group r-x,
    mask rwx, others r-x."""
    undefined = 0xFFFFFFFF
    entries = [(0x01, 7, undefined), (0x02, 7, uid), (0x04, 5, undefined), (0x10, 7, undefined)]
    entries.append((0x20, 5, undefined))
    data = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)
    os.setxattr(path, "system.posix_acl_access", data)


@needs_root
def test_a_run_directory_is_read_only_when_it_is_ours_in_closed_folders(reachable):
    """What a resume should ask before it reads run.yaml, which names the script it starts."""
    root = folder(reachable, "runs", 0o755)
    run = folder(root, "run", 0o700)
    check_run_directory(str(run))
    os.chown(run, attacker_uid(), -1)  # a run directory the attacker put in place
    with pytest.raises(UsageError, match=f"is owned by user {ATTACKER}, not a folder of this user's"):
        check_run_directory(str(run))
    os.chown(run, 0, -1)
    root.chmod(0o777)  # ours, but in a folder where anyone could have swapped it
    with pytest.raises(UsageError, match=f"{root} \\(above {run}\\) has mode 0777"):
        check_run_directory(f"file://{run}")


# ---------------------------------------------------------------------------- the batch step


def submitted_run(reachable: Path, run_mode: int = 0o700) -> Path:
    """root (0755) / run (0700) / slurm (0755) / 7_submitted.pkl (0644), as `orch submit` leaves them."""
    root = folder(reachable, "runs", 0o755)
    slurm = folder(folder(root, "run", run_mode), "slurm", 0o755)
    pickle = slurm / "7_submitted.pkl"
    pickle.write_bytes(b"a job")
    pickle.chmod(0o644)
    return pickle


def test_the_batch_step_takes_a_pickle_of_its_own_in_closed_folders(reachable):
    pickle = submitted_run(reachable)
    check_submitted_pickle(str(pickle), wait_s=0)
    # A umask of 000 or 002 opens what submitit makes; inside the 0700 run directory no one
    # else reaches it.
    pickle.parent.chmod(0o777)
    pickle.chmod(0o666)
    check_submitted_pickle(str(pickle), wait_s=0)


@pytest.mark.parametrize("what", ["link", "others write it", "root opened", "missing"])
def test_the_batch_step_refuses_a_pickle_others_could_have_made(reachable, what):
    pickle = submitted_run(reachable, run_mode=0o755)  # others may enter the run directory
    expected = {
        "link": f"{pickle} is not a regular file",
        "others write it": f"{pickle} has mode 0666: others can write it",
        "root opened": f"{reachable}/runs (above {pickle}) has mode 0777",
        "missing": f"{pickle} is not there after 0s",
    }[what]
    if what == "link":
        pickle.rename(pickle.with_name("real.pkl"))
        pickle.symlink_to("real.pkl")
    elif what == "others write it":
        pickle.chmod(0o666)
    elif what == "root opened":
        (reachable / "runs").chmod(0o777)
    else:
        pickle.unlink()
    with pytest.raises(UnsafePickle) as refused:
        check_submitted_pickle(str(pickle), wait_s=0)
    assert str(refused.value).startswith(expected), refused.value


@needs_root
@pytest.mark.parametrize("whose", ["pickle", "slurm folder", "run directory"])
def test_the_batch_step_refuses_what_another_user_owns(reachable, whose):
    pickle = submitted_run(reachable)
    owned = {"pickle": pickle, "slurm folder": pickle.parent, "run directory": pickle.parent.parent}[whose]
    os.chown(owned, attacker_uid(), -1)
    with pytest.raises(UnsafePickle) as refused:
        check_submitted_pickle(str(pickle), wait_s=0)
    assert str(refused.value) == f"{owned} belongs to user {ATTACKER}, not to this user (user root)"


def test_the_batch_step_finds_the_pickle_submitit_loads(monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    assert submitted_pickle("/runs/r/slurm") == "/runs/r/slurm/12_submitted.pkl"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "10")  # a job array's task: ARRAY_TASK
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert submitted_pickle("/runs/sw/slurm") == "/runs/sw/slurm/10_2_submitted.pkl"


def test_the_guard_runs_before_submitits_loader_with_every_path_quoted():
    assert guarded_python("/opt/my env/bin/python", "/runs/a b/slurm") == (
        "'/opt/my env/bin/python' -m orchestrator.backends.slurm.batch_guard '/runs/a b/slurm'"
        " && '/opt/my env/bin/python'"
    )
