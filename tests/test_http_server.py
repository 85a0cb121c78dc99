"""The REST port's HTTP server (tfscache.transport.http_server) byte by byte: framing,
keep-alive, pipelining, limits and timeouts, on an in-memory transport and a Clock."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from tfscache.errors import ServingError
from tfscache.frontend.rest import error_reply
from tfscache.transport.http_server import HttpLimits, HttpServerFactory, HttpServerProtocol
from tfscache.wire import HttpReply, HttpRequest


class RecordingApp:
    """Answers each request with its path, at once or when ``hold`` asks it to wait."""

    def __init__(self) -> None:
        self.requests: list[tuple[HttpRequest, ServingError | None]] = []
        self.hold = False
        self.held: list[defer.Deferred[HttpReply]] = []
        self.cancelled = 0

    def handle(self, request: HttpRequest, error: ServingError | None) -> Any:
        self.requests.append((request, error))
        if error is not None:
            return error_reply(error)
        reply = HttpReply(200, request.path + b"|" + request.body, [(b"X-Path", request.path)])
        if self.hold:
            d: defer.Deferred[HttpReply] = defer.Deferred(self._cancelled)
            self.held.append(d)
            return d.addCallback(lambda _: reply)
        return reply

    def _cancelled(self, _d: defer.Deferred[HttpReply]) -> None:
        self.cancelled += 1

    def error_reply(self, error: ServingError) -> HttpReply:
        return error_reply(error)


class StringTransport:
    """An asyncio transport that keeps what is written."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.disconnecting = False
        self.producerState = "producing"

    def write(self, data: bytes) -> None:
        self.data.append(data)

    def writelines(self, parts: list[bytes]) -> None:
        self.data.extend(parts)

    def value(self) -> bytes:
        return b"".join(self.data)

    def close(self) -> None:
        self.disconnecting = True

    abort = close

    def pause_reading(self) -> None:
        self.producerState = "paused"

    def resume_reading(self) -> None:
        self.producerState = "producing"


def connect(app: Any, limits: HttpLimits | None = None, clock: Clock | None = None) -> tuple[Any, StringTransport]:
    factory = HttpServerFactory(app, limits or HttpLimits(), clock or Clock())
    proto = factory()
    transport = StringTransport()
    proto.connection_made(transport)
    return proto, transport


def replies(data: bytes) -> list[bytes]:
    """The status lines in ``data``."""
    return [line for line in data.split(b"\r\n") if line.startswith(b"HTTP/1.")]


class FramingTests(unittest.TestCase):
    def setUp(self) -> None:
        self.app = RecordingApp()
        self.clock = Clock()
        self.proto: HttpServerProtocol
        self.proto, self.transport = connect(self.app, clock=self.clock)

    def test_keep_alive_and_content_length(self) -> None:
        self.proto.data_received(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 200 OK\r\n"), out)
        self.assertIn(b"Content-Length: 6\r\n", out)
        self.assertTrue(out.endswith(b"\r\n\r\n/a|abc"), out)
        self.assertFalse(self.transport.disconnecting)

    def test_http_1_0_closes_unless_asked_to_keep_alive(self) -> None:
        self.proto.data_received(b"GET /a HTTP/1.0\r\n\r\n")
        self.assertIn(b"Connection: close", self.transport.value())
        self.assertTrue(self.transport.disconnecting)
        proto, transport = connect(self.app)
        proto.data_received(b"GET /b HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        self.assertIn(b"Connection: keep-alive", transport.value())
        self.assertFalse(transport.disconnecting)

    def test_pipelined_requests_are_answered_in_order(self) -> None:
        self.app.hold = True
        self.proto.data_received(b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n")
        self.assertEqual(len(self.app.requests), 1)  # one at a time
        self.assertEqual(self.transport.producerState, "paused")
        while self.app.held:
            self.app.held.pop(0).callback(None)
        out = self.transport.value()
        self.assertEqual(out.count(b"HTTP/1.1 200 OK"), 3)
        self.assertLess(out.index(b"/1|"), out.index(b"/2|"))
        self.assertLess(out.index(b"/2|"), out.index(b"/3|"))
        self.assertEqual(self.transport.producerState, "producing")

    def test_chunked_body_is_dechunked(self) -> None:
        self.proto.data_received(b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                                b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        [(request, error)] = self.app.requests
        self.assertIsNone(error)
        self.assertEqual(request.parts, [b"abc", b"de"])
        self.assertEqual(request.body, b"abcde")

    def test_expect_100_continue(self) -> None:
        self.proto.data_received(b"POST /e HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        self.assertEqual(self.transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        self.proto.data_received(b"ok")
        self.assertIn(b"HTTP/1.1 200 OK", self.transport.value())

    def test_head_has_no_body(self) -> None:
        self.proto.data_received(b"HEAD /h HTTP/1.1\r\n\r\n")
        out = self.transport.value()
        self.assertIn(b"Content-Length: 3\r\n", out)
        self.assertTrue(out.endswith(b"\r\n\r\n"), out)

    def test_garbage_gets_a_json_400_and_a_close(self) -> None:
        self.proto.data_received(b"\x16\x03\x01garbage\r\n\r\n")
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out)
        self.assertIn(b'{"error": "Malformed request: not HTTP', out)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.app.requests, [])

    def test_http_0_9_is_refused(self) -> None:
        self.proto.data_received(b"GET /v1/models/m\r\n\r\n")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 400 "), self.transport.value())
        self.assertEqual(self.app.requests, [])

    def test_a_header_over_the_line_limit_is_refused(self) -> None:
        proto, transport = connect(self.app, HttpLimits(max_line=100))
        proto.data_received(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 101 + b"\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "))
        self.assertEqual(self.app.requests, [])

    def test_garbage_after_a_pending_request_waits_for_its_reply(self) -> None:
        self.app.hold = True
        self.proto.data_received(b"GET /ok HTTP/1.1\r\n\r\n\x16\x03garbage\r\n\r\n")
        self.assertFalse(self.transport.disconnecting)
        self.app.held.pop().callback(None)
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 200 OK\r\n"), out)
        self.assertIn(b"Connection: close", out)
        self.assertTrue(self.transport.disconnecting)

    def test_too_many_headers_is_refused(self) -> None:
        proto, transport = connect(self.app, HttpLimits(max_headers=10))
        proto.data_received(b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(11)) + b"\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "))
        self.assertTrue(transport.disconnecting)

    def test_client_gone_cancels_the_reply(self) -> None:
        self.app.hold = True
        self.proto.data_received(b"GET /g HTTP/1.1\r\n\r\n")
        self.proto.connection_lost(None)
        self.assertEqual(self.app.cancelled, 1)
        self.assertEqual(self.transport.value(), b"")


