"""DiskCache on a real directory: the capacity holds while copies run at once, and what a disk
eviction logs."""

from __future__ import annotations

import os
import tempfile

from twisted.internet import defer
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from tfscache.errors import Code, ServingError
from tfscache.modelspec import ModelId
from tfscache.node.disk_cache import DiskCache

A, B, C = ModelId("a", 1), ModelId("b", 1), ModelId("c", 1)


def put(cache: DiskCache, mid: ModelId, size: int) -> None:
    """What a completed copy leaves: the version directory, then the books."""
    os.makedirs(cache.path(mid))
    with open(os.path.join(cache.path(mid), "saved_model.pb"), "wb") as f:
        f.write(b"x" * size)
    cache.add(mid, size)


class ReservationTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.cache = DiskCache(tempfile.mkdtemp(prefix="tfscache-disk-"), 250)
        yield self.cache.start()

    @defer.inlineCallbacks
    def test_copies_under_way_share_the_capacity(self):  # type: ignore[no-untyped-def]
        yield self.cache.make_room(A, 100, ())
        yield self.cache.make_room(B, 100, ())
        self.assertEqual((self.cache.used_bytes, self.cache.reserved_bytes), (0, 200))
        err = yield self.assertFailure(self.cache.make_room(C, 100, ()), ServingError)
        self.assertEqual(err.code, Code.RESOURCE_EXHAUSTED)
        put(self.cache, A, 100)  # settled: reserved becomes used
        self.assertEqual((self.cache.used_bytes, self.cache.reserved_bytes), (100, 100))
        self.cache.release(B)  # b's copy failed: its room is free again
        self.assertEqual(self.cache.reserved_bytes, 0)
        yield self.cache.make_room(C, 100, ())
        put(self.cache, C, 100)
        self.assertEqual((self.cache.used_bytes, self.cache.reserved_bytes), (200, 0))
        self.assertEqual(self.cache.evictions, 0)

    @defer.inlineCallbacks
    def test_reserved_bytes_are_not_freed_by_deleting_the_reserving_model(self):  # type: ignore[no-untyped-def]
        put(self.cache, A, 100)
        yield self.cache.make_room(B, 100, ())  # fits beside a
        yield self.cache.make_room(C, 100, ())  # 100 + 100 reserved + 100 > 250: a goes
        self.assertNotIn(A, self.cache)
        self.assertFalse(os.path.exists(self.cache.path(A)))
        self.assertEqual((self.cache.used_bytes, self.cache.reserved_bytes), (0, 200))

    @defer.inlineCallbacks
    def test_settled_size_is_the_copied_size(self):  # type: ignore[no-untyped-def]
        yield self.cache.make_room(A, 100, ())
        yield self.cache.make_room(A, 120, ())  # a retry replaces the reservation
        self.assertEqual(self.cache.reserved_bytes, 120)
        put(self.cache, A, 90)
        self.assertEqual((self.cache.used_bytes, self.cache.reserved_bytes), (90, 0))
        self.cache.release(A)  # nothing reserved any more: no effect
        self.assertEqual(self.cache.reserved_bytes, 0)


class EvictionLogTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_eviction_line_names_model_version_bytes_seconds_reason(self):  # type: ignore[no-untyped-def]
        cache = DiskCache(tempfile.mkdtemp(prefix="tfscache-disk-"), 250)
        yield cache.start()
        events: list[dict] = []

        def observe(event: dict) -> None:
            if "disk evict" in event.get("log_format", ""):
                events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        put(cache, A, 100)
        put(cache, B, 100)
        yield cache.make_room(C, 100, {B})  # a is the least recently used and unprotected
        yield cache.evict(B)
        self.assertEqual([(e["model"], e["version"], e["bytes"], e["reason"]) for e in events],
                         [("a", 1, 100, "capacity"), ("b", 1, 100, "admin")])
        for e in events:
            self.assertIsInstance(e["seconds"], float)
            self.assertGreaterEqual(e["seconds"], 0.0)
        self.assertFalse(os.path.exists(os.path.join(cache.root, "a")))
        self.assertFalse(os.path.exists(os.path.join(cache.root, "b")))
