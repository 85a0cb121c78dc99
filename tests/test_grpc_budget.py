"""The gRPC API bounds the request bytes its calls hold together (``listen.max_buffered_bytes``,
as REST bounds its bodies): a call waiting (for a cold model, say) keeps its request, and a
call that would take the total over the bound gets RESOURCE_EXHAUSTED at once; once the
waiting call ends its bytes are free again.  A real grpc.aio server and client on loopback."""

from __future__ import annotations

from typing import Any

import grpc
from twisted.internet import defer
from twisted.trial import unittest

from tfscache.frontend.grpc_server import GrpcFrontend, GrpcLimits
from tfscache.metrics import Metrics
from tfscache.proto import model_spec_pb2
from tfscache.transport.grpc_client import as_deferred

PREDICT = "/tensorflow.serving.PredictionService/Predict"


def predict_request(name: str, size: int) -> bytes:
    """A Predict request for ``name`` of about ``size`` bytes: the model spec and an unknown
    field of padding (the front end reads only the spec)."""
    spec = model_spec_pb2.ModelSpecCarrier(model_spec=model_spec_pb2.ModelSpec(name=name)).SerializeToString()
    pad = b"\0" * size
    length = len(pad)
    varint = b""
    while True:
        byte, length = length & 0x7F, length >> 7
        varint += bytes([byte | (0x80 if length else 0)])
        if not length:
            break
    return spec + b"\x7a" + varint + pad  # field 15, length-delimited


class HoldingHandler:
    """Answers each call when the test says so."""

    def __init__(self) -> None:
        self.held: list[defer.Deferred[bytes]] = []
        self._arrival: defer.Deferred[None] | None = None

    def arrival(self) -> defer.Deferred[None]:
        """Fires when the next call reaches the handler."""
        self._arrival = defer.Deferred()
        return self._arrival

    def grpc(self, method: str, ref: Any, payload: bytes, timeout: float | None, metadata: Any = ()) -> Any:
        d: defer.Deferred[bytes] = defer.Deferred()
        self.held.append(d)
        arrival, self._arrival = self._arrival, None
        if arrival is not None:
            arrival.callback(None)
        return d

    def rest(self, call: Any, request: Any) -> Any:
        raise NotImplementedError


class GrpcBudgetTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.handler = HoldingHandler()
        self.frontend = GrpcFrontend(self.handler, Metrics(), "127.0.0.1", 0,  # type: ignore[arg-type]
                                     limits=GrpcLimits(max_buffered=150_000))
        self.frontend.startService()
        yield self.frontend.started
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.frontend.bound_port}")
        self.predict = self.channel.unary_unary(PREDICT)
        self.addCleanup(lambda: as_deferred(self.channel.close()))
        self.addCleanup(self.frontend.stopService)

    def call(self, payload: bytes) -> defer.Deferred[bytes]:
        async def go() -> bytes:
            reply: bytes = await self.predict(payload, timeout=30)
            return reply
        return as_deferred(go())

    @defer.inlineCallbacks
    def test_a_call_over_the_budget_is_refused_while_another_holds_its_bytes(self) -> Any:
        arrived = self.handler.arrival()
        first = self.call(predict_request("m", 100_000))
        yield arrived  # the first call waits in the handler, holding its bytes
        self.assertEqual(self.frontend.buffered, len(predict_request("m", 100_000)))
        try:
            yield self.call(predict_request("m", 100_000))
        except grpc.aio.AioRpcError as e:
            self.assertEqual(e.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
            self.assertIn("listen.max_buffered_bytes", e.details() or "")
        else:
            self.fail("the second call was not refused")
        self.assertEqual(len(self.handler.held), 1)  # the refused one never reached the handler
        self.handler.held[0].callback(b"")
        self.assertEqual((yield first), b"")
        self.assertEqual(self.frontend.buffered, 0)
        # the budget is free again: the same call is now taken
        arrived = self.handler.arrival()
        again = self.call(predict_request("m", 100_000))
        yield arrived
        self.handler.held[1].callback(b"")
        self.assertEqual((yield again), b"")
