"""Whether another user can swap a run directory for one of their own: the storage root and every
folder above it, checked before orch creates, resumes or submits anything there (issue 28).

A run directory is 0700, but a folder that others may write lets them rename any entry in it and
put one of their own under its name; orch then reads theirs: the config a resume starts (run.yaml
names the script) or the pickle a Slurm batch step loads (submitit's `slurm/<job>_submitted.pkl`),
and runs their code as you. The sticky bit stops that (only an entry's owner, the folder's owner
and root may rename an entry), so a folder is safe when no one but its owner (and you) can write
it, or when it is sticky and belongs to root or to you: the owner of a sticky folder still renames
what is in it, and a sticky folder in /tmp may have been made by anyone.

Every folder a lookup of the path reads is checked, up to `/`: renaming any of them (the root's
parent, or one far above) swaps everything below at once, so no folder is a safe place to stop,
not even one of root's that is closed to others, if its own parent is open. Links are followed
the way the kernel does, and the folder holding each link is checked too. Folders not made yet
are skipped (the run directory's creation makes them 0755 at most, whatever the umask:
storage/rundir.py). What lies inside a
folder of yours that no one else may enter (no search bit for group or others) is out of their
reach whatever its mode; renaming takes write and search permission on the folder.

Trusted: root, you, and each folder's owner (who can chmod it open whatever orch checks; the
batch step's guard still refuses a pickle that is not yours). The group's write bit does not
count when the group is the private group of the folder's owner or of yours (umask 002 makes
0775 folders with it) and no ACL names other users (the group bits are then the ACL's mask).
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
from collections import deque
from dataclasses import dataclass

from orchestrator.errors import UsageError

MAX_LINKS = 40  # the kernel's own limit on links followed in one lookup (ELOOP past it)


@dataclass(frozen=True)
class OpenFolder:
    """A folder on the way to a path in which another user may rename entries."""

    folder: str
    mode: int
    writers: str  # who else may write in it: "others", "group team", "users its ACL names"...
    letters: str  # chmod's letters for them: "o", "g" or "go"
    sticky_owner: str | None = None  # a sticky folder's owner, whom the sticky bit does not stop

    def detail(self, below: str | None = None) -> str:
        """What is wrong, one clause; `below` is the path the check was for, when not this folder."""
        where = self.folder if below in (None, self.folder) else f"{self.folder} (above {below})"
        if self.sticky_owner is not None:
            return (
                f"{where} has mode {self.mode:04o} and belongs to {self.sticky_owner}: the sticky bit"
                " does not stop a folder's owner from renaming what is in it"
            )
        return (
            f"{where} has mode {self.mode:04o}: {self.writers} can write in it and it has no sticky bit,"
            " so they can rename what is in it and put their own in its place, a run directory included"
        )

    @property
    def fix(self) -> str:
        if self.sticky_owner is not None:
            return f"set storage.root outside {self.folder}"
        return (
            f"chmod {self.letters}-w {self.folder}, or chmod +t {self.folder} (as its owner),"
            " or set storage.root outside it"
        )


def check_storage_root(root: str) -> None:
    """UsageError, one line naming the folder and the fix, when another user could swap run
    directories under the local storage root `root` (a path or a file:// URL)."""
    path = os.path.abspath(root.removeprefix("file://"))
    try:
        found = open_folder_above(path)
    except OSError as exc:
        raise UsageError(f"storage.root: cannot check the folders of {path}: {exc.strerror}") from None
    if found is not None:
        raise UsageError(f"storage.root: {found.detail(path)}; fix: {found.fix}")


def check_run_directory(path: str) -> None:
    """UsageError, one line, unless the local run (or sweep) directory `path` is a folder of this
    user's that no other user could have put in place: before its run.yaml is read (it names the
    script a resume starts), whatever storage.root that run.yaml claims."""
    path = os.path.abspath(path.removeprefix("file://"))
    try:
        info = os.lstat(path)
        found = open_folder_above(os.path.dirname(path))
    except OSError as exc:
        raise UsageError(f"run directory {path}: cannot check it: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        owner = "a link" if stat.S_ISLNK(info.st_mode) else f"owned by {user_name(info.st_uid)}"
        raise UsageError(f"run directory {path} is {owner}, not a folder of this user's: not reading it")
    if found is not None:
        raise UsageError(f"run directory {path}: {found.detail(path)}; fix: {found.fix}")


def open_folder_above(path: str) -> OpenFolder | None:
    """The folder nearest `path` (itself, when a folder) among those a lookup of `path` reads in
    which another user may rename entries; None when there is none. A folder below one that only
    this user can enter is out of everyone else's reach, whatever its mode (slurm/ inside a 0700
    run directory, made with a umask of 002)."""
    me = os.getuid()
    folders = [(folder, os.lstat(folder)) for folder in lookup_folders(path)]
    closed = [folder for folder, info in folders if closed_to_others(folder, info, me)]
    for folder, info in folders:
        if any(is_below(folder, shut) for shut in closed):
            continue
        found = open_folder(folder, info, me)
        if found is not None:
            return found
    return None


def hidden_from_others(path: str) -> bool:
    """Whether no other user can reach `path` (a file, not a link): a folder on its way is one
    only this user can enter."""
    me = os.getuid()
    folders = lookup_folders(path)
    return any(
        closed_to_others(folder, os.lstat(folder), me)
        for folder in folders
        if folder == folders[0] or is_below(folders[0], folder)
    )


def closed_to_others(folder: str, info: os.stat_result, me: int) -> bool:
    """Whether no one but `me` (and root) may look up names in `folder`: ours, no search bit for
    group or others, no ACL naming anyone else."""
    return info.st_uid == me and not info.st_mode & 0o011 and not has_access_acl(folder)


def is_below(folder: str, ancestor: str) -> bool:
    """Whether the resolved `folder` lies inside the resolved `ancestor` (plain path prefixes:
    lookup_folders returns paths without links)."""
    return folder.startswith(ancestor.rstrip("/") + "/")


def lookup_folders(path: str) -> list[str]:
    """Every existing folder whose entries a lookup of the absolute `path` reads, nearest first:
    `path` itself when it is a folder, then each parent up to `/`, with links resolved as the
    kernel resolves them (`..` after a link leaves its target) and the folder holding each link
    kept. The lookup stops at the first name not there yet."""
    if not os.path.isabs(path):
        raise ValueError(f"not an absolute path: {path}")
    names = deque(path.split("/"))
    at, read, links = "/", {"/": None}, 0
    while names:
        name = names.popleft()
        if name in ("", "."):
            continue
        if name == "..":
            at = os.path.dirname(at)
            continue
        here = os.path.join(at, name)
        try:
            info = os.lstat(here)
        except (FileNotFoundError, NotADirectoryError):
            break  # made later, by the run directory's creation
        if stat.S_ISLNK(info.st_mode):
            links += 1
            if links > MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
            target = os.readlink(here)
            at = "/" if target.startswith("/") else at
            names.extendleft(reversed(target.split("/")))
            continue
        if not stat.S_ISDIR(info.st_mode):
            break  # a file: nothing below it to look up
        at = here
        read[at] = None
    return list(reversed(read))


def open_folder(folder: str, info: os.stat_result, me: int) -> OpenFolder | None:
    """An OpenFolder when a user other than `me`, root and the folder's owner may rename entries
    in `folder` (whose lstat is `info`), else None."""
    writers = other_writers(folder, info, me)
    if writers is None:
        return None
    who, letters = writers
    mode = stat.S_IMODE(info.st_mode)
    if not mode & stat.S_ISVTX:
        return OpenFolder(folder, mode, who, letters)
    if info.st_uid in (0, me):
        return None  # sticky, and its owner is trusted: no one else renames our entries
    return OpenFolder(folder, mode, who, letters, sticky_owner=user_name(info.st_uid))


def other_writers(folder: str, info: os.stat_result, me: int) -> tuple[str, str] | None:
    """(who, chmod's letters) for the users besides `me` and the owner who may write in `folder`,
    or None when there are none."""
    # Renaming an entry takes both write and search permission on the folder.
    group_writes = info.st_mode & stat.S_IWGRP and info.st_mode & stat.S_IXGRP
    others_write = info.st_mode & stat.S_IWOTH and info.st_mode & stat.S_IXOTH
    who, letters = [], ""
    if group_writes and not group_is_private(folder, info, me):
        who.append("users its ACL names" if has_access_acl(folder) else f"group {group_name(info.st_gid)}")
        letters += "g"
    if others_write:
        who.append("others")
        letters += "o"
    return (" and ".join(who), letters) if who else None


def group_is_private(folder: str, info: os.stat_result, me: int) -> bool:
    """Whether only the folder's owner or `me` can be in its group: a user-private group (named
    after its one user, that user's primary group, no other member listed), and no ACL whose mask
    the group bits would be."""
    try:
        group = grp.getgrgid(info.st_gid)
        user = pwd.getpwnam(group.gr_name)
    except KeyError:
        return False
    return (
        user.pw_gid == info.st_gid
        and user.pw_uid in (info.st_uid, me)
        and set(group.gr_mem) <= {group.gr_name}
        and not has_access_acl(folder)
    )


def has_access_acl(folder: str) -> bool:
    """Whether `folder` has a POSIX access ACL (then its group bits are the mask of every named
    user's and group's entry, not the owning group's)."""
    try:
        return bool(os.getxattr(folder, "system.posix_acl_access", follow_symlinks=False))
    except OSError:  # ENODATA: none; ENOTSUP: a filesystem without them
        return False


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def user_name(uid: int) -> str:
    try:
        return f"user {pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"uid {uid}"
