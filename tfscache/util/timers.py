"""Timeouts for the request path: almost every one is cancelled before it fires.

A Twisted ``callLater`` and its ``cancel`` cost about 6 µs here (a DelayedCall in the
reactor's heap, the loop's timer rescheduled), twice per warm request (the route's deadline,
the forward's).  These timers share one reactor call per slot of ``resolution`` seconds: adding
one is a list append, cancelling it a flag (the slot's call is cancelled once it has none left),
and it fires at most ``resolution`` late.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Timer:
    __slots__ = ("_fn", "_slot")

    def __init__(self, fn: Callable[[], Any], slot: _Slot) -> None:
        # both let go once the timer has fired or been cancelled: a timer and its slot refer
        # to each other, and ``fn`` (a Deferred's cancel, say) holds a whole request, which is
        # then freed when it ends, not left for the garbage collector (measured on a warm gRPC
        # call: the objects it collects per call 9.5 -> 5, the rest grpc.aio's own)
        self._fn: Callable[[], Any] | None = fn
        self._slot: _Slot | None = slot

    def active(self) -> bool:
        return self._fn is not None

    def cancel(self) -> None:
        slot = self._slot
        if slot is not None:  # pending (its function and slot go together)
            self._fn = self._slot = None
            slot.cancelled_one()


class _Slot:
    __slots__ = ("timers", "live", "call", "owner", "key")

    def __init__(self, owner: Timers, key: int) -> None:
        self.timers: list[Timer] = []
        self.live = 0
        self.call: IDelayedCall | None = None
        self.owner, self.key = owner, key

    def cancelled_one(self) -> None:
        self.live -= 1
        if self.live == 0:
            if self.call is not None and self.call.active():
                self.call.cancel()
            self.timers.clear()
            self.owner._slots.pop(self.key, None)

    def fire(self) -> None:
        self.owner._slots.pop(self.key, None)
        timers, self.timers = self.timers, []
        for timer in timers:
            fn = timer._fn
            if fn is not None:
                timer._fn = timer._slot = None
                fn()


class Timers:
    def __init__(self, clock: IReactorTime, resolution: float = 0.05) -> None:
        self.clock, self.resolution = clock, resolution
        self._slots: dict[int, _Slot] = {}

    def call_later(self, seconds: float, fn: Callable[[], Any]) -> Timer:
        """Call ``fn`` in ``seconds`` (up to ``resolution`` later), unless cancelled first."""
        key = math.ceil((self.clock.seconds() + seconds) / self.resolution)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot(self, key)
            slot.call = self.clock.callLater(max(0.0, key * self.resolution - self.clock.seconds()), slot.fire)
        timer = Timer(fn, slot)
        slot.timers.append(timer)
        slot.live += 1
        return timer
