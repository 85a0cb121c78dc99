"""Forwarding REST requests: HTTP/1.1 over pooled keep-alive connections, parsed by httptools.

A request goes out as its head and its body chunks in one ``writelines``; the reply comes
back as its code, headers and body chunks (chunked replies de-chunked), never joined here.
Connections are kept per (scheme, host, port), at most ``max_idle_per_host`` idle ones.  A
request sent on a reused connection that the server closed meanwhile (it saw no byte of a
reply) is sent once more on a new connection: TF Serving's model API has no side effects.

Errors: ``ConnectFailed`` when no connection could be made (refused, not accepted within
``connect_timeout``), ``ExchangeFailed`` when the connection broke after the request was sent
or the reply is not HTTP; cancelling the Deferred closes the connection.

twisted.web's Agent does this too, and cost several times as much per request (an object
graph per request and per reply; bench/README.md, "Profiling the warm path").  Connections are
the asyncio loop's own transports, as in ``http_server``.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections import deque
from typing import Any

import httptools
from twisted.internet import defer
from twisted.python.failure import Failure

from tfscache.transport.grpc_client import as_deferred
from tfscache.wire import BodyStream, Header, HttpReply, header_value


class ConnectFailed(Exception):
    """No connection to the server: it refused, or did not accept in time."""


class ExchangeFailed(Exception):
    """The connection broke, or the reply was not HTTP, after the request was sent."""


class _Stale(ExchangeFailed):
    """A reused connection closed before any byte of the reply: send again."""


Key = tuple[bytes, str, int]
# A reply whose Content-Length is at least this is streamed (HttpReply.stream): handed on once
# its head is in, its body written on as it arrives.  Smaller ones come whole (one write on).
STREAM_AT = 256 * 1024


class HttpClientPool:
    def __init__(self, connect_timeout: float = 30.0, max_idle_per_host: int = 64,
                 tls: ssl.SSLContext | None = None) -> None:
        self.connect_timeout = connect_timeout
        self.max_idle_per_host, self.tls = max_idle_per_host, tls
        self._idle: dict[Key, deque[_ClientConnection]] = {}
        self._open: set[_ClientConnection] = set()

    def request(self, scheme: bytes, host: str, port: int, method: bytes, target: bytes,
                headers: list[Header], parts: list[bytes], length: int | None = None) -> defer.Deferred[HttpReply]:
        """Send one request; ``headers`` without Host, Content-Length or hop-by-hop ones;
        ``length``: the body's, when the caller knows it."""
        key = (scheme, host, port)
        if length is None:
            length = sum(len(p) for p in parts)
        head = _request_head(method, target, host, port, headers, length)
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.connected:
                d = conn.send(head, parts)
                d.addErrback(self._again_if_stale, key, head, parts)
                return d
        return self._fresh(key, head, parts)

    def _again_if_stale(self, failure: Failure, key: Key, head: bytes, parts: list[bytes]) -> Any:
        if failure.check(_Stale):
            return self._fresh(key, head, parts)
        return failure

    def _fresh(self, key: Key, head: bytes, parts: list[bytes]) -> defer.Deferred[HttpReply]:
        connecting = as_deferred(self._connect(key))
        return connecting.addCallback(lambda conn: conn.send(head, parts))

    async def _connect(self, key: Key) -> _ClientConnection:
        scheme, host, port = key
        tls = None
        if scheme == b"https":
            if self.tls is None:
                raise ValueError("https forward without a TLS context")
            tls = self.tls
        loop = asyncio.get_running_loop()
        try:
            _transport, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _ClientConnection(self, key), host, port, ssl=tls,
                                       server_hostname=host if tls else None),
                self.connect_timeout)
        except (TimeoutError, OSError) as e:
            raise ConnectFailed(f"{type(e).__name__}: {e}") from None
        return conn

    def _idle_again(self, conn: _ClientConnection) -> None:
        idle = self._idle.setdefault(conn.key, deque())
        if len(idle) >= self.max_idle_per_host:
            conn.transport.close()
        else:
            idle.append(conn)

    def _lost(self, conn: _ClientConnection) -> None:
        self._open.discard(conn)
        idle = self._idle.get(conn.key)
        if idle is not None and conn in idle:
            idle.remove(conn)

    def close(self) -> defer.Deferred[None]:
        """Close every connection (at shutdown); fires once they are closed."""
        waits = []
        for conn in list(self._open):
            waits.append(conn.closed)
            conn.transport.close()
        self._idle.clear()
        return defer.gatherResults(waits).addCallback(lambda _: None)


