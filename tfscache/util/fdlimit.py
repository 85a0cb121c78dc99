"""The open-files limit: raised to its hard limit at start, and the connection limits kept below it.

Every connection is a file descriptor; a node past its soft limit fails every request
(accept fails, gRPC answers INTERNAL "Too many open files"), so the daemon raises its soft
limit to the hard one (the unit sets ``LimitNOFILE``; systemd's default soft limit is 1,024)
and caps each listener's connections to what the limit leaves after a reserve for everything
else (TF Serving's connections, files being copied, discovery, logs)."""

from __future__ import annotations

import resource
from dataclasses import dataclass

RESERVED = 256          # descriptors kept for what is not a client connection
MIN_CONNECTIONS = 64    # per listener, however low the limit
UNLIMITED_TARGET = 1 << 20  # a hard limit of "unlimited" is not a number setrlimit takes for NOFILE


@dataclass(frozen=True)
class OpenFiles:
    before: int   # the soft limit the process started with
    soft: int     # the soft limit now
    hard: int
    error: str = ""  # why it could not be raised, if it could not

    def connection_cap(self, listeners: int = 2) -> int:
        """The connections one of ``listeners`` listeners may hold without exhausting the limit."""
        return max(MIN_CONNECTIONS, (self.soft - RESERVED) // listeners)


def raise_open_files_limit() -> OpenFiles:
    """Soft RLIMIT_NOFILE up to the hard limit (an unprivileged process may)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, UNLIMITED_TARGET)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return OpenFiles(soft, soft, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as e:
        return OpenFiles(soft, soft, hard, str(e))
    return OpenFiles(soft, target, hard)


def open_files_limit() -> OpenFiles:
    """The limit as it is, unchanged (a node inside a test process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return OpenFiles(soft, soft, hard)
