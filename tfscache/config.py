"""The configuration: one YAML file, a schema with defaults, validated at start-up.

Any problem stops the daemon with ONE line naming the key (``ConfigError``).  Environment
variables override keys: ``TFSCACHE_SERVING__MAX_MODELS=20`` sets ``serving.max_models``
(the value is read as YAML, so numbers, booleans and lists work, except for string keys, whose
value is kept as it is: a token ``0123`` stays ``0123``); ``__`` separates the levels, and a
``TFSCACHE_`` variable without it is not configuration.  An empty variable means null.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import yaml

from tfscache.node.eviction import POLICIES

ENV_PREFIX = "TFSCACHE_"


class ConfigError(Exception):
    """A configuration problem, worded as one line that names the key."""


_REQUIRED = object()


@dataclass(frozen=True)
class Field:
    kind: str  # str | int | float | bool | size | list | map | choice
    default: Any = _REQUIRED
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    doc: str = ""
    maximum: float | None = None


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(value: Any) -> int:
    """Bytes from an int or a string like ``512MiB`` / ``10GB`` / ``1.5G``."""
    if isinstance(value, bool):
        raise ValueError("expected a size")
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError(f"expected a size such as 1073741824 or '1GiB', got {value!r}")
    number, unit = float(m.group(1)), (m.group(2) or "").lower()
    if "i" in unit:
        factor = 1024 ** ("kmgt".index(unit[0]) + 1)
    else:
        factor = _SIZE_UNITS[unit[:1]]
    return int(number * factor)


def _default_node_id() -> str:
    return socket.gethostname()


# The schema.  A nested dict is a section; a Field is a key.  Defaults fit a sidecar next to
# a TF Serving moved to ports 9500 (gRPC) and 9501 (REST), so clients keep 8500/8501.
SCHEMA: dict[str, Any] = {
    "node": {
        "id": Field("str", None, doc="Member id in the cluster; default: $POD_NAME (the downward API), "
                                     "else the host name."),
        "advertise_host": Field("str", None, doc="Address other nodes use to reach this one; default: "
                                                 "$POD_IP, else 127.0.0.1."),
    },
    "listen": {
        "host": Field("str", "0.0.0.0", doc="Interface for the client-facing ports."),
        "rest_port": Field("int", 8501, minimum=0, maximum=65535),
        "grpc_port": Field("int", 8500, minimum=0, maximum=65535),
        "grpc_threads": Field("int", 32, minimum=1,
                              doc="Ignored since the gRPC API runs on grpc.aio (no thread per call); "
                                  "accepted so that older files still load."),
        "max_request_bytes": Field("size", 64 * 1024 * 1024, minimum=1,
                                   doc="Largest REST body or gRPC message accepted."),
        "tls_cert": Field("str", None, doc="PEM certificate (chain): serve REST and gRPC over TLS."),
        "tls_key": Field("str", None, doc="PEM private key of tls_cert."),
        "drain_timeout_seconds": Field("float", 30.0, minimum=0,
                                       doc="On SIGTERM, how long in-flight requests may finish."),
        "max_connections": Field("int", 10_000, minimum=1,
                                 doc="Open REST connections at most; a new one past this is closed."),
        "max_buffered_bytes": Field("size", 1024**3, minimum=1,
                                    doc="Request bodies held by all REST connections together; the "
                                        "request past it gets 429 RESOURCE_EXHAUSTED."),
        "idle_timeout_seconds": Field("float", 120.0, minimum=0.1,
                                      doc="A REST connection idle this long between requests is closed."),
        "header_timeout_seconds": Field("float", 30.0, minimum=0.1,
                                        doc="A REST request whose headers take longer is closed."),
        "body_timeout_seconds": Field("float", 60.0, minimum=0.1,
                                      doc="A REST body that sends no byte for this long is closed."),
    },
    "model_provider": {
        "type": Field("choice", "disk", choices=("disk", "s3", "azure", "gcs")),
        "listing_ttl_seconds": Field("float", 5.0, minimum=0,
                                     doc="How long a version listing is reused for 'latest'."),
        "fetch_timeout_seconds": Field("float", 600.0, minimum=0.001),
        "check_interval_seconds": Field("float", 10.0, minimum=0.1,
                                        doc="How often the source is checked for readability (/readyz)."),
        "copy_threads": Field("int", 4, minimum=1,
                              doc="Copies at once, in threads of their own (not the reactor's pool)."),
        "disk": {
            "base_path": Field("str", None, doc="Root of <name>/<version>/ directories."),
        },
        "s3": {
            "bucket": Field("str", None),
            "prefix": Field("str", ""),
            "region": Field("str", None),
            "endpoint_url": Field("str", None, doc="For MinIO, Ceph, R2 and other S3-compatibles."),
            "max_concurrency": Field("int", 8, minimum=1),
            "multipart_threshold_bytes": Field("size", 8 * 1024 * 1024, minimum=5 * 1024 * 1024),
            "progress_interval_seconds": Field("float", 5.0, minimum=0.1),
            "verify_md5": Field("bool", True, doc="Check each plain-MD5 ETag after download (sizes always)."),
            "access_key_id": Field("str", None, doc="Prefer boto3's standard credential chain."),
            "secret_access_key": Field("str", None),
        },
        "azure": {
            "account_url": Field("str", None, doc="https://<account>.blob.core.windows.net (or Azurite's URL)."),
            "container": Field("str", None),
            "prefix": Field("str", ""),
            "connection_string": Field("str", None, doc="Or sas_token, or account_key; none: DefaultAzureCredential."),
            "sas_token": Field("str", None, doc="Needs read and list permissions."),
            "account_key": Field("str", None),
            "max_concurrency": Field("int", 8, minimum=1),
            "chunk_size_bytes": Field("size", 8 * 1024 * 1024, minimum=1024 * 1024,
                                      doc="Blobs above this are read in ranges of this size, in parallel."),
            "progress_interval_seconds": Field("float", 5.0, minimum=0.1),
            "verify_md5": Field("bool", True, doc="Check each blob's Content-MD5 where it has one (sizes always)."),
        },
        "gcs": {
            "bucket": Field("str", None),
            "prefix": Field("str", ""),
            "endpoint_url": Field("str", None, doc="For an emulator (fake-gcs-server); default: Google's."),
            "project": Field("str", None),
            "credentials_file": Field("str", None, doc="A service-account key file; default: ADC."),
            "anonymous": Field("bool", False, doc="No credentials: public buckets and emulators."),
            "max_concurrency": Field("int", 8, minimum=1),
            "chunk_size_bytes": Field("size", 8 * 1024 * 1024, minimum=1024 * 1024,
                                      doc="Objects above this are read in ranges of this size, in parallel."),
            "progress_interval_seconds": Field("float", 5.0, minimum=0.1),
            "verify_checksums": Field("bool", True, doc="Check each object's CRC32C, else its MD5 (sizes always)."),
        },
    },
    "disk_cache": {
        "path": Field("str", _REQUIRED, doc="Local directory for the copied models."),
        "capacity_bytes": Field("size", 10 * 1024**3, minimum=1),
        "eviction": Field("choice", "adaptive", choices=POLICIES,
                          doc="Which copy to delete for room: lru, or adaptive (decayed frequency x "
                              "copy time per byte)."),
    },
    "serving": {
        "grpc_target": Field("str", "127.0.0.1:9500", doc="host:port of TF Serving's gRPC API."),
        "model_path": Field("str", None, doc="disk_cache.path as TF Serving sees it (the base_path sent "
                                             "to it), when its container mounts the cache elsewhere; "
                                             "default: disk_cache.path."),
        "rest_url": Field("str", "http://127.0.0.1:9501", doc="TF Serving's REST API."),
        "max_models": Field("int", 10, minimum=1, doc="Models loaded at once."),
        "max_bytes": Field("size", 0, minimum=0, doc="Memory budget; 0 means count only."),
        "memory_factor": Field("float", 1.0, minimum=0.01,
                               doc="Estimated memory = size on disk x this factor."),
        "load_timeout_seconds": Field("float", 300.0, minimum=0.001),
        "config_write_timeout_seconds": Field(
            "float", 30.0, minimum=0.001,
            doc="Bound on one model-list write to TF Serving; past it the node's loads count as "
                "stuck (cold models go to other owners) until TF Serving finishes them."),
        "request_timeout_seconds": Field("float", 60.0, minimum=0.001,
                                         doc="Deadline of a forwarded request without its own."),
        "failure_backoff_seconds": Field("float", 30.0, minimum=0,
                                         doc="A failed load is not retried before this."),
        "churn_guard_seconds": Field("float", 2.0, minimum=0,
                                     doc="A model used this recently is not evicted to make room."),
        "capacity_wait_seconds": Field("float", 30.0, minimum=0,
                                       doc="How long a load waits for room before RESOURCE_EXHAUSTED."),
        "eviction": Field("choice", "adaptive", choices=POLICIES,
                          doc="Which idle model to unload for room: lru, or adaptive (decayed "
                              "frequency x reload time per slot or byte; bench/eviction.py)."),
        "model_platform": Field("str", "tensorflow"),
        "reset_on_start": Field("bool", True, doc="Send an empty model list at start-up."),
        "health_interval_seconds": Field("float", 5.0, minimum=0.1,
                                         doc="How often TF Serving's health is probed."),
    },
    "cluster": {
        "replicas_per_model": Field("int", 2, minimum=1),
        "forward_timeout_seconds": Field("float", 360.0, minimum=0.001,
                                         doc="Deadline of a routed request without its own: it may "
                                             "include a cold load on the owner."),
        "tls_ca_cert": Field("str", None, doc="PEM CA that signs the other nodes' certificates "
                                                  "(when listen.tls_cert is set); default: system roots."),
        "spread_inflight_threshold": Field("int", 32, minimum=1,
                                           doc="In-flight requests on the first owner before spreading."),
        "spill_over": Field("bool", True, doc="An owner with no room for the model (RESOURCE_EXHAUSTED) "
                                              "passes the request to the next owner."),
        "discovery": {
            "type": Field("choice", "static", choices=("static", "etcd", "consul", "kubernetes")),
            "members": Field("list", [], doc="static: [{id, host, rest_port, grpc_port}]."),
            "prefix": Field("str", "/tfscache", doc="etcd key prefix / Consul service name."),
            "ttl_seconds": Field("float", 10.0, minimum=1),
            "endpoints": Field("list", [], doc="etcd: ['http://host:2379']; consul: ['http://host:8500']."),
            "username": Field("str", None),
            "password": Field("str", None),
            "token": Field("str", None, doc="Consul ACL token."),
            "service": Field("str", None, doc="consul: service name; default: the prefix without its slashes. "
                                              "kubernetes: the Service whose ready endpoints are the members; "
                                              "default: tfscache."),
            "namespace": Field("str", None, doc="kubernetes: the Service's namespace; default: $POD_NAMESPACE, "
                                                "the pod's own, the kubeconfig context's, else default."),
            "kubeconfig": Field("str", None, doc="kubernetes: a kubeconfig file (outside the cluster); "
                                                 "default: the pod's service account."),
            "rest_port_name": Field("str", "rest", doc="kubernetes: the name of the Service's port for "
                                                       "tfscache's REST port."),
            "grpc_port_name": Field("str", "grpc", doc="kubernetes: the name of the Service's port for "
                                                       "tfscache's gRPC port."),
            "ca_cert": Field("str", None, doc="etcd / consul: PEM CA that signs the server's certificate; "
                                              "default: system roots."),
            "client_cert": Field("str", None, doc="etcd / consul: PEM client certificate (with client_key)."),
            "client_key": Field("str", None, doc="etcd / consul: PEM key of client_cert."),
        },
    },
    "metrics": {
        "enabled": Field("bool", True),
        "per_model_labels": Field("bool", False, doc="Label metrics by model (high cardinality)."),
        "relay_backend": Field("bool", True, doc="Append TF Serving's own metrics when it exposes them."),
    },
    "admin": {
        "enabled": Field("bool", False),
        "token": Field("str", None, doc="Bearer token required by /admin (required when enabled)."),
    },
    "logging": {
        "level": Field("choice", "info", choices=("debug", "info", "warn", "error")),
        "format": Field("choice", "text", choices=("text", "json")),
        "access_log": Field("bool", False, doc="One line per model API request (method, model, version, code, "
                            "duration)."),
    },
}


def _check(key: str, f: Field, value: Any) -> Any:
    if value is None:
        # an explicit null (or an empty variable) where the code expects a value: say so here,
        # not with a traceback later
        if f.default is _REQUIRED or f.default is not None:
            raise ConfigError(f"{key}: a value is required")
        return None
    try:
        if f.kind == "str":
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise ValueError(f"expected a string, got {type(value).__name__}")
            value = str(value)
        elif f.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"expected an integer, got {value!r}")
        elif f.kind == "float":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"expected a number, got {value!r}")
            value = float(value)
        elif f.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"expected true or false, got {value!r}")
        elif f.kind == "size":
            value = parse_size(value)
        elif f.kind == "list":
            if not isinstance(value, list):
                raise ValueError(f"expected a list, got {type(value).__name__}")
        elif f.kind == "choice":
            if value not in f.choices:
                raise ValueError(f"expected one of {', '.join(f.choices)}, got {value!r}")
    except ValueError as e:
        raise ConfigError(f"{key}: {e}")
    if f.minimum is not None and isinstance(value, int | float) and value < f.minimum:
        raise ConfigError(f"{key}: must be at least {f.minimum:g}, got {value}")
    if f.maximum is not None and isinstance(value, int | float) and value > f.maximum:
        raise ConfigError(f"{key}: must be at most {f.maximum:g}, got {value}")
    return value


def _build(schema: Mapping[str, Any], data: Any, prefix: str) -> SimpleNamespace:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping")
    for k in data:
        if k not in schema:
            raise ConfigError(f"{prefix}{k}: unknown key")
    out = {}
    for k, spec in schema.items():
        key = prefix + k
        if isinstance(spec, dict):
            out[k] = _build(spec, data.get(k), key + ".")
        else:
            value = data.get(k, None if spec.default is _REQUIRED else spec.default)
            out[k] = _check(key, spec, value)
    return SimpleNamespace(**out)


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for var, raw in environ.items():
        # only TFSCACHE_SECTION__KEY: other TFSCACHE_* variables (TFSCACHE_CACHE for the dev
        # tools, TFSCACHE_ADMIN_TOKEN for the CLI) are not configuration
        if not var.startswith(ENV_PREFIX) or "__" not in var:
            continue
        path = var[len(ENV_PREFIX):].lower().split("__")
        if not all(path):
            raise ConfigError(f"{var}: malformed variable name")
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(path)}: expected a mapping")
            node = child
        field = _field_at(path)
        if raw == "":
            node[path[-1]] = None
        elif field is not None and field.kind in ("str", "choice"):
            # as written: YAML would turn a token 0123 into 83, 0x1F into 31, 12:30 into 750,
            # and refuse true
            node[path[-1]] = raw
        else:
            try:
                node[path[-1]] = yaml.safe_load(raw)
            except yaml.YAMLError:
                node[path[-1]] = raw


def _field_at(path: list[str]) -> Field | None:
    spec: Any = SCHEMA
    for part in path:
        if not isinstance(spec, dict) or part not in spec:
            return None
        spec = spec[part]
    return spec if isinstance(spec, Field) else None


_MEMBER_KEYS = ("id", "host", "rest_port", "grpc_port")


def _check_member(i: int, m: Any) -> None:
    key = f"cluster.discovery.members[{i}]"
    if not isinstance(m, dict) or not {"host", "rest_port", "grpc_port"} <= set(m):
        raise ConfigError(f"{key}: expected a mapping with host, rest_port, grpc_port")
    for k in m:
        if k not in _MEMBER_KEYS:
            raise ConfigError(f"{key}.{k}: unknown key")
    for k in ("id", "host"):
        if k in m and (not isinstance(m[k], str) or not m[k]):
            raise ConfigError(f"{key}.{k}: expected a non-empty string, got {m[k]!r}")
    for k in ("rest_port", "grpc_port"):
        v = m[k]
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{key}.{k}: expected an integer, got {v!r}")
        if not 0 < v <= 65535:  # port 0 (any free port) only makes sense for listening
            raise ConfigError(f"{key}.{k}: expected a TCP port 1..65535, got {v}")


def _cross_checks(cfg: SimpleNamespace, environ: Mapping[str, str]) -> None:
    p = cfg.model_provider
    if p.type == "disk" and not p.disk.base_path:
        raise ConfigError("model_provider.disk.base_path: a value is required for type disk")
    if p.type == "s3" and not p.s3.bucket:
        raise ConfigError("model_provider.s3.bucket: a value is required for type s3")
    if p.type == "azure":
        a = p.azure
        if not a.container:
            raise ConfigError("model_provider.azure.container: a value is required for type azure")
        if not a.account_url and not a.connection_string:
            raise ConfigError("model_provider.azure.account_url: a value is required without a connection_string")
        given = [k for k in ("connection_string", "sas_token", "account_key") if getattr(a, k)]
        if len(given) > 1:
            raise ConfigError(f"model_provider.azure.{given[1]}: give one of connection_string, sas_token, account_key")
    if p.type == "gcs":
        if not p.gcs.bucket:
            raise ConfigError("model_provider.gcs.bucket: a value is required for type gcs")
        if p.gcs.anonymous and p.gcs.credentials_file:
            raise ConfigError("model_provider.gcs.credentials_file: not with anonymous: true")
        if p.gcs.credentials_file and not os.access(p.gcs.credentials_file, os.R_OK):
            raise ConfigError(f"model_provider.gcs.credentials_file: cannot read {p.gcs.credentials_file}")
    if bool(cfg.listen.tls_cert) != bool(cfg.listen.tls_key):
        raise ConfigError("listen.tls_key: tls_cert and tls_key go together")
    for key in ("tls_cert", "tls_key"):
        path = getattr(cfg.listen, key)
        if path and not os.access(path, os.R_OK):
            raise ConfigError(f"listen.{key}: cannot read {path}")
    if cfg.admin.enabled and not cfg.admin.token:
        raise ConfigError("admin.token: a value is required when admin.enabled is true")
    d = cfg.cluster.discovery
    if d.type in ("etcd", "consul") and not d.endpoints:
        raise ConfigError(f"cluster.discovery.endpoints: a value is required for type {d.type}")
    if d.type in ("etcd", "consul"):
        if bool(d.client_cert) != bool(d.client_key):
            raise ConfigError("cluster.discovery.client_key: client_cert and client_key go together")
        for key in ("ca_cert", "client_cert", "client_key"):
            path = getattr(d, key)
            if path and not os.access(path, os.R_OK):
                raise ConfigError(f"cluster.discovery.{key}: cannot read {path}")
        for endpoint in d.endpoints if d.ca_cert or d.client_cert else ():
            if str(endpoint).lower().startswith("http://"):  # TLS was asked for: never plaintext
                raise ConfigError(f"cluster.discovery.endpoints: {endpoint!r} is plain http, but ca_cert / "
                                  "client_cert ask for TLS: use https://")
    if d.type == "kubernetes" and d.kubeconfig and not os.access(d.kubeconfig, os.R_OK):
        raise ConfigError(f"cluster.discovery.kubeconfig: cannot read {d.kubeconfig}")
    for i, m in enumerate(d.members):
        _check_member(i, m)
    # the downward API's POD_NAME / POD_IP: a pod's name is its id in its Service's endpoints
    if cfg.node.id is None:
        cfg.node.id = environ.get("POD_NAME") or _default_node_id()
    if cfg.node.advertise_host is None:
        cfg.node.advertise_host = environ.get("POD_IP") or "127.0.0.1"


def load_config(
    data: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> SimpleNamespace:
    """Validate a parsed mapping (plus environment overrides) into a Config namespace."""
    merged = _deep_copy(dict(data or {}))
    env = os.environ if environ is None else environ
    _apply_env(merged, env)
    cfg = _build(SCHEMA, merged, "")
    _cross_checks(cfg, env)
    return cfg


def load_config_file(path: str, environ: Mapping[str, str] | None = None) -> SimpleNamespace:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror or e}")
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: not valid YAML: {str(e).splitlines()[0]}")
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return load_config(data, environ)


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def flatten(cfg: SimpleNamespace, prefix: str = "") -> dict[str, Any]:
    """``{"serving.max_models": 10, ...}`` of a loaded config."""
    out: dict[str, Any] = {}
    for k, v in vars(cfg).items():
        if isinstance(v, SimpleNamespace):
            out.update(flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def walk_schema(
    visit: Callable[[str, Field], None], schema: Mapping[str, Any] = SCHEMA, prefix: str = ""
) -> None:
    """Call ``visit(key, field)`` for every key (used to document the reference)."""
    for k, spec in schema.items():
        if isinstance(spec, dict):
            walk_schema(visit, spec, prefix + k + ".")
        else:
            visit(prefix + k, spec)
