"""The wire conventions shared by the front ends, the router and the local node: which headers
and gRPC metadata keys are the transport's (never passed on), the marker on node-to-node
forwards, the node-unavailable marker, and the message types a request and a reply travel in.

One place, so that a REST reply through two hops carries one ``Date`` and the forwarded
marker is spelled once."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from twisted.internet import defer

from tfscache.errors import NODE_UNAVAILABLE_KEY

# Set on every node-to-node forward (REST header, gRPC metadata): the receiving node serves
# the request itself instead of routing it again, once its value (the cluster's token,
# cluster/forward_auth.py) verifies.
FORWARDED_KEY = "x-tfscache-forwarded"
FORWARDED_HEADER = FORWARDED_KEY.encode()
NODE_UNAVAILABLE_HEADER = NODE_UNAVAILABLE_KEY.encode()

# Hop-by-hop and framing headers are the transport's business, not the payload's (RFC 9110
# 7.6.1), plus our own marker; Date and Server are written by whoever sends the reply.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"host", b"te", b"trailer",
    b"upgrade", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization", FORWARDED_HEADER,
})
REPLY_SKIP = HOP_BY_HOP | {b"date", b"server", NODE_UNAVAILABLE_HEADER}

# What a gRPC client sends that is not its own metadata: the transport's, and our marker.
_SKIP_METADATA = frozenset({"user-agent", "te", "content-type", FORWARDED_KEY})

Header = tuple[bytes, bytes]
Metadata = Sequence[tuple[str, str | bytes]]


def forwardable_headers(headers: Iterable[Header]) -> list[Header]:
    """A request's end-to-end headers, to pass on unchanged (names as the client spelled them)."""
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]


def reply_headers(headers: Iterable[Header]) -> list[Header]:
    """A reply's end-to-end headers, for the next hop back to the client."""
    return [(k, v) for k, v in headers if k.lower() not in REPLY_SKIP]


def forwardable_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> tuple[tuple[str, str | bytes], ...]:
    """A gRPC client's own metadata, to pass on as REST headers are (tracing ids, auth for a
    proxy in front of TF Serving); gRPC's reserved keys stay behind."""
    return tuple((k, v) for k, v in metadata or ()
                 if k not in _SKIP_METADATA and not k.startswith(("grpc-", ":")))


def has_header(headers: Iterable[Header], name: bytes) -> bool:
    """``name`` given in lower case."""
    return any(k.lower() == name for k, _v in headers)


def header_value(headers: Iterable[Header], name: bytes) -> bytes | None:
    """The first value of ``name`` (lower case), or None."""
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


class HttpRequest:
    """A REST request as the front end received it: the raw target (still percent-encoded,
    with its query), the headers as sent, and the body as the chunks it arrived in (joined
    only by whoever needs it whole: a forward writes the chunks as they are)."""

    __slots__ = ("method", "path", "headers", "parts", "length")

    def __init__(self, method: bytes, path: bytes, headers: list[Header] | None = None,
                 body: bytes | list[bytes] = b"") -> None:
        self.method, self.path = method, path
        self.headers = headers if headers is not None else []
        self.parts = [body] if isinstance(body, bytes) else body
        self.length = sum(len(p) for p in self.parts)

    @property
    def body(self) -> bytes:
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)

    def head(self, n: int) -> bytes:
        """The body's first ``n`` bytes, without joining the rest."""
        out = b""
        for part in self.parts:
            out += part[:n - len(out)]
            if len(out) >= n:
                break
        return out

    def __repr__(self) -> str:
        return f"HttpRequest({self.method!r}, {self.path!r}, {self.length} bytes)"


class HttpReply:
    """A REST reply: the code, the end-to-end headers and the body as chunks."""

    __slots__ = ("code", "headers", "parts", "stream")

    def __init__(self, code: int, body: bytes | list[bytes] = b"", headers: list[Header] | None = None,
                 stream: BodyStream | None = None) -> None:
        self.code = code
        self.parts = [body] if isinstance(body, bytes) else body
        self.headers = headers if headers is not None else []
        # a large body still arriving (``parts`` is then empty): written on as it comes
        self.stream = stream

    @property
    def body(self) -> bytes:
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)

    def header(self, name: bytes) -> bytes | None:
        return header_value(self.headers, name)

    def __repr__(self) -> str:
        return f"HttpReply({self.code}, {sum(len(p) for p in self.parts)} bytes)"


class BodyStream:
    """The body of a large reply, still arriving from the server that sends it: its chunks go
    to the sink attached (the client's connection) as they come, so that a 32 MB answer is
    neither held whole nor delayed until its last byte.  ``length`` is its Content-Length.
    ``done`` fires once the last chunk went to the sink and fails if the sending connection
    broke; cancelling it (the client went away) aborts the sending connection.  ``pause`` and
    ``resume`` stop and restart reading from it while the sink's buffer is full."""

    __slots__ = ("length", "done", "_sink", "_pending", "_pause", "_resume", "_abort")

    def __init__(self, length: int, pause: Callable[[], None], resume: Callable[[], None],
                 abort: Callable[[], None]) -> None:
        self.length = length
        self.done: defer.Deferred[None] = defer.Deferred(lambda _d: abort())
        self._sink: Callable[[bytes], None] | None = None
        self._pending: list[bytes] = []
        self._pause, self._resume, self._abort = pause, resume, abort

    def feed(self, chunk: bytes) -> None:
        if self._sink is not None:
            self._sink(chunk)
        else:
            self._pending.append(chunk)

    def attach(self, sink: Callable[[bytes], None]) -> list[bytes]:
        """Send the chunks from now on to ``sink``; returns those that came before."""
        self._sink = sink
        pending, self._pending = self._pending, []
        return pending

    def finish(self) -> None:
        if not self.done.called:
            self.done.callback(None)

    def fail(self, why: Exception) -> None:
        if not self.done.called:
            self.done.errback(why)

    def pause(self) -> None:
        self._pause()

    def resume(self) -> None:
        self._resume()

    def abort(self) -> None:
        """Stop it (its deadline passed): the sending connection is aborted, ``done`` fails."""
        self._abort()
