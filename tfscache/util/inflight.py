"""Counting requests in flight, so a graceful stop can wait for them to finish."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from tfscache.util.deferreds import cancel_when_done


class InFlight:
    def __init__(self) -> None:
        self.count = 0
        self._idle: list[defer.Deferred[bool]] = []

    def enter(self) -> None:
        self.count += 1

    def exit(self) -> None:
        self.count -= 1
        if self.count == 0:
            waiters, self._idle = self._idle, []
            for d in waiters:
                d.callback(True)

    def wait_idle(self, timeout: float, clock: IReactorTime) -> defer.Deferred[bool]:
        """Fire True once nothing is in flight, or False after ``timeout`` seconds."""
        if self.count == 0:
            return defer.succeed(True)
        d: defer.Deferred[bool] = defer.Deferred()
        self._idle.append(d)

        def give_up() -> None:
            if not d.called:
                self._idle.remove(d)
                d.callback(False)

        return cancel_when_done(d, clock.callLater(timeout, give_up))
