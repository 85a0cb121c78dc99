"""Running a loaded model's signatures as TF Serving does (shared by the REST and gRPC APIs)."""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from tfscache.devserver.servables import Version
from tfscache.errors import Code, ServingError, invalid

DEFAULT_SIGNATURE = "serving_default"
CLASSIFY = "tensorflow/serving/classify"
REGRESS = "tensorflow/serving/regress"
PREDICT = "tensorflow/serving/predict"


def signature(ver: Version, name: str, method: str | None = None) -> tuple[str, Any]:
    name = name or DEFAULT_SIGNATURE
    assert ver.loaded is not None
    sig = ver.loaded.signature_defs.get(name)
    if sig is None:
        raise ServingError(Code.FAILED_PRECONDITION, f'Serving signature key "{name}" not found.')
    if method is not None and sig.method_name != method:
        raise invalid(f"Expected {method.rsplit('/', 1)[-1]} signature method_name to be {method}. "
                      f"Was: {sig.method_name}")
    return name, sig


def _call(ver: Version, sig_name: str, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
    assert ver.loaded is not None
    fn = ver.loaded.model.signatures[sig_name]
    specs = fn.structured_input_signature[1]
    args = {}
    try:
        for key, value in feeds.items():
            args[key] = tf.convert_to_tensor(value, dtype=specs[key].dtype)
        out = fn(**args)
    except (tf.errors.InvalidArgumentError, ValueError, TypeError) as e:
        msg = getattr(e, "message", None) or str(e)
        raise invalid(msg.splitlines()[0] if msg else type(e).__name__)
    return {k: v.numpy() for k, v in out.items()}


def predict(ver: Version, sig_name: str, inputs: dict[str, Any], output_filter: list[str] | None = None
            ) -> tuple[str, dict[str, np.ndarray]]:
    sig_name, sig = signature(ver, sig_name)
    expected, sent = set(sig.inputs), set(inputs)
    if expected != sent:
        raise invalid(
            f"input size does not match signature: {len(sent)}!={len(expected)} len({{{','.join(sorted(sent))}}}) "
            f"!= len({{{','.join(sorted(expected))}}}). Sent extra: {{{','.join(sorted(sent - expected))}}}. "
            f"Missing but required: {{{','.join(sorted(expected - sent))}}}."
        )
    outputs = _call(ver, sig_name, inputs)
    if output_filter:
        unknown = [o for o in output_filter if o not in outputs]
        if unknown:
            raise invalid(f"output tensor alias not found in signature: {unknown[0]}")
        outputs = {k: v for k, v in outputs.items() if k in output_filter}
    return sig_name, outputs


def classify(ver: Version, sig_name: str, examples: list[bytes]) -> tuple[str, list[list[tuple[str, float]]]]:
    sig_name, sig = signature(ver, sig_name, CLASSIFY)
    out = _call(ver, sig_name, {next(iter(sig.inputs)): np.array(examples, dtype=object)})
    scores = out.get("scores")
    classes = out.get("classes")
    rows = []
    for i in range(len(examples)):
        s: Any = np.reshape(scores[i], [-1]) if scores is not None else []
        c: Any = np.reshape(classes[i], [-1]) if classes is not None else [b""] * len(s)
        rows.append([(lbl.decode() if isinstance(lbl, bytes) else str(lbl), float(sc))
                     for lbl, sc in zip(c, s, strict=False)])
    return sig_name, rows


def regress(ver: Version, sig_name: str, examples: list[bytes]) -> tuple[str, list[float]]:
    sig_name, sig = signature(ver, sig_name, REGRESS)
    out = _call(ver, sig_name, {next(iter(sig.inputs)): np.array(examples, dtype=object)})
    values = np.reshape(out["outputs"], [-1])
    return sig_name, [float(v) for v in values]


# -- TensorProto in the typed fields TF Serving uses (float_val, int_val, ...) -----------------
_FIELDS = {
    np.float32: (types_pb2.DT_FLOAT, "float_val"), np.float64: (types_pb2.DT_DOUBLE, "double_val"),
    np.int32: (types_pb2.DT_INT32, "int_val"), np.int16: (types_pb2.DT_INT16, "int_val"),
    np.int8: (types_pb2.DT_INT8, "int_val"), np.uint8: (types_pb2.DT_UINT8, "int_val"),
    np.int64: (types_pb2.DT_INT64, "int64_val"), np.bool_: (types_pb2.DT_BOOL, "bool_val"),
}


def to_tensor_proto(arr: np.ndarray) -> tensor_pb2.TensorProto:
    arr = np.asarray(arr)
    proto = tensor_pb2.TensorProto(
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in arr.shape]))
    if arr.dtype.kind in ("O", "S", "U"):
        proto.dtype = types_pb2.DT_STRING
        proto.string_val.extend(v if isinstance(v, bytes) else str(v).encode() for v in arr.flat)
        return proto
    dtype, field = _FIELDS.get(arr.dtype.type, (None, None))
    if dtype is None or field is None:
        return tf.make_tensor_proto(arr)
    proto.dtype = dtype
    getattr(proto, field).extend(arr.flatten().tolist())
    return proto


def from_tensor_proto(proto: tensor_pb2.TensorProto) -> np.ndarray:
    try:
        return tf.make_ndarray(proto)
    except Exception as e:
        raise invalid(f"Invalid tensor: {e}")
