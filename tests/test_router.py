"""The router over real HTTP and gRPC: small in-process nodes made of the real RestFrontend
and GrpcBridge over a tiny request handler that answers with its node id."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import grpc
import treq
from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from tests.harness.process import unused_port
from tfscache.cluster.discovery.static import StaticDiscovery
from tfscache.cluster.members import Member
from tfscache.cluster.ring import owners
from tfscache.cluster.router import CONNECT_TIMEOUT, Router
from tfscache.errors import Code, ServingError, no_room
from tfscache.frontend.grpc_server import GrpcFrontend
from tfscache.frontend.rest import RestFrontend
from tfscache.metrics import Metrics
from tfscache.modelspec import ModelRef, RestCall, parse_rest_path
from tfscache.proto import model_spec_pb2
from tfscache.transport.grpc_client import as_deferred
from tfscache.transport.http_server import listen
from tfscache.util.grpc_twisted import future_to_deferred
from tfscache.wire import HttpReply, HttpRequest

PREDICT = "/tensorflow.serving.PredictionService/Predict"


def predict_payload(name: str) -> bytes:
    spec = model_spec_pb2.ModelSpec(name=name).SerializeToString()
    return b"\x0a" + bytes([len(spec)]) + spec + b"\x12\x03abc"  # model_spec + opaque bytes


class TinyHandler:
    """An IRequestHandler that answers with its node id; modes make it fail or wait."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.mode = "ok"  # ok | unavailable | notfound | hold | down
        # models whose copy fails here (a full disk): UNAVAILABLE about that model only
        self.failing: set[str] = set()
        # models there is no room for here (every slot in use): RESOURCE_EXHAUSTED, no-room
        self.full: set[str] = set()
        self.rest_calls: list[HttpRequest] = []
        self.grpc_calls: list[tuple[str, bytes, float | None]] = []
        self.grpc_metadata: list[tuple[tuple[str, Any], ...]] = []
        self.held: list[defer.Deferred[Any]] = []

    def _answer(self, make: Any, name: str = "") -> defer.Deferred[Any]:
        if name in self.full:
            return defer.fail(no_room(f"No room to load model {name} version 1 on {self.node_id}"))
        if self.mode == "too_large":  # a RESOURCE_EXHAUSTED that is not about room for a model
            return defer.fail(ServingError(Code.RESOURCE_EXHAUSTED, "Received message larger than max"))
        if name in self.failing:
            return defer.fail(ServingError(
                Code.UNAVAILABLE, f"Could not copy model {name} version 1 into the cache: "
                "No space left on device (errno 28)"))
        if self.mode == "down":  # as the local node says when its TF Serving is unreachable
            return defer.fail(ServingError(
                Code.UNAVAILABLE, "TF Serving REST API is unreachable: ConnectionRefusedError", node_wide=True))
        if self.mode == "unavailable":
            return defer.fail(ServingError(Code.UNAVAILABLE, f"{self.node_id} is unavailable"))
        if self.mode == "notfound":
            return defer.fail(ServingError(Code.NOT_FOUND, "Servable not found for request: Latest(x)"))
        if self.mode == "hold":
            d: defer.Deferred[Any] = defer.Deferred()
            self.held.append(d)
            return d.addCallback(lambda _: make())
        return defer.succeed(make())

    def rest(self, call: RestCall, request: HttpRequest) -> defer.Deferred[HttpReply]:
        self.rest_calls.append(request)
        forwarded = any(k.lower() == b"x-tfscache-forwarded" for k, _v in request.headers)
        body = {"node": self.node_id, "model": call.ref.name, "forwarded": forwarded,
                "method": request.method.decode(), "path": request.path.decode(),
                "body": request.body.decode()}
        return self._answer(lambda: HttpReply(
            200, json.dumps(body).encode(), [(b"content-type", b"application/json"),
                                             (b"x-node", self.node_id.encode())]), call.ref.name)

    def grpc(self, method: str, ref: ModelRef, payload: bytes, timeout: float | None,
             metadata: Any = ()) -> defer.Deferred[bytes]:
        self.grpc_calls.append((method, payload, timeout))
        self.grpc_metadata.append(tuple(metadata))
        return self._answer(lambda: self.node_id.encode() + b"|" + payload, ref.name)

    def release(self) -> None:
        held, self.held = self.held, []
        for d in held:
            if not d.called:
                d.callback(None)


