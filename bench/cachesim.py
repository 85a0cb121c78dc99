"""Offline cache simulators for request traces: LRU and Belady's MIN, any tfscache eviction
policy, and trace generators (Zipf, shifting, bursty/diurnal, sizes).

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
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
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


# -- traces that are not stationary, sizes, and any eviction policy --------------------------

def _zipf_sampler(n_items: int, skew: float, rng: random.Random) -> Callable[[], int]:
    cum = list(itertools.accumulate(1.0 / (k + 1) ** skew for k in range(n_items)))
    total = cum[-1]
    return lambda: min(bisect.bisect_right(cum, rng.random() * total), n_items - 1)


def shifting_trace(n_items: int, n_requests: int, skew: float, period: int, seed: int = 0) -> list[int]:
    """Zipf over popularity ranks whose models change: every ``period`` requests half of the
    ranks, chosen at random, get their models reshuffled among them, so tenants go quiet (a
    popular model drops to a far rank) and others become active (a far one moves up)."""
    rng = random.Random(seed)
    draw = _zipf_sampler(n_items, skew, rng)
    model_at = list(range(n_items))
    rng.shuffle(model_at)
    out = []
    for i in range(n_requests):
        if i and i % period == 0:
            ranks = rng.sample(range(n_items), n_items // 2)
            moved = [model_at[r] for r in ranks]
            rng.shuffle(moved)
            for r, m in zip(ranks, moved, strict=True):
                model_at[r] = m
        out.append(model_at[draw()])
    return out


def bursty_trace(n_items: int, n_requests: int, skew: float, seed: int = 0, day: int = 5000,
                 burst_chance: float = 0.01, burst_requests: int = 30, burst_span: int = 100) -> list[int]:
    """Diurnal and bursty: two halves of the models (say two time zones' tenants), each Zipf
    over its own ranks, whose shares follow a sine of period ``day`` requests; and bursts:
    each request starts one with ``burst_chance``, ``burst_requests`` requests for a model
    drawn uniformly (a batch job of a tenant otherwise quiet) spread over the next
    ``burst_span`` requests."""
    rng = random.Random(seed)
    half = n_items // 2
    draw = _zipf_sampler(half, skew, rng)
    east, west = list(range(half)), list(range(half, n_items))
    rng.shuffle(east)
    rng.shuffle(west)
    due: dict[int, list[int]] = {}  # position -> burst requests due there
    out: list[int] = []
    while len(out) < n_requests:
        i = len(out)
        waiting = due.pop(i, None)
        if waiting:
            out.append(waiting.pop())
            if waiting:  # the rest of what was due here, next
                due.setdefault(i + 1, []).extend(waiting)
            continue
        if rng.random() < burst_chance:
            model = rng.randrange(n_items)
            for _ in range(burst_requests):
                due.setdefault(i + 1 + rng.randrange(burst_span), []).append(model)
        share = 0.5 + 0.5 * math.sin(2 * math.pi * i / day)
        rank = draw()
        out.append(east[rank] if rng.random() < share else west[rank])
    return out


def lognormal_sizes(n_items: int, seed: int = 0, median: float = 150e6, sigma: float = 1.2,
                    low: float = 10e6, high: float = 2e9) -> list[float]:
    """Model sizes in bytes, log-normal (``median``, ``sigma``) clipped to [low, high],
    independent of popularity."""
    rng = random.Random(seed)
    return [min(max(rng.lognormvariate(math.log(median), sigma), low), high) for _ in range(n_items)]


@dataclass(frozen=True)
class PolicyResult:
    policy: str
    requests: int
    loads: int
    reload_seconds: float


def simulate(policy: Any, trace: Sequence[int], capacity: float, sizes: Sequence[float] | None = None,
             load_seconds: Sequence[float] | None = None, name: str | None = None) -> PolicyResult:
    """Replay ``trace`` through a demand cache of ``capacity`` (items, or bytes when ``sizes``
    are given) that asks ``policy`` (a tfscache IEvictionPolicy, the daemon's own code) for
    its victims, offering them least recently used first as the CacheManager does.  A load
    of item k costs ``load_seconds[k]`` (1 s each when not given)."""
    cache: OrderedDict[int, float] = OrderedDict()  # least recently used first
    used = 0.0
    loads = 0
    seconds = 0.0
    for item in trace:
        policy.requested(item)
        if item in cache:
            cache.move_to_end(item)
            continue
        size = sizes[item] if sizes is not None else 1.0
        while cache and used + size > capacity:
            victim = policy.victim(list(cache))
            used -= cache.pop(victim)
            policy.removed(victim)
        cache[item] = size
        used += size
        loads += 1
        cost = load_seconds[item] if load_seconds is not None else 1.0
        seconds += cost
        policy.admitted(item, size, cost)
    return PolicyResult(name or policy.name, len(trace), loads, seconds)


def belady_min_sized(trace: Sequence[int], capacity: float, sizes: Sequence[float] | None = None,
                     load_seconds: Sequence[float] | None = None) -> PolicyResult:
    """Belady's MIN with sizes: evict the cached items used furthest in the future until the
    new one fits.  Optimal in loads for equal sizes (``belady_min``); with sizes it is the
    classic bound, not the exact optimum (that is NP-hard)."""
    nxt = next_uses(trace)
    cached: dict[int, int] = {}
    heap: list[tuple[int, int]] = []  # (-next use, item); stale entries skipped
    used = 0.0
    loads = 0
    seconds = 0.0
    for i, item in enumerate(trace):
        if item not in cached:
            size = sizes[item] if sizes is not None else 1.0
            while cached and used + size > capacity:
                neg, victim = heapq.heappop(heap)
                if cached.get(victim) == -neg:
                    del cached[victim]
                    used -= sizes[victim] if sizes is not None else 1.0
            used += size
            loads += 1
            seconds += load_seconds[item] if load_seconds is not None else 1.0
        cached[item] = nxt[i]
        heapq.heappush(heap, (-nxt[i], item))
        if len(heap) > 4 * len(cached) + 64:
            heap = [(-nu, it) for it, nu in cached.items()]
            heapq.heapify(heap)
    return PolicyResult("min", len(trace), loads, seconds)
