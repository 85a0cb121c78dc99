"""TF Serving's own facts, checked against the DevServer directly AND through a tfscache node.

Each test is one fact that TensorFlow Serving's repository states, in its tests or its REST
docs (tensorflow/serving at the commit in ../shared/tfserving-testdata/SOURCE_COMMIT); its
docstring names the source.  The models are TF Serving's own test SavedModels
(``tfserving-testdata``, zero-padded version directories as TF Serving ships them), copied into
a model source by this module: the DevServer serves that source from a start-up model config
as TF Serving's tests do; tfscache serves it from its disk provider, with the version label
that TF Serving's REST test configures written into ``labels.json``.

With ``tensorflow_model_server`` on PATH both backends are the real TF Serving.  A fact the
DevServer cannot match is listed in ``STAND_IN_DIFFERENCES`` with the reason: Trial reports it
as an expected failure of the stand-in (through tfscache too, which forwards to it), never as
a difference of tfscache.

Sources, abbreviated in the docstrings:
  TMS  tensorflow_serving/model_servers/tensorflow_model_server_test.py
  HRH  tensorflow_serving/model_servers/http_rest_api_handler_test.cc
  JT   tensorflow_serving/util/json_tensor_test.cc
  AR   tensorflow_serving/g3doc/api_rest.md
  PI   tensorflow_serving/servables/tensorflow/predict_impl_test.cc
  SRC  the named .cc file's own error text (the tests match a part of it)
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from typing import Any

import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    predict_pb2,
    regression_pb2,
)
from twisted.internet import defer
from twisted.trial import unittest

from tests.clients import GrpcClient, Reply, http
from tests.harness import shared
from tests.harness.devserver import DevServer
from tests.harness.node import InProcessNode, node_config
from tfscache.errors import Code, ServingError

# byte copies of TF Serving's servables/tensorflow/testdata (Apache 2.0; README.md there)
TESTDATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tfserving-testdata")

LABEL, NO_LABEL = "Version_Label", "Version_Nonexistent"  # HRH's kTestModelVersionLabel
TWO_VERSIONS = "saved_model_half_plus_two_2_versions"     # HRH's kTestModelName

# model name in the source -> the test SavedModel (its versions as shipped: 00000123)
MODELS = {
    "default": "saved_model_half_plus_two_cpu",               # TMS's name for half_plus_two
    "default_tf2": "saved_model_half_plus_two_tf2_cpu",
    TWO_VERSIONS: TWO_VERSIONS,
    "saved_model_half_plus_three": "saved_model_half_plus_three",  # AR's example
    "half_plus_three": "saved_model_half_plus_three",              # TMS's good_model_config
    "counter": "saved_model_counter",
}

# fact -> why the DevServer answers otherwise (a limit of the stand-in, not of tfscache)
STAND_IN_DIFFERENCES: dict[str, str] = {}


def write_source(path: str) -> None:
    for name, model in MODELS.items():
        src = os.path.join(TESTDATA, model)
        for version_dir in sorted(os.listdir(src)):
            if name == TWO_VERSIONS and version_dir != "00000123":
                continue  # HRH serves version 123 only (a specific-versions policy)
            shutil.copytree(os.path.join(src, version_dir), os.path.join(path, name, version_dir))
    with open(os.path.join(path, TWO_VERSIONS, "labels.json"), "w") as f:
        json.dump({LABEL: 123}, f)
    broken = os.path.join(path, "broken", "00000123")  # a model that fails to load
    os.makedirs(os.path.join(broken, "variables"))
    with open(os.path.join(broken, "saved_model.pb"), "wb") as f:
        f.write(b"not a SavedModel")


def source() -> str:
    return shared.model_dir("tfserving-testdata", write_source)  # type: ignore[no-any-return]


def start_up_config(base: str) -> str:
    """The DevServer's start-up config: every model, TWO_VERSIONS as HRH configures it, and
    the broken one (a DevServer survives it; TF Serving would not start, so it is left out
    there, which TF Serving answers with the same NOT_FOUND)."""
    parts = []
    broken = [] if shutil.which("tensorflow_model_server") else ["broken"]
    for name in [*MODELS, *broken]:
        extra = ""
        if name == TWO_VERSIONS:
            extra = (f'model_version_policy {{ specific {{ versions: 123 }} }} '
                     f'version_labels {{ key: "{LABEL}" value: 123 }}')
        parts.append(f'config {{ name: "{name}" base_path: "{os.path.join(base, name)}" '
                     f'model_platform: "tensorflow" {extra} }}')
    return "model_config_list { " + " ".join(parts) + " }\n"


def direct_backend() -> DevServer:
    """A DevServer serving the source from its start-up config (one per test process)."""
    return shared.shared(  # type: ignore[no-any-return]
        "facts-backend", lambda: DevServer(model_config=start_up_config(source())).start(),
        lambda b: b.stop())


def serialized_example(**features: float) -> bytes:
    feats = {k: tf.train.Feature(float_list=tf.train.FloatList(value=[v])) for k, v in features.items()}
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def add_example(req: Any, **features: float) -> None:
    ex = req.input.example_list.examples.add()
    for k, v in features.items():
        ex.features.feature[k].float_list.value.append(v)


class Facts:
    """The facts; a subclass says where requests go (``rest_url``, ``grpc_target``)."""

    rest_url: str
    client: GrpcClient

    # -- helpers -----------------------------------------------------------------------------
    def rest(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> defer.Deferred[Reply]:
        return http(method, self.rest_url + path, body, raw=raw)

    def grpc(self, method: str, request: Any, service: str = "predictions") -> defer.Deferred[Any]:
        stub = getattr(self.client, service)
        return self.client.call(getattr(stub, method), request)

    def assertJson(self, reply: Reply, code: int, expected: Any) -> None:
        t: Any = self
        t.assertEqual(reply.code, code, reply.body)
        t.assertEqual(reply.headers.getRawHeaders(b"content-type"), [b"application/json"])
        t.assertEqual(reply.json(), expected)

    def assertRestError(self, reply: Reply, code: int, part: str) -> None:
        t: Any = self
        t.assertEqual(reply.code, code, reply.body)
        t.assertEqual(reply.headers.getRawHeaders(b"content-type"), [b"application/json"])
        error = reply.json()["error"]  # AR: every error is {"error": <message string>}
        t.assertIsInstance(error, str)
        t.assertIn(part, error)

    @defer.inlineCallbacks
    def assertGrpcError(self, d: defer.Deferred[Any], code: Code, part: str):  # type: ignore[no-untyped-def]
        t: Any = self
        err = yield t.assertFailure(d, ServingError)
        t.assertEqual(err.code, code, err.message)
        t.assertIn(part, err.message)
        return err

    def assertSpec(self, spec: Any, name: str, signature: str, version: int) -> None:
        """TMS's _VerifyModelSpec."""
        t: Any = self
        t.assertEqual((spec.name, spec.signature_name, spec.version.value), (name, signature, version))

    def predict_request(self, name: str = "default", output_filter: bool = True, **spec: Any) -> Any:
        """TMS's VerifyPredictRequest: x = [2.0], shape [1], output_filter ["y"]."""
        req = predict_pb2.PredictRequest()
        req.model_spec.name = name
        for k, v in spec.items():
            if k == "version":
                req.model_spec.version.value = v
            else:
                setattr(req.model_spec, k, v)
        req.inputs["x"].dtype = types_pb2.DT_FLOAT
        req.inputs["x"].float_val.append(2.0)
        req.inputs["x"].tensor_shape.dim.add().size = 1
        if output_filter:
            req.output_filter.append("y")
        return req

    # -- gRPC: tensorflow_model_server_test.py --------------------------------------------
    @defer.inlineCallbacks
    def test_grpc_predict(self):  # type: ignore[no-untyped-def]
        """TMS testPredictSavedModel / VerifyPredictRequest: y = 3.0 (DT_FLOAT, one value),
        with and without output_filter; model_spec names the model, serving_default, 123."""
        t: Any = self
        for output_filter in (True, False):
            resp = yield self.grpc("Predict", self.predict_request(output_filter=output_filter))
            t.assertIn("y", resp.outputs)
            t.assertEqual(resp.outputs["y"].dtype, types_pb2.DT_FLOAT)
            t.assertEqual(list(resp.outputs["y"].float_val), [3.0])
            self.assertSpec(resp.model_spec, "default", "serving_default", 123)

    @defer.inlineCallbacks
    def test_grpc_predict_half_plus_three(self):  # type: ignore[no-untyped-def]
        """TMS testGoodModelConfig: half_plus_three (a TF1 model whose signatures parse
        serialized tf.Example) answers y = 4.0 at x = 2.0, version 123."""
        t: Any = self
        for output_filter in (True, False):
            resp = yield self.grpc("Predict", self.predict_request("half_plus_three", output_filter))
            t.assertEqual(list(resp.outputs["y"].float_val), [4.0])
            self.assertSpec(resp.model_spec, "half_plus_three", "serving_default", 123)

    @defer.inlineCallbacks
    def test_grpc_get_model_status(self):  # type: ignore[no-untyped-def]
        """TMS testGetModelStatus: one version, 123, error_code 0."""
        t: Any = self
        req = get_model_status_pb2.GetModelStatusRequest()
        req.model_spec.name = "default"
        resp = yield self.grpc("GetModelStatus", req, "models")
        t.assertEqual([(s.version, s.status.error_code) for s in resp.model_version_status], [(123, 0)])

    @defer.inlineCallbacks
    def test_grpc_get_model_metadata(self):  # type: ignore[no-untyped-def]
        """TMS testGetModelMetadata: the name asked for, version 123, one metadata entry:
        signature_def."""
        t: Any = self
        req = get_model_metadata_pb2.GetModelMetadataRequest()
        req.model_spec.name = "default"
        req.metadata_field.append("signature_def")
        resp = yield self.grpc("GetModelMetadata", req)
        t.assertEqual((resp.model_spec.name, resp.model_spec.version.value), ("default", 123))
        t.assertEqual(list(resp.metadata), ["signature_def"])

    @defer.inlineCallbacks
    def _classify(self, name: str):  # type: ignore[no-untyped-def]
        t: Any = self
        req = classification_pb2.ClassificationRequest()
        req.model_spec.name, req.model_spec.signature_name = name, "classify_x_to_y"
        add_example(req, x=2.0)
        resp = yield self.grpc("Classify", req)
        t.assertEqual(len(resp.result.classifications), 1)
        t.assertEqual([c.score for c in resp.result.classifications[0].classes], [3.0])
        self.assertSpec(resp.model_spec, name, "classify_x_to_y", 123)

    def test_grpc_classify(self) -> defer.Deferred[None]:
        """TMS testClassify: score 3.0 at x = 2.0 (TF1 model)."""
        return self._classify("default")  # type: ignore[no-any-return]

    def test_grpc_classify_tf2(self) -> defer.Deferred[None]:
        """TMS testClassifyTf2: the same from the TF2 export (whose signatures' method name is
        predict: TF Serving does not check it by default)."""
        return self._classify("default_tf2")  # type: ignore[no-any-return]

    @defer.inlineCallbacks
    def _regress(self, name: str):  # type: ignore[no-untyped-def]
        t: Any = self
        req = regression_pb2.RegressionRequest()
        req.model_spec.name, req.model_spec.signature_name = name, "regress_x_to_y"
        add_example(req, x=2.0)
        resp = yield self.grpc("Regress", req)
        t.assertEqual([r.value for r in resp.result.regressions], [3.0])
        self.assertSpec(resp.model_spec, name, "regress_x_to_y", 123)

    def test_grpc_regress(self) -> defer.Deferred[None]:
        """TMS testRegress: 3.0 at x = 2.0 (TF1 model)."""
        return self._regress("default")  # type: ignore[no-any-return]

    def test_grpc_regress_tf2(self) -> defer.Deferred[None]:
        """TMS testRegressTf2: the same from the TF2 export."""
        return self._regress("default_tf2")  # type: ignore[no-any-return]

    @defer.inlineCallbacks
    def _multi_inference(self, name: str):  # type: ignore[no-untyped-def]
        t: Any = self
        req = inference_pb2.MultiInferenceRequest()
        for sig, method in (("regress_x_to_y", "tensorflow/serving/regress"),
                            ("classify_x_to_y", "tensorflow/serving/classify")):
            task = req.tasks.add()
            task.model_spec.name, task.model_spec.signature_name, task.method_name = name, sig, method
        add_example(req, x=2.0)
        resp = yield self.grpc("MultiInference", req)
        t.assertEqual(len(resp.results), 2)
        t.assertEqual(resp.results[0].regression_result.regressions[0].value, 3.0)
        t.assertEqual(resp.results[1].classification_result.classifications[0].classes[0].score, 3.0)
        for i in range(2):
            self.assertSpec(resp.results[i].model_spec, name, req.tasks[i].model_spec.signature_name, 123)

    def test_grpc_multi_inference(self) -> defer.Deferred[None]:
        """TMS testMultiInference: regress and classify in one call, 3.0 each."""
        return self._multi_inference("default")  # type: ignore[no-any-return]

    def test_grpc_multi_inference_tf2(self) -> defer.Deferred[None]:
        """TMS testMultiInferenceTf2."""
        return self._multi_inference("default_tf2")  # type: ignore[no-any-return]

    # -- gRPC: what the .cc files say --------------------------------------------------------
    @defer.inlineCallbacks
    def test_grpc_counter_reference_variables(self):  # type: ignore[no-untyped-def]
        """PI PredictionWithCustomizedSignatures: saved_model_counter (reference-typed
        variables) counts 0, 1, 0, 1 (output_filter), 4 (incr_counter_by 3)."""
        t: Any = self
        req = predict_pb2.PredictRequest()
        req.model_spec.name = "counter"
        req.model_spec.version.value = 123
        seen = []
        for sig in ("reset_counter", "get_counter", "incr_counter", "reset_counter", "incr_counter",
                    "incr_counter_by"):
            req.model_spec.signature_name = sig
            del req.output_filter[:]
            if sig == "incr_counter" and seen:
                req.output_filter.append("output")
            if sig == "incr_counter_by":
                req.inputs["delta"].dtype = types_pb2.DT_FLOAT
                req.inputs["delta"].float_val.append(3.0)
            resp = yield self.grpc("Predict", req)
            t.assertEqual(resp.outputs["output"].dtype, types_pb2.DT_FLOAT)
            seen.append(list(resp.outputs["output"].float_val))
            self.assertSpec(resp.model_spec, "counter", sig, 123)
        t.assertEqual(seen[1:], [[0.0], [1.0], [0.0], [1.0], [4.0]])

    def test_grpc_missing_model_spec(self) -> defer.Deferred[Any]:
        """SRC predict_impl.cc: no model_spec is INVALID_ARGUMENT "Missing ModelSpec"."""
        req = predict_pb2.PredictRequest()
        req.inputs["x"].float_val.append(1.0)
        return self.assertGrpcError(self.grpc("Predict", req), Code.INVALID_ARGUMENT,  # type: ignore[no-any-return]
                                    "Missing ModelSpec")

    def test_grpc_unknown_model(self) -> defer.Deferred[Any]:
        """AR / HRH PredictModelNameVersionErrors: an unknown model is NOT_FOUND
        "Servable not found for request: Latest(half)"."""
        return self.assertGrpcError(self.grpc("Predict", self.predict_request("half")),  # type: ignore[no-any-return]
                                    Code.NOT_FOUND, "Servable not found for request: Latest(half)")

    def test_grpc_unknown_version(self) -> defer.Deferred[Any]:
        """HRH PredictModelNameVersionErrors: an unknown version is NOT_FOUND."""
        return self.assertGrpcError(  # type: ignore[no-any-return]
            self.grpc("Predict", self.predict_request(version=50)), Code.NOT_FOUND,
            "Servable not found for request: Specific(default, 50)")

    def test_grpc_unknown_signature(self) -> defer.Deferred[Any]:
        """SRC predict_util.cc: FAILED_PRECONDITION 'Serving signature key "nope" not found.'"""
        return self.assertGrpcError(  # type: ignore[no-any-return]
            self.grpc("Predict", self.predict_request(signature_name="nope")), Code.FAILED_PRECONDITION,
            'Serving signature key "nope" not found.')

    @defer.inlineCallbacks
    def test_grpc_output_filter_errors(self):  # type: ignore[no-untyped-def]
        """SRC predict_util.cc: an output_filter alias the signature lacks, and one given
        twice: INVALID_ARGUMENT with TF Serving's words."""
        req = self.predict_request()
        req.output_filter[:] = ["nope"]
        yield self.assertGrpcError(self.grpc("Predict", req), Code.INVALID_ARGUMENT,
                                   "output tensor alias not found in signature: nope")
        req.output_filter[:] = ["y", "y"]
        yield self.assertGrpcError(self.grpc("Predict", req), Code.INVALID_ARGUMENT,
                                   "duplicate output tensor alias: y")

    def test_grpc_classify_unknown_signature(self) -> defer.Deferred[Any]:
        """SRC classifier.cc: INVALID_ARGUMENT "No signature was found with the name: nope"."""
        req = classification_pb2.ClassificationRequest()
        req.model_spec.name, req.model_spec.signature_name = "default", "nope"
        add_example(req, x=2.0)
        return self.assertGrpcError(self.grpc("Classify", req), Code.INVALID_ARGUMENT,  # type: ignore[no-any-return]
                                    "No signature was found with the name: nope")

    @defer.inlineCallbacks
    def test_grpc_version_label(self):  # type: ignore[no-untyped-def]
        """HRH Predict by label (the same through gRPC's model_spec.version_label): the
        labelled version answers; an unknown label is INVALID_ARGUMENT "Unrecognized servable
        version label"."""
        t: Any = self
        resp = yield self.grpc("Predict", self.predict_request(TWO_VERSIONS, version_label=LABEL))
        t.assertEqual(list(resp.outputs["y"].float_val), [3.0])
        t.assertEqual(resp.model_spec.version.value, 123)
        yield self.assertGrpcError(self.grpc("Predict", self.predict_request(TWO_VERSIONS, version_label=NO_LABEL)),
                                   Code.INVALID_ARGUMENT, "Unrecognized servable version label")

    def test_grpc_metadata_needs_a_field(self) -> defer.Deferred[Any]:
        """SRC get_model_metadata_impl.cc: INVALID_ARGUMENT "GetModelMetadataRequest must
        specify at least one metadata_field"."""
        req = get_model_metadata_pb2.GetModelMetadataRequest()
        req.model_spec.name = "default"
        return self.assertGrpcError(self.grpc("GetModelMetadata", req), Code.INVALID_ARGUMENT,  # type: ignore[no-any-return]
                                    "GetModelMetadataRequest must specify at least one metadata_field")

    def test_grpc_multi_inference_duplicate_signature(self) -> defer.Deferred[Any]:
        """SRC multi_inference.cc: "Duplicate evaluation of signature: regress_x_to_y"."""
        req = inference_pb2.MultiInferenceRequest()
        for _ in range(2):
            task = req.tasks.add()
            task.model_spec.name, task.model_spec.signature_name = "default", "regress_x_to_y"
            task.method_name = "tensorflow/serving/regress"
        add_example(req, x=2.0)
        return self.assertGrpcError(self.grpc("MultiInference", req), Code.INVALID_ARGUMENT,  # type: ignore[no-any-return]
                                    "Duplicate evaluation of signature: regress_x_to_y")

    def test_grpc_model_that_fails_to_load(self) -> defer.Deferred[Any]:
        """A version that fails to load is not served: NOT_FOUND naming it (ServerCore finds no
        servable; SRC server_core.cc)."""
        return self.assertGrpcError(self.grpc("Predict", self.predict_request("broken")),  # type: ignore[no-any-return]
                                    Code.NOT_FOUND, "broken")

    # -- REST: tensorflow_model_server_test.py ---------------------------------------------
    @defer.inlineCallbacks
    def test_rest_classify(self):  # type: ignore[no-untyped-def]
        """TMS testClassifyREST: {"results": [[["", 3.0]]]}."""
        reply = yield self.rest("POST", "/v1/models/default:classify",
                                {"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}]})
        self.assertJson(reply, 200, {"results": [[["", 3.0]]]})

    @defer.inlineCallbacks
    def test_rest_regress(self):  # type: ignore[no-untyped-def]
        """TMS testRegressREST: {"results": [3.0]}."""
        reply = yield self.rest("POST", "/v1/models/default:regress",
                                {"signature_name": "regress_x_to_y", "examples": [{"x": 2.0}]})
        self.assertJson(reply, 200, {"results": [3.0]})

    @defer.inlineCallbacks
    def test_rest_predict_row(self):  # type: ignore[no-untyped-def]
        """TMS testPredictREST: {"predictions": [3.0, 3.5, 4.0]}."""
        reply = yield self.rest("POST", "/v1/models/default:predict", {"instances": [2.0, 3.0, 4.0]})
        self.assertJson(reply, 200, {"predictions": [3.0, 3.5, 4.0]})

    @defer.inlineCallbacks
    def test_rest_predict_columnar(self):  # type: ignore[no-untyped-def]
        """TMS testPredictColumnarREST: {"outputs": [3.0, 3.5, 4.0]}."""
        reply = yield self.rest("POST", "/v1/models/default:predict", {"inputs": [2.0, 3.0, 4.0]})
        self.assertJson(reply, 200, {"outputs": [3.0, 3.5, 4.0]})

    @defer.inlineCallbacks
    def test_rest_status(self):  # type: ignore[no-untyped-def]
        """TMS testGetStatusREST: the exact JSON."""
        reply = yield self.rest("GET", "/v1/models/default")
        self.assertJson(reply, 200, {"model_version_status": [
            {"version": "123", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]})

    @defer.inlineCallbacks
    def test_rest_metadata(self):  # type: ignore[no-untyped-def]
        """TMS testGetModelMetadataREST: equal to half_plus_two_model_metadata.json."""
        with open(os.path.join(TESTDATA, "half_plus_two_model_metadata.json")) as f:
            expected = json.load(f)
        reply = yield self.rest("GET", "/v1/models/default/metadata")
        self.assertJson(reply, 200, expected)

    # -- REST: http_rest_api_handler_test.cc -----------------------------------------------
    @defer.inlineCallbacks
    def test_rest_unsupported_api_calls(self):  # type: ignore[no-untyped-def]
        """HRH UnsupportedApiCalls: INVALID_ARGUMENT (400) "Malformed request" or "Missing
        model name" for paths outside the API."""
        for method, path, part in (
                ("GET", "/v1/foo", "Malformed request"), ("POST", "/v1/foo", "Malformed request"),
                ("GET", "/v1/models", "Missing model name"),
                ("GET", "/v1/models/debug/model_name", "Malformed request"),
                ("POST", "/v1/models", "Malformed request"),
                ("GET", "/v1/models/foo:predict", "Malformed request"),
                ("GET", "/v1/models/foo/version/50:predict", "Malformed request"),
                ("POST", "/v1/models/foo/version/50:regress", "Malformed request"),
                ("POST", "/v1/models/foo/versions/HELLO:regress", "Malformed request"),
                ("POST", "/v1/models/foo/metadata", "Malformed request"),
                ("POST", "/v1/models/foo/label/some_label:regress", "Malformed request"),
                ("POST", "/v1/models/foo/versions/50/labels/some_label:regress", "Malformed request"),
                ("POST", "/v1/models/foo/versions/some_label:regress", "Malformed request")):
            reply = yield self.rest(method, path)
            self.assertRestError(reply, 400, part)

    @defer.inlineCallbacks
    def test_rest_version_outside_int64(self):  # type: ignore[no-untyped-def]
        """HRH UnsupportedApiCalls: uint64's max as a version: 400 "Failed to convert version"."""
        reply = yield self.rest("POST", f"/v1/models/foo/versions/{2**64 - 1}:regress")
        self.assertRestError(reply, 400, "Failed to convert version")

    @defer.inlineCallbacks
    def test_rest_unknown_model_or_version(self):  # type: ignore[no-untyped-def]
        """HRH PredictModelNameVersionErrors: unknown model, unknown version, a longer name:
        NOT_FOUND (404)."""
        for path in ("/v1/models/foo:predict", "/v1/models/foo/versions/50:predict",
                     f"/v1/models/{TWO_VERSIONS}99:predict", f"/v1/models/{TWO_VERSIONS}/versions/50:predict"):
            reply = yield self.rest("POST", path, {"instances": [1]})
            self.assertRestError(reply, 404, "Servable not found")

    @defer.inlineCallbacks
    def test_rest_unknown_model_doc_answer(self):  # type: ignore[no-untyped-def]
        """AR's example: 404 {"error": "Servable not found for request: Latest(half)"}."""
        reply = yield self.rest("POST", "/v1/models/half:predict", {"instances": [1.0, 5.0]})
        self.assertJson(reply, 404, {"error": "Servable not found for request: Latest(half)"})

    @defer.inlineCallbacks
    def test_rest_predict_request_errors(self):  # type: ignore[no-untyped-def]
        """HRH PredictRequestErrors: empty body, not JSON, a string for a float, an unknown
        label, a number as signature_name: INVALID_ARGUMENT (400) with TF Serving's words."""
        path = f"/v1/models/{TWO_VERSIONS}:predict"
        for raw, part in ((b"", "JSON Parse error: The document is empty"),
                          (b"instances = [1, 2]", "JSON Parse error: Invalid value"),
                          (b'{ "instances": ["x", "y"] }', "not of expected type: float"),
                          (b'{ "signature_name": 100 }', "'signature_name' key must be a string value.")):
            reply = yield self.rest("POST", path, raw=raw)
            self.assertRestError(reply, 400, part)
        reply = yield self.rest("POST", f"/v1/models/{TWO_VERSIONS}/labels/{NO_LABEL}:predict",
                                {"instances": ["x", "y"]})
        self.assertRestError(reply, 400, "Unrecognized servable version label")

    @defer.inlineCallbacks
    def test_rest_predict(self):  # type: ignore[no-untyped-def]
        """HRH Predict: latest, /versions/123, /labels/Version_Label, a signature_name, the
        columnar format; each answer application/json."""
        base = f"/v1/models/{TWO_VERSIONS}"
        for path, body, expected in (
                (":predict", {"instances": [[1.0, 2.0], [3.0, 4.0]]}, {"predictions": [[2.5, 3.0], [3.5, 4.0]]}),
                ("/versions/123:predict", {"instances": [1.0, 2.0]}, {"predictions": [2.5, 3.0]}),
                (f"/labels/{LABEL}:predict", {"instances": [1.0, 2.0]}, {"predictions": [2.5, 3.0]}),
                ("/versions/123:predict", {"signature_name": "serving_default", "instances": [3.0, 4.0]},
                 {"predictions": [3.5, 4.0]}),
                ("/versions/123:predict", {"signature_name": "serving_default", "inputs": [3.0, 4.0]},
                 {"outputs": [3.5, 4.0]})):
            reply = yield self.rest("POST", base + path, body)
            self.assertJson(reply, 200, expected)

    @defer.inlineCallbacks
    def test_rest_regress_by_version_and_label(self):  # type: ignore[no-untyped-def]
        """HRH Regress: {"results": [42]} at x = 80, latest, by version, by label."""
        body = {"signature_name": "regress_x_to_y", "examples": [{"x": 80.0}]}
        for path in (":regress", "/versions/123:regress", f"/labels/{LABEL}:regress"):
            reply = yield self.rest("POST", f"/v1/models/{TWO_VERSIONS}{path}", body)
            self.assertJson(reply, 200, {"results": [42]})

    @defer.inlineCallbacks
    def test_rest_classify_by_label(self):  # type: ignore[no-untyped-def]
        """HRH Classify: [[["", 12]]] at x = 20; by label [[["", 7]]] at x = 10."""
        body = {"signature_name": "classify_x_to_y", "examples": [{"x": 20.0}]}
        reply = yield self.rest("POST", f"/v1/models/{TWO_VERSIONS}:classify", body)
        self.assertJson(reply, 200, {"results": [[["", 12]]]})
        body = {"signature_name": "classify_x_to_y", "examples": [{"x": 10.0}]}
        reply = yield self.rest("POST", f"/v1/models/{TWO_VERSIONS}/labels/{LABEL}:classify", body)
        self.assertJson(reply, 200, {"results": [[["", 7]]]})

    @defer.inlineCallbacks
    def test_rest_status_by_version_and_label(self):  # type: ignore[no-untyped-def]
        """HRH GetStatus: latest, /versions/123, /labels/Version_Label: the same JSON."""
        expected = {"model_version_status": [
            {"version": "123", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
        for path in ("", "/versions/123", f"/labels/{LABEL}"):
            reply = yield self.rest("GET", f"/v1/models/{TWO_VERSIONS}{path}")
            self.assertJson(reply, 200, expected)

    @defer.inlineCallbacks
    def test_rest_metadata_two_versions(self):  # type: ignore[no-untyped-def]
        """HRH GetModelMetadata: equal to saved_model_half_plus_two_2_versions_metadata.json."""
        with open(os.path.join(TESTDATA, "saved_model_half_plus_two_2_versions_metadata.json")) as f:
            expected = json.load(f)
        reply = yield self.rest("GET", f"/v1/models/{TWO_VERSIONS}/metadata")
        self.assertJson(reply, 200, expected)

    # -- REST: json_tensor_test.cc (through the predict, classify and regress APIs) ----------
    @defer.inlineCallbacks
    def test_rest_tensor_errors(self):  # type: ignore[no-untyped-def]
        """JT SingleUnnamedTensorErrors: ragged sizes, ragged shapes, mixed types, both keys,
        a number as signature_name: 400 with TF Serving's words."""
        for body, part in (
                ('{"signature_name": 5, "instances": [[1,2],[3,4],[5,6,7]]}', "must be a string value"),
                ('{"instances": [[1,2],[3,4],[5,6,7]], "inputs": [[1,2],[3,4],[5,6,7]]}', "Not formatted correctly"),
                ('{"instances": [[1,2],[3,4],[5,6,7]]}', "Expecting tensor size"),
                ('{"instances": [[1,2],[3,4],[[5,6]]]}', "Expecting shape"),
                ('{"instances": [1, [1]]}', "Expecting shape"),
                ('{"instances": [[1,2],["a", "b"]]}', "not of expected type")):
            reply = yield self.rest("POST", "/v1/models/default:predict", raw=body.encode())
            self.assertRestError(reply, 400, part)

    @defer.inlineCallbacks
    def test_rest_example_errors(self):  # type: ignore[no-untyped-def]
        """JT ClassifyRegressRequestTest.JsonErrors, for classify and regress: 400 with TF
        Serving's words (before the model is looked up)."""
        for body, part in (
                ('{"signature_name": ["hello"], "examples": [{"names": ["foo", "bar"]}]}',
                 "'signature_name' key must be a string"),
                ('{"context": [{"names": ["foo", "bar"]}]}', "Example must be JSON object"),
                ('{"examples": {"names": ["foo", "bar"]}}', "list/array"),
                ('{"examples": [[{"names": ["foo", "bar"]}]]}', "Example must be JSON object"),
                ('{"examples": [{"names": [10, null]}]}', "names has element with unexpected JSON type: Null"),
                ('{"examples": [{"names": [10, 10.0]}]}', "feature: names expecting type: int64"),
                ('{"examples": [{"names": [10, {"test": 10}]}]}',
                 "names has element with unexpected JSON type: Object"),
                ('{"examples": [{"names": [[10], 20]}]}', "names has element with unexpected JSON type: Array"),
                ('{"examples": [{"names": [20, 18446744073709551603]}]}', "Only int64_t is supported")):
            for api in ("classify", "regress"):
                reply = yield self.rest("POST", f"/v1/models/default:{api}", raw=body.encode())
                self.assertRestError(reply, 400, part)

    # -- REST: api_rest.md ----------------------------------------------------------------
    @defer.inlineCallbacks
    def test_rest_doc_example_half_plus_three(self):  # type: ignore[no-untyped-def]
        """AR Example: status 123 AVAILABLE; predict [1, 2, 5] -> [3.5, 4.0, 5.5]; regress on
        the "tensorflow/serving/regress" signature -> [3.5, 4.0]."""
        base = "/v1/models/saved_model_half_plus_three"
        reply = yield self.rest("GET", base)
        self.assertJson(reply, 200, {"model_version_status": [
            {"version": "123", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]})
        reply = yield self.rest("POST", base + ":predict", {"instances": [1.0, 2.0, 5.0]})
        self.assertJson(reply, 200, {"predictions": [3.5, 4.0, 5.5]})
        reply = yield self.rest("POST", base + ":regress", {
            "signature_name": "tensorflow/serving/regress", "examples": [{"x": 1.0}, {"x": 2.0}]})
        self.assertJson(reply, 200, {"results": [3.5, 4.0]})

    @defer.inlineCallbacks
    def test_rest_b64_binary_input(self):  # type: ignore[no-untyped-def]
        """AR "Encoding binary values": {"b64": ...} is a DT_STRING value; here a serialized
        tf.Example fed to the classify signature through predict (row and columnar)."""
        b64 = {"b64": base64.b64encode(serialized_example(x=2.0)).decode()}
        reply = yield self.rest("POST", "/v1/models/default:predict",
                                {"signature_name": "classify_x_to_y", "instances": [b64]})
        self.assertJson(reply, 200, {"predictions": [[3.0]]})
        reply = yield self.rest("POST", "/v1/models/default:predict",
                                {"signature_name": "classify_x_to_y", "inputs": [b64]})
        self.assertJson(reply, 200, {"outputs": [[3.0]]})

    @defer.inlineCallbacks
    def test_rest_nan_and_infinity(self):  # type: ignore[no-untyped-def]
        """AR "JSON conformance": NaN, Infinity and -Infinity are read and written as tokens."""
        reply = yield self.rest("POST", "/v1/models/default:predict",
                                raw=b'{"instances": [NaN, Infinity, -Infinity]}')
        self.assertEqual(reply.code, 200, reply.body)
        self.assertIn(b"NaN", reply.body)  # type: ignore[attr-defined]
        predictions = reply.json()["predictions"]
        self.assertNotEqual(predictions[0], predictions[0])  # type: ignore[attr-defined]
        self.assertEqual(predictions[1:], [float("inf"), float("-inf")])  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_rest_float_shortest_text(self):  # type: ignore[no-untyped-def]
        """AR (DT_FLOAT is a JSON number) and JT's outputs: a float32 is printed with the
        shortest text that reads back as it: 0.5 * 0.1 + 2 is 2.05, not 2.049999952316284."""
        for api, body, key in (("predict", {"instances": [0.1]}, b'"predictions"'),
                               ("regress", {"signature_name": "regress_x_to_y", "examples": [{"x": 0.1}]},
                                b'"results"')):
            reply = yield self.rest("POST", f"/v1/models/default:{api}", body)
            self.assertEqual(reply.code, 200, reply.body)  # type: ignore[attr-defined]
            self.assertIn(key, reply.body)  # type: ignore[attr-defined]
            self.assertIn(b"2.05", reply.body)  # type: ignore[attr-defined]
            self.assertNotIn(b"2.0499", reply.body)  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_rest_unknown_signature(self):  # type: ignore[no-untyped-def]
        """SRC http_rest_api_handler.cc GetInfoMap: 400 'Serving signature name: "nope" not
        found in signature def'."""
        reply = yield self.rest("POST", "/v1/models/default:predict",
                                {"signature_name": "nope", "instances": [1.0]})
        self.assertRestError(reply, 400, 'Serving signature name: "nope" not found in signature def')

    @defer.inlineCallbacks
    def test_rest_model_that_fails_to_load(self):  # type: ignore[no-untyped-def]
        """A version that failed to load is not served: 404 naming it."""
        reply = yield self.rest("POST", "/v1/models/broken:predict", {"instances": [1.0]})
        self.assertRestError(reply, 404, "broken")


def _mark_stand_in_differences() -> None:
    if shutil.which("tensorflow_model_server"):
        return  # the real thing: every fact must hold
    for fact, reason in STAND_IN_DIFFERENCES.items():
        getattr(Facts, fact).todo = f"DevServer differs from TF Serving: {reason}"


_mark_stand_in_differences()


class DirectFacts(Facts, unittest.TestCase):
    """The facts against the backend itself (the DevServer, or TF Serving when installed)."""

    timeout = 120

    def setUp(self) -> None:
        backend = direct_backend()
        self.rest_url = backend.rest_url
        self.client = GrpcClient(backend.grpc_target)
        self.addCleanup(self.client.close)


class TfscacheFacts(Facts, unittest.TestCase):
    """The same facts through a tfscache node in front of a backend it owns."""

    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        cfg = node_config(source(), shared.backend(), tempfile.mkdtemp(prefix="tfscache-facts-"),
                          serving={"failure_backoff_seconds": 30})
        self.node = InProcessNode(cfg)
        yield self.node.start()
        self.addCleanup(self.node.stop)
        self.rest_url = self.node.rest_url
        self.client = GrpcClient(self.node.grpc_target)
        self.addCleanup(self.client.close)
