"""Rendezvous hashing: balance, minimal movement on join and leave, stable order."""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter

from twisted.trial import unittest

from tests.harness.process import REPO_ROOT
from tfscache.cluster.members import Member
from tfscache.cluster.ring import Ring, owners, weight

NAMES = [f"model-{i}" for i in range(10000)]


def members(n: int, start: int = 0) -> list[Member]:
    return [Member(f"node-{i}", f"10.0.0.{i}", 8501, 8500) for i in range(start, start + n)]


def first_owners(ms: list[Member], names: list[str] = NAMES) -> dict[str, str]:
    ring = Ring(ms, 1)
    return {name: ring.owners(name)[0].id for name in names}


class RingTests(unittest.TestCase):
    def test_balance(self) -> None:
        counts = Counter(first_owners(members(10)).values())
        self.assertEqual(len(counts), 10)
        # 1,000 expected per member; a binomial sd is ~30, allow 15 %
        for member, n in counts.items():
            self.assertTrue(850 <= n <= 1150, f"{member} owns {n} of 10000")

    def test_replicas_are_balanced_too(self) -> None:
        ring = Ring(members(10), 3)
        counts = Counter(m.id for name in NAMES for m in ring.owners(name))
        for member, n in counts.items():
            self.assertTrue(2700 <= n <= 3300, f"{member} is an owner of {n} of 10000 names")

    def test_join_moves_about_one_in_n_plus_one_to_the_new_member_only(self) -> None:
        before_members = members(10)
        before = first_owners(before_members)
        after = first_owners(before_members + members(1, start=10))
        moved = [name for name in NAMES if before[name] != after[name]]
        self.assertTrue(all(after[name] == "node-10" for name in moved))  # only to the new member
        self.assertTrue(10000 / 11 * 0.85 <= len(moved) <= 10000 / 11 * 1.15, len(moved))

    def test_leave_moves_only_the_leavers_models(self) -> None:
        ms = members(10)
        before = first_owners(ms)
        after = first_owners([m for m in ms if m.id != "node-3"])
        moved = {name for name in NAMES if before[name] != after[name]}
        self.assertEqual(moved, {name for name in NAMES if before[name] == "node-3"})

    def test_replica_lists_change_minimally(self) -> None:
        ms = members(8)
        ring_before, ring_after = Ring(ms, 3), Ring([m for m in ms if m.id != "node-5"], 3)
        for name in NAMES[:2000]:
            before = [m.id for m in ring_before.owners(name)]
            after = [m.id for m in ring_after.owners(name)]
            # the survivors keep their relative order; the leaver's place goes to the next one
            self.assertEqual([i for i in before if i != "node-5"], after[:len([i for i in before if i != "node-5"])])

    def test_order_of_the_member_list_does_not_matter(self) -> None:
        ms = members(20)
        shuffled = list(ms)
        random.Random(7).shuffle(shuffled)
        a, b = Ring(ms, 3), Ring(shuffled, 3)
        for name in NAMES[:1000]:
            self.assertEqual(a.owners(name), b.owners(name))
            self.assertEqual(list(a.owners(name)), owners(name, shuffled, 3))

    def test_deterministic_across_processes(self) -> None:
        code = ("from tfscache.cluster.ring import weight; "
                "print(weight('node-1', 'model-1'), weight('n\u00e9', 'm\u00fcdel'))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": "123", "PYTHONPATH": REPO_ROOT}).stdout.split()
        self.assertEqual([int(x) for x in out], [weight("node-1", "model-1"), weight("n\u00e9", "m\u00fcdel")])

    def test_fewer_members_than_replicas(self) -> None:
        ring = Ring(members(2), 3)
        self.assertEqual(len(ring.owners("x")), 2)
        self.assertEqual(Ring([], 2).owners("x"), ())

    def test_duplicate_ids_count_once(self) -> None:
        m = members(3)
        ring = Ring(m + [Member("node-1", "other", 1, 2)], 3)
        self.assertEqual(len(ring), 3)

    def test_cache_is_bounded_and_consistent(self) -> None:
        ring = Ring(members(5), 2, cache_size=100)
        first = {name: ring.owners(name) for name in NAMES[:300]}
        self.assertLessEqual(len(ring._cache), 100)
        for name in NAMES[:300]:
            self.assertEqual(ring.owners(name), first[name])