class Node:
    """A RestFrontend and a GrpcBridge: not-forwarded requests go to this node's router,
    forwarded ones to its tiny handler."""

    def __init__(self, node_id: str) -> None:
        self.id = node_id
        self.tiny = TinyHandler(node_id)
        self.metrics = Metrics()
        self.router: Router | None = None
        self.routed = 0  # requests that reached this node's router (not forwarded ones)
        self.rest_frontend = RestFrontend(self, self.metrics, local=self.tiny)
        self.grpc_bridge = GrpcFrontend(self, self.metrics, "127.0.0.1", 0, local=self.tiny)
        self.port: Any = None

    @defer.inlineCallbacks
    def start(self):  # type: ignore[no-untyped-def]
        self.port = yield as_deferred(listen(self.rest_frontend.factory(reactor), "127.0.0.1", 0))
        self.grpc_bridge.startService()
        yield self.grpc_bridge.started
        return self

    @property
    def member(self) -> Member:
        assert self.grpc_bridge.bound_port is not None
        return Member(self.id, "127.0.0.1", self.port.port, self.grpc_bridge.bound_port)

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.port.port}"

    # the handler the front ends call for requests that were not forwarded
    def rest(self, call: RestCall, request: HttpRequest) -> defer.Deferred[HttpReply]:
        self.routed += 1
        assert self.router is not None
        return self.router.rest(call, request)

    def grpc(self, method: str, ref: ModelRef, payload: bytes, timeout: float | None,
             metadata: Any = ()) -> defer.Deferred[bytes]:
        self.routed += 1
        assert self.router is not None
        return self.router.grpc(method, ref, payload, timeout, metadata)

    @defer.inlineCallbacks
    def stop(self):  # type: ignore[no-untyped-def]
        self.tiny.release()
        if self.router is not None:
            yield self.router.close()
        self.port.stop()
        self.port.factory.close_idle()
        yield self.grpc_bridge.stopService()


