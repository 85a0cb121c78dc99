"""Small Deferred tools that Twisted does not ship."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure


class SharedResult:
    """One operation, many waiters: each ``observe()`` gets its own Deferred with the result.

    Twisted has no multicast Deferred; chaining callbacks on the original would let one waiter
    change (or swallow) what the next one sees, and cancelling one waiter must not cancel the
    shared work (a request that gives up must not abort a load others wait for)."""

    def __init__(self, operation: defer.Deferred[Any]) -> None:
        self._waiters: list[defer.Deferred[Any]] = []
        self._done = False
        self._result: Any = None
        operation.addBoth(self._fire)

    @property
    def done(self) -> bool:
        return self._done

    def observe(self) -> defer.Deferred[Any]:
        if self._done:
            if isinstance(self._result, Failure):
                return defer.fail(self._result)
            return defer.succeed(self._result)
        d: defer.Deferred[Any] = defer.Deferred(lambda d: self._waiters.remove(d))
        self._waiters.append(d)
        return d

    def _fire(self, result: Any) -> None:
        self._done, self._result = True, result
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
        return None  # the shared operation's own failure is handled by its observers


def cancel_when_done(d: defer.Deferred[Any], call: IDelayedCall) -> defer.Deferred[Any]:
    """Cancel the delayed ``call`` (a timer set for ``d``) once ``d`` has a result."""

    def done(result: Any) -> Any:
        if call.active():
            call.cancel()
        return result

    return d.addBoth(done)


def with_timeout(
    d: defer.Deferred[Any], seconds: float | None, clock: IReactorTime,
    on_timeout: Callable[[], Exception],
) -> defer.Deferred[Any]:
    """Fail ``d`` with ``on_timeout()`` after ``seconds`` (cancelling it), like addTimeout but
    with our own error (TF Serving's DEADLINE_EXCEEDED) instead of TimeoutError."""
    if seconds is None:
        return d
    timed_out = []

    def expire() -> None:
        timed_out.append(True)
        d.cancel()

    call = clock.callLater(max(seconds, 0), expire)

    def translate(result: Any) -> Any:
        if timed_out and isinstance(result, Failure) and result.check(defer.CancelledError):
            raise on_timeout()
        return result

    return cancel_when_done(d, call).addBoth(translate)
