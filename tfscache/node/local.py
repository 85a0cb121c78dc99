"""LocalNode: serve a request from this node's cache and TF Serving.

Resolve the model, hold it AVAILABLE with a lease, pass the client's bytes to TF Serving
unchanged and its answer back unchanged, release the lease.

One exception: a call that names no version is pinned to the version it leased (REST path
``/versions/N``, gRPC ``model_spec.version``).  TF Serving would answer it with the highest
version it has loaded, which may be another one (loaded by an explicit request, or no longer in
the source), that nobody leased and that could be unloaded under the request.  Pinning changes
nothing the client sees when that version is the highest (predict, classify and regress answers
carry no version or the one used; metadata names the version it describes).  Status calls are
never pinned: without a version TF Serving lists every version, and so do we.  MultiInference
is not pinned either: its specs sit inside repeated tasks, and appending one would add a task.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import URI, Agent, HTTPConnectionPool, readBody
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer

from tfscache.errors import Code, ServingError, deadline, unavailable
from tfscache.interfaces import IRequestHandler
from tfscache.metrics import Metrics
from tfscache.modelspec import ModelId, ModelRef, RestCall
from tfscache.node.manager import CacheManager
from tfscache.proto import model_spec_pb2
from tfscache.util.grpc_twisted import future_to_deferred

# Hop-by-hop and framing headers are the transport's business, not the payload's.
_SKIP_HEADERS = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"host",
                 b"te", b"trailer", b"upgrade", b"proxy-connection", b"x-tfscache-forwarded"}


@dataclass
class HttpRequest:
    method: bytes
    path: bytes                      # raw, still percent-encoded, with the query string
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""


@dataclass
class HttpReply:
    code: int
    body: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


Metadata = Sequence[tuple[str, str | bytes]]
# what a gRPC client sends that is not its own metadata: the transport's, and our marker
_SKIP_METADATA = frozenset({"user-agent", "te", "content-type", "x-tfscache-forwarded"})


# gRPC methods whose request has model_spec as field 1 and whose answer for no version is the
# same as for the version it resolves to
_PINNABLE_GRPC = frozenset({
    "/tensorflow.serving.PredictionService/Predict", "/tensorflow.serving.PredictionService/Classify",
    "/tensorflow.serving.PredictionService/Regress",
    "/tensorflow.serving.PredictionService/GetModelMetadata",
})
_PINNABLE_REST = frozenset({"predict", "classify", "regress", "metadata"})


def pinned_rest_path(call: RestCall, path: bytes, mid: ModelId) -> bytes:
    """``path`` (raw, with its query) naming version ``mid.version`` when the call named none."""
    if call.ref.version is not None or call.ref.label is not None or call.api not in _PINNABLE_REST:
        return path
    target, q, query = path.partition(b"?")
    pin = b"/versions/%d" % mid.version
    if call.api == "metadata":  # .../models/<name>/metadata (any case)
        target = target[:-len(b"/metadata")] + pin + target[-len(b"/metadata"):]
    else:  # .../models/<name>:<verb>; a name has no ':' (TF Serving's own expression)
        head, colon, verb = target.rpartition(b":")
        target = head + pin + colon + verb
    return target + q + query


def pinned_grpc_payload(method: str, ref: ModelRef, payload: bytes, mid: ModelId) -> bytes:
    """``payload`` with ``model_spec.version`` set when the call named none: a second
    ``model_spec`` (field 1) appended to a message is merged into the first by protobuf, so
    the name, signature and every other field stay as the client sent them."""
    if ref.version is not None or ref.label is not None or method not in _PINNABLE_GRPC:
        return payload
    spec = model_spec_pb2.ModelSpecCarrier()
    spec.model_spec.version.value = mid.version
    return payload + spec.SerializeToString()


def forwardable_metadata(metadata: Sequence[tuple[str, str | bytes]] | None) -> tuple[tuple[str, str | bytes], ...]:
    """A gRPC client's own metadata, to pass on as REST headers are (tracing ids, auth for a
    proxy in front of TF Serving); gRPC's reserved keys stay behind."""
    return tuple((k, v) for k, v in metadata or ()
                 if k not in _SKIP_METADATA and not k.startswith(("grpc-", ":")))


def forwardable_headers(headers: list[tuple[bytes, bytes]]) -> Headers:
    out = Headers()
    for k, v in headers:
        if k.lower() not in _SKIP_HEADERS:
            out.addRawHeader(k, v)
    return out


@implementer(IAgentEndpointFactory)
class CachedEndpoints:
    """An Agent's endpoints, one per (scheme, host, port), built once: the Agent's own factory
    makes a new HostnameEndpoint for every request, and its IDNA host check alone costs about
    a tenth of a warm request's CPU (profiled; bench/profile_warm.py)."""

    def __init__(self, reactor: Any, connect_timeout: float | None = None,
                 tls_policy: IPolicyForHTTPS | None = None) -> None:
        self.reactor, self.connect_timeout, self.tls_policy = reactor, connect_timeout, tls_policy
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            if len(self._endpoints) >= 1024:  # a bound; only the members and the backend are here
                self._endpoints.clear()
            timeout = 30 if self.connect_timeout is None else self.connect_timeout  # 30: Twisted's default
            endpoint = HostnameEndpoint(self.reactor, uri.host.decode("ascii"), uri.port, timeout=timeout)
            if uri.scheme == b"https" and self.tls_policy is not None:
                endpoint = wrapClientTLS(self.tls_policy.creatorForNetloc(uri.host, uri.port), endpoint)
            elif uri.scheme != b"http":
                raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")
            self._endpoints[key] = endpoint
        return endpoint


