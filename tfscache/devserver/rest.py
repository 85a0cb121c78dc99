"""The DevServer's REST API: TF Serving's JSON API (stdlib threaded HTTP server)."""

from __future__ import annotations

import base64
import gzip
import json
import math
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

import numpy as np
import tensorflow as tf
from google.protobuf import json_format

from tfscache.devserver import inference
from tfscache.devserver.grpc_service import signature_def_map
from tfscache.devserver.servables import STATE_NAMES, ServableManager
from tfscache.errors import Code, ServingError, invalid
from tfscache.modelspec import _PREDICT_RE, _STATUS_RE, MAX_VERSION


def _decode_value(v: Any) -> Any:
    if isinstance(v, dict) and set(v) == {"b64"}:
        try:
            return base64.b64decode(v["b64"], validate=True)
        except Exception:
            raise invalid("Unable to base64 decode")
    if isinstance(v, list):
        return [_decode_value(x) for x in v]
    return v


def _version(text: str | None) -> int | None:
    if not text:
        return None
    if int(text) > MAX_VERSION:  # TF Serving's words (http_rest_api_util.cc)
        raise invalid(f"Failed to convert version: {text} to numeric.")
    return int(text)


def _debug(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _json_type(value: Any) -> str:
    """rapidjson's type names, which TF Serving's messages use."""
    if value is None:
        return "Null"
    if value is True:
        return "True"
    if value is False:
        return "False"
    if isinstance(value, dict):
        return "Object"
    if isinstance(value, list):
        return "Array"
    if isinstance(value, str):
        return "String"
    return "Number"


def _shape(value: Any) -> tuple[int, ...]:
    shape: list[int] = []
    while isinstance(value, list):
        shape.append(len(value))
        value = value[0] if value else None
    return tuple(shape)


def _check_leaves(value: Any, dtype: Any) -> None:
    """TF Serving's JSON type check per tensor element (json_tensor.cc AddValueToTensor)."""
    if isinstance(value, list):
        for v in value:
            _check_leaves(v, dtype)
        return
    if dtype == tf.string:
        ok = isinstance(value, str) or (isinstance(value, dict) and set(value) == {"b64"})
    elif dtype == tf.bool:
        ok = isinstance(value, bool)
    elif dtype.is_floating:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif dtype.is_integer:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and not dtype.min <= value <= dtype.max:
            raise invalid(f"JSON Value: {_debug(value)} is out of range for type: {dtype.name}")
    else:
        ok = True
    if not ok:
        raise invalid(f"JSON Value: {_debug(value)} Type: {_json_type(value)} is not of expected type: "
                      f"{dtype.name}")


def _consistent(name: str, values: list[Any], sizes: dict[str, tuple[int, ...]]) -> None:
    for i, value in enumerate(values):
        shape = _shape(value)
        first = sizes.setdefault(name, shape)
        if int(np.prod(first)) != int(np.prod(shape)):
            raise invalid(f"Expecting tensor size: {int(np.prod(first))} but got: {int(np.prod(shape))}")
        if first != shape:
            raise invalid(f"Expecting shape {list(first)} but got: {list(shape)}")
        del i


def _row_inputs(instances: Any, sig: Any, body: Any) -> dict[str, Any]:
    if not isinstance(instances, list):
        raise invalid(f"JSON Value: {_debug(body)} Expecting 'instances' to be an list/array")
    if not instances:
        raise invalid(f"JSON Value: {_debug(body)} No values in 'instances' array")
    names = sorted(sig.inputs)
    named = isinstance(instances[0], dict) and set(instances[0]) != {"b64"}
    sizes: dict[str, tuple[int, ...]] = {}
    for i, inst in enumerate(instances):
        is_obj = isinstance(inst, dict) and set(inst) != {"b64"}
        if named and not is_obj:
            raise invalid(f"Expecting object but got list at item {i} of input list")
        if not named and is_obj:
            raise invalid(f"Expecting value/list but got object at item {i} of input list")
    if named:
        columns: dict[str, list[Any]] = {}
        for inst in instances:
            for k in names:
                if k not in inst:
                    raise invalid(f"Missing named input: {k} in 'instances' object.")
            for k, v in inst.items():
                if k not in sig.inputs:
                    raise invalid(f"JSON object: does not have named input: {k}")
                columns.setdefault(k, []).append(v)
        for k, vs in columns.items():
            _consistent(k, vs, sizes)
            _check_leaves(vs, tf.dtypes.as_dtype(sig.inputs[k].dtype).base_dtype)
        return {k: _decode_value(vs) for k, vs in columns.items()}
    if len(names) != 1:
        raise invalid("instances must be objects naming each input when the signature has several inputs")
    _consistent(names[0], instances, sizes)
    _check_leaves(instances, tf.dtypes.as_dtype(sig.inputs[names[0]].dtype).base_dtype)
    return {names[0]: _decode_value(instances)}


def _columnar_inputs(inputs: Any, sig: Any) -> dict[str, Any]:
    names = sorted(sig.inputs)
    if isinstance(inputs, dict) and set(inputs) != {"b64"}:
        for k, v in inputs.items():
            if k not in sig.inputs:
                raise invalid(f"JSON object: does not have named input: {k}")
            _check_leaves(v, tf.dtypes.as_dtype(sig.inputs[k].dtype).base_dtype)
        return {k: _decode_value(v) for k, v in inputs.items()}
    if len(names) != 1:
        raise invalid("inputs must be an object naming each input when the signature has several inputs")
    _check_leaves(inputs, tf.dtypes.as_dtype(sig.inputs[names[0]].dtype).base_dtype)
    return {names[0]: _decode_value(inputs)}


def _f32(v: Any) -> Any:
    """A float32 as TF Serving prints it: the shortest text that reads back as that float32
    (``2.05``, not ``2.049999952316284``); NaN and infinities as JSON's extension tokens."""
    return float(str(np.float32(v))) if math.isfinite(v) else float(v)


def _json_value(arr: np.ndarray) -> Any:
    """Like TF Serving: float32 printed with its shortest representation, bytes as text or b64."""
    if arr.dtype == np.float32:
        return np.vectorize(_f32, otypes=[object])(arr).tolist() if arr.size else arr.tolist()
    if arr.dtype.kind in ("O", "S"):
        def enc(v: Any) -> Any:
            if isinstance(v, bytes):
                try:
                    return v.decode("utf-8")
                except UnicodeDecodeError:
                    return {"b64": base64.b64encode(v).decode()}
            return v
        return np.vectorize(enc, otypes=[object])(arr).tolist() if arr.size else arr.tolist()
    return arr.tolist()


def _feature(name: str, values: list[Any]) -> Any:
    """One tf.train.Feature from JSON values, by TF Serving's rules (AddValueToFeature): the
    first value's JSON type fixes the kind; integers are int64, decimals float, strings and
    b64 objects bytes, booleans int64."""
    kind: str | None = None
    out: list[Any] = []
    item: Any
    for v in values:
        if v is None or isinstance(v, list) or (isinstance(v, dict) and set(v) != {"b64"}):
            raise invalid(f"Feature: {name} has element with unexpected JSON type: {_json_type(v)}")
        if isinstance(v, bool) or isinstance(v, int):
            this, item = "int64", int(v)
            if item > 2**63 - 1:
                raise invalid(f"Feature: {name} has uint64_t element. Only int64_t is supported.")
        elif isinstance(v, float):
            this, item = "float", v
        else:
            this, item = "bytes", v.encode() if isinstance(v, str) else _decode_value(v)
        if kind is None:
            kind = this
        elif kind != this:
            raise invalid(f"Unexpected element type in feature: {name} expecting type: {kind}")
        out.append(item)
    if kind == "int64":
        return tf.train.Feature(int64_list=tf.train.Int64List(value=out))
    if kind == "float":
        return tf.train.Feature(float_list=tf.train.FloatList(value=out))
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=out))


