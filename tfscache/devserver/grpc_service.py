"""The DevServer's gRPC API: PredictionService and ModelService with the official protos."""

from __future__ import annotations

import time
from concurrent import futures
from typing import Any

import grpc
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from tfscache.devserver import inference
from tfscache.devserver.servables import ServableManager, Version, reload_response
from tfscache.errors import Code, ServingError, invalid


def _spec(spec: Any) -> tuple[str, int | None, str | None]:
    which = spec.WhichOneof("version_choice")
    return (spec.name, spec.version.value if which == "version" else None,
            spec.version_label if which == "version_label" else None)


def _abort(context: grpc.ServicerContext, err: ServingError) -> None:
    context.abort(grpc.StatusCode[err.code.name], err.message)


def _serialized_examples(inp: Any) -> list[bytes]:
    which = inp.WhichOneof("kind")
    if which == "example_list":
        return [e.SerializeToString() for e in inp.example_list.examples]
    if which == "example_list_with_context":
        out = []
        ctx = inp.example_list_with_context.context
        for e in inp.example_list_with_context.examples:
            merged = type(e)()
            merged.CopyFrom(ctx)
            merged.MergeFrom(e)
            out.append(merged.SerializeToString())
        return out
    raise invalid("Input is empty")


class _Base:
    def __init__(self, manager: ServableManager) -> None:
        self.manager = manager

    def _guard(self, context: grpc.ServicerContext, fn: Any) -> Any:
        try:
            return fn()
        except ServingError as e:
            _abort(context, e)


def _add_classes(out: Any, row: list[tuple[str, float]]) -> None:
    for label, score in row:
        out.classes.add(label=label, score=score)


class PredictionService(_Base, prediction_service_pb2_grpc.PredictionServiceServicer):
    def _ver(self, spec: Any) -> Version:
        return self.manager.resolve(*_spec(spec))

    def _request_ver(self, request: Any) -> Version:
        if not request.HasField("model_spec"):  # TF Serving's check in every API
            raise invalid("Missing ModelSpec")
        return self._ver(request.model_spec)

    def _reply_spec(self, out_spec: Any, ver: Version, sig: str) -> None:
        out_spec.name = ver.name
        out_spec.version.value = ver.version
        out_spec.signature_name = sig

    def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            ver = self._request_ver(request)
            inputs = {k: inference.from_tensor_proto(v) for k, v in request.inputs.items()}
            sig, outputs = inference.predict(ver, request.model_spec.signature_name, inputs,
                                             list(request.output_filter))
            resp = predict_pb2.PredictResponse()
            self._reply_spec(resp.model_spec, ver, sig)
            for k, v in outputs.items():
                resp.outputs[k].CopyFrom(inference.to_tensor_proto(v))
            return resp
        return self._guard(context, run)

    def Classify(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            ver = self._request_ver(request)
            sig, rows = inference.classify(ver, request.model_spec.signature_name,
                                           _serialized_examples(request.input))
            resp = classification_pb2.ClassificationResponse()
            self._reply_spec(resp.model_spec, ver, sig)
            for row in rows:
                _add_classes(resp.result.classifications.add(), row)
            return resp
        return self._guard(context, run)

    def Regress(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            ver = self._request_ver(request)
            sig, values = inference.regress(ver, request.model_spec.signature_name,
                                            _serialized_examples(request.input))
            resp = regression_pb2.RegressionResponse()
            self._reply_spec(resp.model_spec, ver, sig)
            for v in values:
                resp.result.regressions.add(value=v)
            return resp
        return self._guard(context, run)

    def MultiInference(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            # TF Serving's checks (multi_inference.cc), in its order
            if not request.tasks:
                raise invalid("Inference tasks not specified")
            names, signatures = set(), set()
            for task in request.tasks:
                if not task.model_spec.name:
                    raise invalid("Found ModelSpec with an empty model name.")
                names.add(task.model_spec.name)
                if len(names) > 1:
                    raise invalid("All ModelSpecs in a MultiInferenceRequest must access the same model name.")
                sig_name = task.model_spec.signature_name or inference.DEFAULT_SIGNATURE
                if sig_name in signatures:
                    raise invalid(f"Duplicate evaluation of signature: {sig_name}")
                signatures.add(sig_name)
                if task.method_name not in (inference.CLASSIFY, inference.REGRESS):
                    raise ServingError(Code.UNIMPLEMENTED,
                                       f"Unsupported signature method_name: {task.method_name}")
            ver = self._ver(request.tasks[0].model_spec)
            assert ver.loaded is not None
            for task in request.tasks:
                sig_name = task.model_spec.signature_name or inference.DEFAULT_SIGNATURE
                if sig_name not in ver.loaded.signature_defs:
                    raise invalid(f"Requested signature not found in model graph: {sig_name}")
            examples = _serialized_examples(request.input)
            resp = inference_pb2.MultiInferenceResponse()
            for task in request.tasks:
                result = resp.results.add()
                if task.method_name == inference.CLASSIFY:
                    sig, rows = inference.classify(ver, task.model_spec.signature_name, examples)
                    for row in rows:
                        _add_classes(result.classification_result.classifications.add(), row)
                else:
                    sig, values = inference.regress(ver, task.model_spec.signature_name, examples)
                    for v in values:
                        result.regression_result.regressions.add(value=v)
                self._reply_spec(result.model_spec, ver, sig)
            return resp
        return self._guard(context, run)

    def GetModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            if not request.HasField("model_spec"):
                raise invalid("Missing ModelSpec")
            if not request.metadata_field:
                raise invalid("GetModelMetadataRequest must specify at least one metadata_field")
            for field in request.metadata_field:
                if field != "signature_def":
                    raise invalid(f"Metadata field {field} is not supported")
            ver = self._ver(request.model_spec)
            resp = get_model_metadata_pb2.GetModelMetadataResponse()
            self._reply_spec(resp.model_spec, ver, "")
            resp.model_spec.ClearField("signature_name")
            resp.metadata["signature_def"].Pack(signature_def_map(ver))
            return resp
        return self._guard(context, run)


def signature_def_map(ver: Version) -> Any:
    m = get_model_metadata_pb2.SignatureDefMap()
    assert ver.loaded is not None
    for k, v in ver.loaded.signature_defs.items():
        m.signature_def[k].CopyFrom(v)
    return m


class ModelService(_Base, model_service_pb2_grpc.ModelServiceServicer):
    def GetModelStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            if not request.HasField("model_spec"):
                raise invalid("Missing ModelSpec")
            resp = get_model_status_pb2.GetModelStatusResponse()
            for ver in self.manager.status(*_spec(request.model_spec)):
                st = resp.model_version_status.add(version=ver.version, state=ver.state)
                if ver.error is not None:
                    st.status.error_code = int(ver.error.code)
                    st.status.error_message = ver.error.message
            return resp
        return self._guard(context, run)

    def HandleReloadConfigRequest(self, request: Any, context: grpc.ServicerContext) -> Any:
        remaining = context.time_remaining()
        deadline = None if remaining is None or remaining > 1e9 else time.monotonic() + remaining
        try:
            self.manager.reload(request.config, deadline)
        except ServingError as e:
            if e.code == Code.INVALID_ARGUMENT:
                _abort(context, e)
            return reload_response(e)
        return reload_response(None)


def make_server(manager: ServableManager, host: str, port: int) -> tuple[grpc.Server, int]:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="devserver-grpc"),
        options=[("grpc.max_receive_message_length", 2**31 - 1),
                 ("grpc.max_send_message_length", 2**31 - 1)],
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(manager), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(manager), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    return server, bound
