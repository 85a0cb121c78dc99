"""tfscache.util.timers on a Clock: timers that share a reactor call per slot."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial import unittest

from tfscache.util.timers import Timers


class TimerTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.timers = Timers(self.clock, resolution=0.1)
        self.fired: list[str] = []

    def test_fires_at_most_a_slot_late(self) -> None:
        t = self.timers.call_later(1.0, lambda: self.fired.append("a"))
        self.clock.advance(0.99)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.fired, ["a"])
        self.assertFalse(t.active())

    def test_cancelled_timers_do_not_fire_and_leave_no_call(self) -> None:
        a = self.timers.call_later(1.01, lambda: self.fired.append("a"))
        b = self.timers.call_later(1.05, lambda: self.fired.append("b"))  # the same slot
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        a.cancel()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        b.cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [])  # the slot's call is gone with its last timer
        self.clock.advance(2)
        self.assertEqual(self.fired, [])

    def test_one_slot_cancelled_the_other_fires(self) -> None:
        self.timers.call_later(1.0, lambda: self.fired.append("a")).cancel()
        self.timers.call_later(2.0, lambda: self.fired.append("b"))
        self.timers.call_later(1.0, lambda: self.fired.append("c"))
        self.clock.advance(1.1)
        self.assertEqual(self.fired, ["c"])
        self.clock.advance(1)
        self.assertEqual(self.fired, ["c", "b"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
