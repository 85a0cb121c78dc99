"""Large REST replies are streamed through a forward (tfscache.transport.http_client's
BodyStream, written on by http_server): the client has the head and the first bytes while the
server behind is still sending, a broken-off body closes the client's connection instead of
leaving it waiting, and the connection serves the next request after a streamed one.  Real
sockets on loopback: a backend that sends half of a large body and waits to be told to send
the rest, the REST server in front of it forwarding over the client pool, a raw client."""

from __future__ import annotations

import asyncio
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tfscache.errors import ServingError
from tfscache.frontend.rest import error_reply
from tfscache.transport.grpc_client import as_deferred
from tfscache.transport.http_client import STREAM_AT, HttpClientPool
from tfscache.transport.http_server import HttpLimits, HttpListener, HttpServerFactory, listen
from tfscache.wire import HttpReply, HttpRequest

SIZE = 4 * STREAM_AT  # streamed
SMALL = b'{"predictions": [1.0]}'


class HalfThenHold(asyncio.Protocol):
    """Answers ``/big`` with SIZE bytes: the head and the first half at once, the rest when the
    test sets ``release`` (or, with ``break_off``, closes the connection instead); anything
    else with a small body."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.buffer = b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.backend.lost.set()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            self.backend.requests += 1
            if head.split(b" ")[1] == b"/big":
                asyncio.ensure_future(self._big())
            else:
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(SMALL), SMALL))

    async def _big(self) -> None:
        body = bytes(range(256)) * (SIZE // 256)
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n" % SIZE + body[:SIZE // 2])
        await self.backend.release.wait()
        if self.backend.break_off:
            self.transport.abort()
        else:
            self.transport.write(body[SIZE // 2:])


class Backend:
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.lost = asyncio.Event()  # a connection to the backend closed
        self.break_off = False
        self.requests = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: HalfThenHold(self), "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port


class Forward:
    """The app: every request forwarded to the backend over the pool, the reply handed back."""

    def __init__(self, pool: HttpClientPool, port: int) -> None:
        self.pool, self.port = pool, port

    def handle(self, request: HttpRequest, error: ServingError | None) -> Any:
        return self.pool.request(b"http", "127.0.0.1", self.port, request.method, request.path, [],
                                 request.parts)

    def error_reply(self, error: ServingError) -> HttpReply:
        return error_reply(error)


async def read_head(reader: asyncio.StreamReader) -> dict[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"HTTP/1.1 200"), lines[0]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:] if line)}


class ReplyStreamingTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> Any:
        return as_deferred(self._start())

    async def _start(self) -> None:
        self.backend = Backend()
        port = await self.backend.start()
        self.pool = HttpClientPool()
        factory = HttpServerFactory(Forward(self.pool, port), HttpLimits(), reactor)  # type: ignore[arg-type]
        self.listener: HttpListener = await listen(factory, "127.0.0.1", 0)

    def tearDown(self) -> Any:
        self.listener.stop()
        assert self.backend.server is not None
        self.backend.server.close()
        self.backend.release.set()
        return self.pool.close()

    async def _client(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.listener.port)

    @defer.inlineCallbacks
    def test_the_head_and_first_half_arrive_while_the_backend_holds_the_rest(self) -> Any:
        async def go() -> None:
            reader, writer = await self._client()
            writer.write(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            headers = await read_head(reader)
            self.assertEqual(headers[b"content-length"], b"%d" % SIZE)
            self.assertEqual(headers[b"content-type"], b"application/json")
            first = await reader.readexactly(SIZE // 2)  # the backend has sent no more than this
            self.assertFalse(self.backend.release.is_set())
            self.backend.release.set()
            rest = await reader.readexactly(SIZE - SIZE // 2)
            self.assertEqual(first + rest, bytes(range(256)) * (SIZE // 256))
            # the same connection serves the next request once the stream is done
            writer.write(b"POST /small HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            headers = await read_head(reader)
            self.assertEqual(await reader.readexactly(int(headers[b"content-length"])), SMALL)
            writer.close()

        yield as_deferred(go())
        self.assertEqual(self.backend.requests, 2)

    @defer.inlineCallbacks
    def test_a_body_that_breaks_off_closes_the_clients_connection(self) -> Any:
        async def go() -> None:
            reader, writer = await self._client()
            writer.write(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            await read_head(reader)
            await reader.readexactly(SIZE // 2)
            self.backend.break_off = True
            self.backend.release.set()
            rest = await reader.read()  # EOF: the client learns the reply is short
            self.assertLess(len(rest), SIZE - SIZE // 2)
            writer.close()

        yield as_deferred(go())

    @defer.inlineCallbacks
    def test_a_client_that_goes_away_mid_stream_frees_the_backend_connection(self) -> Any:
        async def go() -> None:
            reader, writer = await self._client()
            writer.write(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            await read_head(reader)
            await reader.readexactly(SIZE // 4)
            self.assertFalse(self.backend.lost.is_set())
            writer.transport.abort()
            # the pool's connection to the backend is aborted rather than left half-read
            await self.backend.lost.wait()
            self.assertFalse(self.backend.release.is_set())

        yield as_deferred(go())
