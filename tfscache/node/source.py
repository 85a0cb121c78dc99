"""SourceMonitor: is the model source readable?

Checked at start and every ``interval`` seconds after (``IModelProvider.check``: the disk
base_path is a directory, the bucket or container answers a listing).  A source that cannot be
read gives one log line when that starts and one when it ends, never a line per request;
meanwhile /readyz is not ready and says why, and a request for a model the node cannot find
gets UNAVAILABLE with that reason instead of TF Serving's "Servable not found" (the source may
well hold it).  Models already in the disk cache keep being served.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from tfscache.interfaces import IModelProvider


class SourceMonitor(service.Service):
    log = Logger()

    def __init__(self, provider: IModelProvider, interval: float, clock: IReactorTime, kind: str = "") -> None:
        self.provider, self.interval, self.clock, self.kind = provider, interval, clock, kind
        self.problem: str | None = None  # why the source cannot be read; None while it can
        self.checked = False             # a first check has ended
        self._listeners: list[Callable[[str | None], None]] = []
        self._first: list[defer.Deferred[None]] = []
        self._loop: task.LoopingCall | None = None
        self._checking = False

    def subscribe(self, listener: Callable[[str | None], None]) -> None:
        """``listener(problem)`` on every change (None: readable again)."""
        self._listeners.append(listener)

    def first_check(self) -> defer.Deferred[None]:
        """Fires once the first check has ended, whatever it found."""
        if self.checked:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred(lambda d: self._first.remove(d))
        self._first.append(d)
        return d

    def startService(self) -> None:
        service.Service.startService(self)
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def stopService(self) -> None:
        service.Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def check(self) -> defer.Deferred[None] | None:
        if self._checking:  # a slow source: the check before this one still runs
            return None
        self._checking = True
        d = defer.maybeDeferred(self.provider.check)

        def ok(_: object) -> None:
            self._set(None)

        def failed(f: object) -> None:
            message = getattr(getattr(f, "value", None), "message", None) or f.getErrorMessage()  # type: ignore[attr-defined]
            self._set(str(message))

        def done(_: object) -> None:
            self._checking = False
            waiting, self._first = self._first, []
            for waiter in waiting:
                waiter.callback(None)

        return d.addCallbacks(ok, failed).addBoth(done)

    def _set(self, problem: str | None) -> None:
        first, was_bad = not self.checked, self.problem is not None
        self.checked = True
        changed = problem != self.problem
        self.problem = problem
        if problem is not None and (first or not was_bad):
            self.log.error("model source ({kind}) cannot be read: {why}; not ready, and requests for models "
                           "not in the disk cache get UNAVAILABLE, until it can (checked every {interval:g}s)",
                           kind=self.kind, why=problem, interval=self.interval)
        elif problem is None and was_bad:
            self.log.info("model source ({kind}) is readable again", kind=self.kind)
        if changed:
            for listener in self._listeners:
                listener(problem)
