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
A call by version label is pinned the same way (status calls too): tfscache resolved the label
to the version it leased; TF Serving has the labels in its config as well (for MultiInference).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from tfscache.errors import Code, ServingError, deadline, unavailable
from tfscache.interfaces import IRequestHandler
from tfscache.metrics import Metrics
from tfscache.modelspec import ModelId, ModelRef, RestCall
from tfscache.node.manager import CacheManager, Lease
from tfscache.proto import model_spec_pb2
from tfscache.transport.grpc_client import GrpcChannel
from tfscache.transport.http_client import HttpClientPool
from tfscache.util.timers import Timers
from tfscache.wire import HttpReply, HttpRequest, Metadata, forwardable_headers, reply_headers

# gRPC methods whose request has model_spec as field 1 and whose answer for no version is the
# same as for the version it resolves to
_PINNABLE_GRPC = frozenset({
    "/tensorflow.serving.PredictionService/Predict", "/tensorflow.serving.PredictionService/Classify",
    "/tensorflow.serving.PredictionService/Regress",
    "/tensorflow.serving.PredictionService/GetModelMetadata",
})
_PINNABLE_REST = frozenset({"predict", "classify", "regress", "metadata"})
# a label names one version, so a status call by label is pinned too
_LABEL_PINNABLE_GRPC = _PINNABLE_GRPC | {"/tensorflow.serving.ModelService/GetModelStatus"}


_LABEL_SEGMENT = re.compile(rb"/labels/[^/:?]+", re.IGNORECASE)


def pinned_rest_path(call: RestCall, path: bytes, mid: ModelId) -> bytes:
    """``path`` (raw, with its query) naming version ``mid.version`` when the call named none,
    or named a label (``/labels/L`` becomes ``/versions/N``, for every API: the label was
    resolved to the version leased)."""
    if call.ref.label is not None:
        target, q, query = path.partition(b"?")
        return _LABEL_SEGMENT.sub(b"/versions/%d" % mid.version, target, count=1) + q + query
    if call.ref.version is not None or call.api not in _PINNABLE_REST:
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
    labelled = ref.label is not None and method in _LABEL_PINNABLE_GRPC
    if not labelled and (ref.version is not None or ref.label is not None or method not in _PINNABLE_GRPC):
        return payload
    # a version after a version_label replaces it (one oneof): the label was resolved to it
    spec = model_spec_pb2.ModelSpecCarrier()
    spec.model_spec.version.value = mid.version
    pin: bytes = spec.SerializeToString()
    return payload + pin


