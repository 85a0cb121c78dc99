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
from tfscache.modelspec import _PREDICT_RE, _STATUS_RE


def _decode_value(v: Any) -> Any:
    if isinstance(v, dict) and set(v) == {"b64"}:
        try:
            return base64.b64decode(v["b64"], validate=True)
        except Exception:
            raise invalid("Unable to base64 decode")
    if isinstance(v, list):
        return [_decode_value(x) for x in v]
    return v


def _row_inputs(instances: Any, names: list[str]) -> dict[str, Any]:
    if not isinstance(instances, list) or not instances:
        raise invalid("Expecting 'instances' to be a non-empty list")
    if all(isinstance(i, dict) and set(i) != {"b64"} for i in instances):
        keys = set(instances[0])
        if any(set(i) != keys for i in instances):
            raise invalid("Expecting all instances to have the same keys")
        return {k: [_decode_value(i[k]) for i in instances] for k in keys}
    if len(names) != 1:
        raise invalid("instances must be objects naming each input when the signature has several inputs")
    return {names[0]: [_decode_value(i) for i in instances]}


def _columnar_inputs(inputs: Any, names: list[str]) -> dict[str, Any]:
    if isinstance(inputs, dict) and set(inputs) != {"b64"}:
        return {k: _decode_value(v) for k, v in inputs.items()}
    if len(names) != 1:
        raise invalid("inputs must be an object naming each input when the signature has several inputs")
    return {names[0]: _decode_value(inputs)}


def _json_value(arr: np.ndarray) -> Any:
    """Like TF Serving: float32 printed with its shortest representation, bytes as text or b64."""
    if arr.dtype == np.float32:
        return np.vectorize(lambda v: float(str(v)) if math.isfinite(v) else float(v), otypes=[object])(arr).tolist() \
            if arr.size else arr.tolist()
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


def _example(features: dict[str, Any]) -> bytes:
    feats = {}
    for k, v in features.items():
        values = v if isinstance(v, list) else [v]
        values = [_decode_value(x) for x in values]
        if all(isinstance(x, bool) for x in values) or all(isinstance(x, int) and not isinstance(x, bool)
                                                          for x in values):
            feats[k] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(x) for x in values]))
        elif all(isinstance(x, int | float) for x in values):
            feats[k] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(x) for x in values]))
        elif all(isinstance(x, str | bytes) for x in values):
            feats[k] = tf.train.Feature(bytes_list=tf.train.BytesList(
                value=[x.encode() if isinstance(x, str) else x for x in values]))
        else:
            raise invalid(f"Unsupported feature value for {k}")
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


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
        try:
            body = json.loads(raw or b"null")
        except ValueError as e:
            raise invalid(f"JSON Parse error: {e}")
        if not isinstance(body, dict):
            raise invalid("JSON Value is not an object")
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
            v = int(version) if version else None
            if meta:
                ver = self.manager.resolve(name, v, label)
                spec = {"name": ver.name, "signature_name": "", "version": str(ver.version)}
                sigs = json_format.MessageToDict(signature_def_map(ver), preserving_proto_field_name=True)
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
            body = self._body()
            ver = self.manager.resolve(unquote(name), int(version) if version else None,
                                       unquote(label) if label else None)
            sig_name = body.get("signature_name", "")
            api = api.lower()
            if api == "predict":
                self._predict(ver, sig_name, body)
            else:
                if "examples" not in body:
                    raise invalid("'examples' is a required field")
                context = body.get("context") or {}
                examples = [_example({**context, **e}) for e in body["examples"]]
                if api == "classify":
                    _, rows = inference.classify(ver, sig_name, examples)
                    self._send(200, {"results": [[[lbl, s] for lbl, s in row] for row in rows]})
                else:
                    _, values = inference.regress(ver, sig_name, examples)
                    self._send(200, {"results": values})
        except ServingError as e:
            self._error(e)
        except Exception as e:  # never a stack trace to the client
            self._error(ServingError(Code.INTERNAL, f"{type(e).__name__}: {e}"))

    def _predict(self, ver: Any, sig_name: str, body: dict[str, Any]) -> None:
        if ("instances" in body) == ("inputs" in body):
            raise invalid("Missing 'inputs' or 'instances' key" if "instances" not in body
                          else "Not allowed to have both 'inputs' and 'instances' keys")
        _, sig = inference.signature(ver, sig_name)
        names = sorted(sig.inputs)
        row = "instances" in body
        inputs = _row_inputs(body["instances"], names) if row else _columnar_inputs(body["inputs"], names)
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
