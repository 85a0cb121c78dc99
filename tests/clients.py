"""Asynchronous TF Serving clients for tests that run a node on the test's own reactor: the
official gRPC stubs (through grpc futures) and plain HTTP JSON (treq).  A blocking client call
on the reactor thread would deadlock an in-process node."""

from __future__ import annotations

import json
from typing import Any

import grpc
import treq
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from twisted.internet import defer, reactor

from tfscache.util.grpc_twisted import future_to_deferred


class Reply:
    def __init__(self, code: int, body: bytes, headers: Any) -> None:
        self.code, self.body, self.headers = code, body, headers

    def json(self) -> Any:
        return json.loads(self.body)


@defer.inlineCallbacks
def http(method: str, url: str, body: Any = None, raw: bytes | None = None,
         headers: dict[bytes, list[bytes]] | None = None, timeout: float = 120):  # type: ignore[no-untyped-def]
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    resp = yield treq.request(method, url, data=data, headers=headers, timeout=timeout, persistent=False)
    content = yield treq.content(resp)
    return Reply(resp.code, content, resp.headers)


def rest_predict(base: str, name: str, xs: list[float], version: int | None = None) -> defer.Deferred[Reply]:
    path = f"/v1/models/{name}" + (f"/versions/{version}" if version is not None else "") + ":predict"
    return http("POST", base + path, {"instances": xs})


class GrpcClient:
    """The official tensorflow-serving-api stubs, each call as a Deferred."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def call(self, method: Any, request: Any, timeout: float = 120, **kw: Any) -> defer.Deferred[Any]:
        return future_to_deferred(reactor, method.future(request, timeout=timeout, **kw))

    def predict(self, name: str, xs: list[float], version: int | None = None,
                timeout: float = 120) -> defer.Deferred[Any]:
        return self.call(self.predictions.Predict, predict_request(name, xs, version), timeout)

    def status(self, name: str) -> defer.Deferred[Any]:
        req = get_model_status_pb2.GetModelStatusRequest()
        req.model_spec.name = name
        return self.call(self.models.GetModelStatus, req)

    def metadata(self, name: str) -> defer.Deferred[Any]:
        req = get_model_metadata_pb2.GetModelMetadataRequest()
        req.model_spec.name = name
        req.metadata_field.append("signature_def")
        return self.call(self.predictions.GetModelMetadata, req)

    def close(self) -> None:
        self.channel.close()


def predict_request(name: str, xs: list[float], version: int | None = None) -> Any:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = name
    if version is not None:
        req.model_spec.version.value = version
    req.inputs["x"].dtype = 1  # DT_FLOAT
    req.inputs["x"].tensor_shape.dim.add().size = len(xs)
    req.inputs["x"].float_val.extend(xs)
    return req
