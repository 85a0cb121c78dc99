"""Forwarding gRPC calls: ``grpc.aio`` channels on the reactor's own asyncio loop.

A call is raw bytes in, raw bytes out (no serializers: only ``model_spec`` is ever read, by
the front end), returned as a Deferred; cancelling the Deferred cancels the call.  A failed
call is a ServingError with the call's status code.  No thread is involved: the reactor is
Twisted's asyncio reactor (``tfscache.reactor``), so the call runs on the loop the reactor
runs on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
from twisted.internet import defer
from twisted.python.failure import Failure

from tfscache.errors import NO_ROOM_KEY, NODE_UNAVAILABLE_KEY, Code, ServingError
from tfscache.reactor import event_loop
from tfscache.wire import Metadata

T = TypeVar("T")
CONNECT_TIMEOUT = 2.0     # a connect to another node slower than this fails over to the next owner


def channel_options(connect_timeout: float | None = CONNECT_TIMEOUT) -> list[tuple[str, int]]:
    """Options of a forwarding channel: no message size limit (the front end applied ours),
    reconnect quickly after a node comes back, and give up a connection attempt (TCP, TLS,
    HTTP/2 settings) after ``connect_timeout``, like a REST forward, so a black-holed owner fails
    over with UNAVAILABLE instead of using the whole deadline.  gRPC core has no option named
    for the connect timeout: it takes ``min_reconnect_backoff_ms`` as its minimum connect
    timeout (default 20 s), while the delay before the next attempt comes from
    ``initial_reconnect_backoff_ms``."""
    options = [
        ("grpc.max_receive_message_length", -1),
        ("grpc.max_send_message_length", -1),
        ("grpc.enable_retries", 0),
    ]
    if connect_timeout is not None:
        options += [
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", max(100, round(connect_timeout * 1000))),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
    return options


class GrpcChannel:
    """One aio channel to one target and its raw-bytes methods, made on first use (an aio
    channel belongs to the loop that is current when it is made: the reactor's)."""

    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None = None,
                 connect_timeout: float | None = CONNECT_TIMEOUT) -> None:
        self.target, self.credentials, self.connect_timeout = target, credentials, connect_timeout
        self._channel: grpc.aio.Channel | None = None
        self._methods: dict[str, Any] = {}

    def _method(self, method: str) -> Any:
        call = self._methods.get(method)
        if call is None:
            if self._channel is None:
                options = channel_options(self.connect_timeout)
                if self.credentials is None:
                    self._channel = grpc.aio.insecure_channel(self.target, options=options)
                else:
                    self._channel = grpc.aio.secure_channel(self.target, self.credentials, options=options)
            call = self._methods[method] = self._channel.unary_unary(method)
        return call

    def call(self, method: str, payload: bytes, timeout: float | None,
             metadata: Metadata | None = None) -> defer.Deferred[bytes]:
        """Call ``method``; fires with the reply's bytes or fails with a ServingError."""
        call = self._method(method)(payload, timeout=timeout, metadata=metadata or None)
        # grpc.aio runs each call as a task of its own, which returns the reply's bytes (or EOF
        # for a status other than OK): the Deferred follows that task, rather than a second task
        # awaiting the call (measured: the second task was ~5% of the reactor thread's time)
        invocation: asyncio.Task[Any] | None = getattr(call, "_invocation_task", None)
        if invocation is None:  # another grpc.aio than the one measured
            return as_deferred(_outcome(call, self.target))
        d: defer.Deferred[bytes] = defer.Deferred(lambda _d: call.cancel())
        invocation.add_done_callback(lambda task: _settle(d, task, call, self.target))
        return d

    def close(self, grace: float | None = None) -> defer.Deferred[None]:
        """Close the channel; calls still running get CANCELLED after ``grace`` seconds."""
        channel, self._channel = self._channel, None
        self._methods.clear()
        if channel is None:
            return defer.succeed(None)
        return as_deferred(channel.close(grace))


def as_deferred(coroutine: Coroutine[Any, Any, T]) -> defer.Deferred[T]:
    """Run an asyncio coroutine as a task on the reactor's loop; cancelling the Deferred
    cancels the task, and fails it with Twisted's CancelledError (asyncio's is a
    BaseException, which Twisted code does not expect)."""
    return defer.Deferred.fromFuture(event_loop().create_task(coroutine)).addErrback(_twisted_cancel)


def _twisted_cancel(failure: Failure) -> Failure:
    if failure.check(asyncio.CancelledError):
        return Failure(defer.CancelledError())
    return failure


def _settle(d: defer.Deferred[bytes], task: asyncio.Task[Any], call: Any, target: str) -> None:
    """The call's task is done: its bytes are the reply; anything else (a status other than
    OK, a cancel) is read back by awaiting the call, which raises what it ended with."""
    if d.called:  # cancelled: the Deferred has failed already
        return
    if not task.cancelled() and task.exception() is None:
        reply = task.result()
        if isinstance(reply, bytes):
            d.callback(reply)
            return
    # the Deferred may be cancelled while the call is read back: then nobody waits for it
    as_deferred(_outcome(call, target)).addBoth(_relay, d)


def _relay(result: bytes | Failure, d: defer.Deferred[bytes]) -> None:
    if not d.called:
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)


async def _outcome(call: Any, target: str) -> bytes:
    try:
        reply: bytes = await call
    except grpc.aio.AioRpcError as e:
        raise rpc_error_to_serving_error(e, target) from None
    return reply


def rpc_error_to_serving_error(e: grpc.RpcError, target: str = "") -> ServingError:
    """UNAVAILABLE is node-wide unless the server's trailing metadata says it is about one
    model only: a failed connection has no server metadata at all, and a server other than
    tfscache (TF Serving) means itself when it says UNAVAILABLE.  RESOURCE_EXHAUSTED is
    ``no_room`` only when a tfscache node says so (NO_ROOM_KEY)."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = (e.details() if hasattr(e, "details") else None) or str(code)
    node_wide = no_room = False
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
        trailers = tuple((e.trailing_metadata() if hasattr(e, "trailing_metadata") else None) or ())
        node_wide = code == grpc.StatusCode.UNAVAILABLE and (NODE_UNAVAILABLE_KEY, "0") not in trailers
        no_room = code == grpc.StatusCode.RESOURCE_EXHAUSTED and (NO_ROOM_KEY, "1") in trailers
    return ServingError(Code(code.value[0]), details, node_wide, no_room)