def black_hole(test: unittest.TestCase) -> int:
    """A loopback port whose connects neither succeed nor fail (a black-holed host): a
    listening socket with a full accept queue, whose kernel drops new SYNs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port: int = listener.getsockname()[1]
    sockets = [listener]
    for _ in range(3):  # fill the accept queue (backlog 0 holds one or two on Linux)
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        sockets.append(s)
    test.addCleanup(lambda: [s.close() for s in sockets])
    probe = socket.socket()
    probe.settimeout(0.5)
    try:
        probe.connect(("127.0.0.1", port))
    except TimeoutError:
        return port
    except OSError as e:
        raise unittest.SkipTest(f"no black hole on this system's loopback: {e}")
    finally:
        probe.close()
    raise unittest.SkipTest("no black hole on this system's loopback: the connect succeeded")


def count(metrics: Metrics, target: str, outcome: str) -> float:
    return metrics.forwards.labels(target=target, outcome=outcome)._value.get()


class RouterTestCase(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def cluster(self, ids=("a", "b", "c"), dead=(), replicas=2, forward_timeout=5.0,  # type: ignore[no-untyped-def]
                spread_threshold=100, down_seconds=3.0, holes=(), spill_over=True):
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        nodes = {}
        for i in ids:
            nodes[i] = yield Node(i).start()
            self.addCleanup(nodes[i].stop)
        members = [n.member for n in nodes.values()]
        members += [Member(d, "127.0.0.1", unused_port(), unused_port()) for d in dead]
        members += [Member(h, "127.0.0.1", black_hole(self), black_hole(self)) for h in holes]
        self.members = members
        for n in nodes.values():
            n.router = Router(n.tiny, StaticDiscovery(members, n.member), n.id, replicas, forward_timeout,
                              spread_threshold, n.metrics, reactor, down_seconds=down_seconds,
                              spill_over=spill_over)
        self.channels: list[grpc.Channel] = []
        self.addCleanup(lambda: [c.close() for c in self.channels])
        return nodes

    def name_owned_by(self, *order: str) -> str:
        """A model name whose rendezvous owners start with ``order``."""
        for i in range(100000):
            name = f"model-{i}"
            got = [m.id for m in owners(name, self.members, len(order))]
            if got == list(order):
                return name
        raise AssertionError(f"no name owned by {order}")

    @defer.inlineCallbacks
    def post(self, node: Node, name: str, body: bytes = b'{"instances": [1]}'):  # type: ignore[no-untyped-def]
        resp = yield treq.post(f"{node.rest_url}/v1/models/{name}:predict", data=body, pool=self.pool,
                               headers={b"content-type": [b"application/json"]})
        content = yield treq.content(resp)
        return resp, content

    def grpc_call(self, node: Node, name: str, timeout: float = 10.0,
                  metadata: Any = None) -> defer.Deferred[bytes]:
        channel = grpc.insecure_channel(f"127.0.0.1:{node.grpc_bridge.bound_port}")
        self.channels.append(channel)
        future = channel.unary_unary(PREDICT).future(predict_payload(name), timeout=timeout, metadata=metadata)
        return future_to_deferred(reactor, future)

    @defer.inlineCallbacks
    def until(self, condition, timeout: float = 5.0, what=None):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met in time{': ' + repr(what()) if what else ''}")
            yield deferLater(0.01)

    def direct(self, node: Node, name: str) -> defer.Deferred[HttpReply]:
        """The router of ``node`` called in-process, as its front end would."""
        path = f"/v1/models/{name}:predict"
        assert node.router is not None
        return node.router.rest(parse_rest_path("POST", path),
                                HttpRequest(b"POST", path.encode(), [(b"content-type", b"application/json")],
                                            b'{"instances": [1]}'))


class RoutingTests(RouterTestCase):
    @defer.inlineCallbacks
    def test_rest_goes_to_the_owner_with_the_marker(self):  # type: ignore[no-untyped-def]
        nodes = yield self.cluster()
        a = nodes["a"]
        for owner in ("b", "c"):
            name = self.name_owned_by(owner)
            resp, content = yield self.post(a, name, b'{"instances": [42]}')
            self.assertEqual(resp.code, 200)
            reply = json.loads(content)
            self.assertEqual(reply["node"], owner)
            self.assertTrue(reply["forwarded"])  # the marker reached the owner
            self.assertEqual(reply["path"], f"/v1/models/{name}:predict")
            self.assertEqual(reply["body"], '{"instances": [42]}')
            self.assertEqual(resp.headers.getRawHeaders(b"x-node"), [owner.encode()])
            self.assertEqual(count(a.metrics, owner, "ok"), 1)
        # the owners served the forwarded requests themselves: their routers saw nothing
        self.assertEqual((a.routed, nodes["b"].routed, nodes["c"].routed), (2, 0, 0))
        self.assertEqual(a.tiny.rest_calls, [])
        self.assertEqual(a.metrics.retries._value.get(), 0)

    @defer.inlineCallbacks
    def test_grpc_goes_to_the_owner_with_the_marker(self):  # type: ignore[no-untyped-def]
        nodes = yield self.cluster()
        a = nodes["a"]
        for owner in ("b", "c"):
            name = self.name_owned_by(owner)
            reply = yield self.grpc_call(a, name)
            self.assertEqual(reply, owner.encode() + b"|" + predict_payload(name))
            self.assertEqual(count(a.metrics, owner, "ok"), 1)
        self.assertEqual((a.routed, nodes["b"].routed, nodes["c"].routed), (2, 0, 0))
        self.assertEqual(len(nodes["b"].tiny.grpc_calls), 1)
        self.assertEqual(a.tiny.grpc_calls, [])

    @defer.inlineCallbacks
    def test_grpc_client_metadata_travels_with_the_call(self):  # type: ignore[no-untyped-def]
        """The client's own metadata (text and binary) reaches the owner's handler, locally and
        after a hop, as REST headers do; the transport's keys and the hop marker do not."""
        nodes = yield self.cluster()
        a = nodes["a"]
        sent = (("x-request-id", "req-42"), ("authorization", "Bearer for-a-proxy"),
                ("trace-bin", b"\x00\x01\xff"))
        for owner in ("a", "b"):
            name = self.name_owned_by(owner)
            yield self.grpc_call(a, name, metadata=sent)
            received = nodes[owner].tiny.grpc_metadata[-1]
            self.assertEqual([kv for kv in received if kv[0] in dict(sent)], list(sent), owner)
            keys = {k for k, _v in received}
            self.assertFalse(keys & {"x-tfscache-forwarded", "user-agent"}, received)
            self.assertFalse([k for k in keys if k.startswith(("grpc-", ":"))], received)

    @defer.inlineCallbacks
    def test_local_owner_is_served_without_a_hop(self):  # type: ignore[no-untyped-def]
        nodes = yield self.cluster()
        a = nodes["a"]
        name = self.name_owned_by("a")
        resp, content = yield self.post(a, name)
        self.assertEqual(json.loads(content)["node"], "a")
        self.assertFalse(json.loads(content)["forwarded"])
        reply = yield self.grpc_call(a, name)
        self.assertTrue(reply.startswith(b"a|"))
        self.assertEqual(count(a.metrics, "local", "ok"), 2)
        self.assertEqual(len(a.tiny.rest_calls) + len(a.tiny.grpc_calls), 2)
        for other in ("b", "c"):
            self.assertEqual((nodes[other].tiny.rest_calls, nodes[other].tiny.grpc_calls), ([], []))

    @defer.inlineCallbacks
    def test_owners_are_the_rendezvous_owners(self):  # type: ignore[no-untyped-def]
        nodes = yield self.cluster(replicas=2)
        for i in range(50):
            name = f"m{i}"
            expected = owners(name, self.members, 2)
            for n in nodes.values():
                self.assertEqual(n.router.owners_for(name), expected)

    @defer.inlineCallbacks
    def test_not_failover_errors_pass_through(self):  # type: ignore[no-untyped-def]
        nodes = yield self.cluster()
        a, b = nodes["a"], nodes["b"]
        b.tiny.mode = "notfound"
        name = self.name_owned_by("b", "c")
        resp, content = yield self.post(a, name)
        self.assertEqual(resp.code, 404)
        self.assertEqual(json.loads(content), {"error": "Servable not found for request: Latest(x)"})
        err = yield self.assertFailure(self.grpc_call(a, name), ServingError)
        self.assertEqual((err.code, err.message), (Code.NOT_FOUND, "Servable not found for request: Latest(x)"))
        self.assertEqual(nodes["c"].tiny.rest_calls + nodes["c"].tiny.grpc_calls, [])
        self.assertEqual(a.metrics.retries._value.get(), 0)

    @defer.inlineCallbacks
    def test_no_members_known_serves_locally(self):  # type: ignore[no-untyped-def]
        nodes = yield self.cluster(ids=("a",))
        a = nodes["a"]

        class Empty(StaticDiscovery):
            def members(self) -> list[Member]:
                return []

        a.router = Router(a.tiny, Empty([], a.member), "a", 2, 5.0, 10, a.metrics, reactor)
        reply = yield self.direct(a, "anything")
        self.assertEqual(json.loads(reply.body)["node"], "a")


