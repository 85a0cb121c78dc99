"""Model ids and what requests say about them: TF Serving REST paths and gRPC ``model_spec``.

Only the model spec is ever parsed; request bodies and gRPC payloads pass through as bytes.
Every name is validated here, before it can reach a file system path or an S3 key.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import unquote

from google.protobuf.message import DecodeError

from tfscache.errors import Code, ServingError, invalid, not_found
from tfscache.proto import model_spec_pb2

MAX_NAME_BYTES = 255
MAX_VERSION = 2**63 - 1


class ModelId(NamedTuple):
    """One version of one model: the unit that is cached, loaded and evicted.  A named tuple
    (hashed and compared in C): it keys the dicts every request looks up, a dozen times."""

    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name}/{self.version}"


@dataclass(frozen=True)
class ModelRef:
    """What a request asks for: a name and at most one of a version or a label."""

    name: str
    version: int | None = None
    label: str | None = None
    signature_name: str = ""

    def describe(self) -> str:
        """TF Serving's wording for the servable request, used in NOT_FOUND messages."""
        if self.version is not None:
            return f"Specific({self.name}, {self.version})"
        return f"Latest({self.name})"


@functools.lru_cache(maxsize=4096)  # names repeat on every request; a refused one raises again
def validate_name(name: str) -> str:
    """Refuse a model name that could escape the cache directory or an S3 prefix."""
    if not name:
        raise invalid("Missing model name in request.")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise invalid(f"Model name is longer than {MAX_NAME_BYTES} bytes.")
    if name.startswith(".") or any(c in name for c in "/\\") or _CONTROL.search(name):
        raise invalid(
            f"Invalid model name {name!r}: it must not start with '.' nor contain '/', '\\' "
            "or control characters."
        )
    return name


def validate_version(version: int) -> int:
    if not 0 <= version <= MAX_VERSION:
        raise invalid(f"Invalid model version {version}: it must be a non-negative int64.")
    return version


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ASCII_DIGITS = re.compile(r"[0-9]+")


def parse_version_dir(dirname: str) -> int | None:
    """The version a directory name stands for, as TF Serving reads it: ASCII digits within
    int64, leading zeros allowed (``00000123`` is version 123, the layout TF Serving's own test
    models ship in); None for anything else, which TF Serving ignores."""
    if not _ASCII_DIGITS.fullmatch(dirname):
        return None
    version = int(dirname)
    return version if version <= MAX_VERSION else None


def version_dirs(names: list[str]) -> dict[int, str]:
    """Version -> directory name among ``names`` (the first in sorted order when two names,
    say ``123`` and ``0123``, stand for one version)."""
    out: dict[int, str] = {}
    for n in sorted(names):
        v = parse_version_dir(n)
        if v is not None:
            out.setdefault(v, n)
    return out


# Version labels live in the model source beside the version directories, one small JSON
# object per model: ``<name>/labels.json`` = ``{"stable": 123, "canary": 124}``.
LABELS_FILE = "labels.json"


def parse_labels(name: str, data: bytes) -> dict[str, int]:
    """A model's ``labels.json``: label -> version; ServingError (FAILED_PRECONDITION) naming
    the model for anything else."""

    def bad(why: str) -> ServingError:
        return ServingError(Code.FAILED_PRECONDITION,
                            f"The version labels of model {name} ({LABELS_FILE}) are invalid: {why}")

    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"not JSON ({e})")
    if not isinstance(doc, dict):
        raise bad("expected an object of label: version")
    labels: dict[str, int] = {}
    for label, version in doc.items():
        if not label or "/" in label or ":" in label or _CONTROL.search(label):
            raise bad(f"label {label!r} must be non-empty, without '/', ':' or control characters")
        if isinstance(version, str) and parse_version_dir(version) is not None:
            version = int(version)
        if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= MAX_VERSION:
            raise bad(f"label {label!r}: version {version!r} is not a non-negative int64")
        labels[label] = version
    return labels


# TF Serving's own expressions (http_rest_api_handler.cc), matched case-insensitively.
_PREDICT_RE = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)",
    re.IGNORECASE,
)
_STATUS_RE = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?",
    re.IGNORECASE,
)


# A REST API as the gRPC method that does the same: the one vocabulary of the ``api`` metric
# label for both protocols (TF Serving's own ``:tensorflow:serving:request_latency`` names
# its API label so too).
REST_API_METHODS = {
    "predict": "Predict", "classify": "Classify", "regress": "Regress",
    "metadata": "GetModelMetadata", "status": "GetModelStatus",
}


@dataclass(frozen=True)
class RestCall:
    """A parsed TF Serving REST path: which model and which API (predict, status, ...)."""

    ref: ModelRef
    api: str  # "predict" | "classify" | "regress" | "status" | "metadata"

    @property
    def method(self) -> str:
        """The gRPC method of the same API (``Predict``, ``GetModelStatus``...)."""
        return REST_API_METHODS[self.api]


def parse_rest_path(method: str, path: str) -> RestCall:
    """Parse ``/v1/models/...`` like TF Serving; raise ServingError for what it refuses."""
    method = method.upper()
    if method == "POST":
        m = _PREDICT_RE.fullmatch(path)
        if m is None:
            raise invalid(f"Malformed request: POST {path}")
        name, version, label, api = m.groups()
        api = api.lower()
    elif method == "GET":
        m = _STATUS_RE.fullmatch(path)
        if m is None:
            raise invalid(f"Malformed request: GET {path}")
        name, version, label, meta = m.groups()
        if not name:
            raise invalid("Missing model name in request.")
        api = "metadata" if meta else "status"
    else:
        raise invalid(f"Malformed request: {method} {path}")
    return RestCall(_make_ref(unquote(name), version, unquote(label) if label else None), api)


