"""Eviction policies on hand-made traces, and their place in the CacheManager and the DiskCache:
the policy ranks, the owner's rules (in flight, pinned, churn guard, protected copies) decide
what may go.  Time in the manager tests is a ``task.Clock``; in the policies it is the count of
requests, so plain sequences are enough."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from bench.cachesim import simulate
from tests.test_manager_timing import ScriptedBackend, make_source
from tfscache.config import ConfigError, load_config
from tfscache.modelspec import ModelId
from tfscache.node import eviction
from tfscache.node.disk_cache import DiskCache
from tfscache.node.eviction import AdaptivePolicy, IEvictionPolicy, LRUPolicy, make_policy
from tfscache.node.manager import CacheLimits, CacheManager
from tfscache.providers.disk import DiskModelProvider


def feed(policy: AdaptivePolicy, requests: Iterable[str], cached: str = "", cost: float = 1.0) -> None:
    """One request per key (a letter); the letters of ``cached`` are in the cache (size 1)."""
    for key in cached:
        policy.admitted(key, 1, cost)
    for key in requests:
        policy.requested(key)


class PolicyTests(unittest.TestCase):
    def test_lru_takes_the_least_recently_used(self) -> None:
        policy = make_policy("lru", 2)
        self.assertTrue(IEvictionPolicy.providedBy(policy))
        policy.requested("a")
        self.assertEqual(policy.victim(["b", "a"]), "b")
        self.assertIsNone(policy.victim([]))

    def test_unknown_policy_is_refused(self) -> None:
        self.assertRaises(ValueError, make_policy, "fifo", 2)
        err = self.assertRaises(ConfigError, load_config, {
            "disk_cache": {"path": "/tmp/x"}, "model_provider": {"disk": {"base_path": "/tmp"}},
            "serving": {"eviction": "fifo"}}, environ={})
        self.assertIn("serving.eviction", str(err))

    def test_frequency_beats_recency(self) -> None:
        """a was asked for three times, b once: b goes although a is the least recently used."""
        policy = AdaptivePolicy(2)
        self.assertTrue(IEvictionPolicy.providedBy(policy))
        feed(policy, "aaab", cached="ab")
        self.assertEqual(policy.victim(["a", "b"]), "b")
        self.assertEqual(LRUPolicy().victim(["a", "b"]), "a")

    def test_equal_models_go_least_recently_used_first(self) -> None:
        policy = AdaptivePolicy(3)
        feed(policy, "abc", cached="abc")
        self.assertEqual(policy.victim(["a", "b", "c"]), "a")
        self.assertEqual(policy.victim(["c", "b"]), "c")

    def test_counts_outlive_an_eviction(self) -> None:
        """The ghost history: a, often asked for, was evicted; back, it outranks c, asked once."""
        policy = AdaptivePolicy(2)
        feed(policy, "aaaa", cached="a")
        policy.removed("a")
        feed(policy, "bc", cached="bc")
        feed(policy, "a", cached="a")
        self.assertEqual(policy.victim(["a", "b"]), "b")

    def test_a_costly_reload_is_kept(self) -> None:
        """Asked for as often, the model that takes 20x longer to load than the others
        stays; within a factor 4 of the typical cost (a measured load time is noisy) costs make
        no difference."""
        policy = AdaptivePolicy(8)
        for key, cost in (("m1", 1.0), ("m2", 1.0), ("m3", 1.0), ("m4", 1.0), ("m5", 1.0), ("fast", 1.0),
                          ("twice", 2.0), ("slow", 20.0)):
            policy.admitted(key, 1, cost)
            policy.requested(key)
        self.assertEqual(policy.victim(["slow", "fast"]), "fast")
        self.assertEqual(policy.victim(["twice", "fast"]), "twice")  # as good: the first one
        # but not at any price: a model asked for far more often outweighs the cost
        feed(policy, ["fast"] * 30)
        self.assertEqual(policy.victim(["slow", "fast"]), "slow")

    def test_a_byte_budget_weighs_the_cost_per_byte(self) -> None:
        """Under a byte budget a model holds its bytes: a big one whose reload is cheap per
        byte goes before a small one as costly per byte as a typical model."""
        policy = AdaptivePolicy(1000)
        policy.admitted("big-cheap", 500, 1.0)     # 0.002 s per byte
        policy.admitted("small", 10, 1.0)          # 0.1 s per byte
        policy.admitted("big-costly", 500, 50.0)   # 0.1 s per byte
        feed(policy, ["small", "big-cheap", "big-costly"])
        self.assertEqual(policy.victim(["small", "big-cheap", "big-costly"]), "big-cheap")
        self.assertEqual(policy.victim(["small", "big-costly"]), "small")  # equal per byte: LRU

    def test_a_scan_does_not_flush_the_hot_models(self) -> None:
        """Two hot models, each pair of their requests followed by two models asked for once:
        LRU evicts the hot ones for every pair of the scan, the adaptive policy keeps them."""
        trace: list[int] = []
        for i in range(200):
            trace += [0, 1, 100 + 2 * i, 101 + 2 * i]
        adaptive = simulate(AdaptivePolicy(3), trace, 3)
        # every scan model once, the hot ones once (and again early on, before their counts
        # stand out)
        self.assertLessEqual(adaptive.loads, 2 + 400 + 4)
        lru = simulate(LRUPolicy(), trace, 3)
        self.assertGreater(lru.loads, 700)

    def test_it_adapts_when_popularity_shifts(self) -> None:
        """Phases of 300 requests, each over 4 models of its own asked for in turn; a cache of
        4: once a phase is over its models are never asked for again.  Plain frequency keeps
        the old, much counted models and misses on every request of the next phase; the
        adaptive policy finds that a short memory misses less and forgets them."""
        trace: list[int] = []
        for phase in range(20):
            trace += [4 * phase + (i % 4) for i in range(300)]
        frequency_only = simulate(AdaptivePolicy(4, half_lives=(float("inf"),)), trace, 4)
        adaptive_policy = AdaptivePolicy(4)
        adaptive = simulate(adaptive_policy, trace, 4)
        lru = simulate(LRUPolicy(), trace, 4)
        self.assertEqual(lru.loads, 80)  # each model once
        self.assertGreater(frequency_only.loads, 1000)
        self.assertLessEqual(adaptive.loads, 80 + 4 * 5)  # a few phases to switch over
        self.assertGreater(adaptive_policy.switches, 0)

    def test_same_requests_same_choices(self) -> None:
        """Time is the count of requests: two policies fed the same requests agree, which is
        what lets the benchmark's simulation predict the daemon."""
        trace = [(7 * i * i + 3 * i) % 23 for i in range(500)]
        one, two = simulate(AdaptivePolicy(5), trace, 5), simulate(AdaptivePolicy(5), trace, 5)
        self.assertEqual(one, two)
    def test_miss_counts_rescaled_choose_alike(self) -> None:
        """The shadows' miss counts grow with time rather than decay on every request, and
        are scaled down before they overflow (after some 500,000 requests); here every 1,000
        requests: a policy rescaled six times chooses as one that never was."""
        trace: list[int] = []
        for phase in range(20):
            trace += [4 * phase + (i % 4) for i in range(300)]
        plain = AdaptivePolicy(4)
        one = simulate(plain, trace, 4)
        self.patch(eviction, "_MISS_RESCALE", 2.0)
        rescaled = AdaptivePolicy(4)
        two = simulate(rescaled, trace, 4)
        self.assertEqual((one.loads, one.reload_seconds), (two.loads, two.reload_seconds))
        self.assertEqual((plain.switches, plain.current), (rescaled.switches, rescaled.current))
        self.assertGreater(plain.switches, 0)
        self.assertLess(rescaled._miss_unit, 2.0)
        self.assertGreater(plain._miss_unit, 32.0)

    def test_ghost_history_is_bounded(self) -> None:
        policy = AdaptivePolicy(2, history=10)
        feed(policy, "ab", cached="ab")
        for i in range(1000):
            policy.requested(f"once-{i}")
        self.assertLessEqual(len(policy.shadows[0].score), 20)
        self.assertIn("a", policy.shadows[0].score)  # what the cache holds is remembered