@implementer(IRequestHandler)
class LocalNode:
    """The warm path is a chain of Deferreds that have fired already (resolve, lease) and
    one forward: no coroutine, no thread."""

    def __init__(
        self,
        cache: CacheManager,
        rest_base: str,
        grpc_target: str,
        metrics: Metrics,
        request_timeout: float,
        load_timeout: float,
        clock: IReactorTime,
        http: HttpClientPool | None = None,
        grpc_channel: GrpcChannel | None = None,
    ) -> None:
        self.cache, self.metrics, self.clock = cache, metrics, clock
        self.timers = Timers(clock)
        url = urlsplit(rest_base.rstrip("/"))
        self.rest_scheme = url.scheme.encode()
        self.rest_host = url.hostname or "127.0.0.1"
        self.rest_port = url.port or (443 if url.scheme == "https" else 80)
        self.rest_prefix = url.path.encode()
        self.request_timeout, self.load_timeout = request_timeout, load_timeout
        self.http = http or HttpClientPool(max_idle_per_host=256)
        # reconnects within a second after TF Serving restarts (not after gRPC's default
        # back-off of up to 120 s)
        self.channel = grpc_channel or GrpcChannel(grpc_target)

    def _lease(self, ref: ModelRef, timeout: float | None) -> defer.Deferred[Lease]:
        d = self.cache.resolve(ref.name, ref.version, ref.label)
        return d.addCallback(self.cache.acquire, timeout)

    def close(self) -> defer.Deferred[None]:
        """Close the connections to TF Serving (at shutdown, after the drain)."""
        return defer.gatherResults([self.http.close(), self.channel.close()]).addCallback(lambda _: None)

    # -- REST --------------------------------------------------------------------------------
    def rest(self, call: RestCall, request: HttpRequest) -> defer.Deferred[HttpReply]:
        ref = call.ref
        lease = None if ref.label is not None else self.cache.lease_now(ref.name, ref.version)
        if lease is not None:  # warm: no Deferred until the forward's own
            try:
                return self._rest_forward(lease, call, request, True)
            except Exception:
                return defer.fail()
        return self._lease(ref, self.load_timeout).addCallback(self._rest_forward, call, request, True)

    def _rest_forward(self, lease: Lease, call: RestCall, request: HttpRequest,
                      retry: bool) -> defer.Deferred[HttpReply]:
        path = pinned_rest_path(call, request.path, lease.model_id)
        d = self.http.request(self.rest_scheme, self.rest_host, self.rest_port, request.method,
                              self.rest_prefix + path, forwardable_headers(request.headers), request.parts,
                              request.length)
        # the deadline covers the answer and its body
        timer = self.timers.call_later(self.request_timeout, d.cancel)
        return d.addBoth(self._rest_done, lease, timer, call, request, retry)

    def _rest_done(self, result: HttpReply | Failure, lease: Lease, timer: Any, call: RestCall,
                   request: HttpRequest, retry: bool) -> HttpReply | defer.Deferred[HttpReply]:
        expired = not timer.active()
        if not expired:
            timer.cancel()
        if isinstance(result, Failure):
            lease.release()
            if expired and result.check(defer.CancelledError):
                raise deadline(f"TF Serving did not answer within {self.request_timeout:g}s")
            if result.check(defer.CancelledError, ServingError):
                result.raiseException()
            raise unavailable(f"TF Serving REST API is unreachable: {type(result.value).__name__}", node_wide=True)
        result.headers = reply_headers(result.headers)
        stream = result.stream
        if stream is None:
            lease.release()
            if result.code == 404 and retry:
                return self._rest_again(lease.model_id, call, request, result)
        else:
            # the head is in, the body on its way: it gets a deadline of its own, and the model
            # stays leased until its last byte
            body_timer = self.timers.call_later(self.request_timeout, stream.abort)
            stream.done.addBoth(self._streamed, lease, body_timer)
        return result

    def _rest_again(self, mid: ModelId, call: RestCall, request: HttpRequest,
                    reply: HttpReply) -> defer.Deferred[HttpReply]:
        """TF Serving said "not found" for a model leased AVAILABLE: verify, load it again if
        TF Serving lost it, and send the request once more; else its 404 is the answer."""

        def again(lost: bool) -> HttpReply | defer.Deferred[HttpReply]:
            if not lost:
                return reply
            self.metrics.reloads_after_not_found.inc()
            return self._lease(call.ref, self.load_timeout).addCallback(self._rest_forward, call, request, False)

        return self.cache.reverify(mid).addCallbacks(again, lambda _f: reply)

    @staticmethod
    def _streamed(result: object, lease: Lease, timer: Any) -> object:
        lease.release()
        if timer.active():
            timer.cancel()
        return result

    # -- gRPC --------------------------------------------------------------------------------
    def grpc(
        self, method: str, ref: ModelRef, payload: bytes, timeout: float | None, metadata: Metadata = ()
    ) -> defer.Deferred[bytes]:
        started = self.clock.seconds()
        lease = None if ref.label is not None else self.cache.lease_now(ref.name, ref.version)
        if lease is not None:  # warm
            try:
                return self._grpc_forward(lease, method, ref, payload, timeout, metadata, started, True)
            except Exception:
                return defer.fail()
        d = self._lease(ref, timeout if timeout is not None else self.load_timeout)
        return d.addCallback(self._grpc_forward, method, ref, payload, timeout, metadata, started, True)

    def _grpc_forward(self, lease: Lease, method: str, ref: ModelRef, payload: bytes, timeout: float | None,
                      metadata: Metadata, started: float, retry: bool) -> defer.Deferred[bytes]:
        remaining = self.request_timeout
        if timeout is not None:
            remaining = timeout - (self.clock.seconds() - started)
            if remaining <= 0:
                lease.release()
                raise deadline("Deadline Exceeded")
        pinned = pinned_grpc_payload(method, ref, payload, lease.model_id)
        d = self.channel.call(method, pinned, remaining, metadata)
        return d.addBoth(self._grpc_done, lease, method, ref, payload, timeout, metadata, started, retry)

    def _grpc_done(self, result: bytes | Failure, lease: Lease, method: str, ref: ModelRef, payload: bytes,
                   timeout: float | None, metadata: Metadata, started: float,
                   retry: bool) -> bytes | defer.Deferred[bytes]:
        lease.release()
        if isinstance(result, Failure):
            e = result.value
            if isinstance(e, ServingError) and e.code == Code.UNAVAILABLE:
                raise unavailable(f"TF Serving gRPC API is unavailable: {e.message}", node_wide=True)
            if retry and isinstance(e, ServingError) and e.code == Code.NOT_FOUND:
                return self._grpc_again(lease.model_id, result, method, ref, payload, timeout, metadata, started)
            result.raiseException()
        return result

    def _grpc_again(self, mid: ModelId, failure: Failure, method: str, ref: ModelRef, payload: bytes,
                    timeout: float | None, metadata: Metadata, started: float) -> defer.Deferred[bytes]:
        """As _rest_again: NOT_FOUND for a leased model is verified, and the call sent once
        more (within the call's deadline) when TF Serving had lost the model."""

        def again(lost: bool) -> Failure | defer.Deferred[bytes]:
            if not lost:
                return failure
            self.metrics.reloads_after_not_found.inc()
            wait = self.load_timeout if timeout is None else timeout - (self.clock.seconds() - started)
            d = self._lease(ref, wait)
            return d.addCallback(self._grpc_forward, method, ref, payload, timeout, metadata, started, False)

        return self.cache.reverify(mid).addCallbacks(again, lambda _f: failure)
