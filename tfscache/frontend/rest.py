"""The client-facing REST API: TF Serving's paths, answered through the request handler.

The root resource dispatches every request itself: the fixed paths (metrics, health) by exact
match, ``/admin`` to the admin API, and everything else to TF Serving's own case-insensitive
expressions (``tfscache.modelspec``).  No web framework routes the model API: Klein/werkzeug
would answer some requests in their own formats (an HTML 405 for a method outside a route's
list, an HTML 404 for a decoded path with a newline, a plain-text 400 and a logged traceback for
a path that is not UTF-8 once percent-decoded), where TF Serving answers ``{"error": ...}``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from tfscache.errors import NODE_UNAVAILABLE_KEY, Code, ServingError, invalid
from tfscache.frontend.errors import as_serving_error, node_unavailable_marker, rest_error_body
from tfscache.interfaces import IRequestHandler
from tfscache.metrics import Metrics
from tfscache.modelspec import parse_rest_path
from tfscache.node.local import HttpRequest
from tfscache.util.inflight import InFlight

JSON = b"application/json"
FORWARDED_HEADER = b"x-tfscache-forwarded"
# what the admin API's router (werkzeug) cannot route in a percent-decoded path
_UNROUTABLE = re.compile(r"[\x00-\x1f\x7f]")


class _Discarded:
    """The body of a request over the limit: counted as it arrives, not kept (Twisted would
    otherwise spool any body to a temporary file, so one huge upload could fill the disk)."""

    def __init__(self, size: int = 0) -> None:
        self.size = size

    def write(self, data: bytes) -> None:
        self.size += len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def tell(self) -> int:
        return self.size

    def read(self, size: int = -1) -> bytes:
        return b""

    def close(self) -> None:
        pass


class BoundedRequest(Request):
    """A request whose body is kept only up to ``max_body`` bytes: past that (by Content-Length
    at once, or as chunks arrive) the rest is read and dropped, and the frontend answers
    TF Serving's error once the request is complete.  Reading on rather than closing at once
    lets the client see the answer instead of a reset."""

    max_body = 64 * 1024 * 1024
    content: Any

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body:
            self.content = _Discarded()
        else:
            super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        content = self.content
        if not isinstance(content, _Discarded) and content.tell() + len(data) > self.max_body:
            size = content.tell()
            content.close()
            self.content = content = _Discarded(size)
        content.write(data)


def bounded_request(max_body: int) -> type[BoundedRequest]:
    """A request factory for a Site, with this body limit."""
    return type("BoundedRequest", (BoundedRequest,), {"max_body": max_body})


class RestFrontend:
    log = Logger()

    def __init__(
        self,
        handler: IRequestHandler,
        metrics: Metrics,
        max_request_bytes: int = 64 * 1024 * 1024,
        extra_routes: dict[str, Callable[[IRequest], Any]] | None = None,
        local: IRequestHandler | None = None,
        admin: Any = None,
    ) -> None:
        self.handler = handler
        # a request another node's router forwarded here is served here, never routed again
        self.local = local or handler
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes
        self.extra_routes = extra_routes or {}
        self.admin_resource = admin.resource() if admin is not None else None
        self.inflight = InFlight()
        self.draining = False

    def resource(self) -> Any:
        return _Root(self)

    # ---------------------------------------------------------------------------------------
    def any_path(self, request: IRequest) -> Any:
        """Dispatch one request, whatever its method and path: bytes, a Deferred of bytes, or
        the admin API's resource."""
        path = request.path.decode("latin-1")
        extra = self.extra_routes.get(path)
        if extra is not None:
            return extra(request)
        if path == "/admin" or path.startswith("/admin/"):
            if self.admin_resource is None:
                return self._error(request, ServingError(Code.NOT_FOUND, "The admin API is disabled"))
            try:
                decoded = b"/".join(request.postpath).decode("utf-8")
            except UnicodeDecodeError:
                decoded = "\x00"
            if _UNROUTABLE.search(decoded):
                return self._error(request, ServingError(Code.NOT_FOUND, f"No admin API at {path}"))
            return self.admin_resource
        return defer.ensureDeferred(self._model_call(request, path))

    async def _model_call(self, request: IRequest, path: str) -> bytes:
        started = time.monotonic()
        api = "unknown"
        self.metrics.inflight.inc()
        self.inflight.enter()
        try:
            if self.draining:
                raise ServingError(Code.UNAVAILABLE, "tfscache is shutting down", node_wide=True)
            call = parse_rest_path(request.method.decode("latin-1"), path)
            api = call.api
            body = self._body(request)
            raw = HttpRequest(
                method=request.method,
                path=request.uri,
                headers=[(k, v) for k, vs in request.requestHeaders.getAllRawHeaders() for v in vs],
                body=body,
            )
            forwarded = request.requestHeaders.hasHeader(FORWARDED_HEADER)
            reply = await (self.local if forwarded else self.handler).rest(call, raw)
            request.setResponseCode(reply.code)
            for k, v in reply.headers:
                request.responseHeaders.addRawHeader(k, v)
            if not request.responseHeaders.hasHeader(b"content-type"):
                request.responseHeaders.setRawHeaders(b"content-type", [JSON])
            code = "OK" if reply.code < 400 else f"HTTP_{reply.code}"
            return reply.body
        except Exception as e:
            err = as_serving_error(e)
            code = err.code.name
            return self._error(request, err)
        finally:
            self.inflight.exit()
            self.metrics.inflight.dec()
            self.metrics.request_done("rest", api, code, time.monotonic() - started)

    def _body(self, request: IRequest) -> bytes:
        content = request.content
        if content is None:
            return b""
        content.seek(0, 2)
        size = content.tell()
        if size > self.max_request_bytes:
            raise ServingError(
                Code.INVALID_ARGUMENT,
                f"Request body of {size} bytes exceeds the limit of {self.max_request_bytes} bytes",
            )
        content.seek(0)
        body: bytes = content.read()
        encoding = request.getHeader(b"content-encoding")
        if encoding and encoding.lower() == b"gzip":
            # TF Serving accepts gzip bodies; pass them on as they came, after a bounded check
            # that they are gzip at all (a bomb must not be inflated here)
            if body[:2] != b"\x1f\x8b":
                raise invalid("Content-Encoding is gzip but the body is not gzip data")
        return body

    @staticmethod
    def _error(request: IRequest, err: ServingError) -> bytes:
        request.setResponseCode(err.http_status)
        request.responseHeaders.setRawHeaders(b"content-type", [JSON])
        marker = node_unavailable_marker(err)
        if marker is not None:
            request.responseHeaders.setRawHeaders(NODE_UNAVAILABLE_KEY.encode(), [marker.encode()])
        return rest_error_body(err)


class _Root(Resource):
    """The REST port's root resource: every method, every path, through ``any_path``."""

    isLeaf = True

    def __init__(self, frontend: RestFrontend) -> None:
        super().__init__()
        self.frontend = frontend

    def render(self, request: IRequest) -> Any:
        try:
            result = self.frontend.any_path(request)
        except Exception as e:  # the dispatch itself answers errors; this is a last resort
            return self.frontend._error(request, as_serving_error(e))
        if IResource.providedBy(result):
            return result.render(request)
        if not isinstance(result, defer.Deferred):
            return result
        finished: list[bool] = []

        def gone(reason: Any) -> None:
            finished.append(True)
            if isinstance(reason, Failure):  # the client went away before the answer
                result.cancel()

        request.notifyFinish().addBoth(gone)  # type: ignore[attr-defined]  # twisted.web's Request has it

        def write(body: bytes) -> None:
            if not finished:
                # a length, not chunked encoding: the answer goes out in one piece, as TF Serving's
                request.setHeader(b"content-length", b"%d" % len(body))
                request.write(body)
                request.finish()

        def failed(f: Failure) -> None:
            if not finished:
                write(self.frontend._error(request, as_serving_error(f)))

        result.addCallbacks(write, failed)
        return NOT_DONE_YET
