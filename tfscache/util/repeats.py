"""One log line per kind of warning and model per interval, however many requests repeat it.

While TF Serving is down, every request for a cold model fails the same way (the list it
could not take, the model that could not load): a line each would drown the log.  A warning
(or error) is "the same" as an earlier one when it comes from the same place (namespace and
format, not the formatted text, which varies with the error's details) about the same model
and version.  The first is written; the ones that follow within ``interval`` seconds are
counted, and when the interval ends one more line says how many there were (the last of them,
with ``suppressed`` = K and " (K similar in the last N s)" after its text).  Info and debug
lines pass as they are.  The clock is passed in (``twisted.internet.task.Clock`` in tests)."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import ILogObserver, LogLevel
from zope.interface import implementer

_LIMITED = (LogLevel.warn, LogLevel.error, LogLevel.critical)
_MAX_KEYS = 10_000  # kinds x models remembered at once; beyond it, lines pass unlimited


class _Window:
    __slots__ = ("until", "suppressed", "last", "timer")

    def __init__(self, until: float) -> None:
        self.until = until
        self.suppressed = 0
        self.last: dict[str, Any] | None = None
        self.timer: IDelayedCall | None = None


@implementer(ILogObserver)
class RepeatFilter:
    """Wraps the observer that writes lines."""

    def __init__(self, target: ILogObserver, clock: IReactorTime, interval: float = 30.0) -> None:
        self.target, self.clock, self.interval = target, clock, interval
        self._windows: dict[tuple[Any, ...], _Window] = {}

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_level") not in _LIMITED or self.interval <= 0 or "log_suppressed_of" in event:
            self.target(event)
            return
        key = (event.get("log_namespace"), event.get("log_format"), event.get("model"), event.get("version"))
        now = self.clock.seconds()
        window = self._windows.get(key)
        if window is None or now >= window.until:
            if window is None and len(self._windows) >= _MAX_KEYS:
                self._prune(now)
                if len(self._windows) >= _MAX_KEYS:
                    self.target(event)
                    return
            self._windows[key] = _Window(now + self.interval)
            self.target(event)
            return
        window.suppressed += 1
        window.last = event
        if window.timer is None:
            window.timer = self.clock.callLater(window.until - now, self._flush, key)

    def _flush(self, key: tuple[Any, ...]) -> None:
        window = self._windows.get(key)
        if window is None:
            return
        window.timer = None
        if not window.suppressed or window.last is None:
            return
        last, count = window.last, window.suppressed
        # the summary is a line of its own: the next interval starts with it
        self._windows[key] = _Window(self.clock.seconds() + self.interval)
        summary = dict(last)
        summary["suppressed"] = count
        summary["log_suppressed_of"] = True
        summary["log_format"] = (last.get("log_format") or "") + (
            f" ({count} similar in the last {self.interval:g} s)")
        summary["log_time"] = self.clock.seconds()
        self.target(summary)

    def _prune(self, now: float) -> None:
        for key in [k for k, w in self._windows.items() if w.until <= now and w.timer is None]:
            del self._windows[key]

    def close(self) -> None:
        """Write the pending summaries now (at shutdown)."""
        for key, window in list(self._windows.items()):
            if window.timer is not None and window.timer.active():
                window.timer.cancel()
                self._flush(key)