class ManagerWithPolicyTests(unittest.TestCase):
    """The adaptive policy in the CacheManager: it chooses only among what may be evicted."""

    @defer.inlineCallbacks
    def manager(self, **limits):  # type: ignore[no-untyped-def]
        self.clock = task.Clock()
        self.backend = ScriptedBackend()
        source = make_source({n: 100 for n in "abcd"})
        disk = DiskCache(tempfile.mkdtemp(prefix="tfscache-eviction-cache-"), 10**9)
        self.cache = CacheManager(DiskModelProvider(source, listing_ttl=0, reactor=reactor), self.backend, disk,
                                  CacheLimits(**limits), clock=self.clock,
                                  policy=AdaptivePolicy(limits.get("max_models", 10)))
        yield self.cache.start()
        return self.cache

    @defer.inlineCallbacks
    def use(self, name: str, times: int = 1):  # type: ignore[no-untyped-def]
        for _ in range(times):
            lease = yield self.cache.acquire(ModelId(name, 1))
            lease.release()

    def unloaded(self) -> list[str]:
        return [line.split()[1] for line in self.backend.log if line.startswith("unload")]

    @defer.inlineCallbacks
    def test_the_least_requested_goes(self):  # type: ignore[no-untyped-def]
        yield self.manager(max_models=2, churn_guard=0.0)
        yield self.use("a", 5)
        yield self.use("b")
        yield self.use("a")  # b is now the most recently used, but asked for once
        yield self.use("c")
        self.assertEqual(self.unloaded(), ["b/1"])
        self.assertEqual([str(m) for m in self.cache.loaded()], ["a/1", "c/1"])

    @defer.inlineCallbacks
    def test_never_a_model_in_flight_or_pinned(self):  # type: ignore[no-untyped-def]
        """The policy's favourite victim is held by a request, then pinned: the other goes."""
        yield self.manager(max_models=2, churn_guard=0.0)
        yield self.use("a", 5)
        held = yield self.cache.acquire(ModelId("b", 1))  # b: asked for once, in flight
        yield self.use("c")
        self.assertEqual(self.unloaded(), ["a/1"])
        held.release()
        self.cache.pin(ModelId("c", 1))  # c: asked for once, pinned
        yield self.use("b")  # b: asked for twice now
        yield self.use("d")
        self.assertEqual(self.unloaded(), ["a/1", "b/1"])
        self.assertEqual([str(m) for m in self.cache.loaded()], ["c/1", "d/1"])

    @defer.inlineCallbacks
    def test_churn_guard_holds_then_the_policy_chooses(self):  # type: ignore[no-untyped-def]
        yield self.manager(max_models=2, churn_guard=2.0, capacity_wait=30.0)
        yield self.use("a", 5)
        yield self.use("b")
        self.clock.advance(1.0)
        c = self.cache.acquire(ModelId("c", 1))
        while not self.cache._room_waiters:  # c's copy runs in a real thread; then it waits for room
            yield task.deferLater(reactor, 0.01)
        self.assertFalse(c.called, "a model used 1 s ago was unloaded")
        self.clock.advance(1.1)  # both guards ran out: b, asked for once, goes
        lease = yield c
        lease.release()
        self.assertEqual(self.unloaded(), ["b/1"])

    @defer.inlineCallbacks
    def test_a_slow_load_is_kept_over_a_fast_one(self):  # type: ignore[no-untyped-def]
        """Asked for as often, a and b; a took 10 s to load (Clock), b none: b goes, although a
        is the least recently used."""
        yield self.manager(max_models=2, churn_guard=0.0)
        self.backend.auto = False
        a = self.cache.acquire(ModelId("a", 1))
        while ("a", 1) not in self.backend.pending:
            yield task.deferLater(reactor, 0.01)
        self.clock.advance(10.0)
        self.backend.finish("a", 1)
        (yield a).release()
        self.backend.auto = True
        yield self.use("b")
        yield self.use("c")
        self.assertEqual(self.unloaded(), ["b/1"])


class DiskWithPolicyTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_the_least_requested_copy_is_deleted_never_a_protected_one(self):  # type: ignore[no-untyped-def]
        cache = DiskCache(tempfile.mkdtemp(prefix="tfscache-disk-"), 300, policy=AdaptivePolicy(300))
        yield cache.start()
        a, b, c, d = (ModelId(n, 1) for n in "abcd")
        for mid in (a, b, c):
            os.makedirs(cache.path(mid))
            cache.requested(mid)
            cache.add(mid, 100, cost=1.0)
        for _ in range(3):
            cache.requested(a)
        cache.requested(c)
        cache.touch(b)  # b: the most recently used, asked for once
        yield cache.make_room(d, 100, {c})  # c is protected (being loaded)
        self.assertEqual(cache.model_ids(), [a, c])
        self.assertFalse(os.path.exists(cache.path(b)))
