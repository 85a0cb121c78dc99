"""The gRPC health service on the client-facing port (grpc.health.v1: Check, Watch, List),
served by a generic handler beside TF Serving's methods.  A real grpc.aio server and client
on loopback."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from twisted.internet import defer
from twisted.trial import unittest

from tfscache.frontend.grpc_server import HEALTH_SERVICES, GrpcFrontend
from tfscache.metrics import Metrics
from tfscache.transport.grpc_client import as_deferred

from .test_grpc_budget import PREDICT, HoldingHandler, predict_request

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class GrpcHealthTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.handler = HoldingHandler()
        self.frontend = GrpcFrontend(self.handler, Metrics(), "127.0.0.1", 0)  # type: ignore[arg-type]
        self.frontend.startService()
        yield self.frontend.started
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.frontend.bound_port}")
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.addCleanup(lambda: as_deferred(self.channel.close()))
        self.addCleanup(self.frontend.stopService)

    def check(self, service: str) -> defer.Deferred[int]:
        async def go() -> int:
            reply = await self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
            return int(reply.status)
        return as_deferred(go())

    @defer.inlineCallbacks
    def test_check_follows_set_serving_for_every_service(self) -> Any:
        for name in HEALTH_SERVICES:
            self.assertEqual((yield self.check(name)), NOT_SERVING)
        yield self.frontend.set_serving(True)
        for name in HEALTH_SERVICES:
            self.assertEqual((yield self.check(name)), SERVING)

    @defer.inlineCallbacks
    def test_an_unknown_service_is_not_found(self) -> Any:
        try:
            yield self.check("no.such.Service")
        except grpc.aio.AioRpcError as e:
            self.assertEqual(e.code(), grpc.StatusCode.NOT_FOUND)
        else:
            self.fail("an unknown service was answered")

    @defer.inlineCallbacks
    def test_watch_streams_the_change(self) -> Any:
        stream = self.health.Watch(health_pb2.HealthCheckRequest(service=HEALTH_SERVICES[1]), timeout=30)
        first = yield as_deferred(stream.read())
        self.assertEqual(first.status, NOT_SERVING)
        self.frontend.set_serving(True)
        second = yield as_deferred(stream.read())
        self.assertEqual(second.status, SERVING)
        stream.cancel()

    @defer.inlineCallbacks
    def test_prediction_methods_still_reach_the_handler(self) -> Any:
        arrived = self.handler.arrival()
        predict = self.channel.unary_unary(PREDICT)

        async def go() -> bytes:
            reply: bytes = await predict(predict_request("m", 10), timeout=30)
            return reply
        call = as_deferred(go())
        yield arrived
        self.handler.held[0].callback(b"answer")
        self.assertEqual((yield call), b"answer")
