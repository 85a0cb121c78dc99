"""Offline cache simulators for request traces: LRU and Belady's MIN, plus a Zipf trace generator.

A trace is a list of item ids (model indices), one per request.  Both simulators are demand
caches, as tfscache is: every miss loads the item (a request cannot be served from outside the
cache), so loads == misses, and a full cache evicts one item per load.

- ``lru``: evicts the least recently used item; what a tfscache node does (``_victim`` picks the
  idle AVAILABLE model with the oldest ``last_used``).
- ``belady_min``: evicts the cached item whose next use lies furthest in the future (never used
  again counts as infinitely far).  Belady (1966) showed that no demand policy has fewer misses on
  the same trace, so it bounds what any smarter eviction policy could gain.  Next uses come from
  one backward pass; the cache keeps a max-heap on next use with lazy deletion, so a run is
  O(n log n).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import random
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class SimResult:
    policy: str
    capacity: int
    requests: int
    hits: int
    loads: int
    evictions: int

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def loads_per_1000(self) -> float:
        return 1000.0 * self.loads / self.requests if self.requests else 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), hit_ratio=round(self.hit_ratio, 6), loads_per_1000=round(self.loads_per_1000, 3))


def zipf_trace(n_items: int, n_requests: int, skew: float, seed: int = 0) -> list[int]:
    """``n_requests`` item ids in ``range(n_items)``; item k has probability proportional to
    1/(k+1)**skew (item 0 is the most popular).  The same seed gives the same trace."""
    if n_items < 1:
        raise ValueError("n_items must be >= 1")
    rng = random.Random(seed)
    cum = list(itertools.accumulate(1.0 / (k + 1) ** skew for k in range(n_items)))
    total = cum[-1]
    # bisect on the cumulative weights: random.choices does the same, but this keeps the
    # trace identical across Python versions that might change choices()' internals
    return [min(bisect.bisect_right(cum, rng.random() * total), n_items - 1) for _ in range(n_requests)]


def lru(trace: Sequence[Hashable], capacity: int) -> SimResult:
    """Replay ``trace`` through an LRU cache of ``capacity`` items."""
    if capacity < 1:
        raise ValueError("capacity must be >= 1")
    cache: OrderedDict[Hashable, None] = OrderedDict()
    hits = evictions = 0
    for item in trace:
        if item in cache:
            hits += 1
            cache.move_to_end(item)
            continue
        if len(cache) >= capacity:
            cache.popitem(last=False)
            evictions += 1
        cache[item] = None
    n = len(trace)
    return SimResult("lru", capacity, n, hits, n - hits, evictions)


def next_uses(trace: Sequence[Hashable]) -> list[int]:
    """For each position i, the position of the next request for the same item, or len(trace)
    when there is none (further than any real position)."""
    n = len(trace)
    out = [n] * n
    seen: dict[Hashable, int] = {}
    for i in range(n - 1, -1, -1):
        out[i] = seen.get(trace[i], n)
        seen[trace[i]] = i
    return out


def belady_min(trace: Sequence[Hashable], capacity: int) -> SimResult:
    """Replay ``trace`` through Belady's MIN (the offline optimum) with ``capacity`` items."""
    if capacity < 1:
        raise ValueError("capacity must be >= 1")
    nxt = next_uses(trace)
    cached: dict[Hashable, int] = {}  # item -> position of its next use
    heap: list[tuple[int, int, Hashable]] = []  # (-next use, tie-break, item); stale entries skipped
    tie = itertools.count()  # unique second key: items themselves are never compared
    hits = evictions = 0
    for i, item in enumerate(trace):
        if item in cached:
            hits += 1
        else:
            if len(cached) >= capacity:
                while True:
                    neg, _, victim = heapq.heappop(heap)
                    if cached.get(victim) == -neg:  # else a stale entry of an older next use
                        del cached[victim]
                        evictions += 1
                        break
        cached[item] = nxt[i]
        heapq.heappush(heap, (-nxt[i], next(tie), item))
        # bound the heap: stale entries pile up on hits; rebuild when they dominate
        if len(heap) > 4 * capacity + 64:
            heap = [(-nu, next(tie), it) for it, nu in cached.items()]
            heapq.heapify(heap)
    n = len(trace)
    return SimResult("min", capacity, n, hits, n - hits, evictions)
