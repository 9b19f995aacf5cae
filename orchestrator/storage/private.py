"""Files of this user's that no other local user can aim, read or hold: a private folder in the
host's temp directory, and lock files opened without following links.

The temp directory is shared by every user of the host, and orch's paths in it can be computed
by anyone (`/tmp/orch-$UID/claims/<digest>.lock`). Another user who makes such a folder first
could put a link where our file goes (then our truncate-and-write lands in ~/.bashrc), read
what we write there, or hold our locks forever. So the top folder, `<tmp>/orch-$UID`, is used
only once checked to be a real directory (not a link), owned by this user and writable by no one
else; everything orch keeps in the temp directory at a name it computes (claims, port leases,
staged logs, a background supervisor's console) lives under it, where no one else can add an
entry, and the rest in folders mkdtemp made (0700, a fresh name). Every refusal is a
NotPrivate: an OSError of one line that names the path and what is wrong with it. Files are
read back (to be uploaded into a run directory) only as regular files of this user's opened
without following links, so nothing a link points to leaves the host.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Callable


class NotPrivate(OSError):
    """A folder or file that another user made, could change or could have aimed elsewhere."""

    FIX = "remove it, or fix its owner and mode"
    # In the shared temp directory a folder another user made can be removed only by its owner
    # or root (the sticky bit); TMPDIR moves all of orch's files elsewhere meanwhile.
    TEMP_FIX = "only its owner or root can remove it; or set TMPDIR to a folder of your own"

    def __init__(self, path: str, what: str, fix: str = FIX) -> None:
        super().__init__(errno.EPERM, f"{path} {what}: refusing to use it ({fix})")
        self.path, self.what = path, what

    def __str__(self) -> str:
        return str(self.strerror)


def user_temp_path(*parts: str) -> str:
    """`<tmp>/orch-$UID/<parts...>`: where user_temp_dir keeps them (nothing made or checked)."""
    return os.path.join(tempfile.gettempdir(), f"orch-{os.getuid()}", *parts)


def user_temp_dir(*parts: str) -> str:
    """`<tmp>/orch-$UID/<parts...>`, each folder made if missing and checked private to this
    user (private_dir). Below a private top folder no one else can have made the others; they
    are checked all the same (a few system calls), so no folder of ours stays open to others."""
    return _walk_temp(parts, private_dir)


def existing_user_temp_dir(*parts: str) -> str | None:
    """user_temp_dir's folder if it is there, checked at every level the same way; None if a
    level is missing. Nothing is made: for readers of what a supervisor staged."""
    try:
        return _walk_temp(parts, _check_dir)
    except FileNotFoundError:
        return None


def _walk_temp(parts: tuple[str, ...], visit: Callable[[str], str]) -> str:
    try:
        path = visit(user_temp_path())
        for name in (name for part in parts for name in part.split(os.sep) if name):
            path = visit(os.path.join(path, name))
    except NotPrivate as refused:
        raise NotPrivate(refused.path, refused.what, NotPrivate.TEMP_FIX) from None
    return path


def private_dir(path: str) -> str:
    """`path`, made 0700 if missing; NotPrivate unless it is a directory (not a link to one)
    owned by this user that no one else can write. One that others can only read or enter (what
    makedirs of a folder below it left, with the umask's mode) is made 0700: no one else could
    have put anything in it."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    return _check_dir(path)


def _check_dir(path: str) -> str:
    """private_dir's checks of an existing folder (FileNotFoundError if there is none)."""
    try:
        # O_NOFOLLOW: a link is refused here, not followed; the checks and the chmod are then on
        # the folder opened, which no rename can swap afterwards.
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise NotPrivate(
                path, "is a symbolic link" if os.path.islink(path) else "is not a directory"
            ) from None
        raise
    try:
        info = os.fstat(fd)
        _check_owner(path, info)
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o022:
            raise NotPrivate(path, f"has mode {mode:04o}: other users can write in it")
        if mode & 0o077:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return path


def open_private_file(path: str, flags: int) -> int:
    """A descriptor of the regular file `path` (created 0600 if missing), opened with `flags`
    (os.O_RDWR, ...) but never through a link, and only if this user owns it: NotPrivate
    otherwise. For files in folders another user may write (a run directory on shared storage)
    or whose name anyone can compute."""
    return _open_own(path, flags | os.O_CREAT)


def open_own_file(path: str) -> int:
    """A read-only descriptor of `path` if it is a regular file of this user's, never through a
    link (NotPrivate otherwise; FileNotFoundError if it is gone). For whatever is copied out of
    the temp directory into a run directory: a link there must not upload what it points to."""
    # O_NONBLOCK: a FIFO put there would block the open; for a regular file it changes nothing.
    return _open_own(path, os.O_RDONLY | os.O_NONBLOCK)


def _open_own(path: str, flags: int) -> int:
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotPrivate(path, "is a symbolic link") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotPrivate(path, "is not a regular file")
        _check_owner(path, info)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_owner(path: str, info: os.stat_result) -> None:
    if info.st_uid != os.getuid():
        raise NotPrivate(path, f"belongs to uid {info.st_uid}, not to this user (uid {os.getuid()})")
