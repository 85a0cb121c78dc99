"""TLS on the client-facing REST and gRPC ports, and between nodes of a cluster."""

from __future__ import annotations

import json
import socket

import grpc
import treq
from twisted.internet import defer, reactor, ssl, threads
from twisted.logger import Logger
from twisted.trial import unittest
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

from tests.clients import predict_request
from tests.harness import shared
from tests.harness.certs import make_tls_files
from tests.harness.devserver import DevServer
from tests.harness.node import InProcessNode, node_config
from tests.harness.process import free_port
from tests.test_node import write_models
from tfscache.errors import Code, ServingError
from tfscache.util.grpc_twisted import future_to_deferred

log = Logger()


class TlsTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_rest_and_grpc_over_tls_and_between_nodes(self):  # type: ignore[no-untyped-def]
        tls = make_tls_files()
        # one TF Serving per node: each node owns its backend's whole model list
        second = yield threads.deferToThread(DevServer().start)
        self.addCleanup(second.stop)
        backends = [shared.backend(), second]
        models = shared.model_dir("m", write_models)
        ports = [(free_port(), free_port()) for _ in range(2)]
        members = [{"id": f"t{i}", "host": "127.0.0.1", "rest_port": r, "grpc_port": g}
                   for i, (r, g) in enumerate(ports)]
        nodes = []
        for i, (rest_port, grpc_port) in enumerate(ports):
            cfg = node_config(models, backends[i], node_id=f"t{i}",
                              listen={"rest_port": rest_port, "grpc_port": grpc_port,
                                      "tls_cert": tls["cert"], "tls_key": tls["key"]},
                              cluster={"replicas_per_model": 1, "tls_ca_cert": tls["ca"],
                                       "discovery": {"type": "static", "members": members}})
            node = InProcessNode(cfg)
            yield node.start()
            self.addCleanup(node.stop)
            nodes.append(node)

        with open(tls["ca"], "rb") as f:
            ca = f.read()
        agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=ssl.Certificate.loadPEM(ca)))
        # every model through node 0: half of them are owned by node 1 and forwarded over TLS
        for name in ("m0", "m1", "m2", "m3"):
            resp = yield treq.request("POST", f"https://127.0.0.1:{ports[0][0]}/v1/models/{name}:predict",
                                      data=json.dumps({"instances": [1.0]}).encode(), agent=agent)
            body = yield treq.content(resp)
            self.assertEqual(resp.code, 200, body)
        remote = sum(n.cache.loads for n in nodes[1:])
        self.assertGreater(remote, 0, "no model was owned by the other node: forwarding untested")

        channel = grpc.secure_channel(f"127.0.0.1:{ports[0][1]}", grpc.ssl_channel_credentials(root_certificates=ca))
        self.addCleanup(channel.close)
        call = channel.unary_unary("/tensorflow.serving.PredictionService/Predict")
        request = predict_request("m1", [1.0]).SerializeToString()
        reply = yield future_to_deferred(reactor, call.future(request, timeout=30))
        self.assertTrue(reply)

        plain = grpc.insecure_channel(f"127.0.0.1:{ports[0][1]}")
        self.addCleanup(plain.close)
        call = plain.unary_unary("/tensorflow.serving.PredictionService/Predict")
        err = yield self.assertFailure(
            future_to_deferred(reactor, call.future(predict_request("m1", [1.0]).SerializeToString(), timeout=5)),
            ServingError)
        self.assertEqual(err.code, Code.UNAVAILABLE)


def plain_http_to(port: int, request: bytes, timeout: float = 20.0) -> bytes:
    """Send plain HTTP to a TLS port; everything the server sends until it closes.  The read
    timeout bounds the wait: a server that keeps the connection open fails the test."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        got = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return got
            except TimeoutError:
                raise AssertionError(f"a plain HTTP connection kept open {timeout}s: {got[:200]!r}") from None
            if not chunk:
                return got
            got += chunk


def describe(reply: bytes) -> str:
    if not reply:
        return "closed, nothing sent"
    if reply.startswith(b"HTTP/"):
        return "HTTP " + reply.split(b"\r\n", 1)[0].decode("latin-1")
    if reply[:1] == b"\x15":  # a TLS record of type alert
        return f"TLS alert ({len(reply)} bytes), then closed"
    return f"{len(reply)} other bytes, then closed"


class PlainHttpToTlsPortTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_plain_http_is_refused_and_tls_still_served(self):  # type: ignore[no-untyped-def]
        """Plain HTTP requests (a predict, a status, one kept alive, half a request) to the TLS
        REST port: a 400 or a closed connection, never a model's answer; the node keeps
        serving over TLS (REST and gRPC)."""
        tls = make_tls_files()
        models = shared.model_dir("m", write_models)
        node = InProcessNode(node_config(models, shared.backend(),
                                         listen={"tls_cert": tls["cert"], "tls_key": tls["key"]}))
        yield node.start()
        self.addCleanup(node.stop)
        port = node.service.rest_port
        body = json.dumps({"instances": [1.0]}).encode()
        requests = {
            "POST predict, Connection: close": b"POST /v1/models/m0/versions/1:predict HTTP/1.1\r\nHost: x\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
            "GET status, kept alive": b"GET /v1/models/m0 HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /healthz, HTTP/1.0": b"GET /healthz HTTP/1.0\r\n\r\n",
            "half a request line": b"GET /v1/mo",
        }
        for name, data in requests.items():
            reply = yield threads.deferToThread(plain_http_to, port, data)
            log.info("plain-http-to-tls {case}: {outcome}", case=name, outcome=describe(reply))
            self.assertNotIn(b"predictions", reply, name)
            self.assertNotIn(b"model_version_status", reply, name)
            if reply.startswith(b"HTTP/"):
                self.assertRegex(reply.split(b"\r\n", 1)[0], rb"^HTTP/1\.[01] 400 ", name)
            elif name != "half a request line":  # bytes short of a TLS record header: only closed
                self.assertTrue(reply == b"" or reply[:1] == b"\x15", (name, reply[:40]))

        with open(tls["ca"], "rb") as f:
            ca = f.read()
        agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=ssl.Certificate.loadPEM(ca)))
        resp = yield treq.request("POST", f"https://127.0.0.1:{port}/v1/models/m0/versions/1:predict",
                                  data=body, agent=agent)
        content = yield treq.content(resp)
        self.assertEqual(resp.code, 200, content)
        self.assertEqual(json.loads(content)["predictions"], [1.0 * 1.0 + 10.0])
        channel = grpc.secure_channel(node.grpc_target, grpc.ssl_channel_credentials(root_certificates=ca))
        self.addCleanup(channel.close)
        call = channel.unary_unary("/tensorflow.serving.PredictionService/Predict")
        request = predict_request("m0", [1.0], 1).SerializeToString()
        reply = yield future_to_deferred(reactor, call.future(request, timeout=30))
        self.assertTrue(reply)