class FailoverTests(RouterTestCase):
    @defer.inlineCallbacks
    def test_refused_owner_fails_over_and_is_remembered_down(self):  # type: ignore[no-untyped-def]
        nodes = yield self.cluster(ids=("a", "b"), dead=("dead",))
        a = nodes["a"]
        name = self.name_owned_by("dead", "b")
        resp, content = yield self.post(a, name)
        self.assertEqual((resp.code, json.loads(content)["node"]), (200, "b"))
        self.assertEqual(count(a.metrics, "dead", "failover"), 1)
        self.assertEqual(a.metrics.retries._value.get(), 1)
        self.assertTrue(a.router.is_down("dead"))
        # the next requests try b first: no new retry
        resp, content = yield self.post(a, name)
        self.assertEqual(json.loads(content)["node"], "b")
        reply = yield self.grpc_call(a, name)
        self.assertTrue(reply.startswith(b"b|"))
        self.assertEqual(a.metrics.retries._value.get(), 1)
        self.assertEqual(count(a.metrics, "dead", "failover"), 1)

    @defer.inlineCallbacks
    def test_grpc_refused_owner_fails_over(self):  # type: ignore[no-untyped-def]
        nodes = yield self.cluster(ids=("a", "b"), dead=("dead",))
        a = nodes["a"]
        name = self.name_owned_by("dead", "b")
        reply = yield self.grpc_call(a, name)
        self.assertTrue(reply.startswith(b"b|"))
        self.assertEqual(count(a.metrics, "dead", "failover"), 1)
        self.assertEqual(a.metrics.retries._value.get(), 1)

    @defer.inlineCallbacks
    def test_grpc_connection_failures_mark_the_owner_down(self):  # type: ignore[no-untyped-def]
        """A gRPC UNAVAILABLE with no answer from the owner (refused, black-holed) carries no
        model-only marker: the owner is down for every model, as with REST."""
        nodes = yield self.cluster(ids=("a", "b"), dead=("dead",), holes=("hole",))
        a = nodes["a"]
        for gone in ("dead", "hole"):
            reply = yield self.grpc_call(a, self.name_owned_by(gone, "b"))
            self.assertTrue(reply.startswith(b"b|"), gone)
            self.assertTrue(a.router.is_down(gone), gone)

    @defer.inlineCallbacks
    def test_black_holed_owner_fails_over_at_the_connect_timeout(self):  # type: ignore[no-untyped-def]
        # an owner whose host vanished: connects hang; both protocols give up after the connect
        # timeout and fail over, well within the request's deadline (10 s): b's answer (gRPC:
        # not DEADLINE_EXCEEDED) and the two failovers counted (not timeouts) say so
        nodes = yield self.cluster(ids=("a", "b"), holes=("hole",), down_seconds=0.0)
        a = nodes["a"]
        name = self.name_owned_by("hole", "b")
        for label, call in (("grpc", lambda: self.grpc_call(a, name, timeout=10.0)),
                            ("rest", lambda: self.post(a, name))):
            started = time.monotonic()
            reply = yield call()
            took = time.monotonic() - started
            served_by = reply[:2] if label == "grpc" else json.loads(reply[1])["node"].encode()
            self.assertEqual(served_by, b"b|" if label == "grpc" else b"b", label)
            self.assertGreater(took, CONNECT_TIMEOUT * 0.9, label)  # it did wait for the connect
        self.assertEqual(count(a.metrics, "hole", "failover"), 2)

    @defer.inlineCallbacks
    def test_unavailable_and_503_fail_over(self):  # type: ignore[no-untyped-def]
        nodes = yield self.cluster(down_seconds=0.0)
        a = nodes["a"]
        nodes["b"].tiny.mode = "unavailable"
        name = self.name_owned_by("b", "c")
        resp, content = yield self.post(a, name)  # b answers 503
        self.assertEqual((resp.code, json.loads(content)["node"]), (200, "c"))
        reply = yield self.grpc_call(a, name)  # b answers UNAVAILABLE
        self.assertTrue(reply.startswith(b"c|"))
        self.assertEqual(count(a.metrics, "b", "failover"), 2)
        self.assertEqual(len(nodes["b"].tiny.rest_calls), 1)
        self.assertEqual(len(nodes["b"].tiny.grpc_calls), 1)
        self.assertEqual(a.metrics.retries._value.get(), 2)

    @defer.inlineCallbacks
    def test_local_unavailable_fails_over(self):  # type: ignore[no-untyped-def]
        nodes = yield self.cluster()
        a = nodes["a"]
        a.tiny.mode = "unavailable"
        name = self.name_owned_by("a", "b")
        reply = yield self.direct(a, name)
        self.assertEqual(json.loads(reply.body)["node"], "b")
        self.assertEqual(count(a.metrics, "local", "failover"), 1)

    @defer.inlineCallbacks
    def test_model_scoped_unavailable_fails_over_without_demoting_the_owner(self):  # type: ignore[no-untyped-def]
        """b cannot copy one model (disk full): that model's requests fail over to c, and b
        stays the first choice for its other models, over REST, gRPC and locally."""
        nodes = yield self.cluster(ids=("a", "b", "c", "d"))
        a, b, d = nodes["a"], nodes["b"], nodes["d"]
        broken, other = self.name_owned_by("b", "c"), self.name_owned_by("b", "d")
        b.tiny.failing.add(broken)
        resp, content = yield self.post(a, broken)
        self.assertEqual((resp.code, json.loads(content)["node"]), (200, "c"))
        self.assertFalse(resp.headers.hasHeader(b"x-tfscache-node-unavailable"))
        reply = yield self.grpc_call(d, broken)  # another router: its own view of b
        self.assertTrue(reply.startswith(b"c|"))
        for router in (a.router, d.router):
            self.assertFalse(router.is_down("b"))
        self.assertEqual((count(a.metrics, "b", "failover"), count(d.metrics, "b", "failover")), (1, 1))
        resp, content = yield self.post(a, other)
        self.assertEqual(json.loads(content)["node"], "b")
        reply = yield self.grpc_call(d, other)
        self.assertTrue(reply.startswith(b"b|"))
        self.assertEqual((a.metrics.retries._value.get(), d.metrics.retries._value.get()), (1, 1))
        # the same on the owner itself: the local failure fails over, the node serves the rest
        mine, mine_too = self.name_owned_by("b", "c"), self.name_owned_by("b", "a")
        b.tiny.failing = {mine}
        reply = yield self.direct(b, mine)
        self.assertEqual(json.loads(reply.body)["node"], "c")
        reply = yield self.direct(b, mine_too)
        self.assertEqual(json.loads(reply.body)["node"], "b")
        self.assertFalse(b.router.is_down("b"))
        self.assertEqual(count(b.metrics, "local", "failover"), 1)
        # when every owner fails that way the client gets the last owner's 503, unmarked
        nodes["c"].tiny.failing.add(broken)
        resp, content = yield self.post(a, broken)
        self.assertEqual(resp.code, 503)
        self.assertIn(f"Could not copy model {broken}", json.loads(content)["error"])
        self.assertFalse(resp.headers.hasHeader(b"x-tfscache-node-unavailable"))
        self.assertFalse(a.router.is_down("c"))

    @defer.inlineCallbacks
    def test_draining_owner_is_demoted_for_every_model(self):  # type: ignore[no-untyped-def]
        nodes = yield self.cluster(ids=("a", "b", "c", "d"))
        a, b, d = nodes["a"], nodes["b"], nodes["d"]
        first, second = self.name_owned_by("b", "c"), self.name_owned_by("b", "d")
        # what the node's drain does to its front ends
        b.rest_frontend.draining, b.grpc_bridge.accepting = True, False
        resp, content = yield self.post(a, first)
        self.assertEqual((resp.code, json.loads(content)["node"]), (200, "c"))
        reply = yield self.grpc_call(d, first)
        self.assertTrue(reply.startswith(b"c|"))
        for router in (a.router, d.router):
            self.assertTrue(router.is_down("b"))
        # tried last for the other models too: no new failover, no new retry
        resp, content = yield self.post(a, second)
        self.assertEqual(json.loads(content)["node"], "d")
        reply = yield self.grpc_call(d, second)
        self.assertTrue(reply.startswith(b"d|"))
        self.assertEqual((count(a.metrics, "b", "failover"), count(d.metrics, "b", "failover")), (1, 1))
        self.assertEqual((a.metrics.retries._value.get(), d.metrics.retries._value.get()), (1, 1))

    @defer.inlineCallbacks
    def test_node_wide_unavailable_demotes_the_owner(self):  # type: ignore[no-untyped-def]
        """The owner's TF Serving is unreachable (node-wide), on the owner and on the routers
        forwarding to it."""
        nodes = yield self.cluster(ids=("a", "b", "c", "d"))
        a, b, d = nodes["a"], nodes["b"], nodes["d"]
        b.tiny.mode = "down"
        first, second = self.name_owned_by("b", "c"), self.name_owned_by("b", "d")
        resp, content = yield self.post(a, first)
        self.assertEqual(json.loads(content)["node"], "c")
        reply = yield self.grpc_call(d, first)
        self.assertTrue(reply.startswith(b"c|"))
        reply = yield self.direct(b, first)  # b's own router, serving locally first
        self.assertEqual(json.loads(reply.body)["node"], "c")
        for router in (a.router, d.router, b.router):
            self.assertTrue(router.is_down("b"))
        resp, content = yield self.post(a, second)
        self.assertEqual(json.loads(content)["node"], "d")
        self.assertEqual(count(a.metrics, "b", "failover"), 1)
        self.assertEqual(count(b.metrics, "local", "failover"), 1)

    @defer.inlineCallbacks
    def test_at_most_replicas_tries(self):  # type: ignore[no-untyped-def]
        nodes = yield self.cluster(ids=("a", "b", "c", "d"), replicas=2)
        a = nodes["a"]
        for n in ("b", "c", "d"):
            nodes[n].tiny.mode = "unavailable"
        name = self.name_owned_by("b", "c")
        resp, content = yield self.post(a, name)
        self.assertEqual(resp.code, 503)  # the last owner's own answer
        self.assertEqual(json.loads(content), {"error": "c is unavailable"})
        err = yield self.assertFailure(self.grpc_call(a, self.name_owned_by("c", "d")), ServingError)
        self.assertEqual(err.code, Code.UNAVAILABLE)
        tried = sum(len(nodes[n].tiny.rest_calls) for n in "abcd")
        self.assertEqual(tried, 2)
        self.assertEqual(sum(len(nodes[n].tiny.grpc_calls) for n in "abcd"), 2)
        self.assertEqual(a.metrics.retries._value.get(), 2)

    @defer.inlineCallbacks
    def test_hanging_owner_is_deadline_exceeded(self):  # type: ignore[no-untyped-def]
        nodes = yield self.cluster(forward_timeout=0.5)
        a = nodes["a"]
        nodes["b"].tiny.mode = "hold"
        name = self.name_owned_by("b", "c")
        # each ends at the router's 0.5 s forward timeout (b never answers): DEADLINE_EXCEEDED,
        # counted as the router's "timeout" below (or the gRPC client's own cancel at 0.5 s)
        err = yield self.assertFailure(self.direct(a, name), ServingError)
        self.assertEqual(err.code, Code.DEADLINE_EXCEEDED)
        resp, content = yield self.post(a, name)
        self.assertEqual(resp.code, 504)
        err = yield self.assertFailure(self.grpc_call(a, name, timeout=0.5), ServingError)
        self.assertEqual(err.code, Code.DEADLINE_EXCEEDED)
        # the gRPC client's deadline is the router's budget: the router's timer and the client's
        # own cancel at its deadline race, so that forward counts as "timeout" or "cancelled"
        outcomes = lambda: {o: count(a.metrics, "b", o) for o in ("timeout", "cancelled", "error", "ok")}  # noqa: E731
        yield self.until(lambda: outcomes()["timeout"] + outcomes()["cancelled"] == 3, what=outcomes)
        self.assertGreaterEqual(outcomes()["timeout"], 2, outcomes())
        self.assertEqual(nodes["c"].tiny.rest_calls + nodes["c"].tiny.grpc_calls, [])  # no retry
        # b's front end ends the requests the router gave up on quietly
        self.assertEqual(self.flushLoggedErrors(defer.CancelledError), [])


    @defer.inlineCallbacks
    def test_client_gone_stops_the_route(self):  # type: ignore[no-untyped-def]
        nodes = yield self.cluster()
        a, b = nodes["a"], nodes["b"]
        b.tiny.mode = "hold"
        name = self.name_owned_by("b", "c")
        d = self.direct(a, name)
        yield self.until(lambda: len(b.tiny.held) == 1)
        d.cancel()
        yield self.assertFailure(d, defer.CancelledError)
        self.assertEqual(count(a.metrics, "b", "cancelled"), 1)
        self.assertEqual((a.metrics.retries._value.get(), a.router.inflight(name, "b")), (0, 0))
        self.assertFalse(a.router.is_down("b"))
        # b's front end ends the request it was serving, quietly (no error logged)
        yield self.until(lambda: b.rest_frontend.inflight.count == 0)
        self.assertEqual(self.flushLoggedErrors(defer.CancelledError), [])


