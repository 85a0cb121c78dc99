"""The client-facing gRPC API: TF Serving's method names, payloads forwarded as raw bytes.

A ``grpc.aio`` server on the reactor's own asyncio loop (``tfscache.reactor``): a call is a
coroutine that reads only the request's ``model_spec``, hands it to the request handler and
awaits its Deferred.  No thread is held while a call waits (for a cold model's copy and load,
say), so no number of waiting calls delays a call for a warm model.  When the client cancels
or its deadline passes, grpc.aio cancels the coroutine, which cancels the handler's Deferred
(a load other requests wait for goes on).  Generic handlers register the method names, so no
TF Serving generated code is needed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from tfscache.access_log import AccessLog
from tfscache.cluster.forward_auth import ForwardMarker, process_marker, unverified_marker
from tfscache.errors import Code, ServingError, invalid
from tfscache.frontend.errors import as_serving_error, error_markers, grpc_status
from tfscache.interfaces import IRequestHandler
from tfscache.metrics import Metrics
from tfscache.modelspec import PREDICTION_METHODS, ModelRef, parse_grpc_request
from tfscache.reactor import event_loop
from tfscache.transport.grpc_client import as_deferred
from tfscache.util.inflight import InFlight
from tfscache.wire import FORWARDED_KEY, forwardable_metadata

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"
HEALTH_SERVICES = ("", PREDICTION_SERVICE, MODEL_SERVICE)
DEADLINE_SLACK = 0.25  # seconds: see the cancel in GrpcFrontend.method_handler

# full method path -> short name used for parsing and metrics
FORWARDED_METHODS = {f"/{PREDICTION_SERVICE}/{m}": m for m in PREDICTION_METHODS}
FORWARDED_METHODS[f"/{MODEL_SERVICE}/GetModelStatus"] = "GetModelStatus"


@dataclass
class GrpcLimits:
    """The gRPC listener's limits (``listen.*``): what a flood of idle or slow connections
    could otherwise hold forever."""

    max_connections: int = 10_000          # past it, a new connection is closed at once
    max_concurrent_streams: int = 1024     # calls in flight on one connection (a client queues more)
    idle_timeout: float = 120.0            # a connection without a call this long gets GOAWAY
    handshake_timeout: float = 30.0        # TLS + HTTP/2 preface must be done within this
    keepalive_time: float = 60.0           # ping a connection this often; close it when
    keepalive_timeout: float = 20.0        # its peer (gone, half-open) does not answer within this
    max_buffered: int = 1 << 30            # request bytes held by all calls together (429's twin)

    def options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_allowed_incoming_connections", self.max_connections),
            ("grpc.max_concurrent_streams", self.max_concurrent_streams),
            ("grpc.max_connection_idle_ms", round(self.idle_timeout * 1000)),
            ("grpc.server_handshake_timeout_ms", round(self.handshake_timeout * 1000)),
            ("grpc.keepalive_time_ms", round(self.keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", round(self.keepalive_timeout * 1000)),
        ]


def _resolve(result: object, future: asyncio.Future[Any]) -> None:
    """The Deferred's result (or its failure's exception) into the future a call awaits."""
    if future.cancelled():
        return
    if isinstance(result, Failure):
        assert result.value is not None  # a Failure always carries its exception
        future.set_exception(result.value)
    else:
        future.set_result(result)


class _GenericHandler(grpc.GenericRpcHandler):
    def __init__(self, frontend: GrpcFrontend) -> None:
        # stream-unary, not unary-unary: grpc.aio's unary handler leaves a stream whose message
        # ends early (a length prefix longer than the data, END_STREAM mid-prefix) without any
        # status; reading the request ourselves (context.read(): the iterator grpc.aio passes
        # the handler stays unused) answers it.  Measured: no dearer per call.
        self._handlers = {
            method: grpc.stream_unary_rpc_method_handler(frontend.method_handler(method, short))
            for method, short in FORWARDED_METHODS.items()
        }

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler | None:
        # None: grpcio answers UNIMPLEMENTED, as TF Serving does for SessionRun
        return self._handlers.get(handler_call_details.method)


class _GenericOnly:
    """A server that takes generated code's handlers as generic ones only.  grpc.aio's serving
    loop waits on one pending call per registered method (asyncio.wait over all of them, for
    every call that arrives): the health service's three registered methods made every
    Predict pay for them.  A generic handler serves the same methods."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self.server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service_name: str, handlers: dict[str, Any]) -> None:
        pass  # served by the generic handler given with them


