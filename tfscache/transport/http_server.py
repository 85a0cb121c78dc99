"""The REST port's HTTP/1.x server: an asyncio protocol around ``httptools`` (llhttp, in C).

It parses only the framing (request line, headers, body length or chunks) and hands each
complete request to an ``IHttpApp``; the app's reply is written with one ``writelines`` (a
large one streamed: its head at once, its body as it arrives, the transport's buffer limits
pausing the server it comes from).  HTTP/1.0 and 1.1, keep-alive, pipelined requests
(answered in order: the transport is paused while one is in progress), ``Expect:
100-continue``, chunked bodies.

Limits, each answered in TF Serving's JSON error format where an answer is possible:
- a body over ``max_body`` is counted as it arrives, not kept, and answered 400 once complete
  (reading on rather than closing lets the client see the answer);
- the bytes of bodies held by all connections together stay under ``max_buffered`` (the
  request over it is answered 429 RESOURCE_EXHAUSTED, its body not kept);
- request line and headers over ``max_head`` bytes or ``max_headers`` lines: 431;
- a connection idle between requests for ``idle_timeout``, a request whose head has not
  arrived ``header_timeout`` after its first byte, a body with no byte for ``body_timeout``:
  closed (one sweep a second checks every connection: no timer per request);
- past ``max_connections`` open connections the one idle the longest is closed to make room
  (its client reconnects at the cost of a handshake); with none idle, the new one is closed.

twisted.web is not used here: its Request spools bodies, parses forms and answers some bad
requests in its own formats, and costs several times this per request (bench/data_plane.py).
The transport is the asyncio loop's own (uvloop's, in C, under the daemon), not a Twisted
one: it sends a reply at once instead of waiting for the next writable event, which took a
quarter of a warm request's CPU (py-spy, 2026-12-03).  The app and its Deferreds are Twisted's;
both run on the one loop the asyncio reactor drives.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from typing import Protocol as TypingProtocol

import httptools
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from tfscache.errors import Code, ServingError
from tfscache.wire import BodyStream, HttpReply, HttpRequest


class IHttpApp(TypingProtocol):
    """What the server hands complete requests to."""

    def handle(self, request: HttpRequest, error: ServingError | None) -> defer.Deferred[HttpReply] | HttpReply:
        """The reply to ``request``; ``error`` is set when the server refused its body already
        (too large, over the buffer budget): the app answers it in its own format."""

    def error_reply(self, error: ServingError) -> HttpReply:
        """The reply for a request the server cannot hand over (a malformed head)."""


@dataclass
class HttpLimits:
    max_body: int = 64 * 1024 * 1024
    max_buffered: int = 1024 * 1024 * 1024
    max_head: int = 64 * 1024
    max_line: int = 16 * 1024  # the request line, or one header (Twisted's and nginx's bound)
    max_headers: int = 256
    max_connections: int = 10_000
    idle_timeout: float = 120.0
    header_timeout: float = 30.0
    body_timeout: float = 60.0


_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_REASONS[499] = b"Client Closed Request"


def status_line(version: bytes, code: int) -> bytes:
    return b"HTTP/%s %d %s\r\n" % (version, code, _REASONS.get(code, b"Unknown"))


class _DateHeader:
    """The ``Date`` header, formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def line(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._line = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return self._line


_DATE = _DateHeader()


class HttpServerFactory:
    """One listening port's connections, their limits and the buffer budget they share; the
    protocol factory of ``loop.create_server``."""

    def __init__(self, app: IHttpApp, limits: HttpLimits, clock: IReactorTime) -> None:
        self.app, self.limits, self.clock = app, limits, clock
        self.connections: set[HttpServerProtocol] = set()
        self.buffered = 0  # body bytes held by all connections
        self._sweep = task.LoopingCall(self._close_expired)
        self._sweep.clock = clock

    def start(self) -> None:
        if not self._sweep.running:
            self._sweep.start(1.0, now=False)

    def stop(self) -> None:
        if self._sweep.running:
            self._sweep.stop()

    def __call__(self) -> HttpServerProtocol:
        return HttpServerProtocol(self)

    def _close_expired(self) -> None:
        now = self.clock.seconds()
        for conn in [c for c in self.connections if c.deadline < now]:
            conn.expired()

    def oldest_idle(self) -> HttpServerProtocol | None:
        """The connection waiting longest for its next request (a scan: only at the limit)."""
        return min((c for c in self.connections if c.waiting_for_request), key=lambda c: c.deadline, default=None)

    def close_idle(self) -> None:
        """At shutdown: close the connections that wait for a request (the others close
        after their reply)."""
        for conn in list(self.connections):
            conn.closing = True
            if conn.idle:
                conn.transport.close()


class HttpListener:
    """A listening REST port."""

    def __init__(self, server: asyncio.AbstractServer, factory: HttpServerFactory) -> None:
        self.server, self.factory = server, factory
        self.port: int = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    def stop(self) -> None:
        """No new connections; the open ones stay until the factory closes them."""
        self.server.close()
        self.factory.stop()


async def listen(factory: HttpServerFactory, host: str, port: int,
                 tls: ssl.SSLContext | None = None) -> HttpListener:
    """Listen on ``host:port`` (0: a port the kernel picks); raises OSError when it cannot."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, host, port, ssl=tls, backlog=1024, reuse_address=True)
    factory.start()
    return HttpListener(server, factory)


class HttpServerProtocol(asyncio.Protocol):
    log = Logger()
    transport: Any  # an asyncio transport once connected

    def __init__(self, factory: HttpServerFactory) -> None:
        self.factory = factory
        self.limits = factory.limits
        self.parser = httptools.HttpRequestParser(self)
        self.deadline = float("inf")
        self.idle = True            # between requests (no byte of the next one yet)
        self.closing = False        # close after the reply in progress
        self._queue: deque[tuple[HttpRequest, ServingError | None, bool, bytes]] = deque()
        self._busy: defer.Deferred[Any] | None = None
        self._streaming: BodyStream | None = None  # the reply body being written on
        self._paused = False
        self._gone = False
        self._refused = False  # the stream is not HTTP any more: nothing after it is parsed
        self._reset_message()

    @property
    def waiting_for_request(self) -> bool:
        """Idle: nothing of a request in, no reply pending or on its way."""
        return self.idle and not self._queue and self._busy is None and self._streaming is None

    # -- connection ------------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        f = self.factory
        if len(f.connections) >= self.limits.max_connections:
            oldest = f.oldest_idle()
            if oldest is None:
                self.log.warn("REST: {count} connections open (listen.max_connections), none idle: "
                              "closing a new one", count=len(f.connections))
                self._gone = True
                self.transport.abort()
                return
            self.log.warn("REST: {count} connections open (listen.max_connections): closing the one "
                          "idle the longest", count=len(f.connections))
            f.connections.discard(oldest)
            oldest.close_now()
        f.connections.add(self)
        self.deadline = f.clock.seconds() + self.limits.idle_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone = True
        self.factory.connections.discard(self)
        self._release_body()
        for request, _error, _keep, _v in self._queue:
            self.factory.buffered -= request.length
        self._queue.clear()
        if self._busy is not None:
            busy, self._busy = self._busy, None
            busy.cancel()  # the client went away: its wait (not a load others wait for) ends

    def expired(self) -> None:
        self.log.debug("REST: closing a connection that timed out ({what})",
                       what="idle" if self.idle else "slow request")
        self.close_now()

    def close_now(self) -> None:
        """Abort the connection; no deadline of its fires again meanwhile."""
        self.deadline = float("inf")
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._gone or self.closing and self._refused:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(ServingError(Code.INVALID_ARGUMENT, "Malformed request: protocol upgrades are not supported"))
        except httptools.HttpParserError as e:
            self._refuse(ServingError(Code.INVALID_ARGUMENT, f"Malformed request: not HTTP/1.x ({e})"))
        except ServingError as e:  # a limit of ours, raised from a callback
            self._refuse(e)

    def _refuse(self, error: ServingError) -> None:
        """A request whose framing cannot be trusted: answer if nothing is pending, then close
        (the rest of the stream cannot be parsed)."""
        self.closing = self._refused = True
        self.pause()
        if self._busy is not None or self._queue:
            return  # the requests before it are answered first; the connection closes after them
        if not self._gone:
            reply = self.factory.app.error_reply(error)
            self._write(reply, b"1.1", keep_alive=False, head_only=False)
        self.transport.close()

    def pause(self) -> None:
        if not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and not self.closing:
            self._paused = False
            self.transport.resume_reading()

    # -- httptools callbacks ---------------------------------------------------------------
    def _reset_message(self) -> None:
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._parts: list[bytes] = []
        self._length = 0
        self._error: ServingError | None = None
        self._discarding = False

    def on_message_begin(self) -> None:
        self.idle = False
        self.deadline = self.factory.clock.seconds() + self.limits.header_timeout

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_head(len(url), len(self._url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._count_head(len(name) + len(value) + 4, len(name) + len(value))
        if len(self._headers) > self.limits.max_headers:
            raise ServingError(Code.INVALID_ARGUMENT,
                               f"Malformed request: more than {self.limits.max_headers} header lines")

    def _count_head(self, n: int, line: int) -> None:
        self._head_bytes += n
        if line > self.limits.max_line:
            raise ServingError(Code.INVALID_ARGUMENT,
                               f"Malformed request: a request line or header over {self.limits.max_line} bytes")
        if self._head_bytes > self.limits.max_head:
            raise ServingError(Code.INVALID_ARGUMENT,
                               f"Malformed request: request line and headers over {self.limits.max_head} bytes")

    def on_headers_complete(self) -> None:
        if self.parser.get_http_version() not in ("1.0", "1.1"):  # llhttp takes HTTP/0.9's bare line
            raise ServingError(Code.INVALID_ARGUMENT, "Malformed request: HTTP/1.0 or HTTP/1.1 only")
        self.deadline = self.factory.clock.seconds() + self.limits.body_timeout
        for k, v in self._headers:
            if len(k) == 6 and k.lower() == b"expect" and v.lower() == b"100-continue" \
                    and self.parser.get_http_version() == "1.1":
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            elif len(k) == 14 and k.lower() == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    continue  # llhttp refuses it
                if declared > self.limits.max_body:
                    self._discard(self._too_large(declared))

    def on_body(self, body: bytes) -> None:
        n = len(body)
        self._length += n
        if self._discarding:
            return
        f = self.factory
        if self._length > self.limits.max_body:
            self._discard(self._too_large(self._length))
        elif f.buffered + n > self.limits.max_buffered:
            self._discard(ServingError(
                Code.RESOURCE_EXHAUSTED,
                f"tfscache holds {f.buffered} bytes of request bodies (listen.max_buffered_bytes is "
                f"{self.limits.max_buffered}): try again later"))
        else:
            f.buffered += n
            self._parts.append(body)
        self.deadline = f.clock.seconds() + self.limits.body_timeout

    def _too_large(self, size: int) -> ServingError:
        return ServingError(Code.INVALID_ARGUMENT,
                            f"Request body of {size} bytes exceeds the limit of {self.limits.max_body} bytes")

    def _discard(self, error: ServingError) -> None:
        if not self._discarding:
            self._discarding = True
            self._error = error
            self._release_body()

    def _release_body(self) -> None:
        self.factory.buffered -= sum(len(p) for p in self._parts)
        self._parts = []

    def on_message_complete(self) -> None:
        parser = self.parser
        method = parser.get_method()
        request = HttpRequest(method, self._url, self._headers, self._parts)
        if self._error is not None:
            request.length = 0
        version = parser.get_http_version().encode()
        keep_alive = parser.should_keep_alive()
        self._queue.append((request, self._error, keep_alive, version))
        self._reset_message()
        self.deadline = float("inf")  # the reply's time is the app's business
        if self._busy is None:
            self._next()
        else:
            self.pause()  # pipelined: one at a time, in order

    # -- replies ---------------------------------------------------------------------------
    def _next(self) -> None:
        while self._queue and self._busy is None and not self._gone:
            request, error, keep_alive, version = self._queue.popleft()
            try:
                result = self.factory.app.handle(request, error)
            except Exception as e:  # the app answers its errors; this is a last resort
                self.log.failure("REST request handler failed", failure=Failure(e))
                result = self.factory.app.error_reply(ServingError(Code.INTERNAL, "Internal error in tfscache"))
            if isinstance(result, defer.Deferred):
                self._busy = result
                result.addCallbacks(self._replied, self._failed,
                                    callbackArgs=(request, keep_alive, version),
                                    errbackArgs=(request, keep_alive, version))
            else:
                self._done(result, request, keep_alive, version)

    def _replied(self, reply: HttpReply, request: HttpRequest, keep_alive: bool, version: bytes) -> None:
        if self._busy is None:
            return  # the connection is gone
        self._busy = None
        self._done(reply, request, keep_alive, version)
        self._next()

    def _failed(self, failure: Failure, request: HttpRequest, keep_alive: bool, version: bytes) -> None:
        if self._busy is None:
            return
        self._busy = None
        self.log.failure("REST request handler failed", failure=failure)
        reply = self.factory.app.error_reply(ServingError(Code.INTERNAL, "Internal error in tfscache"))
        self._done(reply, request, keep_alive, version)
        self._next()

    def _done(self, reply: HttpReply, request: HttpRequest, keep_alive: bool, version: bytes) -> None:
        self.factory.buffered -= request.length
        stream = reply.stream
        if self._gone:
            if stream is not None:
                stream.done.cancel()
            return
        keep_alive = keep_alive and not self.closing
        head_only = request.method == b"HEAD"
        self._write(reply, version, keep_alive, head_only)
        if stream is not None:
            if head_only:
                stream.done.cancel()  # nobody wants the body
            else:
                self._stream_on(stream, keep_alive)
                return
        self._reply_sent(keep_alive)

    def _stream_on(self, stream: BodyStream, keep_alive: bool) -> None:
        """The head is written: the body follows as it arrives, the next request after it."""
        self._streaming = stream
        self._busy = stream.done
        write = self.transport.write
        for chunk in stream.attach(write):
            write(chunk)
        stream.done.addCallbacks(self._streamed, self._stream_broke, callbackArgs=(keep_alive,))

    def _streamed(self, _: object, keep_alive: bool) -> None:
        self._streaming = None
        if self._busy is None:
            return  # the connection is gone
        self._busy = None
        self._reply_sent(keep_alive)
        self._next()

    def _stream_broke(self, failure: Failure) -> None:
        self._streaming = None
        if self._busy is None:
            return  # the connection is gone (its loss cancelled the stream)
        self._busy = None
        # the head promised a length the body will not reach: only closing says so
        self.log.warn("REST: a streamed reply broke off: {error}", error=failure.getErrorMessage())
        self.closing = True
        self.transport.abort()

    def pause_writing(self) -> None:
        if self._streaming is not None:
            self._streaming.pause()

    def resume_writing(self) -> None:
        if self._streaming is not None:
            self._streaming.resume()

    def _reply_sent(self, keep_alive: bool) -> None:
        if not keep_alive:
            self.closing = True
            self.transport.close()
            return
        if not self._queue:
            self.idle = True
            self.deadline = self.factory.clock.seconds() + self.limits.idle_timeout
            self.resume()

    def _write(self, reply: HttpReply, version: bytes, keep_alive: bool, head_only: bool) -> None:
        length = reply.stream.length if reply.stream is not None else sum(len(p) for p in reply.parts)
        head = [status_line(version if version in (b"1.0", b"1.1") else b"1.1", reply.code), _DATE.line()]
        for k, v in reply.headers:
            head.append(b"%s: %s\r\n" % (k, v))
        head.append(b"Content-Length: %d\r\n" % length)
        if not keep_alive:
            head.append(b"Connection: close\r\n\r\n")
        elif version == b"1.0":
            head.append(b"Connection: keep-alive\r\n\r\n")
        else:
            head.append(b"\r\n")
        if head_only:
            self.transport.write(b"".join(head))
        else:
            head_bytes = b"".join(head)
            if length < 65536:
                self.transport.write(head_bytes + b"".join(reply.parts))
            else:
                self.transport.writelines([head_bytes, *reply.parts])

