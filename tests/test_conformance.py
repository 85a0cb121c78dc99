"""Official-client conformance: the same requests, sent directly to the backend and through
tfscache, give identical answers (and identical error codes)."""

from __future__ import annotations

from typing import Any

from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    regression_pb2,
)
from twisted.internet import defer

from tests.clients import GrpcClient, http, predict_request
from tests.test_node import NodeTestCase, coef
from tfscache.errors import ServingError


def example(req: Any, xs: list[float]) -> None:
    for x in xs:
        ex = req.input.example_list.examples.add()
        ex.features.feature["x"].float_list.value.append(x)


class ConformanceTests(NodeTestCase):
    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        NodeTestCase.setUp(self)
        self.n = yield self.node()
        self.via = GrpcClient(self.n.grpc_target)
        self.direct = GrpcClient(self.backend.grpc_target)
        self.addCleanup(self.via.close)
        self.addCleanup(self.direct.close)

    @defer.inlineCallbacks
    def same_rest(self, method: str, path: str, body: Any = None, raw: bytes | None = None):  # type: ignore[no-untyped-def]
        via = yield http(method, self.n.rest_url + path, body, raw=raw)
        direct = yield http(method, self.backend.rest_url + path, body, raw=raw)
        self.assertEqual(via.code, direct.code, (path, via.body, direct.body))
        self.assertEqual(via.json(), direct.json(), path)
        self.assertEqual(via.headers.getRawHeaders(b"content-type"), [b"application/json"])
        return via

    @defer.inlineCallbacks
    def same_grpc(self, method: str, request: Any, service: str = "predictions"):  # type: ignore[no-untyped-def]
        results = []
        for client in (self.via, self.direct):
            stub = getattr(client, service)
            try:
                resp = yield client.call(getattr(stub, method), request)
                results.append(("ok", resp.SerializeToString(deterministic=True)))
            except ServingError as e:
                results.append((e.code.name, e.message))
        self.assertEqual(results[0], results[1], method)
        return results[0]

    @defer.inlineCallbacks
    def test_rest_predict_row_and_columnar(self):  # type: ignore[no-untyped-def]
        reply = yield self.same_rest("POST", "/v1/models/m1:predict", {"instances": [1.0, 2.0, 5.0]})
        a, b = coef(1, 2)
        self.assertEqual(reply.json(), {"predictions": [a * x + b for x in (1.0, 2.0, 5.0)]})
        reply = yield self.same_rest("POST", "/v1/models/m1/versions/2:predict", {"inputs": [1.0, 2.0]})
        self.assertEqual(reply.json(), {"outputs": [a * 1.0 + b, a * 2.0 + b]})
        yield self.same_rest("POST", "/v1/models/m1:predict",
                             {"signature_name": "serving_default", "instances": [[1.0]]})

    @defer.inlineCallbacks
    def test_rest_classify_regress(self):  # type: ignore[no-untyped-def]
        body = {"signature_name": "classify_x_to_y", "examples": [{"x": 1.0}, {"x": 2.0}]}
        reply = yield self.same_rest("POST", "/v1/models/m2:classify", body)
        self.assertIn("results", reply.json())
        body = {"signature_name": "regress_x_to_y", "examples": [{"x": 1.0}, {"x": 2.0}]}
        reply = yield self.same_rest("POST", "/v1/models/m2:regress", body)
        a, b = coef(2, 2)
        self.assertEqual(reply.json(), {"results": [a * 1.0 + b, a * 2.0 + b]})

    @defer.inlineCallbacks
    def test_rest_status_and_metadata(self):  # type: ignore[no-untyped-def]
        yield http("POST", self.n.rest_url + "/v1/models/m3:predict", {"instances": [1.0]})
        reply = yield self.same_rest("GET", "/v1/models/m3")
        self.assertEqual(reply.json()["model_version_status"][0]["state"], "AVAILABLE")
        reply = yield self.same_rest("GET", "/v1/models/m3/versions/2/metadata")
        self.assertIn("signature_def", reply.json()["metadata"])

    @defer.inlineCallbacks
    def test_rest_errors_match(self):  # type: ignore[no-untyped-def]
        yield http("POST", self.n.rest_url + "/v1/models/m1:predict", {"instances": [1.0]})
        for body in ({"instances": [1.0], "inputs": [1.0]}, {"instances": [[1.0, 2.0], [1.0]]},
                     {"signature_name": "nope", "instances": [1.0]}, {}):
            reply = yield self.same_rest("POST", "/v1/models/m1:predict", body)
            self.assertEqual(reply.code, 400, body)
        reply = yield self.same_rest("POST", "/v1/models/m1:predict", raw=b"{oops")
        self.assertEqual(reply.code, 400)
        reply = yield self.same_rest("POST", "/v1/models/m1/versions/9:predict", {"instances": [1.0]})
        self.assertEqual(reply.code, 404)

    @defer.inlineCallbacks
    def test_grpc_predict_classify_regress_multi(self):  # type: ignore[no-untyped-def]
        code, _ = yield self.same_grpc("Predict", predict_request("m1", [1.0, 3.0]))
        self.assertEqual(code, "ok")
        code, _ = yield self.same_grpc("Predict", predict_request("m1", [1.0], version=1))
        self.assertEqual(code, "ok")

        creq = classification_pb2.ClassificationRequest()
        creq.model_spec.name, creq.model_spec.signature_name = "m1", "classify_x_to_y"
        example(creq, [1.0, 2.0])
        code, _ = yield self.same_grpc("Classify", creq)
        self.assertEqual(code, "ok")

        rreq = regression_pb2.RegressionRequest()
        rreq.model_spec.name, rreq.model_spec.signature_name = "m1", "regress_x_to_y"
        example(rreq, [1.0, 2.0])
        code, _ = yield self.same_grpc("Regress", rreq)
        self.assertEqual(code, "ok")

        mreq = inference_pb2.MultiInferenceRequest()
        for sig, method in (("classify_x_to_y", "tensorflow/serving/classify"),
                            ("regress_x_to_y", "tensorflow/serving/regress")):
            t = mreq.tasks.add()
            t.model_spec.name, t.model_spec.signature_name, t.method_name = "m1", sig, method
        example(mreq, [1.0, 2.0])
        code, _ = yield self.same_grpc("MultiInference", mreq)
        self.assertEqual(code, "ok")

    @defer.inlineCallbacks
    def test_grpc_metadata_and_status(self):  # type: ignore[no-untyped-def]
        req = get_model_metadata_pb2.GetModelMetadataRequest()
        req.model_spec.name = "m4"
        req.metadata_field.append("signature_def")
        code, _ = yield self.same_grpc("GetModelMetadata", req)
        self.assertEqual(code, "ok")
        sreq = get_model_status_pb2.GetModelStatusRequest()
        sreq.model_spec.name = "m4"
        code, _ = yield self.same_grpc("GetModelStatus", sreq, service="models")
        self.assertEqual(code, "ok")

    @defer.inlineCallbacks
    def test_grpc_errors_match(self):  # type: ignore[no-untyped-def]
        yield self.via.predict("m1", [1.0])
        bad = predict_request("m1", [1.0])
        bad.inputs["nope"].CopyFrom(bad.inputs["x"])
        code, _ = yield self.same_grpc("Predict", bad)
        self.assertEqual(code, "INVALID_ARGUMENT")
        code, _ = yield self.same_grpc("Predict", predict_request("m1", [1.0], version=9))
        self.assertEqual(code, "NOT_FOUND")
        wrong_sig = predict_request("m1", [1.0])
        wrong_sig.model_spec.signature_name = "nope"
        code, _ = yield self.same_grpc("Predict", wrong_sig)
        self.assertNotEqual(code, "ok")
