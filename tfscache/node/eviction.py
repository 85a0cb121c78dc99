"""Eviction policies: which of the models that may be evicted goes first.

The owner of the room (the CacheManager for TF Serving's slots, the DiskCache for the disk)
decides which models MAY go (no request in flight, not pinned, past the churn guard, not being
copied or loaded) and asks its policy which of those goes; the policy only ranks.  It hears of
every request (``requested``), of every model that takes room (``admitted``, with its size and
its measured reload cost) and of every one that gives it back (``removed``).

- ``lru``: the least recently used first (the candidates come least recently used first, so
  this is their first one).  What the original TFServingCache and ModelMesh do.
- ``adaptive``: cost- and frequency-aware, with an adaptive memory.  A model's value is its
  exponentially decayed request count (kept for evicted models too: a bounded ghost history)
  times its reload cost (copy + load seconds) per unit of the budget it holds (a slot, or its
  bytes under a byte budget); the least valuable goes first.  How fast counts decay decides
  between frequency and recency: a long memory wins on stable popularity (a Zipf workload:
  it keeps the most requested models, where LRU keeps the most recent), a short one when
  popularity shifts (it forgets tenants gone quiet; at the shortest it is LRU).  No single
  half-life wins both, so the policy simulates a few of them side by side on the same
  requests (key-only shadow caches with the same budget) and ranks with the one that missed
  least over the recent past, as set dueling does in CPU caches.

Time in the policies is the count of requests seen, not the clock: a policy fed the same
requests makes the same choices, in the daemon as in ``bench/eviction.py``'s simulation.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Hashable, Sequence

from zope.interface import Attribute, Interface, implementer

POLICIES = ("lru", "adaptive")


class IEvictionPolicy(Interface):
    """Ranks the models that may be evicted from one budget (TF Serving's slots, the disk)."""

    name = Attribute("The policy's config name, e.g. 'lru'.")
    capacity = Attribute("The budget, in the units of admitted()'s sizes; its owner keeps it current.")

    def requested(key: Hashable) -> None:
        """A request for ``key`` arrived (a hit or a miss)."""

    def admitted(key: Hashable, size: float, cost: float) -> None:
        """``key`` now takes ``size`` of the budget (bytes; 1 under a count budget); reloading it
        after an eviction would cost ``cost`` seconds (0: not measured yet)."""

    def removed(key: Hashable) -> None:
        """``key`` gave its room back (evicted, unloaded, deleted)."""

    def victim(candidates: Sequence[Hashable]) -> Hashable | None:
        """The one of ``candidates`` (what may be evicted now, least recently used first) to
        evict first; None only when there are none."""


@implementer(IEvictionPolicy)
class LRUPolicy:
    """The least recently used candidate first: the owner's own recency order."""

    name = "lru"

    def __init__(self, capacity: float = 0.0) -> None:
        self.capacity = capacity

    def requested(self, key: Hashable) -> None:
        pass

    def admitted(self, key: Hashable, size: float, cost: float) -> None:
        pass

    def removed(self, key: Hashable) -> None:
        pass

    def victim(self, candidates: Sequence[Hashable]) -> Hashable | None:
        return candidates[0] if candidates else None


# Half-lives of the decayed counts the adaptive policy compares, in requests.  Spread
# geometrically so that one fits whatever the budget and the pace of change; 1 is LRU (the
# last request outweighs all before it), inf plain frequency since the model was first seen.
HALF_LIVES = (1.0, 25.0, 100.0, 400.0, 1600.0, math.inf)
# Memory of the shadows' miss counts (requests): long enough for a steady verdict, short
# enough to follow a change of the workload within a few thousand requests.
MISS_HALF_LIFE = 1000.0
# A shadow takes over only once it misses this much less than the one in use: no flapping
# between two that are as good (every switch costs misses while the cache converges).
SWITCH_MARGIN = 0.03
_MISS_RESCALE = 2.0 ** 512  # the miss counts' unit stays below it (see requested)
# Reload costs per unit of budget within this factor of the typical one count as typical.
COST_DEAD_ZONE = 4.0
_LOG_DEAD_ZONE = math.log(COST_DEAD_ZONE)


class _Shadow:
    """A key-only simulation of the cache as one half-life would run it."""

    def __init__(self, half_life: float) -> None:
        self.rate = 0.0 if math.isinf(half_life) else math.log(2) / half_life
        self.score: dict[Hashable, float] = {}    # log of the decayed count, at time 0 (see requested)
        self.resident: dict[Hashable, float] = {}  # key -> its size in the shadow
        self.used = 0.0
        self.heap: list[tuple[float, int, Hashable]] = []  # (value, tie, key), stale ones skipped
        self.misses = 0.0  # decayed, in AdaptivePolicy._miss_unit's scale (see requested)


class _Known:
    """Last known values per key (sizes, costs) and their running mean: what an unknown key
    counts as, so that a model never loaded before is neither favoured nor penalised."""

    def __init__(self) -> None:
        self.values: dict[Hashable, float] = {}
        self.total = 0.0

    def set(self, key: Hashable, value: float) -> None:
        if value > 0:
            self.total += value - self.values.get(key, 0.0)
            self.values[key] = value

    def pop(self, key: Hashable) -> None:
        self.total -= self.values.pop(key, 0.0)

    def get(self, key: Hashable) -> float:
        v = self.values.get(key)
        return self.mean() if v is None else v

    def mean(self) -> float:
        return self.total / len(self.values) if self.values else 1.0


@implementer(IEvictionPolicy)
class AdaptivePolicy:
    """Decayed frequency x reload cost per unit of budget, with the half-life that the shadow
    simulations find best for the recent requests (see the module's doc)."""

    name = "adaptive"

    def __init__(self, capacity: float, half_lives: Sequence[float] = HALF_LIVES,
                 history: int = 0) -> None:
        """``capacity``: the budget the shadows simulate, in the units of ``admitted``'s size
        (slots or bytes).  ``history``: keys remembered at most (0: 20 x what the cache
        holds, at least 2,000)."""
        self.capacity = capacity
        self.shadows = [_Shadow(h) for h in half_lives]
        self.current = len(self.shadows) - 1  # start as plain frequency
        self.history = history
        self.now = 0
        self.size = _Known()   # last known size of a key
        self.cost = _Known()   # last known reload cost of a key (seconds)
        self.cached: set[Hashable] = set()      # what the real cache holds
        self._weights: dict[Hashable, float] = {}  # log(cost / size) as last admitted
        self._typical = 0.0  # log(mean cost / mean size)
        self._tie = itertools.count()
        self._miss_growth = 2.0 ** (1.0 / MISS_HALF_LIFE)
        self._miss_unit = 1.0
        self.switches = 0

    # -- what a model is worth -----------------------------------------------------------------
    def _weight(self, key: Hashable) -> float:
        """log(reload cost per unit of budget) against the typical one: 0 within a factor
        COST_DEAD_ZONE of it (measured load times are noisy: equal models must stay equal)."""
        raw = self._weights.get(key)
        if raw is None:
            return 0.0
        d = raw - self._typical
        return 0.0 if abs(d) < _LOG_DEAD_ZONE else d

    def _value(self, shadow: _Shadow, key: Hashable) -> float:
        return shadow.score.get(key, -math.inf) + self._weight(key)

    # -- IEvictionPolicy -----------------------------------------------------------------------
    def requested(self, key: Hashable) -> None:
        # runs for every request (twice: TF Serving's slots and the disk), so a hit in a
        # shadow files nothing: a key's value only grows with its requests, so its entry in
        # the heap comes out early and _shrink files it again at its current value
        self.now = now = self.now + 1
        # the miss counts decay alike in every shadow and only their order is read, so rather
        # than decaying each one on every request, a miss adds 2^(now / MISS_HALF_LIFE)
        unit = self._miss_unit = self._miss_unit * self._miss_growth
        if unit > _MISS_RESCALE:
            self._rescale_misses()
            unit = self._miss_unit
        missed = False
        size = weight = 0.0
        log1p, exp = math.log1p, math.exp
        for shadow in self.shadows:
            # count the request at time ``now``: score = log(sum over requests of e^(rate * t)),
            # so that the order of two keys never changes between their requests
            x = shadow.rate * now
            score = shadow.score
            old = score.get(key)
            if old is None:
                value = x
            elif old > x:
                value = old + log1p(exp(x - old))
            else:
                value = x + log1p(exp(old - x))
            score[key] = value
            if key in shadow.resident:
                continue
            if not missed:
                missed = True
                size, weight = self.size.get(key), self._weight(key)
            shadow.misses += unit
            shadow.resident[key] = size
            shadow.used += size
            self._shrink(shadow, key)
            heapq.heappush(shadow.heap, (value + weight, next(self._tie), key))
            if len(shadow.heap) > 4 * len(shadow.resident) + 64:
                shadow.heap = [(self._value(shadow, k), next(self._tie), k) for k in shadow.resident]
                heapq.heapify(shadow.heap)
        # which shadow missed least changes only with a miss
        if missed:
            best = min(range(len(self.shadows)), key=lambda i: self.shadows[i].misses)
            if best != self.current and (self.shadows[best].misses
                                         < (1 - SWITCH_MARGIN) * self.shadows[self.current].misses):
                self.current = best
                self.switches += 1
        if len(self.shadows[0].score) > 2 * self._history_limit():
            self._forget()

    def _history_limit(self) -> int:
        """Keys remembered at most once the history is trimmed (``history``, or 20 x what the
        cache holds, at least 2,000); it is trimmed when it holds twice as many."""
        return self.history or max(2000, 20 * len(self.cached))

    def _rescale_misses(self) -> None:
        """Scale the miss counts and their unit down alike (by a power of two: exact)."""
        for shadow in self.shadows:
            shadow.misses /= _MISS_RESCALE
        self._miss_unit /= _MISS_RESCALE

    def _shrink(self, shadow: _Shadow, keep: Hashable) -> None:
        """Evict from a shadow until it fits its budget, never the key just requested (a
        demand cache must load it)."""
        kept: list[tuple[float, int, Hashable]] = []
        while shadow.used > self.capacity and shadow.heap:
            value, tie, key = heapq.heappop(shadow.heap)
            if key not in shadow.resident:
                continue  # stale: evicted since
            current = self._value(shadow, key)
            if value != current:  # stale: requested since, or its weight changed
                heapq.heappush(shadow.heap, (current, tie, key))
                continue
            if key == keep:
                kept.append((value, tie, key))
                continue
            shadow.used -= shadow.resident.pop(key)
        for item in kept:
            heapq.heappush(shadow.heap, item)

    def _forget(self) -> None:
        """Bound the ghost history: drop the least valuable keys that no cache holds (once
        it holds twice the limit)."""
        limit = self._history_limit()
        shadow = self.shadows[self.current]
        holding = set(self.cached).union(*(s.resident for s in self.shadows))
        ghosts = sorted((k for k in shadow.score if k not in holding), key=lambda k: self._value(shadow, k))
        for key in ghosts[: max(0, len(shadow.score) - limit)]:
            for s in self.shadows:
                s.score.pop(key, None)
            self.size.pop(key)
            self.cost.pop(key)
            self._weights.pop(key, None)

    def admitted(self, key: Hashable, size: float, cost: float) -> None:
        self.cached.add(key)
        self.size.set(key, size)
        self.cost.set(key, cost)
        self._weights[key] = math.log(max(self.cost.get(key), 1e-9) / max(self.size.get(key), 1e-12))
        self._typical = math.log(max(self.cost.mean(), 1e-9) / max(self.size.mean(), 1e-12))

    def removed(self, key: Hashable) -> None:
        self.cached.discard(key)

    def victim(self, candidates: Sequence[Hashable]) -> Hashable | None:
        if not candidates:
            return None
        shadow = self.shadows[self.current]
        # min() keeps the first of equals: among equally valuable ones, the least recently used
        return min(candidates, key=lambda k: self._value(shadow, k))


def make_policy(name: str, capacity: float) -> IEvictionPolicy:
    """The policy called ``name`` (see POLICIES) for a budget of ``capacity`` (slots or bytes)."""
    if name == "lru":
        return LRUPolicy(capacity)
    if name == "adaptive":
        return AdaptivePolicy(capacity)
    raise ValueError(f"unknown eviction policy {name!r} (one of {', '.join(POLICIES)})")
