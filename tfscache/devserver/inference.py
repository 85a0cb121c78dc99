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


def signature(ver: Version, name: str) -> tuple[str, Any]:
    """Predict's signature lookup (predict_util.cc): FAILED_PRECONDITION when missing."""
    name = name or DEFAULT_SIGNATURE
    assert ver.loaded is not None
    sig = ver.loaded.signature_defs.get(name)
    if sig is None:
        raise ServingError(Code.FAILED_PRECONDITION, f'Serving signature key "{name}" not found.')
    return name, sig


def _examples_signature(ver: Version, name: str) -> tuple[str, Any]:
    """Classify's and Regress's lookup (classifier.cc, regressor.cc): INVALID_ARGUMENT when
    missing; no method-name check (TF Serving's default, which TF2 models rely on)."""
    name = name or DEFAULT_SIGNATURE
    assert ver.loaded is not None
    sig = ver.loaded.signature_defs.get(name)
    if sig is None:
        raise invalid(f"No signature was found with the name: {name}")
    return name, sig


def _call(ver: Version, sig_name: str, feeds: dict[str, Any], outputs: list[str] | None = None
          ) -> dict[str, np.ndarray]:
    assert ver.loaded is not None
    try:
        return ver.loaded.run(sig_name, feeds, outputs)
    except (tf.errors.InvalidArgumentError, ValueError, TypeError, OverflowError) as e:
        msg = getattr(e, "message", None) or str(e)
        raise invalid(msg.splitlines()[0] if msg else type(e).__name__)


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
    wanted = None
    if output_filter:
        seen = set()
        for alias in output_filter:
            if alias not in sig.outputs:
                raise invalid(f"output tensor alias not found in signature: {alias} Outputs expected to be "
                              f"in the set {{{','.join(sorted(sig.outputs))}}}.")
            if alias in seen:
                raise invalid(f"duplicate output tensor alias: {alias}")
            seen.add(alias)
        wanted = list(output_filter)
    return sig_name, _call(ver, sig_name, inputs, wanted)


def _one_input(sig: Any, what: str) -> str:
    if len(sig.inputs) != 1:
        raise invalid("Expected one input Tensor.")
    if "inputs" not in sig.inputs:
        raise invalid(f"No {what} inputs found in SignatureDef: {sig}")
    return "inputs"


def classify(ver: Version, sig_name: str, examples: list[bytes]) -> tuple[str, list[list[tuple[str, float]]]]:
    sig_name, sig = _examples_signature(ver, sig_name)
    alias = _one_input(sig, "classification")
    if len(sig.outputs) not in (1, 2):
        raise invalid(f"Expected one or two output Tensors, found {len(sig.outputs)}")
    wanted = [k for k in ("classes", "scores") if k in sig.outputs]
    if not wanted:
        raise invalid('Expected classification signature outputs to contain at least one of "classes" or '
                      f'"scores". Signature was: {sig}')
    out = _call(ver, sig_name, {alias: np.array(examples, dtype=object)}, wanted)
    scores, classes = out.get("scores"), out.get("classes")
    for tensor in (t for t in (classes, scores) if t is not None):
        if tensor.ndim != 2:
            raise invalid(f"Expected Tensor shape: [batch_size num_classes] but got {list(tensor.shape)}")
    rows = []
    for i in range(len(examples)):
        # a missing output is an empty label or a zero score, as in TF Serving's result
        s: Any = scores[i] if scores is not None else [0.0] * len(classes[i])  # type: ignore[index]
        c: Any = classes[i] if classes is not None else [b""] * len(s)
        rows.append([(lbl.decode() if isinstance(lbl, bytes) else str(lbl), float(sc))
                     for lbl, sc in zip(c, s, strict=False)])
    return sig_name, rows


def regress(ver: Version, sig_name: str, examples: list[bytes]) -> tuple[str, list[float]]:
    sig_name, sig = _examples_signature(ver, sig_name)
    alias = _one_input(sig, "regression")
    if len(sig.outputs) != 1:
        raise invalid("Expected one output Tensor.")
    if "outputs" not in sig.outputs:
        raise invalid(f"No regression outputs found in SignatureDef: {sig}")
    out = _call(ver, sig_name, {alias: np.array(examples, dtype=object)}, ["outputs"])
    values = out["outputs"]
    if not (values.ndim == 1 or (values.ndim == 2 and values.shape[1] == 1)):
        raise invalid("Expected output Tensor shape to be either [batch_size] or [batch_size, 1] but got "
                      f"{list(values.shape)}")
    return sig_name, [float(v) for v in np.reshape(values, [-1])]


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
        array: np.ndarray = tf.make_ndarray(proto)
        return array
    except Exception as e:
        raise invalid(f"Invalid tensor: {e}")
