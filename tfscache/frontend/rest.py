"""The client-facing REST API: TF Serving's paths, answered through the request handler.

``RestFrontend`` is the app behind the REST port's HTTP server (``transport.http_server``):
the fixed paths (metrics, health) by exact match, ``/admin`` to the admin API, and everything
else to TF Serving's own case-insensitive expressions (``tfscache.modelspec``).  A model call
reads the method, the path and two headers (the forwarded marker, which must verify, and
Content-Encoding); the body's chunks go on to TF Serving as they came.  Every error is TF Serving's
``{"error": ...}`` with its HTTP code.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from tfscache.access_log import AccessLog
from tfscache.cluster.forward_auth import ForwardMarker, process_marker, unverified_marker
from tfscache.errors import Code, ServingError, invalid
from tfscache.frontend.errors import as_serving_error, error_markers, rest_error_body
from tfscache.interfaces import IRequestHandler
from tfscache.metrics import Metrics
from tfscache.modelspec import parse_rest_path
from tfscache.transport.http_server import HttpLimits, HttpServerFactory
from tfscache.util.inflight import InFlight
from tfscache.wire import FORWARDED_HEADER, HttpReply, HttpRequest, header_value

if TYPE_CHECKING:
    from tfscache.frontend.admin import AdminApi

JSON = b"application/json"
JSON_HEADERS = [(b"Content-Type", JSON)]

Route = Callable[[HttpRequest], "defer.Deferred[HttpReply] | HttpReply"]


def error_reply(err: ServingError) -> HttpReply:
    """TF Serving's error reply, with the markers for another node's router (node-unavailable
    on UNAVAILABLE, no-room on a capacity RESOURCE_EXHAUSTED)."""
    headers = list(JSON_HEADERS)
    for key, value in error_markers(err):
        headers.append((key.encode(), value.encode()))
    return HttpReply(err.http_status, rest_error_body(err), headers)


def json_reply(body: bytes, code: int = 200) -> HttpReply:
    return HttpReply(code, body, list(JSON_HEADERS))


class RestFrontend:
    """IHttpApp of the REST port."""

    def __init__(
        self,
        handler: IRequestHandler,
        metrics: Metrics,
        max_request_bytes: int = 64 * 1024 * 1024,
        extra_routes: dict[str, Route] | None = None,
        local: IRequestHandler | None = None,
        admin: AdminApi | None = None,
        forward_marker: ForwardMarker | None = None,
    ) -> None:
        self.handler = handler
        # a request another node's router forwarded here (its marker verifies) is served here,
        # never routed again; a client's marker does not verify and is routed as usual
        self.local = local or handler
        self.forward_marker = forward_marker or process_marker()
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes
        self.extra_routes = extra_routes or {}
        self.admin = admin
        self.inflight = InFlight()
        self.draining = False
        self.access_log: AccessLog | None = None  # logging.access_log

    def factory(self, clock: IReactorTime, limits: HttpLimits | None = None) -> HttpServerFactory:
        """The REST port's protocol factory."""
        limits = limits or HttpLimits()
        limits.max_body = self.max_request_bytes
        return HttpServerFactory(self, limits, clock)

    # -- IHttpApp --------------------------------------------------------------------------
    def error_reply(self, error: ServingError) -> HttpReply:
        return error_reply(error)

    def handle(self, request: HttpRequest, error: ServingError | None) -> defer.Deferred[HttpReply] | HttpReply:
        path = request.path.split(b"?", 1)[0].decode("latin-1")
        extra = self.extra_routes.get(path)
        if extra is not None:
            return error_reply(error) if error is not None else extra(request)
        if path == "/admin" or path.startswith("/admin/"):
            if self.admin is None:
                return error_reply(ServingError(Code.NOT_FOUND, "The admin API is disabled"))
            if error is not None:
                return error_reply(error)
            return self.admin.handle(request, path)
        if self.access_log is not None:
            return self.access_log.rest(request, path, lambda: self._model_call(request, path, error))
        return self._model_call(request, path, error)

    # -- the model API ---------------------------------------------------------------------
    def _model_call(self, request: HttpRequest, path: str, error: ServingError | None
                    ) -> defer.Deferred[HttpReply] | HttpReply:
        started = time.perf_counter()
        self.inflight.enter()
        api = "unknown"
        try:
            if self.draining:
                raise ServingError(Code.UNAVAILABLE, "tfscache is shutting down", node_wide=True)
            call = parse_rest_path(request.method.decode("latin-1"), path)
            api = call.method  # the metrics' vocabulary is gRPC's, for both protocols
            if error is not None:
                raise error
            encoding = header_value(request.headers, b"content-encoding")
            # TF Serving accepts gzip bodies; they pass on as they came, after a bounded check
            # that they are gzip at all (a bomb must not be inflated here)
            if encoding is not None and encoding.lower() == b"gzip" and request.head(2) != b"\x1f\x8b":
                raise invalid("Content-Encoding is gzip but the body is not gzip data")
            marker = header_value(request.headers, FORWARDED_HEADER)
            forwarded = marker is not None and self.forward_marker.verify(marker)
            if marker is not None and not forwarded:
                unverified_marker(call.ref.name, "REST")
            d = (self.local if forwarded else self.handler).rest(call, request)
        except Exception as e:
            return self._failed(Failure(e), api, started)
        return d.addCallbacks(self._finished, self._failed, callbackArgs=(api, started),
                              errbackArgs=(api, started))

    def _failed(self, failure: Failure, api: str, started: float) -> HttpReply:
        err = as_serving_error(failure)
        return self._finished(error_reply(err), api, started, err.code.name)

    def _finished(self, reply: HttpReply, api: str, started: float, name: str | None = None) -> HttpReply:
        self.inflight.exit()
        if name is None:
            name = "OK" if reply.code < 400 else f"HTTP_{reply.code}"
        if header_value(reply.headers, b"content-type") is None:
            reply.headers.append((b"Content-Type", JSON))
        self.metrics.request_done("rest", api, name, time.perf_counter() - started)
        return reply
