"""Parsing what requests say about models: REST paths and gRPC model_spec bytes."""

from google.protobuf import wrappers_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    predict_pb2,
    regression_pb2,
)
from twisted.trial import unittest

from tfscache import modelspec
from tfscache.errors import Code, ServingError
from tfscache.modelspec import ModelRef, parse_grpc_request, parse_rest_path, validate_name


class RestPathTests(unittest.TestCase):
    def test_predict_forms(self) -> None:
        c = parse_rest_path("POST", "/v1/models/m:predict")
        self.assertEqual((c.ref, c.api), (ModelRef("m"), "predict"))
        c = parse_rest_path("POST", "/v1/models/m/versions/3:classify")
        self.assertEqual((c.ref, c.api), (ModelRef("m", 3), "classify"))
        c = parse_rest_path("POST", "/v1/models/m/labels/stable:regress")
        self.assertEqual((c.ref, c.api), (ModelRef("m", None, "stable"), "regress"))

    def test_case_insensitive_and_url_decoded(self) -> None:
        c = parse_rest_path("post", "/V1/Models/my%20model/VERSIONS/7:PREDICT")
        self.assertEqual((c.ref, c.api), (ModelRef("my model", 7), "predict"))

    def test_status_and_metadata(self) -> None:
        self.assertEqual(parse_rest_path("GET", "/v1/models/m").api, "status")
        c = parse_rest_path("GET", "/v1/models/m/versions/2/metadata")
        self.assertEqual((c.ref, c.api), (ModelRef("m", 2), "metadata"))

    def assertCode(self, code: Code, method: str, path: str) -> ServingError:
        err = self.assertRaises(ServingError, parse_rest_path, method, path)
        self.assertEqual(err.code, code, err.message)
        return err

    def test_refused(self) -> None:
        err = self.assertCode(Code.INVALID_ARGUMENT, "GET", "/v1/models")
        self.assertIn("Missing model name", err.message)
        self.assertCode(Code.INVALID_ARGUMENT, "POST", "/v1/models/m")  # no :verb
        self.assertCode(Code.INVALID_ARGUMENT, "POST", "/v1/models/m:explode")
        self.assertCode(Code.INVALID_ARGUMENT, "DELETE", "/v1/models/m")
        self.assertCode(Code.INVALID_ARGUMENT, "GET", "/v1/models/m/versions/x")
        err = self.assertCode(Code.INVALID_ARGUMENT, "GET", "/v1/models/m/versions/99999999999999999999")
        # TF Serving's words (http_rest_api_util.cc; http_rest_api_handler_test.cc checks them
        # for uint64's max)
        self.assertEqual(err.message, "Failed to convert version: 99999999999999999999 to numeric.")
        err = self.assertCode(Code.INVALID_ARGUMENT, "POST", f"/v1/models/m/versions/{2**64 - 1}:regress")
        self.assertIn("Failed to convert version", err.message)

    def test_names_that_could_escape_are_refused(self) -> None:
        for bad in ("..", "%2e%2e", "a%2Fb", "a%5Cb", "%00x", ".hidden", "x" * 300):
            self.assertCode(Code.INVALID_ARGUMENT, "POST", f"/v1/models/{bad}:predict")
        for bad in ("", ".", "..", "a/b", "a\\b", "/abs", "nul\x00", "tab\t"):
            self.assertRaises(ServingError, validate_name, bad)
        self.assertEqual(validate_name("tenant-42_model.v2"), "tenant-42_model.v2")


