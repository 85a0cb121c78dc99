"""The client-facing gRPC API: TF Serving's method names, payloads forwarded as raw bytes.

grpcio runs its server in its own thread pool.  Each call reads only the ``model_spec`` of the
request, then hands over to the reactor, where the request handler does the asynchronous work;
the grpc thread waits for the answer.  When the client cancels or its deadline passes, the
handler's Deferred is cancelled (a load other requests wait for goes on) and the thread is
free at once.  A generic handler registers the method names, so no TF Serving generated code
is needed.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc
from twisted.application import service
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from tfscache.errors import NODE_UNAVAILABLE_KEY, Code, ServingError
from tfscache.frontend.errors import as_serving_error, grpc_status, node_unavailable_marker
from tfscache.interfaces import IRequestHandler
from tfscache.metrics import Metrics
from tfscache.modelspec import PREDICTION_METHODS, parse_grpc_request
from tfscache.node.local import Metadata, forwardable_metadata
from tfscache.util.inflight import InFlight

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"
FORWARDED_METADATA = "x-tfscache-forwarded"
DEADLINE_SLACK = 0.25  # seconds: see GrpcBridge._run

# full method path -> short name used for parsing and metrics
FORWARDED_METHODS = {f"/{PREDICTION_SERVICE}/{m}": m for m in PREDICTION_METHODS}
FORWARDED_METHODS[f"/{MODEL_SERVICE}/GetModelStatus"] = "GetModelStatus"


class _GenericHandler(grpc.GenericRpcHandler):
    def __init__(self, bridge: GrpcBridge) -> None:
        self.bridge = bridge

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        short = FORWARDED_METHODS.get(method)
        if short is not None:
            return grpc.unary_unary_rpc_method_handler(
                lambda payload, context: self.bridge.call(method, short, payload, context)
            )
        extra = self.bridge.extra_methods.get(method)
        if extra is not None:
            return grpc.unary_unary_rpc_method_handler(extra)
        return None  # grpcio answers UNIMPLEMENTED, as TF Serving does for SessionRun


class GrpcBridge(service.Service):
    """IService: the grpcio server on the client-facing gRPC port."""

    log = Logger()

    def __init__(
        self,
        handler: IRequestHandler,
        metrics: Metrics,
        host: str,
        port: int,
        threads_count: int = 32,
        max_message_bytes: int = 64 * 1024 * 1024,
        extra_methods: dict[str, Any] | None = None,
        credentials: grpc.ServerCredentials | None = None,
        local: IRequestHandler | None = None,
        health: Any = None,
    ) -> None:
        self.handler, self.metrics = handler, metrics
        self.health = health  # a grpc_health HealthServicer, kept up to date by the node
        # a call another node's router forwarded here is served here, never routed again
        self.local = local or handler
        self.host, self.port = host, port
        self.threads_count, self.max_message_bytes = threads_count, max_message_bytes
        self.extra_methods = extra_methods or {}
        self.credentials = credentials
        self.server: grpc.Server | None = None
        self.bound_port: int | None = None
        self.accepting = True
        # calls in flight, counted on the reactor, so a drain can wait for them with REST's
        self.inflight = InFlight()
        self.stop_grace = 5.0  # seconds grpcio gives the calls still running at stopService
        # the grpc threads waiting for the reactor's answer (see _release_waiting)
        self._waiting: set[queue.Queue[Any]] = set()
        self._waiting_lock = threading.Lock()

    def startService(self) -> None:
        super().startService()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.threads_count, thread_name_prefix="tfscache-grpc"),
            handlers=[_GenericHandler(self)],
            options=[
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", 2**31 - 1),
                ("grpc.so_reuseport", 0),
            ],
        )
        if self.health is not None:
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = f"{self.host}:{self.port}"
        if self.credentials is not None:
            self.bound_port = self.server.add_secure_port(address, self.credentials)
        else:
            self.bound_port = self.server.add_insecure_port(address)
        self.server.start()
        self.log.info("gRPC API listening on {host}:{port}", host=self.host, port=self.bound_port)

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        if self.server is None:
            return None
        event = self.server.stop(grace=max(0.0, self.stop_grace))
        # wait in a thread: the reactor must keep running so in-flight calls can finish
        return threads.deferToThread(event.wait).addCallback(lambda _: self._release_waiting())

    def _release_waiting(self) -> None:
        """Past the grace grpcio has cancelled the calls, but their threads still wait for the
        reactor, which is about to stop: answer them here, or the process could not exit
        (the executor's threads are joined at exit)."""
        with self._waiting_lock:
            waiting = list(self._waiting)
        for outcome in waiting:
            try:
                outcome.put_nowait(Failure(ServingError(Code.UNAVAILABLE, "tfscache is shutting down", node_wide=True)))
            except queue.Full:
                pass  # its answer is there already

    # runs in a grpc worker thread
    def call(self, method: str, short: str, payload: bytes, context: grpc.ServicerContext) -> bytes:
        from twisted.internet import reactor
        from twisted.internet.threads import blockingCallFromThread

        started = time.monotonic()
        code = "OK"
        # queued before the accepting check, so a call let in is counted by the time a drain
        # (which turns accepting off, then lets the reactor run the queue) looks at the count
        reactor.callFromThread(self.inflight.enter)  # type: ignore[attr-defined]
        try:
            if not self.accepting:
                raise ServingError(Code.UNAVAILABLE, "tfscache is shutting down", node_wide=True)
            ref = parse_grpc_request(short, payload)
            remaining = context.time_remaining()
            timeout = None if remaining is None or remaining > 1e9 else remaining
            received = context.invocation_metadata() or ()
            forwarded = any(k == FORWARDED_METADATA for k, _v in received)
            handler = self.local if forwarded else self.handler
            metadata = forwardable_metadata(received)
            return self._run(context, handler, method, ref, payload, timeout, metadata)
        except Exception as e:
            err = e if isinstance(e, ServingError) else None
            if isinstance(e, defer.CancelledError):
                # answered here: at shutdown the reactor may be gone before it could translate
                err = ServingError(Code.CANCELLED, "Request cancelled")
            if err is None:
                err = blockingCallFromThread(reactor, as_serving_error, e)  # type: ignore[arg-type]
            code = err.code.name
            marker = node_unavailable_marker(err)
            if marker is not None:
                context.set_trailing_metadata(((NODE_UNAVAILABLE_KEY, marker),))
            context.abort(grpc_status(err), err.message)
            raise  # unreachable: abort raises
        finally:
            reactor.callFromThread(self.inflight.exit)  # type: ignore[attr-defined]
            self.metrics.request_done("grpc", short, code, time.monotonic() - started)

    def _run(
        self, context: grpc.ServicerContext, handler: IRequestHandler, method: str, ref: Any,
        payload: bytes, timeout: float | None, metadata: Metadata,
    ) -> bytes:
        """Run the handler on the reactor and wait here for its result, like
        blockingCallFromThread, but cancel it when the RPC ends first (the client cancelled, its
        deadline passed): the grpc thread must not wait for a result nobody will read."""
        from twisted.internet import reactor

        outcome: queue.Queue[Any] = queue.Queue(maxsize=1)
        running: list[defer.Deferred[bytes]] = []

        def start() -> None:
            d = defer.maybeDeferred(self._in_reactor, handler, method, ref, payload, timeout, metadata)
            running.append(d)
            # translated here, on the reactor: the grpc thread must not need the reactor once
            # the answer is in (it may be stopping); a cancel stays one (see the deadline check)
            d.addErrback(lambda f: f if f.check(defer.CancelledError) else Failure(as_serving_error(f)))
            d.addBoth(outcome.put)

        def cancel() -> None:
            for d in running:
                d.cancel()  # no effect once it has its result

        with self._waiting_lock:
            self._waiting.add(outcome)
        try:
            reactor.callFromThread(start)  # type: ignore[attr-defined]
            # callFromThread keeps order: cancel() always runs after start()
            if not context.add_callback(lambda: reactor.callFromThread(cancel)):  # type: ignore[attr-defined]
                reactor.callFromThread(cancel)  # type: ignore[attr-defined]  # the RPC is over already
            result = outcome.get()
        finally:
            with self._waiting_lock:
                self._waiting.discard(outcome)
        if isinstance(result, Failure):
            remaining = context.time_remaining()
            # a client whose deadline passes cancels the call itself, which can reach us a
            # little before our copy of its deadline (sent as a relative grpc-timeout, so ours
            # is later by the transit time): that is still its deadline, not a cancel
            if result.check(defer.CancelledError) and remaining is not None and remaining <= DEADLINE_SLACK:
                raise ServingError(Code.DEADLINE_EXCEEDED, "Deadline Exceeded")
            result.raiseException()
        reply: bytes = result
        return reply

    def _in_reactor(
        self, handler: IRequestHandler, method: str, ref: Any, payload: bytes, timeout: float | None,
        metadata: Metadata,
    ) -> defer.Deferred[bytes]:
        self.metrics.inflight.inc()
        d = handler.grpc(method, ref, payload, timeout, metadata)

        def done(result: Any) -> Any:
            self.metrics.inflight.dec()
            return result

        return d.addBoth(done)
