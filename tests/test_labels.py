"""Version labels and zero-padded version directories, end to end through a node (REST and
gRPC, a real DevServer), and the pieces underneath: the disk provider's listing of both, the
labels file, the listing TTL a label change waits for, and the ModelConfig sent to TF Serving.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from tensorflow_serving.apis import inference_pb2
from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.clients import GrpcClient, http, predict_request
from tests.harness import shared
from tests.harness.node import InProcessNode, node_config
from tfscache.devserver.models import write_half_plus_two
from tfscache.errors import Code, ServingError
from tfscache.modelspec import parse_labels
from tfscache.providers.base import ListingCache
from tfscache.providers.disk import DiskModelProvider


def write_labels(base: str, name: str, labels: dict[str, Any]) -> None:
    with open(os.path.join(base, name, "labels.json"), "w") as f:
        json.dump(labels, f)


def write_source(base: str) -> None:
    for v in (1, 2):
        write_half_plus_two(base, "lab", v, float(v), 0.0)  # y = v * x
    write_labels(base, "lab", {"stable": 1, "canary": 2})
    path = write_half_plus_two(base, "padded", 123, 0.5, 2.0)
    os.rename(path, os.path.join(base, "padded", "00000123"))  # TF Serving's own layout
    write_half_plus_two(base, "badlabels", 1)
    with open(os.path.join(base, "badlabels", "labels.json"), "w") as f:
        f.write("{not json")


class LabelsThroughANodeTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.backend = shared.backend()
        self.models = tempfile.mkdtemp(prefix="tfscache-labels-")
        write_source(self.models)
        # a TTL of 0: every request reads the labels again, so a change shows at once
        self.node = InProcessNode(node_config(self.models, self.backend,
                                              model_provider={"listing_ttl_seconds": 0}))
        yield self.node.start()
        self.addCleanup(self.node.stop)
        self.client = GrpcClient(self.node.grpc_target)
        self.addCleanup(self.client.close)

    def rest(self, path: str, body: Any = None, method: str = "POST") -> defer.Deferred[Any]:
        return http(method, self.node.rest_url + path, body)

    @defer.inlineCallbacks
    def test_rest_and_grpc_by_label(self):  # type: ignore[no-untyped-def]
        reply = yield self.rest("/v1/models/lab/labels/stable:predict", {"instances": [3.0]})
        self.assertEqual(reply.json(), {"predictions": [3.0]})
        reply = yield self.rest("/v1/models/lab/labels/canary:predict", {"instances": [3.0]})
        self.assertEqual(reply.json(), {"predictions": [6.0]})
        req = predict_request("lab", [3.0])
        req.model_spec.version_label = "canary"
        resp = yield self.client.call(self.client.predictions.Predict, req)
        self.assertEqual((list(resp.outputs["y"].float_val), resp.model_spec.version.value), ([6.0], 2))
        reply = yield self.rest("/v1/models/lab/labels/stable", method="GET")
        self.assertEqual([s["version"] for s in reply.json()["model_version_status"]], ["1"])
        reply = yield self.rest("/v1/models/lab/labels/stable/metadata", method="GET")
        self.assertEqual(reply.json()["model_spec"]["version"], "1")

    @defer.inlineCallbacks
    def test_tf_serving_is_told_the_labels_of_available_versions(self):  # type: ignore[no-untyped-def]
        yield self.rest("/v1/models/lab/labels/stable:predict", {"instances": [1.0]})
        config = self.node.service.backend._config().config.model_config_list.config
        [lab] = [mc for mc in config if mc.name == "lab"]
        # canary's version 2 is not loaded: TF Serving would refuse a label naming it
        self.assertEqual(dict(lab.version_labels), {"stable": 1})
        # TF Serving answers the label itself (unpinned MultiInference relies on it)
        reply = yield http("GET", self.backend.rest_url + "/v1/models/lab/labels/stable")
        self.assertEqual(reply.code, 200, reply.body)
        mreq = inference_pb2.MultiInferenceRequest()
        task = mreq.tasks.add()
        task.model_spec.name, task.model_spec.version_label = "lab", "stable"
        task.model_spec.signature_name, task.method_name = "regress_x_to_y", "tensorflow/serving/regress"
        mreq.input.example_list.examples.add().features.feature["x"].float_list.value.append(4.0)
        resp = yield self.client.call(self.client.predictions.MultiInference, mreq)
        self.assertEqual(resp.results[0].regression_result.regressions[0].value, 4.0)
        self.assertEqual(resp.results[0].model_spec.version.value, 1)

    @defer.inlineCallbacks
    def test_unknown_label_answers_as_tf_serving(self):  # type: ignore[no-untyped-def]
        reply = yield self.rest("/v1/models/lab/labels/nope:predict", {"instances": [1.0]})
        self.assertEqual((reply.code, reply.json()), (400, {"error": "Unrecognized servable version label: nope"}))
        req = predict_request("lab", [1.0])
        req.model_spec.version_label = "nope"
        err = yield self.assertFailure(self.client.call(self.client.predictions.Predict, req), ServingError)
        self.assertEqual((err.code, err.message), (Code.INVALID_ARGUMENT, "Unrecognized servable version label: nope"))
        reply = yield self.rest("/v1/models/padded/labels/any:predict", {"instances": [1.0]})  # no labels file
        self.assertEqual(reply.code, 400)

    @defer.inlineCallbacks
    def test_a_label_change_in_the_source_takes_effect(self):  # type: ignore[no-untyped-def]
        reply = yield self.rest("/v1/models/lab/labels/stable:predict", {"instances": [1.0]})
        self.assertEqual(reply.json(), {"predictions": [1.0]})
        write_labels(self.models, "lab", {"stable": 2, "canary": 2})
        reply = yield self.rest("/v1/models/lab/labels/stable:predict", {"instances": [1.0]})
        self.assertEqual(reply.json(), {"predictions": [2.0]})
        config = self.node.service.backend._config().config.model_config_list.config
        [lab] = [mc for mc in config if mc.name == "lab"]
        self.assertEqual(dict(lab.version_labels), {"stable": 2, "canary": 2})
        write_labels(self.models, "lab", {"canary": 2})  # stable removed
        reply = yield self.rest("/v1/models/lab/labels/stable:predict", {"instances": [1.0]})
        self.assertEqual(reply.code, 400, reply.body)

    @defer.inlineCallbacks
    def test_a_broken_labels_file(self):  # type: ignore[no-untyped-def]
        reply = yield self.rest("/v1/models/badlabels/labels/x:predict", {"instances": [1.0]})
        self.assertEqual(reply.code, 400, reply.body)  # FAILED_PRECONDITION, naming the model and file
        self.assertIn("badlabels", reply.json()["error"])
        self.assertIn("labels.json", reply.json()["error"])
        reply = yield self.rest("/v1/models/badlabels:predict", {"instances": [1.0]})  # by number: fine
        self.assertEqual(reply.code, 200, reply.body)

    @defer.inlineCallbacks
    def test_zero_padded_version_directory(self):  # type: ignore[no-untyped-def]
        reply = yield self.rest("/v1/models/padded:predict", {"instances": [2.0]})
        self.assertEqual(reply.json(), {"predictions": [3.0]})
        resp = yield self.client.predict("padded", [2.0], version=123)
        self.assertEqual(resp.model_spec.version.value, 123)
        self.assertTrue(os.path.isdir(os.path.join(self.node.cache.disk.root, "padded", "123")))


class LabelPiecesTests(unittest.TestCase):
    def test_labels_file(self) -> None:
        self.assertEqual(parse_labels("m", b'{"stable": 3, "canary": "00000004"}'), {"stable": 3, "canary": 4})
        for bad in (b"[1]", b"{", b'{"a": -1}', b'{"a": true}', b'{"a/b": 1}', b'{"": 1}', b'{"a": 1.5}',
                    b'{"a": 9223372036854775808}'):
            err = self.assertRaises(ServingError, parse_labels, "m", bad)
            self.assertEqual(err.code, Code.FAILED_PRECONDITION, bad)
            self.assertIn("model m", err.message)

    def test_a_label_change_waits_for_the_ttl(self) -> None:
        now = [0.0]
        cache = ListingCache(5.0, clock=lambda: now[0], normalise=dict)
        files = [{"stable": 1}]
        fetch = lambda _n: defer.succeed(dict(files[-1]))  # noqa: E731
        self.assertEqual(self.successResultOf(cache.get("m", fetch)), {"stable": 1})
        files.append({"stable": 2})
        now[0] = 4.9
        self.assertEqual(self.successResultOf(cache.get("m", fetch)), {"stable": 1})
        now[0] = 5.0
        self.assertEqual(self.successResultOf(cache.get("m", fetch)), {"stable": 2})

    @defer.inlineCallbacks
    def test_disk_provider_reads_padded_versions_and_labels(self):  # type: ignore[no-untyped-def]
        base = tempfile.mkdtemp(prefix="tfscache-padded-")
        for d in ("00000123", "7", "0124", "x1", "٣"):  # "٣": a digit, but not ASCII
            os.makedirs(os.path.join(base, "m", d, "variables"))
            with open(os.path.join(base, "m", d, "saved_model.pb"), "wb") as f:
                f.write(d.encode())
        provider = DiskModelProvider(base, listing_ttl=0, reactor=reactor)
        self.addCleanup(provider.close)
        self.assertEqual((yield provider.list_versions("m")), [7, 123, 124])
        self.assertEqual((yield provider.version_size("m", 123)), len(b"00000123"))
        dest = os.path.join(tempfile.mkdtemp(prefix="tfscache-dest-"), "m", "124")
        copied = yield provider.fetch("m", 124, dest)
        self.assertEqual(copied, len(b"0124"))
        with open(os.path.join(dest, "saved_model.pb"), "rb") as f:
            self.assertEqual(f.read(), b"0124")
        self.assertEqual((yield provider.list_labels("m")), {})
        write_labels(base, "m", {"stable": 123})
        self.assertEqual((yield provider.list_labels("m")), {"stable": 123})