class GrpcFrontend(service.Service):
    """IService: the grpc.aio server on the client-facing gRPC port."""

    log = Logger()

    def __init__(
        self,
        handler: IRequestHandler,
        metrics: Metrics,
        host: str,
        port: int,
        max_message_bytes: int = 64 * 1024 * 1024,
        credentials: grpc.ServerCredentials | None = None,
        local: IRequestHandler | None = None,
        health: bool = True,
        forward_marker: ForwardMarker | None = None,
        limits: GrpcLimits | None = None,
    ) -> None:
        self.handler, self.metrics = handler, metrics
        self.limits = limits or GrpcLimits()
        # a call another node's router forwarded here (its marker verifies) is served here,
        # never routed again; a client's marker does not verify and is routed as usual
        self.local = local or handler
        self.forward_marker = forward_marker or process_marker()
        self.host, self.port = host, port
        self.max_message_bytes = max_message_bytes
        self.credentials = credentials
        self.health = health_aio.HealthServicer() if health else None
        self._serving = False
        self.server: grpc.aio.Server | None = None
        self.bound_port: int | None = None
        self.accepting = True
        self.buffered = 0  # bytes of the requests of the calls in flight (limits.max_buffered)
        self.access_log: AccessLog | None = None  # logging.access_log
        # calls in flight, so a drain can wait for them with REST's
        self.inflight = InFlight()
        self.stop_grace = 5.0  # seconds the calls still running at stopService may take
        self.started: defer.Deferred[None] = defer.Deferred()

    def startService(self) -> None:
        service.Service.startService(self)
        self.server = grpc.aio.server(
            handlers=[_GenericHandler(self)],
            options=[
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", 2**31 - 1),
                ("grpc.so_reuseport", 0),
                *self.limits.options(),
            ],
        )
        if self.health is not None:
            health_pb2_grpc.add_HealthServicer_to_server(self.health, _GenericOnly(self.server))
            self.set_serving(self._serving)
        address = f"{self.host}:{self.port}"
        if self.credentials is not None:
            self.bound_port = self.server.add_secure_port(address, self.credentials)
        else:
            self.bound_port = self.server.add_insecure_port(address)
        if not self.bound_port:
            raise OSError(f"cannot listen on {address} (gRPC)")
        d = as_deferred(self.server.start())
        d.addCallback(lambda _: self.log.info("gRPC API listening on {host}:{port}", host=self.host,
                                              port=self.bound_port))
        d.chainDeferred(self.started)

    def stopService(self) -> defer.Deferred[None] | None:
        service.Service.stopService(self)
        if self.server is None:
            return None
        server, self.server = self.server, None
        return as_deferred(server.stop(max(0.0, self.stop_grace)))

    def set_serving(self, serving: bool) -> defer.Deferred[None]:
        """The gRPC health service's answer for the server and TF Serving's services; fires
        once Check answers so."""
        self._serving = serving
        if self.health is None or self.server is None:
            return defer.succeed(None)
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        updates = [as_deferred(self.health.set(name, status)) for name in HEALTH_SERVICES]
        return defer.gatherResults(updates).addCallback(lambda _: None)

    # -- calls -----------------------------------------------------------------------------
    def method_handler(self, method: str, short: str) -> Any:
        loop = event_loop()

        async def call(_requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
            started = time.perf_counter()
            code = "OK"
            timeout: float | None = None
            ref: ModelRef | None = None  # for the access log
            held = 0
            self.inflight.enter()
            try:
                # the reader API, not the request iterator: an async generator left unfinished
                # costs a finaliser task per call (the loop's asyncgen hooks)
                payload = await context.read()
                if payload is grpc.aio.EOF:
                    raise invalid(f"The {short} call carried no complete request message")
                if not self.accepting:
                    raise ServingError(Code.UNAVAILABLE, "tfscache is shutting down", node_wide=True)
                # a call holds its request while it waits (for a cold model, say): the bytes all
                # calls hold are bounded, as REST's bodies are (listen.max_buffered_bytes)
                if self.buffered + len(payload) > self.limits.max_buffered:
                    raise ServingError(Code.RESOURCE_EXHAUSTED,
                                       f"The {short} request ({len(payload)} bytes) would take the requests "
                                       "held by this node over listen.max_buffered_bytes; try again later")
                held = len(payload)
                self.buffered += held
                ref = parse_grpc_request(short, payload)
                remaining = context.time_remaining()
                timeout = None if remaining is None or remaining > 1e9 else remaining
                received = context.invocation_metadata() or ()
                verify = self.forward_marker.verify
                markers = [v for k, v in received if k == FORWARDED_KEY]
                forwarded = any(verify(v) for v in markers)
                if markers and not forwarded:
                    unverified_marker(ref.name, "gRPC")
                handler = self.local if forwarded else self.handler
                d = handler.grpc(method, ref, payload, timeout, forwardable_metadata(received))
                # Deferred.asFuture's three closures and done-callback, done with one future
                reply = loop.create_future()
                d.addBoth(_resolve, reply)
                try:
                    result: bytes = await reply
                except asyncio.CancelledError:
                    d.cancel()
                    raise
                return result
            except asyncio.CancelledError:
                # the client went away or its deadline passed (grpc.aio cancels the call at
                # the deadline, which can come a little before our copy of it: it was sent as a
                # relative grpc-timeout): nobody to answer, but count it for what it was
                late = timeout is not None and time.perf_counter() - started >= timeout - DEADLINE_SLACK
                code = "DEADLINE_EXCEEDED" if late else "CANCELLED"
                raise
            except Exception as e:
                err = as_serving_error(e)
                code = err.code.name
                markers = error_markers(err)
                if markers:
                    context.set_trailing_metadata(tuple(markers))
                await context.abort(grpc_status(err), err.message)
                raise  # unreachable: abort raises
            finally:
                self.buffered -= held
                self.inflight.exit()
                self.metrics.request_done("grpc", short, code, time.perf_counter() - started)
                if self.access_log is not None:
                    self.access_log.line("grpc", short, ref, code, time.perf_counter() - started)

        return call
