"""Rendezvous (highest random weight) hashing of model names onto members.

Each (member, name) pair gets a weight: the first 8 bytes of BLAKE2b of ``member.id + NUL +
name``.  A name's owners are the members sorted by falling weight; the first R are its
replicas.  The weights are the same in every process (no Python ``hash()``), so every router
picks the same owners from the same member list, whatever its order.  When a member joins it
takes over only the names for which it has the highest weight (about 1/(N+1) of them); when
one leaves only its own names move.  All versions of a model share owners (the name is hashed,
not the version).
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable, Sequence

from tfscache.cluster.members import Member


def weight(member_id: str, name: str) -> int:
    """The rendezvous weight of one member for one model name."""
    digest = hashlib.blake2b(f"{member_id}\0{name}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owners(name: str, members: Iterable[Member], replicas: int) -> list[Member]:
    """The first ``replicas`` owners of ``name``, most preferred first (uncached)."""
    ranked = sorted(members, key=lambda m: (weight(m.id, name), m.id), reverse=True)
    return ranked[:max(replicas, 0)]


class Ring:
    """An immutable member list with a bounded cache of owner lists per model name.

    Build a new Ring when the membership changes (``version`` says which list it is); its
    cache then starts empty, so cached answers never outlive the list they were computed from.
    """

    def __init__(self, members: Sequence[Member], replicas: int, version: int = 0,
                 cache_size: int = 65536) -> None:
        by_id: dict[str, Member] = {}
        for m in members:
            by_id[m.id] = m  # one entry per id; the last record of an id wins
        self.members: tuple[Member, ...] = tuple(sorted(by_id.values(), key=lambda m: m.id))
        self.replicas = replicas
        self.version = version
        self.cache_size = cache_size
        self._cache: dict[str, tuple[Member, ...]] = {}
        self._prefixes = [(m, f"{m.id}\0".encode("utf-8", "surrogatepass")) for m in self.members]

    def owners(self, name: str) -> tuple[Member, ...]:
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        encoded = name.encode("utf-8", "surrogatepass")
        blake2b = hashlib.blake2b
        # 8-byte big-endian digests compare as bytes exactly as their integers do
        top = heapq.nlargest(
            self.replicas,
            [(blake2b(prefix + encoded, digest_size=8).digest(), m.id, m) for m, prefix in self._prefixes],
        )
        result = tuple(entry[2] for entry in top)
        if len(self._cache) >= self.cache_size:
            self._cache.clear()  # cheap bound: a cold refill costs one hash per member per name
        self._cache[name] = result
        return result

    def __len__(self) -> int:
        return len(self.members)
