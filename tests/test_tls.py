"""TLS on the client-facing REST and gRPC ports, and between nodes of a cluster."""

from __future__ import annotations

import json

import grpc
import treq
from twisted.internet import defer, reactor, ssl, threads
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
        reply = yield future_to_deferred(call.future(predict_request("m1", [1.0]).SerializeToString(), timeout=30))
        self.assertTrue(reply)

        plain = grpc.insecure_channel(f"127.0.0.1:{ports[0][1]}")
        self.addCleanup(plain.close)
        call = plain.unary_unary("/tensorflow.serving.PredictionService/Predict")
        err = yield self.assertFailure(
            future_to_deferred(call.future(predict_request("m1", [1.0]).SerializeToString(), timeout=5)), ServingError)
        self.assertEqual(err.code, Code.UNAVAILABLE)
