"""GrpcChannel: the forward's Deferred follows grpc.aio's own task for the call; a real
grpc.aio server on loopback answers."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from twisted.internet import defer
from twisted.trial import unittest

from tfscache.errors import Code, ServingError
from tfscache.transport import grpc_client
from tfscache.transport.grpc_client import GrpcChannel, as_deferred

METHOD = "/test.Echo/Call"


class _Handler(grpc.GenericRpcHandler):
    def service(self, details: Any) -> grpc.RpcMethodHandler | None:
        if details.method != METHOD:
            return None

        async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            if request == b"unavailable":
                await context.abort(grpc.StatusCode.UNAVAILABLE, "not now")
            return b"echo:" + request

        return grpc.unary_unary_rpc_method_handler(call)


class GrpcChannelTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.server = grpc.aio.server(handlers=[_Handler()])
        port = self.server.add_insecure_port("127.0.0.1:0")
        yield as_deferred(self.server.start())
        self.addCleanup(lambda: as_deferred(self.server.stop(0)))
        self.target = f"127.0.0.1:{port}"
        self.channel = GrpcChannel(self.target)
        self.addCleanup(self.channel.close)

    @defer.inlineCallbacks
    def test_reply_and_status(self):  # type: ignore[no-untyped-def]
        reply = yield self.channel.call(METHOD, b"x", 10.0)
        self.assertEqual(reply, b"echo:x")
        err = yield self.assertFailure(self.channel.call(METHOD, b"unavailable", 10.0), ServingError)
        self.assertEqual((err.code, err.message), (Code.UNAVAILABLE, "not now"))

    @defer.inlineCallbacks
    def test_cancel_while_the_status_is_read_back(self):  # type: ignore[no-untyped-def]
        """The call's task ends with a status other than OK, the status is read back by awaiting
        the call, and the Deferred is cancelled in between: it fails once, with CancelledError
        (it used to be failed a second time by the read-back: AlreadyCalledError)."""
        call = self.channel._method(METHOD)(b"unavailable", timeout=10.0)
        d: defer.Deferred[bytes] = defer.Deferred(lambda _d: call.cancel())
        task = call._invocation_task
        task.add_done_callback(lambda t: grpc_client._settle(d, t, call, self.target))
        task.add_done_callback(lambda _t: d.cancel())  # runs after _settle started the read-back
        yield self.assertFailure(d, defer.CancelledError)
        # the read-back ends on the loop's next turns; nothing may fail then (trial would report
        # an AlreadyCalledError logged there)
        for _ in range(3):
            yield as_deferred(_tick())


async def _tick() -> None:
    await asyncio.sleep(0)  # one turn of the loop (the read-back's), not a wait for time