class GrpcModelSpecTests(unittest.TestCase):
    """The official request messages, serialized, read by our small carrier protos."""

    def test_every_request_type(self) -> None:
        for cls in (predict_pb2.PredictRequest, classification_pb2.ClassificationRequest,
                    regression_pb2.RegressionRequest, get_model_metadata_pb2.GetModelMetadataRequest,
                    get_model_status_pb2.GetModelStatusRequest):
            req = cls()
            req.model_spec.name = "m"
            req.model_spec.version.value = 4
            if hasattr(req.model_spec, "signature_name"):
                req.model_spec.signature_name = "sig"
            ref = parse_grpc_request("Predict", req.SerializeToString())
            self.assertEqual((ref.name, ref.version, ref.label), ("m", 4, None), cls.__name__)

    def test_predict_with_inputs_and_label(self) -> None:
        req = predict_pb2.PredictRequest()
        req.model_spec.name = "m"
        req.model_spec.version_label = "canary"
        req.inputs["x"].float_val.extend([1.0, 2.0])
        req.inputs["x"].dtype = 1
        ref = parse_grpc_request("Predict", req.SerializeToString())
        self.assertEqual((ref.name, ref.version, ref.label), ("m", None, "canary"))

    def test_version_zero_is_a_version(self) -> None:
        req = predict_pb2.PredictRequest()
        req.model_spec.name = "m"
        req.model_spec.version.CopyFrom(wrappers_pb2.Int64Value(value=0))
        self.assertEqual(parse_grpc_request("Predict", req.SerializeToString()).version, 0)

    def test_multi_inference(self) -> None:
        req = inference_pb2.MultiInferenceRequest()
        for sig in ("classify_x_to_y", "regress_x_to_y"):
            t = req.tasks.add()
            t.model_spec.name = "m"
            t.model_spec.signature_name = sig
            t.method_name = "tensorflow/serving/classify"
        ref = parse_grpc_request("MultiInference", req.SerializeToString())
        self.assertEqual((ref.name, ref.version), ("m", None))

    def test_multi_inference_mixed_models_refused(self) -> None:
        req = inference_pb2.MultiInferenceRequest()
        for name in ("a", "b"):
            req.tasks.add().model_spec.name = name
        err = self.assertRaises(ServingError, parse_grpc_request, "MultiInference", req.SerializeToString())
        self.assertEqual(err.code, Code.INVALID_ARGUMENT)
        empty = inference_pb2.MultiInferenceRequest().SerializeToString()
        self.assertRaises(ServingError, parse_grpc_request, "MultiInference", empty)

    def test_garbage_and_missing_spec(self) -> None:
        for payload in (b"\xff\xff\xff", b"\x0a\x05ab", b""):
            err = self.assertRaises(ServingError, parse_grpc_request, "Predict", payload)
            self.assertEqual(err.code, Code.INVALID_ARGUMENT)

    def test_hostile_name_in_spec(self) -> None:
        req = predict_pb2.PredictRequest()
        req.model_spec.name = "../../etc"
        err = self.assertRaises(ServingError, parse_grpc_request, "Predict", req.SerializeToString())
        self.assertEqual(err.code, Code.INVALID_ARGUMENT)

    def test_a_spec_read_once_is_known_by_its_bytes(self) -> None:
        """The same spec bytes give the same answer, read or remembered; the tensors around
        them do not matter; a spec that failed is never remembered."""
        req = predict_pb2.PredictRequest()
        req.model_spec.name = "tenant-7"
        req.model_spec.version.value = 3
        req.model_spec.signature_name = "serving_default"
        req.inputs["x"].tensor_content = b"\x00" * 300_000  # a long field before nothing else
        req.output_filter.append("y")
        first = parse_grpc_request("Predict", req.SerializeToString())
        self.assertIn(req.model_spec.SerializeToString(), modelspec._REFS)
        req.inputs["x"].tensor_content = b"\x01" * 10
        again = parse_grpc_request("Predict", req.SerializeToString())
        self.assertEqual(first, ModelRef("tenant-7", 3, None, "serving_default"))
        self.assertIs(again, first)
        bad = predict_pb2.PredictRequest()
        bad.model_spec.name = "../up"
        for _ in range(2):
            err = self.assertRaises(ServingError, parse_grpc_request, "Predict", bad.SerializeToString())
            self.assertEqual(err.code, Code.INVALID_ARGUMENT)

    def test_a_spec_sent_twice_is_merged_as_protobuf_does(self) -> None:
        """Field 1 twice: protobuf merges the second into the first (what a version pin
        appended to a request relies on); the walk leaves such a request to protobuf."""
        first = predict_pb2.PredictRequest()
        first.model_spec.name = "m"
        first.model_spec.version.value = 1
        second = predict_pb2.PredictRequest()
        second.model_spec.version.value = 2
        payload = first.SerializeToString() + second.SerializeToString()
        self.assertIsNone(modelspec._model_spec_field(payload))
        ref = parse_grpc_request("Predict", payload)
        self.assertEqual((ref.name, ref.version), ("m", 2))

    def test_the_walk_refuses_what_is_not_well_formed(self) -> None:
        spec = b"\x0a\x01m"
        self.assertEqual(modelspec._model_spec_field(b"\x0a\x03" + spec), spec)
        for payload in (b"\x0a\x05ab",            # a length past the end
                        b"\x0a\x03" + spec + b"\x10",  # a varint cut short
                        b"\x0b\x0a\x03" + spec,   # a group
                        b"\x02\x00",              # field 0
                        b"\x12\x01z",             # no field 1 at all
                        b"\x0a\x03" + spec + b"\x19\x00"):  # a fixed64 cut short
            self.assertIsNone(modelspec._model_spec_field(payload), payload)

    def test_a_long_spec_is_read_every_time_never_remembered(self) -> None:
        """What the remembered specs hold is bounded: a spec longer than 1 KiB (a signature name
        of 2,000 characters, say) is read each time and never kept."""
        req = predict_pb2.PredictRequest()
        req.model_spec.name = "m"
        req.model_spec.signature_name = "s" * 2000
        for _ in range(2):
            ref = parse_grpc_request("Predict", req.SerializeToString())
            self.assertEqual((ref.name, ref.signature_name), ("m", "s" * 2000))
        self.assertNotIn(req.model_spec.SerializeToString(), modelspec._REFS)

    def test_a_request_of_many_fields_is_left_to_protobuf(self) -> None:
        req = predict_pb2.PredictRequest()
        req.model_spec.name = "wide"
        for i in range(100):
            req.inputs[f"x{i}"].float_val.append(1.0)
        payload = req.SerializeToString()
        self.assertIsNone(modelspec._model_spec_field(payload))
        self.assertEqual(parse_grpc_request("Predict", payload).name, "wide")
