"""The optional access log (``logging.access_log``): one line per model API request, with its
protocol, method, model, version, status code and duration, in namespace ``tfscache.access``.

Off by default: the front ends hold ``None`` then, and a request costs one ``is None`` test."""

from __future__ import annotations

import time
from collections.abc import Callable

from twisted.internet import defer
from twisted.logger import Logger

from tfscache.modelspec import ModelRef, parse_rest_path
from tfscache.wire import HttpReply, HttpRequest


class AccessLog:
    def __init__(self) -> None:
        # an instance's Logger: a class attribute's namespace would be this class's name
        self.log = Logger(namespace="tfscache.access", source=self)

    def line(self, protocol: str, method: str, ref: ModelRef | None, code: str | int, seconds: float) -> None:
        version = ref.version if ref is not None and ref.version is not None else (ref.label if ref else None)
        self.log.info("{protocol} {method} {model} {version} {code} {milliseconds:.1f}ms", protocol=protocol,
                      method=method, model=ref.name if ref is not None else "-",
                      version=version if version is not None else "-", code=code,
                      milliseconds=seconds * 1000.0, seconds=round(seconds, 6))

    def rest(self, request: HttpRequest, path: str,
             call: Callable[[], defer.Deferred[HttpReply] | HttpReply]) -> defer.Deferred[HttpReply] | HttpReply:
        """``call()``'s reply, logged when it is ready."""
        started = time.perf_counter()
        method = request.method.decode("latin-1")
        try:
            ref: ModelRef | None = parse_rest_path(method, path).ref
        except Exception:
            ref = None  # the reply says why

        def done(reply: HttpReply) -> HttpReply:
            self.line("rest", method, ref, reply.code, time.perf_counter() - started)
            return reply

        result = call()
        if isinstance(result, defer.Deferred):
            return result.addCallback(done)
        return done(result)
