"""A failed storage operation in words: what `orch` prints and `orch status` shows as a root
cause ("storage full: No space left on device"), for local disks and object-store clients alike.
"""

from __future__ import annotations

import errno

# What a storage failure is, in the words `orch status` shows as a run's root cause.
_ERRNO_CAUSES = {
    errno.ENOSPC: "storage full",
    errno.EDQUOT: "storage quota exceeded",
    errno.EROFS: "storage is read-only",
    errno.EACCES: "storage refused access",
    errno.EPERM: "storage refused access",
    errno.EIO: "storage I/O error",
    errno.ESTALE: "storage handle went stale",
    errno.ETIMEDOUT: "storage unreachable",
    errno.ECONNREFUSED: "storage unreachable",
    errno.ECONNRESET: "storage unreachable",
    errno.EHOSTUNREACH: "storage unreachable",
    errno.ENETUNREACH: "storage unreachable",
}
# Object-store clients raise their own classes, not OSError with an errno: matched by a part of
# a class name (botocore's NoCredentialsError, EndpointConnectionError, ConnectTimeoutError,
# ReadTimeoutError, ConnectionClosedError; aiohttp's ServerDisconnectedError, ...).
_CLIENT_CAUSES = (
    ("NoCredentials", "storage credentials missing"),
    ("Connect", "storage unreachable"),
    ("Disconnected", "storage unreachable"),
    ("Timeout", "storage unreachable"),
)


def storage_cause(exc: BaseException) -> str:
    """One line for a failed storage operation that names the failure in words when it is a
    storage one ("storage full: No space left on device"), else the error's class and text."""
    cause = _ERRNO_CAUSES.get(exc.errno) if isinstance(exc, OSError) and exc.errno else None
    names = [cls.__name__ for cls in type(exc).__mro__]
    for part, words in _CLIENT_CAUSES if cause is None else ():
        if any(part in name for name in names):
            cause = words
            break
    text = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else ""
    if isinstance(exc, OSError) and exc.strerror:
        detail = exc.strerror
    else:
        detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return f"{cause}: {detail}" if cause else detail