@functools.lru_cache(maxsize=1024)
def _host_header(host: str, port: int) -> bytes:
    return b"Host: %s:%d\r\n" % (host.encode("idna"), port)


def _request_head(method: bytes, target: bytes, host: str, port: int, headers: list[Header], length: int) -> bytes:
    lines = [b"%s %s HTTP/1.1\r\n%s" % (method, target, _host_header(host, port))]
    for k, v in headers:
        lines.append(b"%s: %s\r\n" % (k, v))
    if length or method not in (b"GET", b"HEAD", b"DELETE", b"OPTIONS"):
        lines.append(b"Content-Length: %d\r\n" % length)
    lines.append(b"\r\n")
    return b"".join(lines)


class _ClientConnection(asyncio.Protocol):
    transport: Any  # an asyncio transport once connected

    def __init__(self, pool: HttpClientPool, key: Key) -> None:
        self.pool, self.key = pool, key
        self.connected = False
        self.reused = False
        self.closed: defer.Deferred[None] = defer.Deferred()
        self._reply: defer.Deferred[HttpReply] | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._stream: BodyStream | None = None
        self._paused = False  # reading paused: the client a stream goes to reads slower
        self._got_bytes = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.connected = True
        self.pool._open.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connected = False
        self.pool._lost(self)
        reply, self._reply = self._reply, None
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.fail(ExchangeFailed(f"the connection was lost mid-reply: {exc or 'closed by the server'}"))
        if reply is not None and not reply.called:
            if self.reused and not self._got_bytes:
                reply.errback(_Stale("the kept-alive connection was closed"))
            else:
                reply.errback(ExchangeFailed(f"the connection was lost: {exc or 'closed by the server'}"))
        self.closed.callback(None)

    def send(self, head: bytes, parts: list[bytes]) -> defer.Deferred[HttpReply]:
        self._reply = defer.Deferred(self._cancel)
        self._parser = httptools.HttpResponseParser(self)
        self._got_bytes = False
        self._headers: list[Header] = []
        self._parts: list[bytes] = []
        if not parts:
            self.transport.write(head)
        elif len(parts) == 1 and len(parts[0]) < 65536:
            self.transport.write(head + parts[0])
        else:
            self.transport.writelines([head, *parts])
        return self._reply

    def _cancel(self, _d: defer.Deferred[HttpReply]) -> None:
        self._reply = None
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        parser = self._parser
        if parser is None or (self._reply is None and self._stream is None):
            self.transport.abort()  # bytes nobody asked for
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as e:
            reply, self._reply = self._reply, None
            self.transport.abort()
            if reply is not None:
                reply.errback(ExchangeFailed(f"the reply is not HTTP: {e}"))
            # a stream fails in connection_lost

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        length = header_value(self._headers, b"content-length")
        if self._reply is None or length is None or not length.isdigit() or int(length) < STREAM_AT:
            return
        self._stream = BodyStream(int(length), self._pause_reading, self._resume_reading, self.transport.abort)
        assert self._parser is not None
        d, self._reply = self._reply, None
        d.callback(HttpReply(self._parser.get_status_code(), [], self._headers, self._stream))

    def _pause_reading(self) -> None:
        if not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            self.transport.resume_reading()

    def on_body(self, body: bytes) -> None:
        if self._stream is not None:
            self._stream.feed(body)
        else:
            self._parts.append(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        keep_alive = parser.should_keep_alive()
        stream, self._stream = self._stream, None
        reply = None if stream is not None else HttpReply(parser.get_status_code(), self._parts, self._headers)
        d, self._reply, self._parser = self._reply, None, None
        if keep_alive:
            self.reused = True
            self._resume_reading()
            self.pool._idle_again(self)
        else:
            self.transport.close()
        if stream is not None:
            stream.finish()
        elif d is not None and reply is not None:
            d.callback(reply)
