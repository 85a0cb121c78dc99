"""Forwarding REST requests: HTTP/1.1 over pooled keep-alive connections, parsed by httptools.

A request goes out as its head and its body chunks in one ``writeSequence``; the reply comes
back as its code, headers and body chunks (chunked replies de-chunked), never joined here.
Connections are kept per (scheme, host, port), at most ``max_idle_per_host`` idle ones.  A
request sent on a reused connection that the server closed meanwhile (it saw no byte of a
reply) is sent once more on a new connection: TF Serving's model API has no side effects.

Errors: ``ConnectFailed`` when no connection could be made (refused, not accepted within
``connect_timeout``), ``ExchangeFailed`` when the connection broke after the request was sent
or the reply is not HTTP; cancelling the Deferred closes the connection.

twisted.web's Agent does this too, and cost several times as much per request (an object
graph per request and per reply; bench/README.md, "Profiling the warm path").
"""

from __future__ import annotations

from collections import deque
from typing import Any

import httptools
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS

from tfscache.wire import Header, HttpReply


class ConnectFailed(Exception):
    """No connection to the server: it refused, or did not accept in time."""


class ExchangeFailed(Exception):
    """The connection broke, or the reply was not HTTP, after the request was sent."""


class _Stale(ExchangeFailed):
    """A reused connection closed before any byte of the reply: send again."""


Key = tuple[bytes, str, int]


class HttpClientPool:
    def __init__(self, reactor: Any, connect_timeout: float = 30.0, max_idle_per_host: int = 64,
                 tls_policy: IPolicyForHTTPS | None = None) -> None:
        self.reactor, self.connect_timeout = reactor, connect_timeout
        self.max_idle_per_host, self.tls_policy = max_idle_per_host, tls_policy
        self._idle: dict[Key, deque[_ClientConnection]] = {}
        self._endpoints: dict[Key, IStreamClientEndpoint] = {}
        self._open: set[_ClientConnection] = set()

    def request(self, scheme: bytes, host: str, port: int, method: bytes, target: bytes,
                headers: list[Header], parts: list[bytes]) -> defer.Deferred[HttpReply]:
        """Send one request; ``headers`` without Host, Content-Length or hop-by-hop ones."""
        key = (scheme, host, port)
        head = _request_head(method, target, host, port, headers, sum(len(p) for p in parts))
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
        connecting = connectProtocol(self._endpoint(key), _ClientConnection(self, key))

        def failed(f: Failure) -> Failure:
            if f.check(ConnectError):
                raise ConnectFailed(f"{type(f.value).__name__}: {f.getErrorMessage()}")
            return f

        connecting.addErrback(failed)
        return connecting.addCallback(lambda conn: conn.send(head, parts))

    def _endpoint(self, key: Key) -> IStreamClientEndpoint:
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            scheme, host, port = key
            if len(self._endpoints) >= 1024:  # a bound; only the members and the backend are here
                self._endpoints.clear()
            endpoint = HostnameEndpoint(self.reactor, host, port, timeout=self.connect_timeout)
            if scheme == b"https":
                if self.tls_policy is None:
                    raise ValueError("https forward without a TLS policy")
                endpoint = wrapClientTLS(self.tls_policy.creatorForNetloc(host.encode("idna"), port), endpoint)
            self._endpoints[key] = endpoint
        return endpoint

    def _idle_again(self, conn: _ClientConnection) -> None:
        idle = self._idle.setdefault(conn.key, deque())
        if len(idle) >= self.max_idle_per_host:
            conn.transport.loseConnection()
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
            conn.transport.loseConnection()
        self._idle.clear()
        return defer.gatherResults(waits).addCallback(lambda _: None)


def _request_head(method: bytes, target: bytes, host: str, port: int, headers: list[Header], length: int) -> bytes:
    lines = [b"%s %s HTTP/1.1\r\nHost: %s:%d\r\n" % (method, target, host.encode("idna"), port)]
    for k, v in headers:
        lines.append(b"%s: %s\r\n" % (k, v))
    if length or method not in (b"GET", b"HEAD", b"DELETE", b"OPTIONS"):
        lines.append(b"Content-Length: %d\r\n" % length)
    lines.append(b"\r\n")
    return b"".join(lines)


class _ClientConnection(Protocol):
    transport: Any  # an ITCPTransport (or TLS) once connected

    def __init__(self, pool: HttpClientPool, key: Key) -> None:
        self.pool, self.key = pool, key
        self.connected = False
        self.reused = False
        self.closed: defer.Deferred[None] = defer.Deferred()
        self._reply: defer.Deferred[HttpReply] | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._got_bytes = False

    def connectionMade(self) -> None:
        self.connected = True
        self.pool._open.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        self.pool._lost(self)
        reply, self._reply = self._reply, None
        if reply is not None and not reply.called:
            if self.reused and not self._got_bytes:
                reply.errback(_Stale("the kept-alive connection was closed"))
            else:
                reply.errback(ExchangeFailed(f"the connection was lost: {reason.getErrorMessage()}"))
        self.closed.callback(None)

    def send(self, head: bytes, parts: list[bytes]) -> defer.Deferred[HttpReply]:
        self._reply = defer.Deferred(self._cancel)
        self._parser = httptools.HttpResponseParser(self)
        self._got_bytes = False
        self._code = 0
        self._headers: list[Header] = []
        self._parts: list[bytes] = []
        if not parts:
            self.transport.write(head)
        elif len(parts) == 1 and len(parts[0]) < 65536:
            self.transport.write(head + parts[0])
        else:
            self.transport.writeSequence([head, *parts])
        return self._reply

    def _cancel(self, _d: defer.Deferred[HttpReply]) -> None:
        self._reply = None
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        self._got_bytes = True
        parser = self._parser
        if parser is None or self._reply is None:
            self.transport.abortConnection()  # bytes nobody asked for
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as e:
            reply, self._reply = self._reply, None
            self.transport.abortConnection()
            if reply is not None:
                reply.errback(ExchangeFailed(f"the reply is not HTTP: {e}"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self._parts.append(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        reply = HttpReply(parser.get_status_code(), self._parts, self._headers)
        keep_alive = parser.should_keep_alive()
        d, self._reply, self._parser = self._reply, None, None
        if keep_alive:
            self.reused = True
            self.pool._idle_again(self)
        else:
            self.transport.loseConnection()
        if d is not None:
            d.callback(reply)