def _make_ref(name: str, version: str | int | None, label: str | None) -> ModelRef:
    validate_name(name)
    v: int | None = None
    if version is not None:
        try:
            v = validate_version(int(version))
        except (ValueError, ServingError):
            # TF Serving's words (http_rest_api_util.cc), for a version outside int64 too
            raise invalid(f"Failed to convert version: {version} to numeric.")
    if label is not None and not label:
        label = None
    return ModelRef(name=name, version=v, label=label)


def parse_model_spec(spec: model_spec_pb2.ModelSpec) -> ModelRef:
    which = spec.WhichOneof("version_choice")
    version = spec.version.value if which == "version" else None
    label = spec.version_label if which == "version_label" else None
    if not spec.name:  # TF Serving looks the empty name up, and finds nothing
        what = f"Specific(, {version})" if version is not None else "Latest()"
        raise not_found(f"Servable not found for request: {what}")
    if version is not None and version < 0:  # an int64 on the wire: no such version
        validate_name(spec.name)
        raise not_found(f"Servable not found for request: Specific({spec.name}, {version})")
    ref = _make_ref(spec.name, version, label)
    return ModelRef(ref.name, ref.version, ref.label, spec.signature_name)


# Method names of tensorflow.serving.PredictionService / ModelService whose request carries
# model_spec in field 1 (MultiInference carries it per task).
PREDICTION_METHODS = ("Classify", "Regress", "Predict", "MultiInference", "GetModelMetadata")


def parse_grpc_request(method: str, payload: bytes) -> ModelRef:
    """Read only the model spec of a serialized TF Serving request."""
    try:
        if method == "MultiInference":
            multi = model_spec_pb2.MultiInferenceCarrier.FromString(payload)
            # TF Serving's checks and words (multi_inference.cc); the first task's spec
            # names the servable, as there
            if not multi.tasks:
                raise invalid("Inference tasks not specified")
            if any(not t.model_spec.name for t in multi.tasks):
                raise invalid("Found ModelSpec with an empty model name.")
            if len({t.model_spec.name for t in multi.tasks}) != 1:
                raise invalid("All ModelSpecs in a MultiInferenceRequest must access the same model name.")
            return parse_model_spec(multi.tasks[0].model_spec)
        spec = _model_spec_field(payload)
        if spec is None:  # protobuf decides what the walk could not
            carrier = model_spec_pb2.ModelSpecCarrier.FromString(payload)
            if not carrier.HasField("model_spec"):
                raise invalid("Missing ModelSpec")
            return parse_model_spec(carrier.model_spec)
        known = _REFS.get(spec)
        if known is not None:
            return known
        model_spec = model_spec_pb2.ModelSpec.FromString(spec)
    except DecodeError as e:
        raise invalid(f"Could not parse the {method} request: {e}")
    ref = parse_model_spec(model_spec)
    if len(spec) <= _REF_KEY_MAX:
        if len(_REFS) >= _REFS_MAX:
            _REFS.clear()  # cheap bound: a refill costs one parse per model spec
        _REFS[spec] = ref
    return ref


# Model specs read before, by their bytes: a request's spec is read on every call, and a
# model's requests carry the same few bytes (only what parsed without an error is kept, and
# only specs of ordinary size: the memory they hold stays under _REFS_MAX x _REF_KEY_MAX).
_REFS: dict[bytes, ModelRef] = {}
_REFS_MAX = 8192
_REF_KEY_MAX = 1024
_WALK_FIELDS_MAX = 64  # top-level fields walked at most (a PredictRequest has one per input)


def _model_spec_field(payload: bytes) -> bytes | None:
    """The bytes of field 1 (``model_spec``) of a serialized request, found by walking its
    top-level fields only (protobuf would copy every other field, a tensor of many MB say,
    into the message's unknown fields); None unless the walk finds well-formed fields and
    field 1 exactly once (protobuf merges repeated ones): the full parse then decides.
    Hand-written: protobuf's Python API has no field scanner."""
    spec = None
    i, n = 0, len(payload)
    fields = 0
    while i < n:
        fields += 1
        if fields > _WALK_FIELDS_MAX:
            return None  # many inputs, say: protobuf's C parser walks them faster
        tag, i = _varint(payload, i)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            return None
        if wire == 2:
            length, i = _varint(payload, i)
            if field == 1:
                if spec is not None:
                    return None
                spec = payload[i:i + length]
            i += length
        elif wire == 0:
            _, i = _varint(payload, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            return None  # groups, or not protobuf
    return spec if i == n else None


def _varint(data: bytes, i: int) -> tuple[int, int]:
    """The varint at ``data[i:]`` and the index after it; past the end reads as a huge value
    (the caller's bounds check then fails the walk)."""
    result = shift = 0
    while i < len(data):
        b = data[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7
        if shift > 63:
            break
    return 0, len(data) + 1


__all__ = [
    "LABELS_FILE",
    "ModelId",
    "ModelRef",
    "RestCall",
    "ServingError",
    "parse_grpc_request",
    "parse_labels",
    "parse_model_spec",
    "parse_rest_path",
    "parse_version_dir",
    "validate_name",
    "validate_version",
    "version_dirs",
]
