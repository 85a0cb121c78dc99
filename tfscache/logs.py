"""Log level and format of the daemon, changeable at run time (SIGHUP).

twistd starts logging to its own observer before the service runs; tfscache wraps what is
there in a level filter and, for ``format: json``, replaces it with JSON lines on standard
output (what systemd's journal and Kubernetes collect)."""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogPublisher,
)
from zope.interface import implementer

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error}
_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_installed: list[ILogObserver] = []


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


def set_level(level: str) -> None:
    _predicate.setLogLevelForNamespace("", LEVELS[level])  # "": the default level


def install(level: str, fmt: str, stream: IO[str] | None = None, clock: Any = None,
            repeat_interval: float = 0.0) -> None:
    """Filter the global observers by level; with ``json``, write JSON lines instead; with a
    ``clock`` and a ``repeat_interval``, one warning per kind and model per interval
    (util/repeats.py)."""
    set_level(level)
    if _installed:
        return
    # LogPublisher has no public way to list its observers; twistd added exactly one.
    current = list(getattr(globalLogPublisher, "_observers", []))
    for obs in current:
        globalLogPublisher.removeObserver(obs)
    # sys.__stdout__: twistd has replaced sys.stdout by a file that logs what is written to it
    out = stream or sys.__stdout__
    targets = [JsonLinesObserver(out)] if fmt == "json" and out is not None else current
    for obs in targets:
        if clock is not None and repeat_interval > 0:
            from tfscache.util.repeats import RepeatFilter

            obs = RepeatFilter(obs, clock, repeat_interval)
        wrapped = FilteringLogObserver(obs, [_predicate])
        globalLogPublisher.addObserver(wrapped)
        _installed.append(wrapped)
