"""tfscache.util.timers on a Clock: timers that share a reactor call per slot."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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


class _Request:
    """Stands for what a timer's function holds: a request's Deferred and all behind it."""

    def cancel(self) -> None:
        pass


@contextmanager
def _no_garbage_collector() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class TimerReferenceTests(unittest.TestCase):
    """A timer lets go of its function once it has ended: a request is freed when it is done,
    by reference counting, not left in a timer-slot cycle for the garbage collector."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.timers = Timers(self.clock, resolution=0.1)

    def _timed(self) -> tuple[weakref.ref[_Request], Callable[[], None]]:
        request = _Request()
        timer = self.timers.call_later(1.0, request.cancel)
        return weakref.ref(request), timer.cancel

    def test_a_cancelled_timer_frees_its_request(self) -> None:
        with _no_garbage_collector():
            other = self.timers.call_later(1.0, lambda: None)  # keeps the slot alive
            gone, cancel = self._timed()
            cancel()
            self.assertIsNone(gone())
            other.cancel()

    def test_the_last_cancel_of_a_slot_frees_its_requests(self) -> None:
        with _no_garbage_collector():
            gone, cancel = self._timed()
            cancel()
            self.assertEqual(self.clock.getDelayedCalls(), [])
            self.assertIsNone(gone())

    def test_a_fired_timer_frees_its_request(self) -> None:
        with _no_garbage_collector():
            gone, _cancel = self._timed()
            self.clock.advance(1.1)
            self.assertIsNone(gone())
