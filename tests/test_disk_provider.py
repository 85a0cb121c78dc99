"""DiskModelProvider in-process: a cancelled or timed-out copy stops in its thread and leaves
nothing behind, a stale tree at the destination does not block later copies, and copies run
in the provider's own bounded thread pool, not in the reactor's shared one.

Copies are held at a file by the provider's ``copy_file`` seam (a threading.Event), so every
step here waits for an event, never for time to pass; fetch timeouts run on a task.Clock, as
the CacheManager's do."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from typing import Any

from twisted.internet import defer, reactor, task, threads
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from tests.harness.files import tree
from tests.test_manager_timing import ScriptedBackend
from tfscache.errors import Code, ServingError
from tfscache.modelspec import ModelId
from tfscache.node.disk_cache import DiskCache
from tfscache.node.manager import CacheLimits, CacheManager
from tfscache.providers.base import STAGING_PREFIX
from tfscache.providers.disk import DiskModelProvider
from tfscache.util.deferreds import with_timeout

FILES = 20
HOLD_LIMIT = 30.0  # only if a test is broken: a held copy never waits longer than this


def write_model(root: str, name: str, version: int = 1, files: int = FILES) -> dict[str, bytes]:
    vdir = os.path.join(root, name, str(version))
    os.makedirs(os.path.join(vdir, "variables"))
    out = {"saved_model.pb": f"graph of {name}".encode()}
    for i in range(files):
        out[os.path.join("variables", f"part-{i:03d}")] = os.urandom(1000 + i)
    for rel, body in out.items():
        with open(os.path.join(vdir, rel), "wb") as f:
            f.write(body)
    return out


class Hold:
    """A ``copy_file`` that records each call and, while armed, holds the first call of
    each copy until released, telling the test (on the reactor thread) that it is held."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []  # (thread name, destination file)
        self.release = threading.Event()
        self.held: defer.DeferredQueue[str] = defer.DeferredQueue()
        self.armed = True
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def __call__(self, src: str, dst: str) -> None:
        with self._lock:
            self.calls.append((threading.current_thread().name, dst))
            hold = self.armed
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            if hold:
                reactor.callFromThread(self.held.put, threading.current_thread().name)
                self.release.wait(HOLD_LIMIT)
            shutil.copy2(src, dst)
        finally:
            with self._lock:
                self.running -= 1


class DiskProviderTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.source = tempfile.mkdtemp(prefix="tfscache-disk-src-")
        self.cache = tempfile.mkdtemp(prefix="tfscache-disk-cache-")
        self.addCleanup(shutil.rmtree, self.source, True)
        self.addCleanup(shutil.rmtree, self.cache, True)
        self.files = write_model(self.source, "m")
        self.events: list[Any] = []
        observer: Any = self.events.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def provider(self, hold: Hold | None = None, **kw: Any) -> DiskModelProvider:
        p = DiskModelProvider(self.source, listing_ttl=0, **{"reactor": reactor, **kw})
        if hold is not None:
            p.copy_file = hold
            self.addCleanup(hold.release.set)  # runs before close: a failed test frees its copy
        self.addCleanup(p.close)
        return p

    def dest(self, name: str = "m", version: int = 1) -> str:
        return os.path.join(self.cache, name, str(version))

    def left(self, name: str = "m") -> list[str]:
        parent = os.path.join(self.cache, name)
        return sorted(os.listdir(parent)) if os.path.isdir(parent) else []

    def log_text(self) -> str:
        return "\n".join(formatEvent(e) for e in self.events)

    @defer.inlineCallbacks
    def test_timed_out_copy_stops_in_its_thread_and_the_next_copy_succeeds(self):  # type: ignore[no-untyped-def]
        hold = Hold()
        p = self.provider(hold)
        clock = task.Clock()
        copy = with_timeout(p.fetch("m", 1, self.dest()), 5.0, clock,
                            lambda: ServingError(Code.DEADLINE_EXCEEDED, "copy of m timed out"))
        yield hold.held.get()  # the copy's thread is inside its first file
        clock.advance(5.0)  # model_provider.fetch_timeout_seconds
        err = yield self.assertFailure(copy, ServingError)
        self.assertEqual(err.code, Code.DEADLINE_EXCEEDED)
        hold.release.set()  # the thread finishes that file, then sees the cancel
        yield p.wait_idle()
        self.assertEqual(len(hold.calls), 1, "the cancelled copy went on copying files")
        self.assertFalse(os.path.exists(self.dest()), "a cancelled copy was renamed into place")
        self.assertEqual(self.left(), [], "a half copy was left behind")
        self.assertIn("disk copy cancelled model=m version=1", self.log_text())

        hold.armed = False
        copied = yield p.fetch("m", 1, self.dest())
        self.assertEqual(copied, sum(len(b) for b in self.files.values()))
        self.assertEqual(tree(self.dest()), self.files)
        self.assertEqual(self.left(), ["1"])

    @defer.inlineCallbacks
    def test_copy_cancelled_while_queued_never_starts(self):  # type: ignore[no-untyped-def]
        write_model(self.source, "n")
        hold = Hold()
        p = self.provider(hold, copy_threads=1)
        first = p.fetch("m", 1, self.dest())
        yield hold.held.get()
        second = p.fetch("n", 1, self.dest("n"))  # waits for the only copy thread
        second.cancel()
        yield self.assertFailure(second, defer.CancelledError)
        hold.release.set()
        yield first
        yield p.wait_idle()
        self.assertEqual([c for c in hold.calls if os.sep + "n" + os.sep in c[1]], [])
        self.assertEqual(self.left("n"), [])
        self.assertEqual(tree(self.dest()), self.files)

    @defer.inlineCallbacks
    def test_stale_tree_at_destination_is_replaced(self):  # type: ignore[no-untyped-def]
        # what a copy that outlived its timeout used to leave: a tree the disk cache never
        # recorded, on which every later rename failed with ENOTEMPTY until a restart
        os.makedirs(os.path.join(self.dest(), "variables"))
        for rel in ("saved_model.pb", os.path.join("variables", "stale-only")):
            with open(os.path.join(self.dest(), rel), "wb") as f:
                f.write(b"stale")
        p = self.provider()
        copied = yield p.fetch("m", 1, self.dest())
        self.assertEqual(copied, sum(len(b) for b in self.files.values()))
        self.assertEqual(tree(self.dest()), self.files)
        self.assertEqual(self.left(), ["1"])
        self.assertIn("replaced a stale copy of model=m version=1", self.log_text())

    @defer.inlineCallbacks
    def test_copies_run_in_their_own_bounded_pool(self):  # type: ignore[no-untyped-def]
        # more held copies than the reactor's shared pool has threads: with copies in that
        # pool nothing else (etcd calls, DNS lookups) could run until one finished
        shared = reactor.getThreadPool()  # type: ignore[attr-defined]
        names = [f"c{i}" for i in range(shared.max + 1)]
        for n in names:
            write_model(self.source, n, files=1)
        hold = Hold()
        p = self.provider(hold, copy_threads=3)
        copies = [p.fetch(n, 1, self.dest(n)) for n in names]
        held = []
        for _ in range(3):
            held.append((yield hold.held.get()))
        other = yield threads.deferToThread(lambda: threading.current_thread().name)
        self.assertEqual(len(hold.calls), 3, "more copies ran at once than the pool's size")
        hold.release.set()
        yield defer.gatherResults(copies, consumeErrors=True)
        self.assertEqual(hold.most, 3)
        for n in names:
            self.assertEqual(self.left(n), ["1"])
        copy_threads = {t for t, _dst in hold.calls}
        self.assertTrue(all(t.startswith("PoolThread-tfscache-disk-copy-") for t in copy_threads),
                        copy_threads)
        self.assertEqual(len(set(held)), 3)
        self.assertNotIn(other, copy_threads)
        # listings and sizes are short and warm requests wait for them: not behind copies
        self.assertEqual((yield p.list_versions("m")), [1])

    @defer.inlineCallbacks
    def test_close_stops_running_copies_and_the_pool(self):  # type: ignore[no-untyped-def]
        hold = Hold()
        p = self.provider(hold)
        copy = p.fetch("m", 1, self.dest())
        yield hold.held.get()
        closed = p.close()
        hold.release.set()
        err = yield self.assertFailure(copy, ServingError)
        self.assertEqual(err.code, Code.UNAVAILABLE)
        self.assertIn("m version 1", err.message)
        yield closed
        self.assertEqual(len(hold.calls), 1)
        self.assertEqual(self.left(), [])
        self.assertFalse(p._threads.started)
        err = yield self.assertFailure(p.fetch("m", 1, self.dest()), ServingError)
        self.assertEqual(err.code, Code.UNAVAILABLE)

    @defer.inlineCallbacks
    def test_manager_fetch_timeout_then_the_model_copies_again(self):  # type: ignore[no-untyped-def]
        """The bug end to end: the CacheManager's fetch timeout, then the next request."""
        hold = Hold()
        p = self.provider(hold)
        clock = task.Clock()
        disk = DiskCache(self.cache, 10**9)
        manager = CacheManager(p, ScriptedBackend(), disk, CacheLimits(fetch_timeout=5.0),
                               clock=clock)
        yield manager.start()
        first = manager.acquire(ModelId("m", 1))
        yield hold.held.get()
        clock.advance(5.0)
        err = yield self.assertFailure(first, ServingError)
        self.assertEqual(err.code, Code.DEADLINE_EXCEEDED)
        self.assertIn("m version 1", err.message)
        hold.release.set()
        yield p.wait_idle()
        self.assertEqual(self.left(), [])
        hold.armed = False
        lease = yield manager.acquire(ModelId("m", 1))
        lease.release()
        self.assertIn(ModelId("m", 1), disk)
        self.assertEqual(tree(self.dest()), self.files)
        self.assertEqual([c for c in self.left() if c.startswith(STAGING_PREFIX)], [])
