"""The benchmarks keep working: the cache simulators are right, and ``bench/run --quick`` (on even
smaller settings) runs every benchmark against real processes and writes sane reports."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Hashable, Sequence
from functools import cache

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.trial import unittest

from bench.cachesim import (
    belady_min,
    belady_min_sized,
    bursty_trace,
    lognormal_sizes,
    lru,
    next_uses,
    shifting_trace,
    simulate,
    zipf_trace,
)
from tests.harness.process import REPO_ROOT, run_in_repo

TEXTBOOK = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]


def optimal_loads(trace: Sequence[Hashable], capacity: int) -> int:
    """The fewest loads of any demand cache on ``trace``: every eviction choice tried."""

    @cache
    def best(i: int, held: frozenset[Hashable]) -> int:
        if i == len(trace):
            return 0
        item = trace[i]
        if item in held:
            return best(i + 1, held)
        if len(held) < capacity:
            return 1 + best(i + 1, held | {item})
        return 1 + min(best(i + 1, (held - {victim}) | {item}) for victim in held)

    return best(0, frozenset())


class CacheSimTests(unittest.TestCase):
    def test_min_on_a_hand_computed_trace(self) -> None:
        # capacity 2, trace 1 2 3 1 4 1 2 3:
        #   1 miss {1}; 2 miss {1,2}; 3 miss: next 1 at 3, next 2 at 6 -> evict 2 {1,3}; 1 hit;
        #   4 miss: next 1 at 5, next 3 at 7 -> evict 3 {1,4}; 1 hit; 2 miss; 3 miss
        r = belady_min([1, 2, 3, 1, 4, 1, 2, 3], 2)
        self.assertEqual((r.hits, r.loads, r.evictions), (2, 6, 4))

    def test_lru_on_a_hand_computed_trace(self) -> None:
        # a miss {a}; b miss {a,b}; a hit (a most recent); c miss, evict b {a,c};
        # b miss, evict a {c,b}; a miss, evict c {b,a}
        r = lru(["a", "b", "a", "c", "b", "a"], 2)
        self.assertEqual((r.hits, r.loads, r.evictions), (1, 5, 3))
        # 1 2 3 1 4 1 2 3 (MIN's trace above): 3 evicts 1, 1 evicts 2, 4 evicts 3, 1 hits,
        # 2 evicts 4, 3 evicts 1
        r = lru([1, 2, 3, 1, 4, 1, 2, 3], 2)
        self.assertEqual((r.hits, r.loads), (1, 7))

    def test_textbook_reference_string(self) -> None:
        # Silberschatz's reference string with 3 frames: 9 faults with OPT, 12 with LRU
        self.assertEqual(belady_min(TEXTBOOK, 3).loads, 9)
        self.assertEqual(lru(TEXTBOOK, 3).loads, 12)

    def test_next_uses(self) -> None:
        self.assertEqual(next_uses(["a", "b", "a", "c", "b"]), [2, 4, 5, 5, 5])

    def test_counts_and_ratios(self) -> None:
        r = lru([1, 1, 1, 2], 1)
        self.assertEqual((r.requests, r.hits, r.loads, r.evictions), (4, 2, 2, 1))
        self.assertEqual(r.hit_ratio, 0.5)
        self.assertEqual(r.loads_per_1000, 500.0)
        self.assertEqual(r.to_dict()["hit_ratio"], 0.5)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.integers(0, 9), max_size=120), st.integers(1, 6))
    def test_min_never_worse_than_lru(self, trace: list[int], capacity: int) -> None:
        m, r = belady_min(trace, capacity), lru(trace, capacity)
        self.assertGreaterEqual(m.hits, r.hits)
        for res in (m, r):
            self.assertEqual(res.hits + res.loads, len(trace))
            self.assertGreaterEqual(res.loads, len(set(trace)))  # every first request is a load
            self.assertEqual(res.evictions, max(0, res.loads - capacity))

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.integers(0, 4), max_size=11), st.integers(1, 3))
    def test_min_is_optimal(self, trace: list[int], capacity: int) -> None:
        self.assertEqual(belady_min(trace, capacity).loads, optimal_loads(trace, capacity))

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.integers(0, 9), max_size=120), st.integers(1, 6))
    def test_policy_simulator_agrees_with_the_reference_ones(self, trace: list[int], capacity: int) -> None:
        """The simulator that drives the daemon's policy objects, with LRUPolicy, is lru();
        MIN with sizes, every size 1, is belady_min(); and the adaptive policy is a demand
        cache that never beats MIN."""
        from tfscache.node.eviction import AdaptivePolicy, LRUPolicy

        self.assertEqual(simulate(LRUPolicy(), trace, capacity).loads, lru(trace, capacity).loads)
        bound = belady_min(trace, capacity).loads
        self.assertEqual(belady_min_sized(trace, capacity, [1.0] * 10).loads, bound)
        adaptive = simulate(AdaptivePolicy(capacity), trace, capacity)
        self.assertGreaterEqual(adaptive.loads, bound)
        self.assertEqual(adaptive.reload_seconds, adaptive.loads)  # 1 s a load unless told

    def test_sized_simulation_holds_the_byte_budget(self) -> None:
        from tfscache.node.eviction import AdaptivePolicy, LRUPolicy

        sizes = [float(10 * (k % 5 + 1)) for k in range(20)]  # 10..50 bytes
        trace = zipf_trace(20, 500, 1.0, 3)
        for policy in (LRUPolicy(), AdaptivePolicy(100)):
            r = simulate(policy, trace, 100, sizes, [s / 10 for s in sizes])
            self.assertGreaterEqual(r.loads, len(set(trace)))
            self.assertGreater(r.reload_seconds, r.loads)  # sizes 10..50: 1-5 s a load

    def test_other_traces(self) -> None:
        shifting = shifting_trace(100, 2000, 1.0, 200, 5)
        self.assertEqual(shifting, shifting_trace(100, 2000, 1.0, 200, 5))
        first, last = shifting[:200], shifting[-200:]
        top = lambda part: max(set(part), key=part.count)  # noqa: E731
        self.assertNotEqual(top(first), top(last))  # popularity moved
        bursty = bursty_trace(100, 3000, 1.0, 5)
        self.assertEqual(len(bursty), 3000)
        self.assertTrue(all(0 <= k < 100 for k in bursty))
        sizes = lognormal_sizes(200, 1)
        self.assertTrue(all(10e6 <= s <= 2e9 for s in sizes))
        self.assertGreater(max(sizes) / min(sizes), 20)

    def test_zipf_trace(self) -> None:
        t = zipf_trace(50, 5000, 1.0, seed=7)
        self.assertEqual(t, zipf_trace(50, 5000, 1.0, seed=7))  # seeded: the same trace
        self.assertNotEqual(t, zipf_trace(50, 5000, 1.0, seed=8))
        self.assertTrue(all(0 <= k < 50 for k in t))
        counts = [t.count(k) for k in range(50)]
        # item k is drawn with p ~ 1/(k+1): item 0 is ~2x item 1 and ~10x item 9 (binomial slack)
        self.assertEqual(max(range(50), key=counts.__getitem__), 0)
        self.assertTrue(1.6 < counts[0] / counts[1] < 2.5, counts[:2])
        self.assertTrue(6 < counts[0] / counts[9] < 16, (counts[0], counts[9]))
        # a larger skew concentrates the requests on fewer models
        self.assertLess(len(set(zipf_trace(500, 2000, 1.2, 1))), len(set(zipf_trace(500, 2000, 0.8, 1))))


# bench/run --quick with even smaller settings: about 45 s on 2 cores
TINY = {
    "TFSCACHE_BENCH_ARGS_WARM_OVERHEAD": "--seconds 0.3 --concurrency 2 --scenarios one_node router",
    "TFSCACHE_BENCH_ARGS_COLD_PATH": "--models 1 --padding-mb 1 --herd 8",
    # more requests in flight than capacity, with churn_guard_seconds 0: a just-loaded model must
    # not be unloaded before its waiters hold their leases
    "TFSCACHE_BENCH_ARGS_ZIPF_WORKLOAD": "--models 20 --capacity 3 --requests 60 --concurrency 6 "
                                         "--sim-requests 500 --capacities 2 5 10 --skews 0.8 1.0 "
                                         "--replay-skews 0.8 1.0",
    "TFSCACHE_BENCH_ARGS_EVICTION": "--models 20 --requests 300 --capacity 3 --replay-traces zipf-1.0 "
                                    "--replay-requests 40 --concurrency 2 --no-cluster",
    "TFSCACHE_BENCH_ARGS_ROUTER_SCALE": "--names 300 --members 5 50",
    "TFSCACHE_BENCH_ARGS_S3_COPY": "--total-mb 2 --files 4 --repeat 1",
    "TFSCACHE_BENCH_ARGS_DATA_PLANE": "--seconds 0.3 --concurrency 2 --cold-models 10 --slow-load-seconds 0.5 "
                                      "--cold-window 1.5",
    "TFSCACHE_BENCH_ARGS_REACTOR_STALLS": "--requests 300",
    # S3 is s3_copy's above; azure and gcs start Azurite and fake-gcs-server (~15 s alone)
    "TFSCACHE_BENCH_ARGS_OBJECT_COPY": "--total-mb 2 --files 4 --repeat 1 --providers azure gcs",
}


class BenchRunTests(unittest.TestCase):
    timeout = 900  # the run takes ~2 min alone, 5 min while other test runs load the 2 CPUs (load 17)

    @defer.inlineCallbacks
    def test_quick_run_writes_sane_reports(self):  # type: ignore[no-untyped-def]
        out = os.path.abspath(self.mktemp())
        env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="2", TFSCACHE_BENCH_NO_SETUP="1",
                   # the venv the tests run in
                   PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""), **TINY)
        stdout, stderr, code = yield run_in_repo(os.path.join(REPO_ROOT, "bench", "run"),
                                                 ["--quick", "--out", out], env)
        text = stdout.decode(errors="replace")
        self.assertEqual(code, 0, text[-3000:] + stderr.decode(errors="replace")[-3000:])
        self.assertIn("all benchmarks succeeded", text)
        self.assertRegex(text, r"wall time: \d+ s")

        def report(name: str) -> dict:  # type: ignore[type-arg]
            path = os.path.join(out, f"{name}.json")
            self.assertIn(path, text)  # the closing summary lists it
            with open(path) as f:
                data: dict = json.load(f)  # type: ignore[type-arg]
            self.assertEqual(data["benchmark"], name)
            self.assertIn("cpus", data["machine"])
            return data

        zipf = report("zipf_workload")
        rows = zipf["simulation"]["rows"]
        self.assertEqual(len(rows), 2 * 3)
        for row in rows:
            self.assertGreaterEqual(row["min"]["hit_ratio"], row["lru"]["hit_ratio"], row)
            self.assertEqual(row["lru"]["hits"] + row["lru"]["loads"], 500)
        # a bigger cache never does worse under MIN
        for skew in (0.8, 1.0):
            mins = [r["min"]["hit_ratio"] for r in sorted(rows, key=lambda r: r["capacity"]) if r["skew"] == skew]
            self.assertEqual(mins, sorted(mins))
        self.assertEqual([r["skew"] for r in zipf["replays"]], [0.8, 1.0])  # one replay per skew
        for replay in zipf["replays"]:
            self.assertEqual(replay["errors"], 0, replay["error_samples"])
            daemon = replay["daemon"]
            self.assertEqual(daemon["hits"] + daemon["misses"], 60)  # every request looked up once
            # the daemon is a demand cache too: never fewer loads than the optimum, nor than models
            self.assertGreaterEqual(daemon["loads"], replay["min"]["loads"])
            self.assertGreaterEqual(daemon["loads"], replay["distinct_models"])
            self.assertEqual(daemon["unloads"], daemon["loads"] - 3)  # all slots full at the end
            self.assertEqual(daemon["load_errors"], 0)
            self.assertGreater(replay["latency_ms"]["p50"], 0)

        path = os.path.join(out, "eviction.json")
        self.assertIn(path, text)
        with open(path) as f:
            records = json.load(f)
        for r in records:
            self.assertEqual(set(r), {"trace", "policy", "requests", "loads", "reload_seconds", "replayed"})
        simulated = {(r["trace"], r["policy"]) for r in records if not r["replayed"] and r["requests"] == 300}
        self.assertEqual(simulated, {(t, p) for t in ("zipf-0.8", "zipf-1.0", "zipf-1.2", "shifting", "bursty",
                                                       "mixed-size") for p in ("lru", "adaptive", "min")})
        self.assertEqual({(r["trace"], r["policy"], r["requests"]) for r in records if r["replayed"]},
                         {("zipf-1.0", "lru", 40), ("zipf-1.0", "adaptive", 40)})
        for r in records:  # MIN is the bound in loads (every trace of the same requests but mixed-size's bytes)
            bound = next(m for m in records if m["policy"] == "min" and not m["replayed"]
                         and (m["trace"], m["requests"]) == (r["trace"], r["requests"]))
            if r["trace"] != "mixed-size":
                self.assertGreaterEqual(r["loads"], bound["loads"], r)
        summary = report("eviction_summary")
        self.assertIn(summary["default"]["default"], ("lru", "adaptive"))
        self.assertEqual([e["errors"] for e in summary["replays"]], [0, 0])

        scale = report("router_scale")
        self.assertEqual([r["members"] for r in scale["runs"]], [5, 50])
        for r in scale["runs"]:
            self.assertTrue(r["agrees_with_reference"])
            for key in ("cold", "cached", "router_candidates", "reference_uncached"):
                self.assertGreater(r[key]["per_second"], 0, key)
            self.assertGreater(r["memory"]["cache_bytes_per_name"], 0)
        moves = {m["change"]: m for m in scale["movement"]}
        self.assertEqual(set(moves), {"join 10->11", "leave 10->9", "leave 3->2"})
        for m in moves.values():
            self.assertEqual(m["names"], 300)
            # rendezvous hashing moves about 1/N of the first owners and R/N of the owner sets
            # (300 names: binomial slack), and a set changes whenever the first owner moves
            self.assertLess(abs(m["first_owner_moved_share"] - m["expected_first_owner_share"]), 0.07, m)
            self.assertLess(abs(m["owner_set_changed_share"] - m["expected_owner_set_share"]), 0.09, m)
            self.assertGreaterEqual(m["owner_set_changed"], m["first_owner_moved"], m)

        warm = report("warm_overhead")
        self.assertEqual({(c["scenario"], c["protocol"], c["target"]) for c in warm["cells"]},
                         {(s, p, t) for s in ("one_node", "router") for p in ("rest", "grpc")
                          for t in ("direct", "via")})
        for cell in warm["cells"]:
            self.assertGreater(cell["requests"], 0, cell)
            self.assertGreater(cell["p50_ms"], 0, cell)
            self.assertEqual(cell["errors"], 0, cell)
            self.assertGreater(cell["loadgen_cpu_us_per_req"], 0, cell)  # the generator's own CPU
        self.assertGreaterEqual(warm["checks"]["router_forwards_counted_by_node0"],
                                warm["checks"]["router_requests_measured"])
        s3 = report("s3_copy")
        self.assertEqual(s3["total_bytes"], 2_000_000)
        self.assertEqual(set(s3["methods"]), {"provider", "provider_nomd5", "per_object", "cli_like"})
        for m in s3["methods"].values():
            self.assertEqual(len(m["seconds"]), 1)
            self.assertGreater(m["median_mb_per_s"], 0)
        self.assertGreater(s3["ratios"]["provider_vs_cli_like"]["median_of_rounds"], 0)
        objects = report("object_copy")
        self.assertEqual(objects["total_bytes"], 2_000_000)
        self.assertEqual(set(objects["providers"]), {"azure", "gcs"})
        for name, r in objects["providers"].items():
            if "skipped" in r:  # its emulator is not installed here: the reason says which
                self.assertIn("missing", r["skipped"], name)
                continue
            for m in ("provider", "provider_nocheck", "plain_sdk"):
                self.assertEqual(len(r["methods"][m]["seconds"]), 1)
                self.assertGreater(r["methods"][m]["median_mb_per_s"], 0)
            self.assertGreater(r["provider_vs_plain"]["median_of_rounds"], 0)
        cold = report("cold_path")
        self.assertTrue(cold["herd"]["passed"], cold["herd"])
        self.assertGreater(cold["medians"]["cold_s"], 0)

        for png in ("hit_ratio_vs_capacity.png", "latency_vs_concurrency.png"):
            with open(os.path.join(out, png), "rb") as f:
                self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n", png)

        stalls = report("reactor_stalls")
        if "skipped" not in stalls:  # it needs bench/fastbackend, as the data plane below does
            self.assertEqual(list(stalls["contenders"]), ["direct", "tfscache"])
            for who, c in stalls["contenders"].items():
                self.assertEqual(c["requests"], 300, who)
                self.assertGreater(c["p50_ms"], 0, who)
                self.assertLessEqual(c["p50_ms"], c["max_ms"], who)

        # last: without its Go programs the data-plane benchmark says so, and this test skips
        plane = report("data_plane")
        if "skipped" in plane:
            raise unittest.SkipTest(f"bench.data_plane: {plane['skipped']}")
        contenders = plane["contenders"]
        self.assertEqual(contenders[0], "direct")
        self.assertIn("tfscache", contenders)
        self.assertIn("floor", contenders)
        self.assertEqual("original" in contenders, plane["original"]["measured"])
        if not plane["original"]["measured"]:
            self.assertTrue(plane["original"]["reason"])  # it says why
        self.assertEqual({(c["backend"], c["scenario"], c["protocol"], c["concurrency"]) for c in plane["cells"]},
                         {("fast", s, p, 2) for s in ("one_node", "router") for p in ("rest", "grpc")})
        for cell in plane["cells"]:
            # every contender in every cell, but the grpc.aio floor in the gRPC cells only
            expected = [w for w in contenders if w != "floor" or cell["protocol"] == "grpc"]
            self.assertEqual(list(cell["rounds"]), expected, (cell["scenario"], cell["protocol"]))
            self.assertEqual("tfscache_vs_floor" in cell["ratios"], cell["protocol"] == "grpc")
            for who in expected:
                (run,) = cell["rounds"][who]
                self.assertGreater(run["requests"], 0, (cell["scenario"], cell["protocol"], who))
                self.assertEqual(run["errors"], 0, (cell["scenario"], cell["protocol"], who, run))
                self.assertGreater(run["p50_ms"], 0)
                if who != "direct":  # the node(s) did the forwarding: their CPU is counted
                    self.assertGreater(run["node_cpu_s"], 0, (cell["scenario"], cell["protocol"], who))
            self.assertIn("tfscache_vs_direct", cell["ratios"])
        for kind, checks in plane["checks"].items():  # the router cells went node-0 -> node-1
            self.assertTrue(checks["tfscache_router_owner_backend_has_model"], kind)
            self.assertFalse(checks["tfscache_router_non_owner_backend_has_model"], kind)
        cold = {c["contender"]: c for c in plane["cold"]}
        self.assertIn("tfscache", cold)
        for who, c in cold.items():
            self.assertGreater(c["warm_alone"]["requests"], 0, who)
            self.assertEqual(c["warm_alone"]["errors"], 0, who)
        # (the original loads one model at a time under a lock its warm calls wait for: beside
        # cold calls they may fail, which is what the cell shows; tfscache's must not)
        self.assertGreater(cold["tfscache"]["warm_beside_cold"]["requests"], 0)
        self.assertEqual(cold["tfscache"]["warm_beside_cold"]["errors"], 0)
        # tfscache loads all ten cold models at once: every cold call answered
        self.assertEqual((cold["tfscache"]["cold"]["answered"], cold["tfscache"]["cold"]["errors"]), (10, 0))