class LimitTests(unittest.TestCase):
    def test_bodies_over_the_shared_budget_are_refused(self) -> None:
        app = RecordingApp()
        app.hold = True
        factory = HttpServerFactory(app, HttpLimits(max_buffered=150), Clock())
        first, second = factory(), factory()
        transports = [StringTransport(), StringTransport()]
        first.connection_made(transports[0])
        second.connection_made(transports[1])
        first.data_received(b"POST /1 HTTP/1.1\r\nContent-Length: 100\r\n\r\n" + b"a" * 100)
        self.assertEqual(factory.buffered, 100)  # held while its reply is pending
        app.hold = False
        second.data_received(b"POST /2 HTTP/1.1\r\nContent-Length: 100\r\n\r\n" + b"b" * 100)
        _request, error = app.requests[1]
        assert error is not None
        self.assertEqual(error.code.name, "RESOURCE_EXHAUSTED")
        self.assertTrue(transports[1].value().startswith(b"HTTP/1.1 429 "))
        app.held[0].callback(None)
        self.assertEqual(factory.buffered, 0)

    def test_past_the_limit_the_connection_idle_the_longest_makes_room(self) -> None:
        clock = Clock()
        factory = HttpServerFactory(RecordingApp(), HttpLimits(max_connections=2), clock)
        transports = [StringTransport() for _ in range(3)]
        protocols = []
        for t in transports:
            protocols.append(factory())
            protocols[-1].connection_made(t)
            clock.advance(1)
        self.assertEqual([t.disconnecting for t in transports], [True, False, False])
        self.assertEqual(factory.connections, {protocols[1], protocols[2]})

    def test_past_the_limit_with_none_idle_the_new_connection_is_closed(self) -> None:
        app = RecordingApp()
        app.hold = True
        factory = HttpServerFactory(app, HttpLimits(max_connections=2), Clock())
        transports = [StringTransport() for _ in range(3)]
        protocols = [factory() for _ in transports]
        for proto, t in zip(protocols[:2], transports[:2], strict=True):
            proto.connection_made(t)
            proto.data_received(b"GET /m HTTP/1.1\r\nHost: x\r\n\r\n")  # a reply pending on each
        protocols[2].connection_made(transports[2])
        self.assertEqual([t.disconnecting for t in transports], [False, False, True])
        self.assertEqual(len(factory.connections), 2)


class TimeoutTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.factory = HttpServerFactory(RecordingApp(), HttpLimits(idle_timeout=10, header_timeout=5,
                                                                    body_timeout=7), self.clock)
        self.factory.start()
        self.addCleanup(self.factory.stop)

    def conn(self) -> tuple[HttpServerProtocol, StringTransport]:
        proto = self.factory()
        transport = StringTransport()
        proto.connection_made(transport)
        return proto, transport

    def test_idle_connection_is_closed(self) -> None:
        proto, transport = self.conn()
        self.clock.advance(9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(transport.disconnecting)

    def test_slow_headers_are_closed(self) -> None:
        proto, transport = self.conn()
        for _ in range(6):  # a byte a second: slowloris
            proto.data_received(b"G")
            self.clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_a_stalled_body_is_closed_a_slow_one_is_not(self) -> None:
        proto, transport = self.conn()
        proto.data_received(b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\n")
        for _ in range(20):
            proto.data_received(b"x")
            self.clock.advance(3)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(8)
        self.assertTrue(transport.disconnecting)