def _example_proto(value: Any) -> Any:
    if not isinstance(value, dict):
        raise invalid(f"Example must be JSON object but got JSON {_json_type(value)}")
    feats = {k: _feature(k, v if isinstance(v, list) else [v]) for k, v in value.items()}
    return tf.train.Example(features=tf.train.Features(feature=feats))


def _examples(body: dict[str, Any]) -> list[bytes]:
    """The serialized examples of a classify or regress body, context merged into each."""
    context = _example_proto(body["context"]) if "context" in body else None
    if "examples" not in body:
        raise invalid(f"JSON Value: {_debug(body)} When method is classify, key 'examples' is expected "
                      "and was not found")
    examples = body["examples"]
    if not isinstance(examples, list):
        raise invalid(f"JSON Value: {_debug(body)} Expecting 'examples' value to be an list/array")
    if not examples:
        raise invalid(f"JSON Value: {_debug(body)} 'examples' value is an empty array")
    out = []
    for e in examples:
        example = _example_proto(e)
        if context is not None:
            merged = type(example)()
            merged.CopyFrom(context)
            merged.MergeFrom(example)
            example = merged
        out.append(example.SerializeToString())
    return out


class Handler(BaseHTTPRequestHandler):
    manager: ServableManager
    protocol_version = "HTTP/1.1"
    # headers and body go out in two writes: with Nagle on, a keep-alive client waits for the
    # delayed ACK (~40 ms) before the body
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # no access log
        pass

    def _send(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, err: ServingError) -> None:
        self._send(err.http_status, {"error": err.message})

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if (self.headers.get("Content-Encoding") or "").lower() == "gzip":
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError):  # EOFError: a truncated stream
                raise invalid("Failed to decompress gzip request body")
        if not raw:
            raise invalid("JSON Parse error: The document is empty")
        try:
            body = json.loads(raw)
        except ValueError as e:  # rapidjson's wording for the common case
            raise invalid(f"JSON Parse error: Invalid value. at offset: {getattr(e, 'pos', 0)}")
        if not isinstance(body, dict):
            raise invalid(f"JSON Value: {_debug(body)} Is not object")
        if "signature_name" in body and not isinstance(body["signature_name"], str):
            raise invalid(f"JSON Value: {_debug(body)} not formatted correctly. 'signature_name' key must be "
                          "a string value.")
        return body

    def do_GET(self) -> None:
        try:
            if self.path.split("?")[0] == "/monitoring/prometheus/metrics":
                self._metrics()
                return
            if self.path.split("?")[0] == "/devserver/loads":
                self._send(200, {"loads": dict(self.manager.load_counts), "available": self.manager.available()})
                return
            m = _STATUS_RE.fullmatch(self.path.split("?")[0])
            if m is None:
                raise invalid(f"Malformed request: GET {self.path}")
            name, version, label, meta = m.groups()
            if not name:
                raise invalid("Missing model name in request.")
            name, label = unquote(name), unquote(label) if label else None
            v = _version(version)
            if meta:
                ver = self.manager.resolve(name, v, label)
                spec = {"name": ver.name, "signature_name": "", "version": str(ver.version)}
                # TF Serving prints every field, defaults too ("name": "", "unknown_rank": false)
                sigs = json_format.MessageToDict(signature_def_map(ver), preserving_proto_field_name=True,
                                                 always_print_fields_with_no_presence=True)
                self._send(200, {"model_spec": spec, "metadata": {"signature_def": sigs}})
                return
            statuses = [{
                "version": str(s.version), "state": STATE_NAMES.get(s.state, "UNKNOWN"),
                "status": {"error_code": s.error.code.name if s.error else "OK",
                           "error_message": s.error.message if s.error else ""},
            } for s in self.manager.status(name, v, label)]
            self._send(200, {"model_version_status": statuses})
        except ServingError as e:
            self._error(e)

    def _metrics(self) -> None:
        """A few of TF Serving's own metric names, so the cache's relay can be tested."""
        lines = ["# TYPE :tensorflow:cc:saved_model:load_attempt_count counter"]
        for key, count in sorted(self.manager.load_counts.items()):
            name, version = key.rsplit("/", 1)
            lines.append(f':tensorflow:cc:saved_model:load_attempt_count{{model_path="{name}",'
                         f'status="success",version="{version}"}} {count}')
        data = ("\n".join(lines) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        try:
            m = _PREDICT_RE.fullmatch(self.path.split("?")[0])
            if m is None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                raise invalid(f"Malformed request: POST {self.path}")
            name, version, label, api = m.groups()
            # TF Serving's order: the path, the body, then the servable (predict looks its
            # signature up before it reads inputs; classify and regress read examples first)
            v = _version(version)
            body = self._body()
            sig_name = body.get("signature_name", "")
            api = api.lower()
            examples = _examples(body) if api != "predict" else []
            ver = self.manager.resolve(unquote(name), v, unquote(label) if label else None)
            if api == "predict":
                self._predict(ver, sig_name, body)
            else:
                if api == "classify":
                    _, rows = inference.classify(ver, sig_name, examples)
                    self._send(200, {"results": [[[lbl, _f32(s)] for lbl, s in row] for row in rows]})
                else:
                    _, values = inference.regress(ver, sig_name, examples)
                    self._send(200, {"results": [_f32(v) for v in values]})
        except ServingError as e:
            self._error(e)
        except Exception as e:  # never a stack trace to the client
            self._error(ServingError(Code.INTERNAL, f"{type(e).__name__}: {e}"))

    def _predict(self, ver: Any, sig_name: str, body: dict[str, Any]) -> None:
        # TF Serving's REST order (json_tensor.cc FillPredictRequestFromJson): the signature's
        # inputs are looked up first, then the body's keys
        sig = ver.loaded.signature_defs.get(sig_name or inference.DEFAULT_SIGNATURE)
        if sig is None:
            raise invalid(f'Serving signature name: "{sig_name or inference.DEFAULT_SIGNATURE}" not found in '
                          "signature def")
        if "instances" in body and "inputs" in body:
            raise invalid(f"JSON Value: {_debug(body)} Not formatted correctly expecting only one of 'inputs' "
                          "or 'instances' keys to exist ")
        if "instances" not in body and "inputs" not in body:
            raise invalid("Missing 'inputs' or 'instances' key")
        row = "instances" in body
        inputs = _row_inputs(body["instances"], sig, body) if row else _columnar_inputs(body["inputs"], sig)
        _, outputs = inference.predict(ver, sig_name, inputs)
        if row:
            keys = sorted(outputs)
            if len(keys) == 1:
                self._send(200, {"predictions": _json_value(outputs[keys[0]])})
            else:
                n = len(next(iter(outputs.values())))
                cols = {k: _json_value(outputs[k]) for k in keys}
                self._send(200, {"predictions": [{k: cols[k][i] for k in keys} for i in range(n)]})
        else:
            if len(outputs) == 1:
                self._send(200, {"outputs": _json_value(next(iter(outputs.values())))})
            else:
                self._send(200, {"outputs": {k: _json_value(v) for k, v in outputs.items()}})


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default 5 drops SYNs when many clients connect at once


def make_server(manager: ServableManager, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"manager": manager})
    server = _Server((host, port), handler)
    server.daemon_threads = True
    return server
