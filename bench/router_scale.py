"""Routing decisions per second and memory of the cluster router, in process (no network).

For every member count, over ``--names`` model names (``tfscache/cluster/ring.py`` and
``router.py``):

  cold           ``Ring.owners(name)`` on a fresh Ring, each name once: one BLAKE2b per member
                 per name plus a top-R selection (what the first request for a model costs after
                 a membership change).
  cached         ``Ring.owners(name)`` again, ``--passes`` times over all names in a shuffled
                 order: a dict lookup (the Ring caches owner lists, up to 65,536 names).
  router         ``Router.candidates(name)`` on the warm ring: the full per-request decision
                 (owners, members marked down, in-flight spreading).
  reference      the uncached module function ``ring.owners()`` (one ``sorted()`` over all
                 members with an int weight each), on a sample of names: what the Ring's
                 cache and byte-wise top-R save.

Movement: for 10->11 (a join), 10->9 and 3->2 members (leaves), the share of names whose first
owner moved and whose R-owner set changed (``movement`` in the JSON).

Memory: tracemalloc of the Ring's owner cache over the first 2,000 names (bytes per cached name)
and the peak while filling it; the deep size of the full cache (dict, owner tuples, the name
strings it keeps alive); the RSS growth of the process over the timed cold pass (no tracemalloc
there, it would slow the timing; the allocator's reuse makes it coarse).

    python -m bench.router_scale            # 10,000 names; 100 and 1,000 members
    python -m bench.router_scale --quick    # 1,000 names; 10 and 100 members
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
import tracemalloc
from typing import Any

from twisted.internet.task import Clock

from bench.common import parse_args, print_table, write_report
from tfscache.cluster.discovery.static import StaticDiscovery
from tfscache.cluster.members import Member
from tfscache.cluster.ring import Ring, owners
from tfscache.cluster.router import Router
from tfscache.metrics import Metrics

REFERENCE_SAMPLE = 500
TRACED = 2000


def _extra(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--names", type=int, help="model names (default 10000, quick 1000)")
    ap.add_argument("--members", type=int, nargs="+", help="member counts (default 100 1000, quick 10 100)")
    ap.add_argument("--replicas", type=int, default=2, help="owners per name (cluster.replicas_per_model)")
    ap.add_argument("--passes", type=int, default=5, help="cached lookups: passes over all names")


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc)."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_members(n: int) -> list[Member]:
    return [Member(f"node-{i:04d}", f"10.0.{i // 250}.{i % 250 + 1}", 8501, 8500) for i in range(n)]


def _rate(count: int, seconds: float) -> dict[str, float]:
    return {"decisions": count, "seconds": round(seconds, 6),
            "per_second": round(count / seconds, 1) if seconds > 0 else float("inf"),
            "us_per_decision": round(1e6 * seconds / count, 3) if count else 0.0}


def measure(n_members: int, names: list[str], replicas: int, passes: int, seed: int = 0) -> dict[str, Any]:
    members = make_members(n_members)
    rng = random.Random(seed)
    out: dict[str, Any] = {"members": n_members, "names": len(names), "replicas": replicas}

    # cold, timed, with the RSS growth over the pass
    gc.collect()
    ring = Ring(members, replicas)
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    for name in names:
        ring.owners(name)
    out["cold"] = _rate(len(names), time.perf_counter() - t0)
    out["rss_delta_bytes"] = rss_bytes() - rss0

    # cached: the same ring, every name again in a shuffled order
    order = names * passes
    rng.shuffle(order)
    t0 = time.perf_counter()
    for name in order:
        ring.owners(name)
    out["cached"] = _rate(len(order), time.perf_counter() - t0)

    # the router's whole decision on a warm ring
    discovery = StaticDiscovery(members, members[0])
    router = Router(None, discovery, members[0].id, replicas, forward_timeout=30.0, clock=Clock(),  # type: ignore[arg-type]
                    spread_threshold=32, metrics=Metrics())
    for name in names:
        router.candidates(name)
    t0 = time.perf_counter()
    for name in order:
        router.candidates(name)
    out["router_candidates"] = _rate(len(order), time.perf_counter() - t0)

    # the uncached reference function, on a sample
    sample = names[:REFERENCE_SAMPLE]
    t0 = time.perf_counter()
    for name in sample:
        owners(name, members, replicas)
    out["reference_uncached"] = _rate(len(sample), time.perf_counter() - t0)
    # both compute the same owners (a benchmark of a wrong answer would be worthless)
    fresh = Ring(members, replicas)
    out["agrees_with_reference"] = all(
        list(fresh.owners(n)) == owners(n, members, replicas) for n in sample[:100])

    # memory of the owner cache: tracemalloc on a fresh ring over the first TRACED names (the
    # tracing slows every allocation; per-name cost and the fill's transient peak do not depend
    # on how many names), and the deep size of the full cache of the timed ring
    deep = sys.getsizeof(ring._cache) + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in ring._cache.items())
    del ring, router
    gc.collect()
    traced = names[:TRACED]
    tracemalloc.start()
    ring = Ring(members, replicas)
    base, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    for name in traced:
        ring.owners(name)
    filled, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out["memory"] = {
        "traced_names": len(traced),
        "traced_cache_bytes": filled - base,
        "cache_bytes_per_name": round((filled - base) / len(traced), 1),
        "fill_peak_bytes": peak - base,
        "ring_bytes_before_cache": base,
        # dict + owner tuples + the name strings the cache keeps alive (members are shared)
        "full_cache_deep_bytes": deep,
    }
    return out


# (name, members before, members after): node-0000.. node-(n-1); a join adds the next id, a
# leave drops the last one
MOVES = [("join 10->11", 10, 11), ("leave 10->9", 10, 9), ("leave 3->2", 3, 2)]


def movement(names: list[str], replicas: int) -> list[dict[str, Any]]:
    """Share of names whose first owner, and whose owner set (first ``replicas``), changes when
    the membership changes: what a join or leave makes the cluster copy and load again."""
    out = []
    for label, before_n, after_n in MOVES:
        before, after = Ring(make_members(before_n), replicas), Ring(make_members(after_n), replicas)
        first = changed = 0
        for name in names:
            b, a = before.owners(name), after.owners(name)
            first += b[0].id != a[0].id
            changed += {m.id for m in b} != {m.id for m in a}
        # rendezvous hashing: a joining member takes the names it ranks first (1/after) and is in
        # the top R of R/after of them; a leaving one hands over its own (1/before, R/before)
        joined = after_n > before_n
        n = after_n if joined else before_n
        out.append({
            "change": label, "members_before": before_n, "members_after": after_n, "names": len(names),
            "replicas": replicas,
            "first_owner_moved": first, "first_owner_moved_share": round(first / len(names), 4),
            "owner_set_changed": changed, "owner_set_changed_share": round(changed / len(names), 4),
            "expected_first_owner_share": round(1 / n, 4),
            "expected_owner_set_share": round(min(replicas, n) / n, 4),
        })
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__ or "", _extra, argv)
    n_names = args.names or (1000 if args.quick else 10_000)
    member_counts = args.members or ([10, 100] if args.quick else [100, 1000])
    names = [f"tenant-{i:05d}-model" for i in range(n_names)]
    runs = [measure(n, names, args.replicas, args.passes) for n in member_counts]
    moves = movement(names, args.replicas)
    report = {
        "settings": {"names": n_names, "members": member_counts, "replicas": args.replicas,
                     "passes": args.passes, "quick": args.quick},
        "runs": runs,
        "movement": moves,
    }
    print_table(
        f"Routing decisions per second, {n_names} names, R={args.replicas}",
        ["members", "cold/s", "cold us", "cached/s", "router/s", "uncached ref/s", "cache B/name",
         "cache KiB", "fill peak KiB", "RSS delta KiB"],
        [[r["members"], r["cold"]["per_second"], r["cold"]["us_per_decision"], r["cached"]["per_second"],
          r["router_candidates"]["per_second"], r["reference_uncached"]["per_second"],
          r["memory"]["cache_bytes_per_name"], r["memory"]["full_cache_deep_bytes"] // 1024,
          r["memory"]["fill_peak_bytes"] // 1024, r["rss_delta_bytes"] // 1024] for r in runs],
    )
    print_table(
        f"Models moved by a membership change, {n_names} names, R={args.replicas} (share of names; "
        "expected: 1/N and R/N of the larger N)",
        ["change", "first owner moved", "expected", f"R={args.replicas} set changed", "expected"],
        [[m["change"], m["first_owner_moved_share"], m["expected_first_owner_share"],
          m["owner_set_changed_share"], m["expected_owner_set_share"]] for m in moves],
    )
    path = write_report("router_scale", report, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
