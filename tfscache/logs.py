"""The daemon's log: level and format (``logging``), the level changeable at run time (SIGHUP).

Under twistd the observer is handed over the way twistd supports: as the application's
``ILogObserver`` component (``twisted.application.app.AppLogger.start`` logs to it from the
first line on, twistd's own start-up lines included, so that with ``format: json`` every line
is JSON).  ``NodeService.setServiceParent`` sets it when twistd makes the node a child of its
application.  Where the lines go follows twistd's options as its own observer would: standard
output with ``-n`` (what systemd's journal and Kubernetes collect), else ``--logfile`` (default
``twistd.log``).  With ``--syslog`` or ``--logger`` twistd's choice is kept (and the level is
not filtered).

The optional access log (``logging.access_log``) is one line per request, namespace
``tfscache.access``: method, model, version, code and duration.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile
from zope.interface import implementer

from tfscache.util.repeats import RepeatFilter

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error}


@implementer(ILogObserver)
class JsonLinesObserver:
    """One compact JSON object per event: time, level, namespace, message, and the event's
    own scalar fields (model, version, bytes, seconds...), so lines can be queried by model.
    (Twisted's jsonFileLogObserver serialises every internal field of an event.)"""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: dict[str, Any]) -> None:
        record: dict[str, Any] = {
            "time": round(event.get("log_time", 0.0), 6),
            "level": getattr(event.get("log_level"), "name", "info"),
            "namespace": event.get("log_namespace", "-"),
            "message": formatEvent(event),
        }
        for k, v in event.items():
            if not k.startswith("log_") and k not in record and isinstance(v, str | int | float | bool):
                record[k] = v
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        self.out.write(json.dumps(record, default=str) + "\n")
        self.out.flush()


def log_stream(twistd_options: Any = None) -> IO[str] | None:
    """Where twistd's own observer would write, from its ServerOptions: standard output with
    ``-n`` and no ``--logfile`` (or ``--logfile -``), else the log file (``twistd.log`` by
    default); None when ``--syslog`` or ``--logger`` chose another observer."""
    if twistd_options is None:
        return sys.stdout
    get = getattr(twistd_options, "get", lambda _key, default=None: default)
    if get("syslog") or get("logger"):
        return None
    logfile = get("logfile")
    if logfile == "-" or (get("nodaemon") and not logfile):
        return sys.stdout
    # a LogFile is a file-like object with write() and flush(), not a TextIO
    stream: IO[str] = LogFile.fromFullPath(logfile or "twistd.log")
    return stream


class DaemonLog:
    """The daemon's log observer: a level filter, changeable at run time, in front of text or
    JSON lines on ``out``."""

    def __init__(self, level: str, fmt: str, out: IO[str], clock: IReactorTime | None = None,
                 repeat_interval: float = 0.0) -> None:
        self.predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
        inner: ILogObserver = JsonLinesObserver(out) if fmt == "json" else textFileLogObserver(out)
        self.repeats: RepeatFilter | None = None
        if clock is not None and repeat_interval > 0:
            # one warning per kind and model per interval, then a count (util/repeats.py)
            inner = self.repeats = RepeatFilter(inner, clock, repeat_interval)
        self.observer: ILogObserver = FilteringLogObserver(inner, [self.predicate])

    def close(self) -> None:
        """At shutdown: the counts of warnings held back are written now, not lost."""
        if self.repeats is not None:
            self.repeats.close()

    def set_level(self, level: str) -> None:
        self.predicate.setLogLevelForNamespace("", LEVELS[level])  # "": the default level
