"""What every model provider shares: a short-lived listing cache and staged copies."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
import time
import uuid
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

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic,
                 normalise: Callable[[Any], Any] = sorted) -> None:
        self.ttl = ttl
        self._clock = clock
        self._normalise = normalise  # versions come back sorted; label maps as they are
        self._entries: dict[str, tuple[float, Any]] = {}
        self._pending: dict[str, SharedResult] = {}

    def get(self, name: str, fetch: Callable[[str], defer.Deferred[Any]]) -> defer.Deferred[Any]:
        now = self._clock()
        hit = self._entries.get(name)
        if hit is not None and now - hit[0] < self.ttl:
            return defer.succeed(self._normalise(hit[1]))
        if len(self._entries) > self.MAX_ENTRIES:
            # bounded memory under a flood of distinct (possibly absent) names
            self._entries = {k: v for k, v in self._entries.items() if now - v[0] < self.ttl}
        shared = self._pending.get(name)
        if shared is None:

            def store(listing: Any) -> Any:
                self._entries[name] = (self._clock(), self._normalise(listing))
                return self._normalise(listing)

            def settle(result: Any) -> Any:
                self._pending.pop(name, None)
                return result

            shared = SharedResult(fetch(name).addCallback(store).addBoth(settle))
            if not shared.done:
                self._pending[name] = shared
        return shared.observe()

    def invalidate(self, name: str) -> None:
        self._entries.pop(name, None)


class CopyStopped(Exception):
    """Raised in a copy's thread once its caller has cancelled it."""


class CopyControl:
    """The stop flag a copy's thread checks, shared with the Deferred's canceller.

    ``lock`` is held by the thread from its last stop check to the rename into place, and by
    the canceller while it decides: a copy is either committed or stopped, never both."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.committed = False
        self.copied = 0

    def check(self) -> None:
        if self.stop.is_set():
            raise CopyStopped()

    def cancel(self) -> bool:
        """Stop the copy; False when it is too late (the model is already in place)."""
        with self.lock:
            if self.committed:
                return False
            self.stop.set()
            return True


def _install(tmp: str, destination: str) -> str | None:
    """Rename ``tmp`` to ``destination``; return the path of a tree that was there before.

    The caller asks for a copy only when its cache does not know ``destination``, so a tree
    found there is nobody's (say, a copy that finished after its caller gave up): it is moved
    aside, under a staging name that a restart's scan deletes, rather than failing every later
    copy of the model with ENOTEMPTY."""
    try:
        os.rename(tmp, destination)
        return None
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    stale = os.path.join(
        os.path.dirname(destination),
        f"{STAGING_PREFIX}stale-{os.path.basename(destination)}-{uuid.uuid4().hex}")
    os.rename(destination, stale)
    try:
        os.rename(tmp, destination)
    except BaseException:
        shutil.rmtree(stale, ignore_errors=True)
        raise
    return stale


def staged_copy(
    destination: str, fill: Callable[[str], int], control: CopyControl | None = None,
    on_replaced: Callable[[], None] | None = None,
) -> int:
    """Run ``fill(tmpdir)`` to write a model, then rename tmpdir to ``destination``.

    Blocking: call from a thread.  The staging directory sits beside the destination (same
    file system, so the rename is atomic) and its name is not numeric, so TF Serving ignores
    it.  On any failure, or when ``control`` was cancelled before the rename, the staging
    directory is removed: a half copy is never visible.  A stale tree already at
    ``destination`` is replaced (``on_replaced`` is called then)."""
    if control is not None:
        control.check()  # cancelled while it waited for a thread
    parent = os.path.dirname(destination)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=STAGING_PREFIX + os.path.basename(destination) + "-", dir=parent)
    try:
        copied = fill(tmp)
        os.chmod(tmp, 0o755)
        if control is None:
            stale = _install(tmp, destination)
        else:
            with control.lock:
                control.check()
                stale = _install(tmp, destination)
                control.committed, control.copied = True, copied
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)
        if on_replaced is not None:
            on_replaced()
    return copied


def stale_copy_warning(reactor: Any, log: Any, name: str, version: int, destination: str) -> Callable[[], None]:
    """An ``on_replaced`` for ``staged_copy`` (which runs in a thread): the warning, logged
    on the reactor thread."""
    return lambda: reactor.callFromThread(
        log.warn, "replaced a stale copy of model={model} version={version} at {path} that the "
        "disk cache did not know", model=name, version=version, path=destination)


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
