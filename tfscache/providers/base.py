"""What every model provider shares: a short-lived listing cache and staged copies."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer

from tfscache.errors import Code, ServingError
from tfscache.util.deferreds import SharedResult

STAGING_PREFIX = ".tmp-"


class ListingCache:
    """Version listings reused for ``ttl`` seconds so "latest" does not cost a LIST per request.

    Concurrent misses for one name share one listing call."""

    MAX_ENTRIES = 10_000

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._entries: dict[str, tuple[float, list[int]]] = {}
        self._pending: dict[str, SharedResult] = {}

    def get(self, name: str, fetch: Callable[[str], defer.Deferred[list[int]]]) -> defer.Deferred[list[int]]:
        now = self._clock()
        hit = self._entries.get(name)
        if hit is not None and now - hit[0] < self.ttl:
            return defer.succeed(list(hit[1]))
        if len(self._entries) > self.MAX_ENTRIES:
            # bounded memory under a flood of distinct (possibly absent) names
            self._entries = {k: v for k, v in self._entries.items() if now - v[0] < self.ttl}
        shared = self._pending.get(name)
        if shared is None:

            def store(versions: list[int]) -> list[int]:
                self._entries[name] = (self._clock(), sorted(versions))
                return sorted(versions)

            def settle(result: Any) -> Any:
                self._pending.pop(name, None)
                return result

            shared = SharedResult(fetch(name).addCallback(store).addBoth(settle))
            if not shared.done:
                self._pending[name] = shared
        return shared.observe()

    def invalidate(self, name: str) -> None:
        self._entries.pop(name, None)


def staged_copy(destination: str, fill: Callable[[str], int]) -> int:
    """Run ``fill(tmpdir)`` to write a model, then rename tmpdir to ``destination``.

    Blocking: call from a thread.  The staging directory sits beside the destination (same
    file system, so the rename is atomic) and its name is not numeric, so TF Serving ignores
    it.  On any failure the staging directory is removed: a half copy is never visible."""
    parent = os.path.dirname(destination)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=STAGING_PREFIX + os.path.basename(destination) + "-", dir=parent)
    try:
        copied = fill(tmp)
        os.chmod(tmp, 0o755)
        os.rename(tmp, destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return copied


def copy_error(name: str, version: int, error: BaseException) -> ServingError:
    """A copy failure as a client-facing error that names the model (and no secrets)."""
    if isinstance(error, ServingError):
        return error
    if isinstance(error, OSError) and error.errno is not None:
        what = f"{error.strerror} (errno {error.errno})"
    else:
        what = type(error).__name__
    return ServingError(
        Code.UNAVAILABLE, f"Could not copy model {name} version {version} into the cache: {what}"
    )
