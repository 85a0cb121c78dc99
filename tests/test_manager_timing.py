"""The CacheManager's timing rules, on a ``task.Clock``: churn guard, bounded capacity wait,
failure back-off, request deadlines, the byte budget.

These rules are about time, which real processes cannot make deterministic, so TF Serving is
replaced here by ``ScriptedBackend``: an in-memory IServingBackend whose loads finish when the
test says.  Everything else is real (the disk provider, the disk cache on a real directory).
End-to-end behaviour against a real backend is in test_node.py."""

from __future__ import annotations

import os
import tempfile

from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from zope.interface import implementer

from tfscache.errors import Code, ServingError
from tfscache.interfaces import IServingBackend
from tfscache.modelspec import ModelId
from tfscache.node.disk_cache import DiskCache
from tfscache.node.manager import CacheLimits, CacheManager, State
from tfscache.providers.disk import DiskModelProvider


@implementer(IServingBackend)
class ScriptedBackend:
    grpc_target = "scripted"
    rest_base = "http://scripted"

    def __init__(self) -> None:
        self.pending: dict[tuple[str, int], defer.Deferred[None]] = {}
        self.loaded: set[tuple[str, int]] = set()
        self.log: list[str] = []
        self.missing: list[str] = []  # loads asked for while the model's directory was gone
        self.auto = True  # loads finish at once unless a test holds them

    def load(self, name: str, version: int, base_path: str, timeout: float) -> defer.Deferred[None]:
        self.log.append(f"load {name}/{version}")
        if not os.path.isdir(os.path.join(base_path, str(version))):
            self.missing.append(f"{name}/{version}")
        d: defer.Deferred[None] = defer.Deferred()
        d.addCallback(lambda _: self.loaded.add((name, version)))
        if self.auto:
            d.callback(None)
        else:
            self.pending[(name, version)] = d
        return d

    def finish(self, name: str, version: int, error: ServingError | None = None) -> None:
        d = self.pending.pop((name, version))
        d.errback(error) if error else d.callback(None)

    def unload(self, name: str, version: int) -> defer.Deferred[None]:
        self.log.append(f"unload {name}/{version}")
        self.loaded.discard((name, version))
        return defer.succeed(None)

    def forget(self, name: str, version: int) -> None:
        self.loaded.discard((name, version))

    def reset(self) -> defer.Deferred[None]:
        self.loaded.clear()
        return defer.succeed(None)

    def resend(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def check(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def status(self, name: str, timeout: float | None = None) -> defer.Deferred[None]:
        return defer.succeed(None)


def make_source(sizes: dict[str, int]) -> str:
    root = tempfile.mkdtemp(prefix="tfscache-timing-src-")
    for name, size in sizes.items():
        os.makedirs(os.path.join(root, name, "1"))
        with open(os.path.join(root, name, "1", "saved_model.pb"), "wb") as f:
            f.write(b"x" * size)
    return root


class TimingTests(unittest.TestCase):
    @defer.inlineCallbacks
    def manager(self, sizes: dict[str, int] | None = None, disk_capacity: int = 10**9,
                **limits):  # type: ignore[no-untyped-def]
        self.clock = task.Clock()
        self.backend = ScriptedBackend()
        source = make_source(sizes or {n: 100 for n in "abc"})
        disk = DiskCache(tempfile.mkdtemp(prefix="tfscache-timing-cache-"), disk_capacity)
        self.cache = CacheManager(DiskModelProvider(source, listing_ttl=0, reactor=reactor), self.backend, disk,
                                  CacheLimits(**limits), clock=self.clock)
        yield self.cache.start()
        return self.cache

    @defer.inlineCallbacks
    def use(self, name: str):  # type: ignore[no-untyped-def]
        lease = yield self.cache.acquire(ModelId(name, 1))
        lease.release()

    @defer.inlineCallbacks
    def test_churn_guard_makes_a_load_wait_not_thrash(self):  # type: ignore[no-untyped-def]
        yield self.manager(max_models=1, churn_guard=2.0, capacity_wait=30.0)
        yield self.use("a")
        self.clock.advance(0.5)
        b = self.cache.acquire(ModelId("b", 1))
        while not self.cache._room_waiters:  # b's copy runs in a real thread; then it waits for room
            yield task.deferLater(reactor, 0.01)
        self.assertFalse(b.called, "a was unloaded while it was used 0.5 s ago")
        self.assertEqual(self.backend.log, ["load a/1"])
        self.clock.advance(1.6)  # a's guard ran out at t=2.0
        lease = yield b
        lease.release()
        self.assertEqual(self.backend.log, ["load a/1", "unload a/1", "load b/1"])

    @defer.inlineCallbacks
    def test_capacity_wait_is_bounded(self):  # type: ignore[no-untyped-def]
        yield self.manager(max_models=1, churn_guard=0.0, capacity_wait=5.0)
        held = yield self.cache.acquire(ModelId("a", 1))  # in flight: never unloaded
        b = self.cache.acquire(ModelId("b", 1))
        while not self.cache._room_waiters:
            yield task.deferLater(reactor, 0.01)
        self.clock.advance(4.9)
        self.assertFalse(b.called)
        self.clock.advance(0.2)
        err = yield self.assertFailure(b, ServingError)
        self.assertEqual(err.code, Code.RESOURCE_EXHAUSTED)
        self.assertEqual(self.backend.log, ["load a/1"])
        held.release()
        yield self.use("b")  # room now: a is idle
        self.assertEqual(self.backend.log, ["load a/1", "unload a/1", "load b/1"])

    @defer.inlineCallbacks
    def test_failure_backoff(self):  # type: ignore[no-untyped-def]
        yield self.manager(failure_backoff=30.0)
        self.backend.auto = False
        first = self.cache.acquire(ModelId("a", 1))
        while ("a", 1) not in self.backend.pending:
            yield task.deferLater(reactor, 0.01)
        self.backend.finish("a", 1, ServingError(Code.INTERNAL, "model a is broken"))
        yield self.assertFailure(first, ServingError)
        self.clock.advance(10)
        err = yield self.assertFailure(self.cache.acquire(ModelId("a", 1)), ServingError)
        self.assertIn("broken", err.message)
        self.assertEqual(self.backend.log, ["load a/1"])  # no second attempt within the back-off
        self.clock.advance(21)
        self.backend.auto = True
        yield self.use("a")
        self.assertEqual(self.backend.log, ["load a/1", "load a/1"])

    @defer.inlineCallbacks
    def test_deadline_shorter_than_the_load(self):  # type: ignore[no-untyped-def]
        yield self.manager()
        self.backend.auto = False
        impatient = self.cache.acquire(ModelId("a", 1), timeout=1.0)
        patient = self.cache.acquire(ModelId("a", 1))
        while ("a", 1) not in self.backend.pending:
            yield task.deferLater(reactor, 0.01)
        self.clock.advance(1.0)
        err = yield self.assertFailure(impatient, ServingError)
        self.assertEqual(err.code, Code.DEADLINE_EXCEEDED)
        self.assertFalse(patient.called)
        self.backend.finish("a", 1)  # the load went on
        lease = yield patient
        lease.release()
        self.assertEqual(self.backend.log, ["load a/1"])
        self.assertEqual(self.cache.entries[ModelId("a", 1)].state, State.AVAILABLE)

    @defer.inlineCallbacks
    def test_byte_budget(self):  # type: ignore[no-untyped-def]
        yield self.manager({"s1": 100, "s2": 100, "big": 250}, max_models=10, max_bytes=300,
                           memory_factor=1.0, churn_guard=0.0)
        for name in ("s1", "s2"):
            yield self.use(name)
            self.clock.advance(1)
        yield self.use("big")  # 250 + 100 + 100 > 300: both small ones go, LRU first
        self.assertEqual(self.backend.log, ["load s1/1", "load s2/1", "unload s1/1", "unload s2/1", "load big/1"])

    @defer.inlineCallbacks
    def until(self, condition):  # type: ignore[no-untyped-def]
        """Copies and sizing run in real threads: let the reactor turn until they are done."""
        for _ in range(3000):
            if condition():
                return
            yield task.deferLater(reactor, 0.01)
        self.fail("condition never held")

    @defer.inlineCallbacks
    def test_copy_waiting_for_room_is_not_deleted_from_disk(self):  # type: ignore[no-untyped-def]
        # b is copied (ON_DISK) and waits for a slot held by a; c's copy must not delete b's
        # directory to make room on disk: b would then be loaded from a missing directory
        yield self.manager(disk_capacity=250, max_models=1, churn_guard=0.0, capacity_wait=30.0)
        held = yield self.cache.acquire(ModelId("a", 1))
        b = self.cache.acquire(ModelId("b", 1))
        yield self.until(lambda: self.cache._room_waiters)
        self.assertEqual(self.cache.entries[ModelId("b", 1)].state, State.ON_DISK)
        c = self.cache.acquire(ModelId("c", 1))
        c_done = []
        c.addBoth(c_done.append)
        yield self.until(lambda: c_done or len(self.cache._room_waiters) > 1)
        self.assertIn(ModelId("b", 1), self.cache.disk)
        self.assertTrue(os.path.isdir(self.cache.disk.path(ModelId("b", 1))))
        # a is loaded and b about to be: nothing on disk may go, so c gets no room
        self.assertEqual(len(c_done), 1)
        self.assertIsInstance(c_done[0].value, ServingError)
        self.assertEqual(c_done[0].value.code, Code.RESOURCE_EXHAUSTED)
        self.assertNotIn(ModelId("c", 1), self.cache.disk)
        held.release()
        lease = yield b
        self.assertEqual(lease.entry.state, State.AVAILABLE)
        lease.release()
        self.assertEqual(self.backend.log, ["load a/1", "unload a/1", "load b/1"])
        self.assertEqual(self.backend.missing, [])
        yield self.use("c")  # a is idle on disk now: it makes room for c
        self.assertNotIn(ModelId("a", 1), self.cache.disk)
        self.assertEqual(self.backend.missing, [])
        self.assertLessEqual(self.cache.disk.used_bytes, 250)

    @defer.inlineCallbacks
    def test_just_loaded_model_is_not_unloaded_before_its_requests_lease_it(self):  # type: ignore[no-untyped-def]
        # churn_guard 0: the moment b's load finishes, c (waiting for room) must not pick b,
        # which b's own requests are about to lease
        yield self.manager(max_models=1, churn_guard=0.0, capacity_wait=30.0)
        self.backend.auto = False
        b = self.cache.acquire(ModelId("b", 1))
        b2 = self.cache.acquire(ModelId("b", 1))
        yield self.until(lambda: ("b", 1) in self.backend.pending)
        c = self.cache.acquire(ModelId("c", 1))
        yield self.until(lambda: self.cache._room_waiters)
        self.backend.finish("b", 1)
        lease, lease2 = yield defer.gatherResults([b, b2])
        self.assertEqual(lease.entry.state, State.AVAILABLE)
        self.assertEqual(lease.entry.inflight, 2)
        self.assertEqual(self.backend.log, ["load b/1"])
        self.assertFalse(c.called)
        lease.release()
        self.assertEqual(self.backend.log, ["load b/1"])  # still in use by the second request
        lease2.release()
        self.assertEqual(self.backend.log, ["load b/1", "unload b/1", "load c/1"])
        self.backend.finish("c", 1)
        (yield c).release()

    @defer.inlineCallbacks
    def test_lease_is_only_handed_out_on_an_available_model(self):  # type: ignore[no-untyped-def]
        # TF Serving found empty in the very tick b's load finished: the first request already
        # holds its lease, the next one must not get a lease on a model that is not loaded
        yield self.manager()
        self.backend.auto = False
        first = self.cache.acquire(ModelId("b", 1))
        second = self.cache.acquire(ModelId("b", 1))
        first.addCallback(lambda lease: (defer.ensureDeferred(self.cache.backend_lost()), lease)[1])
        got: list[object] = []
        second.addCallback(lambda lease: (got.append(lease), lease)[1])
        yield self.until(lambda: ("b", 1) in self.backend.pending)
        self.backend.finish("b", 1)
        lease = yield first
        self.assertEqual(got, [])
        yield self.until(lambda: ("b", 1) in self.backend.pending)  # loaded again, from disk
        self.backend.finish("b", 1)
        lease2 = yield second
        self.assertEqual(lease2.entry.state, State.AVAILABLE)
        self.assertEqual(self.backend.log, ["load b/1", "load b/1"])
        self.assertEqual(self.cache.fetches, 1)
        lease.release()
        lease2.release()

    @defer.inlineCallbacks
    def test_concurrent_copies_respect_the_disk_capacity(self):  # type: ignore[no-untyped-def]
        yield self.manager(disk_capacity=250, max_models=10, churn_guard=0.0)
        results = yield defer.DeferredList(
            [self.cache.acquire(ModelId(n, 1)) for n in "abc"], consumeErrors=True)
        failed = [r for ok, r in results if not ok]
        self.assertEqual(len(failed), 1, results)
        self.assertEqual(failed[0].value.code, Code.RESOURCE_EXHAUSTED)
        self.assertIn("No room in the disk cache", failed[0].value.message)
        for ok, lease in results:
            if ok:
                lease.release()
        self.assertEqual(len(self.cache.disk), 2)
        self.assertEqual(self.cache.disk.used_bytes, 200)
        self.assertEqual(self.cache.disk.reserved_bytes, 0)