class SpillOverTests(RouterTestCase):
    @defer.inlineCallbacks
    def test_no_room_spills_to_the_next_owner_without_demoting_it(self):  # type: ignore[no-untyped-def]
        """b has no room for the model: REST, gRPC and local requests go to the next owner,
        b is not marked down (it serves its other models), and the spill-overs are counted."""
        nodes = yield self.cluster()
        a, b = nodes["a"], nodes["b"]
        name, other = self.name_owned_by("b", "c"), self.name_owned_by("b", "a")
        b.tiny.full.add(name)
        resp, content = yield self.post(a, name)  # b answers 429 marked no-room
        self.assertEqual((resp.code, json.loads(content)["node"]), (200, "c"))
        self.assertFalse(resp.headers.hasHeader(b"x-tfscache-no-room"))
        reply = yield self.grpc_call(a, name)  # b answers RESOURCE_EXHAUSTED marked no-room
        self.assertTrue(reply.startswith(b"c|"))
        self.assertFalse(a.router.is_down("b"))
        self.assertEqual(count(a.metrics, "b", "spill"), 2)
        self.assertEqual(a.metrics.spill_overs._value.get(), 2)
        resp, content = yield self.post(a, other)
        self.assertEqual(json.loads(content)["node"], "b")
        # on the owner itself: its own cache has no room
        mine = self.name_owned_by("a", "c")
        a.tiny.full.add(mine)
        reply = yield self.direct(a, mine)
        self.assertEqual(json.loads(reply.body)["node"], "c")
        reply = yield a.router.grpc(PREDICT, ModelRef(mine), predict_payload(mine), 5.0)
        self.assertTrue(reply.startswith(b"c|"))
        self.assertEqual(count(a.metrics, "local", "spill"), 2)
        self.assertEqual(a.metrics.spill_overs._value.get(), 4)
        self.assertFalse(a.router.is_down("a"))

    @defer.inlineCallbacks
    def test_no_owner_with_room_gives_the_last_resource_exhausted(self):  # type: ignore[no-untyped-def]
        nodes = yield self.cluster()
        a, b, c = nodes["a"], nodes["b"], nodes["c"]
        name = self.name_owned_by("b", "c")
        b.tiny.full.add(name)
        c.tiny.full.add(name)
        resp, content = yield self.post(a, name)
        self.assertEqual(resp.code, 429)
        self.assertEqual(json.loads(content), {"error": f"No room to load model {name} version 1 on c"})
        self.assertFalse(resp.headers.hasHeader(b"x-tfscache-no-room"))  # the router's business
        err = yield self.assertFailure(self.grpc_call(a, name), ServingError)
        self.assertEqual((err.code, err.message), (Code.RESOURCE_EXHAUSTED,
                                                   f"No room to load model {name} version 1 on c"))
        self.assertEqual((len(b.tiny.rest_calls), len(c.tiny.rest_calls)), (1, 1))
        self.assertEqual((len(b.tiny.grpc_calls), len(c.tiny.grpc_calls)), (1, 1))
        self.assertFalse(a.router.is_down("b") or a.router.is_down("c"))
        self.assertEqual(a.metrics.spill_overs._value.get(), 4)

    @defer.inlineCallbacks
    def test_other_resource_exhausted_is_not_spilled(self):  # type: ignore[no-untyped-def]
        nodes = yield self.cluster()
        a, b, c = nodes["a"], nodes["b"], nodes["c"]
        b.tiny.mode = "too_large"
        name = self.name_owned_by("b", "c")
        resp, content = yield self.post(a, name)
        self.assertEqual((resp.code, json.loads(content)), (429, {"error": "Received message larger than max"}))
        err = yield self.assertFailure(self.grpc_call(a, name), ServingError)
        self.assertEqual(err.code, Code.RESOURCE_EXHAUSTED)
        self.assertEqual((len(c.tiny.rest_calls), len(c.tiny.grpc_calls)), (0, 0))
        self.assertEqual(a.metrics.spill_overs._value.get(), 0)

    @defer.inlineCallbacks
    def test_spill_over_off_answers_the_first_owners_429(self):  # type: ignore[no-untyped-def]
        nodes = yield self.cluster(spill_over=False)
        a, b, c = nodes["a"], nodes["b"], nodes["c"]
        name = self.name_owned_by("b", "c")
        b.tiny.full.add(name)
        resp, content = yield self.post(a, name)
        self.assertEqual(resp.code, 429)
        self.assertIn("No room to load model", json.loads(content)["error"])
        self.assertFalse(resp.headers.hasHeader(b"x-tfscache-no-room"))
        err = yield self.assertFailure(self.grpc_call(a, name), ServingError)
        self.assertEqual(err.code, Code.RESOURCE_EXHAUSTED)
        self.assertEqual((len(c.tiny.rest_calls), len(c.tiny.grpc_calls)), (0, 0))
        self.assertEqual(a.metrics.spill_overs._value.get(), 0)