@implementer(IBodyProducer)
class BytesProducer:
    """A request body that is in memory already, written in one go (a FileBodyProducer would
    write it from a cooperative task, a reactor iteration later)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def http_agent(reactor: Any, pool: HTTPConnectionPool, connect_timeout: float | None = None,
               tls_policy: IPolicyForHTTPS | None = None) -> Agent:
    """A plain Agent (no redirects, cookies or content decoding: bytes pass through as they
    are) over ``pool``, with endpoints built once per host."""
    return Agent.usingEndpointFactory(reactor, CachedEndpoints(reactor, connect_timeout, tls_policy), pool=pool)


@implementer(IRequestHandler)
class LocalNode:
    def __init__(
        self,
        cache: CacheManager,
        rest_base: str,
        grpc_channel: grpc.Channel,
        metrics: Metrics,
        request_timeout: float,
        load_timeout: float,
        pool: HTTPConnectionPool | None = None,
    ) -> None:
        from twisted.internet import reactor

        self.cache, self.metrics = cache, metrics
        self.rest_base = rest_base.rstrip("/").encode()
        self.channel = grpc_channel
        self.request_timeout, self.load_timeout = request_timeout, load_timeout
        self.clock = reactor
        self.pool = pool or HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 64
        self.agent = http_agent(reactor, self.pool)
        self._grpc_methods: dict[str, grpc.UnaryUnaryMultiCallable] = {}

    async def _lease(self, ref: ModelRef, timeout: float | None):  # type: ignore[no-untyped-def]
        mid = await self.cache.resolve(ref.name, ref.version, ref.label)
        return await self.cache.acquire(mid, timeout)

    # -- REST --------------------------------------------------------------------------------
    def rest(self, call: RestCall, request: HttpRequest) -> defer.Deferred[HttpReply]:
        return defer.ensureDeferred(self._rest(call, request))

    async def _rest(self, call: RestCall, request: HttpRequest) -> HttpReply:
        lease = await self._lease(call.ref, self.load_timeout)
        try:
            producer = BytesProducer(request.body) if request.body else None
            path = pinned_rest_path(call, request.path, lease.model_id)
            d: defer.Deferred[Any] = self.agent.request(request.method, self.rest_base + path,
                                   forwardable_headers(request.headers), producer)
            # the deadline covers the answer and its body (cancelling d cancels readBody too)
            d.addCallback(lambda resp: readBody(resp).addCallback(lambda body: (resp, body)))
            timer = self.clock.callLater(self.request_timeout, d.cancel)
            try:
                resp, body = await d
            except defer.CancelledError:
                raise deadline(f"TF Serving did not answer within {self.request_timeout:g}s")
            except ServingError:
                raise
            except Exception as e:
                raise unavailable(f"TF Serving REST API is unreachable: {type(e).__name__}", node_wide=True)
            finally:
                if timer.active():
                    timer.cancel()
            headers = [(k, v) for k, vs in resp.headers.getAllRawHeaders() for v in vs
                       if k.lower() not in _SKIP_HEADERS]
            return HttpReply(resp.code, body, headers)
        finally:
            lease.release()

    # -- gRPC --------------------------------------------------------------------------------
    def grpc(
        self, method: str, ref: ModelRef, payload: bytes, timeout: float | None, metadata: Metadata = ()
    ) -> defer.Deferred[bytes]:
        return defer.ensureDeferred(self._grpc(method, ref, payload, timeout, metadata))

    async def _grpc(self, method: str, ref: ModelRef, payload: bytes, timeout: float | None,
                    metadata: Metadata) -> bytes:
        started = time.monotonic()
        lease = await self._lease(ref, timeout if timeout is not None else self.load_timeout)
        try:
            remaining = self.request_timeout
            if timeout is not None:
                remaining = timeout - (time.monotonic() - started)
                if remaining <= 0:
                    raise deadline("Deadline Exceeded")
            call = self._grpc_methods.get(method)
            if call is None:
                call = self._grpc_methods[method] = self.channel.unary_unary(method)
            try:
                payload = pinned_grpc_payload(method, ref, payload, lease.model_id)
                reply: bytes = await future_to_deferred(
                    call.future(payload, timeout=remaining, metadata=tuple(metadata) or None))
            except ServingError as e:
                if e.code == Code.UNAVAILABLE:
                    raise unavailable(f"TF Serving gRPC API is unavailable: {e.message}", node_wide=True)
                raise
            return reply
        finally:
            lease.release()