class SpreadTests(RouterTestCase):
    @defer.inlineCallbacks
    def test_hot_model_spreads_to_the_next_owner(self):  # type: ignore[no-untyped-def]
        nodes = yield self.cluster(spread_threshold=2)
        a, b = nodes["a"], nodes["b"]
        name = self.name_owned_by("b", "c")
        b.tiny.mode = "hold"
        first = [self.direct(a, name) for _ in range(2)]
        yield self.until(lambda: len(b.tiny.held) == 2)
        self.assertEqual(a.router.inflight(name, "b"), 2)
        # b has 2 in flight from this router: the third request goes to the second owner
        third = yield self.direct(a, name)
        self.assertEqual(json.loads(third.body)["node"], "c")
        grpc_reply = yield self.grpc_call(a, name)
        self.assertTrue(grpc_reply.startswith(b"c|"))
        b.tiny.release()
        replies = yield defer.gatherResults(first)
        self.assertEqual([json.loads(r.body)["node"] for r in replies], ["b", "b"])
        self.assertEqual(a.router.inflight(name, "b"), 0)
        # quiet again: back to one node
        b.tiny.mode = "ok"
        for _ in range(3):
            reply = yield self.direct(a, name)
            self.assertEqual(json.loads(reply.body)["node"], "b")
        self.assertEqual(len(nodes["c"].tiny.rest_calls), 1)

    @defer.inlineCallbacks
    def test_quiet_model_stays_on_one_node(self):  # type: ignore[no-untyped-def]
        nodes = yield self.cluster(spread_threshold=4)
        a = nodes["a"]
        name = self.name_owned_by("c", "b")
        replies = yield defer.gatherResults([self.direct(a, name) for _ in range(4)])
        self.assertEqual({json.loads(r.body)["node"] for r in replies}, {"c"})
        self.assertEqual(nodes["b"].tiny.rest_calls, [])

def deferLater(seconds: float) -> defer.Deferred[None]:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)
