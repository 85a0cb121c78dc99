"""The configuration: one YAML file, typed settings with defaults (pydantic), validated at start-up.

Any problem stops the daemon with ONE line naming the key (``ConfigError``).  Environment
variables override keys: ``TFSCACHE_SERVING__MAX_MODELS=20`` sets ``serving.max_models``
(the value is read as YAML, so numbers, booleans and lists work, except for string keys, whose
value is kept as it is: a token ``0123`` stays ``0123``); ``__`` separates the levels, and a
``TFSCACHE_`` variable without it is not configuration.  An empty variable means null.

pydantic (v2) validates: strict types (``"8500"`` is not a port, ``1`` is not ``true``), unknown
keys refused, frozen settings.  Its errors are reworded here as one line per problem.  The
environment layer is ours rather than pydantic-settings': it reads values as YAML like the file,
keeps string keys as written, and refuses an unknown ``TFSCACHE_A__B`` (pydantic-settings
parses JSON and ignores variables that match no field).

``python -m tfscache.config --reference`` writes the README's configuration reference from
the schema (``--check``: fail if it is out of date).
"""

from __future__ import annotations

import copy
import os
import re
import socket
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, get_args
from urllib.parse import SplitResult, urlsplit

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, model_validator
from pydantic.config import JsonDict
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError

ENV_PREFIX = "TFSCACHE_"


class ConfigError(Exception):
    """A configuration problem, worded as one line that names the key."""


# -- sizes ----------------------------------------------------------------------------------------
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(value: object) -> int:
    """Bytes from an int or a string: ``1G`` / ``1GB`` are 10^9 (SI), ``1Gi`` / ``1GiB`` are
    2^30 (IEC); ``1.5G`` works, a bare number is bytes."""
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


def format_size(n: int) -> str:
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


# -- value kinds ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kind:
    """Marks an annotated type with the kind the reference and the environment layer read."""

    name: str  # string | size


def _error(text: str) -> PydanticCustomError:
    return PydanticCustomError("tfscache", "{text}", {"text": text})


def _text(value: object) -> object:
    # YAML reads `id: 7` or `prefix: 2024` as numbers: a string key takes them as their text
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if value is not None and not isinstance(value, str):
        raise _error(f"expected a string, got {type(value).__name__}")
    return value


def _nonempty_text(value: object) -> object:
    if not isinstance(value, str) or not value:
        raise _error(f"expected a non-empty string, got {value!r}")
    return value


def _size(value: object) -> object:
    if value is None:
        return value
    try:
        return parse_size(value)
    except ValueError as e:
        raise _error(str(e))


Text = Annotated[str, BeforeValidator(_text), Kind("string")]
OptionalText = Annotated[str | None, BeforeValidator(_text), Kind("string")]
NonEmptyText = Annotated[str, BeforeValidator(_nonempty_text), Kind("string")]
Size = Annotated[int, BeforeValidator(_size), Kind("size")]
EvictionPolicy = Literal["lru", "adaptive"]  # tfscache.node.eviction.POLICIES (a test checks)

_REQUIRED: Any = ...


def setting(default: Any, doc: str = "", *, shown: str | None = None, ge: float | None = None,
            le: float | None = None) -> Any:
    """A key: its default (``_REQUIRED``: none), what it means, and how the reference shows its
    default where the value itself says little (``shown``)."""
    extra: JsonDict | None = {"shown": shown} if shown else None
    return Field(default, description=doc, ge=ge, le=le, json_schema_extra=extra)


T = TypeVar("T")


def required(value: T | None, key: str) -> T:
    """A key the schema requires in this configuration (``model_provider.s3.bucket`` for type
    s3): its value, typed as present."""
    if value is None:
        raise ConfigError(f"{key}: a value is required")
    return value


def _section(cls: type[Section]) -> Any:
    return Field(default_factory=cls)


# -- the discovery's endpoint rules (shared with the discovery clients built directly) ------------
def tls_requested(ca_cert: str | None, client_cert: str | None, client_key: str | None) -> bool:
    """Whether the discovery client must use TLS; a certificate without its key is an error."""
    if bool(client_cert) != bool(client_key):
        raise ValueError("cluster.discovery.client_key: client_cert and client_key go together")
    return bool(ca_cert or client_cert)


def endpoint_url(endpoint: str, backend: str, tls: bool) -> SplitResult:
    """The parts of an endpoint URL (``host:port`` means https when ``tls``, else http).  An
    ``http://`` endpoint with TLS options is refused: it would send everything in plaintext."""
    url = endpoint if "://" in endpoint else ("https://" if tls else "http://") + endpoint
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"cluster.discovery.endpoints: not a {backend} URL: {endpoint!r}")
    if tls and parts.scheme != "https":
        raise ValueError(f"cluster.discovery.endpoints: {endpoint!r} is plain http, but ca_cert / client_cert "
                         "ask for TLS: use https://")
    return parts


def endpoint_bases(endpoints: Sequence[str], kind: str, backend: str, ca_cert: str | None,
                   client_cert: str | None, client_key: str | None, default_port: int | None = None) -> list[str]:
    """``scheme://host:port`` of each of a discovery's endpoints (``default_port`` where one
    names none), https where the TLS options ask for it; ``kind`` is the discovery's
    ``type``, ``backend`` its name in messages."""
    if not endpoints:
        raise ValueError(f"cluster.discovery.endpoints: a value is required for type {kind}")
    tls = tls_requested(ca_cert, client_cert, client_key)
    bases = []
    for endpoint in endpoints:
        parts = endpoint_url(endpoint, backend, tls)
        missing_port = default_port is not None and not parts.port
        bases.append(f"{parts.scheme}://{parts.netloc}" + (f":{default_port}" if missing_port else ""))
    return bases


# -- the schema -----------------------------------------------------------------------------------
class Section(BaseModel):
    """A mapping of keys: strict types, unknown keys refused, frozen once loaded."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _a_mapping(cls, data: object) -> object:
        if data is None:  # `listen:` with nothing under it
            return {}
        if not isinstance(data, Mapping):
            raise _error("expected a mapping")
        return data


def _at(key: str, text: str) -> PydanticCustomError:
    """An error about ``key`` below the section that raises it."""
    return PydanticCustomError("tfscache", "{text}", {"text": text, "key": key})


def _check_readable(key: str, path: str | None) -> None:
    if path and not os.access(path, os.R_OK):
        raise _at(key, f"cannot read {path}")


class NodeSettings(Section):
    # filled in by _defaults: the type says what the rest of the code gets
    id: Text = setting(None, "Member id in the cluster (in Kubernetes: the pod's name, as its endpoints "
                             "name it).", shown="`$POD_NAME`, else the host name")
    advertise_host: Text = setting(None, "Address other nodes use to reach this one.",
                                   shown="`$POD_IP`, else `127.0.0.1`")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: object, info: ValidationInfo) -> object:
        # the downward API's POD_NAME / POD_IP: a pod's name is its id in its Service's endpoints
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            return data
        context = info.context if isinstance(info.context, Mapping) else {}
        environ: Mapping[str, str] = context.get("environ", os.environ)
        data = dict(data)
        if data.get("id") is None:
            data["id"] = environ.get("POD_NAME") or socket.gethostname()
        if data.get("advertise_host") is None:
            data["advertise_host"] = environ.get("POD_IP") or "127.0.0.1"
        return data


Port = Annotated[int, Field(ge=0, le=65535)]


class ListenSettings(Section):
    host: Text = setting("0.0.0.0", "Interface of the client-facing ports.")
    rest_port: Port = setting(8501, "Client-facing REST port (TF Serving's default); 0: any free port.")
    grpc_port: Port = setting(8500, "Client-facing gRPC port (TF Serving's default); 0: any free port.")
    grpc_threads: int = setting(32, "Ignored: the gRPC API runs on grpc.aio with no thread per call "
                                    "(accepted so that older files still load).", ge=1)
    max_request_bytes: Size = setting(64 * 1024**2, "Largest REST body or gRPC message accepted.", ge=1)
    tls_cert: OptionalText = setting(None, "PEM certificate (chain): serve REST (HTTPS) and gRPC over TLS "
                                           "(with `tls_key`).")
    tls_key: OptionalText = setting(None, "PEM private key of `tls_cert`.")
    drain_timeout_seconds: float = setting(30.0, "On SIGTERM, how long in-flight requests may finish.", ge=0)
    max_connections: int = setting(10_000, "Open connections per listener (REST, gRPC) at most. Past it, "
                                           "REST closes the connection idle the longest (the new one when none "
                                           "is idle); gRPC closes the new one. Never more than half of the open-files "
                                           "limit minus 256 (the daemon raises its soft limit to the hard one "
                                           "at start and logs both).", ge=1)
    grpc_max_concurrent_streams: int = setting(1024, "gRPC calls in flight on one connection; a client queues "
                                                     "more.", ge=1)
    ports_file: OptionalText = setting(None, "A file the node writes (JSON `rest_port`, `grpc_port`) once both "
                                             "ports listen: the ports it bound when they are 0.")
    max_buffered_bytes: Size = setting(1024**3, "Request bodies held by all REST connections together, and "
                                                "(a budget of its own) the requests held by all gRPC calls; "
                                                "the request past it gets 429 / `RESOURCE_EXHAUSTED`.", ge=1)
    idle_timeout_seconds: float = setting(120.0, "A REST connection idle this long between requests is "
                                                 "closed; a gRPC connection without a call this long too.",
                                          ge=0.1)
    header_timeout_seconds: float = setting(30.0, "A REST request whose line and headers take longer is "
                                                  "closed (slowloris); a gRPC connection whose TLS and HTTP/2 "
                                                  "handshake take longer too.", ge=0.1)
    body_timeout_seconds: float = setting(60.0, "A REST body that sends no byte for this long is closed.",
                                          ge=0.1)

    @model_validator(mode="after")
    def _tls(self) -> ListenSettings:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise _at("tls_key", "tls_cert and tls_key go together")
        _check_readable("tls_cert", self.tls_cert)
        _check_readable("tls_key", self.tls_key)
        return self


class DiskSourceSettings(Section):
    base_path: OptionalText = setting(None, "Root of `<base_path>/<name>/<version>/saved_model.pb`.",
                                      shown="required for disk")


class S3Settings(Section):
    bucket: OptionalText = setting(None, "Bucket holding `<prefix>/<name>/<version>/...`.",
                                   shown="required for s3")
    prefix: Text = setting("", "Key prefix.")
    region: OptionalText = setting(None, "Region.", shown="boto3's")
    endpoint_url: OptionalText = setting(None, "MinIO, Ceph, R2 and other S3-compatible stores.", shown="AWS")
    max_concurrency: int = setting(8, "Parallel object downloads per copy.", ge=1)
    multipart_threshold_bytes: Size = setting(8 * 1024**2, "Objects above this download in parts.",
                                              ge=5 * 1024**2)
    progress_interval_seconds: float = setting(5.0, "Progress log interval during a copy.", ge=0.1)
    verify_md5: bool = setting(True, "Check every object whose ETag is a plain MD5 against its content "
                                     "(sizes are always checked); costs CPU: `bench/README.md` §5.")
    access_key_id: OptionalText = setting(None, "Prefer the environment, shared files or instance roles "
                                                "(boto3's chain).", shown="boto3's chain")
    secret_access_key: OptionalText = setting(None, "The secret of `access_key_id`; never logged.",
                                              shown="boto3's chain")


class AzureSettings(Section):
    account_url: OptionalText = setting(None, "`https://<account>.blob.core.windows.net`, or Azurite's "
                                              "`http://127.0.0.1:10000/devstoreaccount1`.",
                                        shown="required without a connection string")
    container: OptionalText = setting(None, "Container holding `<prefix>/<name>/<version>/...`.",
                                      shown="required for azure")
    prefix: Text = setting("", "Blob name prefix.")
    connection_string: OptionalText = setting(None, "One of `connection_string`, `sas_token`, `account_key` "
                                                    "at most; none: `DefaultAzureCredential`; never logged.")
    sas_token: OptionalText = setting(None, "A SAS token; needs read and list permissions.")
    account_key: OptionalText = setting(None, "The storage account's key.")
    max_concurrency: int = setting(8, "Range reads at once per copy.", ge=1)
    chunk_size_bytes: Size = setting(8 * 1024**2, "Blobs above this are read in ranges of this size, in "
                                                  "parallel.", ge=1024**2)
    progress_interval_seconds: float = setting(5.0, "Progress log interval during a copy.", ge=0.1)
    verify_md5: bool = setting(True, "Check each blob's Content-MD5 where it has one (sizes always).")


class GCSSettings(Section):
    bucket: OptionalText = setting(None, "Bucket holding `<prefix>/<name>/<version>/...`.",
                                   shown="required for gcs")
    prefix: Text = setting("", "Object name prefix.")
    endpoint_url: OptionalText = setting(None, "An emulator such as fake-gcs-server.", shown="Google's")
    project: OptionalText = setting(None, "GCP project (listing needs none).", shown="the credentials'")
    credentials_file: OptionalText = setting(None, "A service-account key file.",
                                             shown="Application Default Credentials")
    anonymous: bool = setting(False, "No credentials: public buckets and emulators.")
    max_concurrency: int = setting(8, "Range reads at once per copy.", ge=1)
    chunk_size_bytes: Size = setting(8 * 1024**2, "Objects above this are read in ranges of this size, in "
                                                  "parallel.", ge=1024**2)
    progress_interval_seconds: float = setting(5.0, "Progress log interval during a copy.", ge=0.1)
    verify_checksums: bool = setting(True, "Check each object's CRC32C, else its MD5 (sizes always).")


class ProviderSettings(Section):
    type: Literal["disk", "s3", "azure", "gcs"] = setting("disk", "Where the models come from.")
    listing_ttl_seconds: float = setting(5.0, "How long a version listing is reused for \"latest\".", ge=0)
    fetch_timeout_seconds: float = setting(600.0, "Bound on one copy into the disk cache.", ge=0.001)
    check_interval_seconds: float = setting(10.0, "How often the source is checked for readability (`/readyz`; "
                                                  "requests for models it cannot list get `UNAVAILABLE` with the "
                                                  "reason meanwhile).", ge=0.1)
    copy_threads: int = setting(4, "Copies at once; they run in threads of their own, so the reactor's pool "
                                   "stays free for DNS and listings.", ge=1)
    disk: DiskSourceSettings = _section(DiskSourceSettings)
    s3: S3Settings = _section(S3Settings)
    azure: AzureSettings = _section(AzureSettings)
    gcs: GCSSettings = _section(GCSSettings)

    @model_validator(mode="after")
    def _source(self) -> ProviderSettings:
        if self.type == "disk" and not self.disk.base_path:
            raise _at("disk.base_path", "a value is required for type disk")
        if self.type == "s3" and not self.s3.bucket:
            raise _at("s3.bucket", "a value is required for type s3")
        if self.type == "azure":
            a = self.azure
            if not a.container:
                raise _at("azure.container", "a value is required for type azure")
            if not a.account_url and not a.connection_string:
                raise _at("azure.account_url", "a value is required without a connection_string")
            given = [k for k, v in (("connection_string", a.connection_string), ("sas_token", a.sas_token),
                                    ("account_key", a.account_key)) if v]
            if len(given) > 1:
                raise _at(f"azure.{given[1]}", "give one of connection_string, sas_token, account_key")
        if self.type == "gcs":
            g = self.gcs
            if not g.bucket:
                raise _at("gcs.bucket", "a value is required for type gcs")
            if g.anonymous and g.credentials_file:
                raise _at("gcs.credentials_file", "not with anonymous: true")
            _check_readable("gcs.credentials_file", g.credentials_file)
        return self


class DiskCacheSettings(Section):
    path: Text = setting(_REQUIRED, "Local directory of the copied models.")
    capacity_bytes: Size = setting(10 * 1024**3, "Directories are deleted past this (which ones: "
                                                 "`disk_cache.eviction`); copies under way count with their "
                                                 "size, so concurrent copies stay within it.", ge=1)
    eviction: EvictionPolicy = setting("adaptive", "Which copy is deleted for room: `lru` (least recently "
                                                   "used) or `adaptive` (the least valuable by decayed request "
                                                   "count x copy time per byte; see \"Eviction\").")


class ServingSettings(Section):
    grpc_target: Text = setting("127.0.0.1:9500", "host:port of TF Serving's gRPC API.")
    model_path: OptionalText = setting(None, "The cache directory as TF Serving sees it (the `base_path` it "
                                             "is sent), when its container mounts the shared volume at "
                                             "another path.", shown="`disk_cache.path`")
    rest_url: Text = setting("http://127.0.0.1:9501", "TF Serving's REST API.")
    max_models: int = setting(10, "Models loaded at once.", ge=1)
    max_bytes: Size = setting(0, "Memory budget for loaded models; `0` = count only.", ge=0)
    memory_factor: float = setting(1.0, "Estimated memory = size on disk x this.", ge=0.01)
    load_timeout_seconds: float = setting(300.0, "A load not AVAILABLE by then fails with "
                                                 "DEADLINE_EXCEEDED.", ge=0.001)
    config_write_timeout_seconds: float = setting(30.0, "Bound on one write of TF Serving's model list "
                                                        "(HandleReloadConfigRequest, which waits for the new models' "
                                                        "loads), at most `load_timeout_seconds`; past it the node's "
                                                        "loads are *stuck* until TF Serving finishes the loads that "
                                                        "write left running: loaded models are served, cold ones get "
                                                        "`UNAVAILABLE` \"this model only\" at once, so routers send "
                                                        "them to their next owner.", ge=0.001)
    request_timeout_seconds: float = setting(60.0, "Deadline of a forwarded request that has none.",
                                             ge=0.001)
    failure_backoff_seconds: float = setting(30.0, "A model that failed to load is not retried before this.",
                                             ge=0)
    churn_guard_seconds: float = setting(2.0, "A model used this recently is not unloaded to make room.", ge=0)
    capacity_wait_seconds: float = setting(30.0, "How long a load waits for room before "
                                                 "RESOURCE_EXHAUSTED.", ge=0)
    eviction: EvictionPolicy = setting("adaptive", "Which idle model is unloaded for room: `lru` or "
                                                   "`adaptive` (decayed request count x reload time per slot, "
                                                   "or per byte under `max_bytes`; see \"Eviction\").")
    model_platform: Text = setting("tensorflow", "`model_platform` sent in the model config.")
    reset_on_start: bool = setting(True, "Send an empty model list at start-up.")
    health_interval_seconds: float = setting(5.0, "How often TF Serving's health is probed (a backend that "
                                                  "restarted empty is noticed).", ge=0.1)


MemberPort = Annotated[int, Field(ge=1, le=65535)]  # port 0 (any free port) only makes sense for listening


class StaticMemberSettings(Section):
    """One entry of ``cluster.discovery.members``."""

    id: Annotated[str | None, BeforeValidator(lambda v: v if v is None else _nonempty_text(v))] = None
    host: NonEmptyText
    rest_port: MemberPort
    grpc_port: MemberPort

    @model_validator(mode="before")
    @classmethod
    def _has_address(cls, data: object) -> object:
        if not isinstance(data, Mapping) or not {"host", "rest_port", "grpc_port"} <= set(data):
            raise _error("expected a mapping with host, rest_port, grpc_port")
        return data


class DiscoverySettings(Section):
    type: Literal["static", "etcd", "consul", "kubernetes"] = setting("static", "How members find each other.")
    members: list[StaticMemberSettings] = setting([], "static: the members `{id, host, rest_port, grpc_port}` "
                                                      "(id default: `host:rest_port`); empty = this node alone.")
    prefix: Text = setting("/tfscache", "etcd key prefix (members under `<prefix>/members/<id>`); Consul: the "
                                        "service name's default.")
    ttl_seconds: float = setting(10.0, "Lease / check TTL.", ge=1)
    endpoints: list[Text] = setting([], "etcd or Consul URLs, `http://` or `https://`; a bare `host:port` is "
                                        "https when a TLS option is set.")
    username: OptionalText = setting(None, "etcd user (never logged).")
    password: OptionalText = setting(None, "etcd password (never logged).")
    token: OptionalText = setting(None, "Consul ACL token (never logged).")
    service: OptionalText = setting(None, "Consul: the service name; Kubernetes: the Service whose ready "
                                          "endpoints are the members.",
                                    shown="Consul: the prefix without slashes; Kubernetes: `tfscache`")
    namespace: OptionalText = setting(None, "Kubernetes: the Service's namespace (`$POD_NAMESPACE`, the "
                                            "service account's, the kubeconfig context's, else `default`).",
                                      shown="the pod's")
    kubeconfig: OptionalText = setting(None, "Kubernetes: a kubeconfig file, to run outside the cluster (token, "
                                             "`tokenFile` or client certificate; exec plugins are refused).",
                                       shown="the pod's service account")
    rest_port_name: Text = setting("rest", "Kubernetes: the name of the Service's port for tfscache's REST "
                                           "port.")
    grpc_port_name: Text = setting("grpc", "Kubernetes: the name of the Service's port for tfscache's gRPC "
                                           "port.")
    ca_cert: OptionalText = setting(None, "etcd / Consul: PEM CA of the server's certificate "
                                          "(`REQUESTS_CA_BUNDLE` does not override it). With any TLS option "
                                          "set an `http://` endpoint is refused.", shown="system roots")
    client_cert: OptionalText = setting(None, "etcd / Consul: PEM client certificate, with `client_key` (etcd "
                                              "`--client-cert-auth`, Consul `verify_incoming`).")
    client_key: OptionalText = setting(None, "etcd / Consul: PEM key of `client_cert`.")

    @model_validator(mode="after")
    def _backend(self) -> DiscoverySettings:
        if self.type in ("etcd", "consul"):
            if not self.endpoints:
                raise _at("endpoints", f"a value is required for type {self.type}")
            try:
                tls = tls_requested(self.ca_cert, self.client_cert, self.client_key)
                for endpoint in self.endpoints:
                    endpoint_url(endpoint, "etcd" if self.type == "etcd" else "Consul", tls)
            except ValueError as e:
                key, _, text = str(e).partition(": ")
                raise _at(key.rsplit(".", 1)[-1], text)
            for key, path in (("ca_cert", self.ca_cert), ("client_cert", self.client_cert),
                              ("client_key", self.client_key)):
                _check_readable(key, path)
        if self.type == "kubernetes":
            _check_readable("kubeconfig", self.kubeconfig)
        return self


class ClusterSettings(Section):
    replicas_per_model: int = setting(2, "Owners per model name.", ge=1)
    forward_timeout_seconds: float = setting(360.0, "Deadline of a routed request that has none (it may "
                                                    "include a cold load on the owner).", ge=0.001)
    tls_ca_cert: OptionalText = setting(None, "PEM CA of the other nodes' certificates (nodes forward over TLS "
                                              "when `listen.tls_cert` is set).", shown="system roots")
    spread_inflight_threshold: int = setting(32, "In-flight requests on the first owner before spreading.",
                                             ge=1)
    spill_over: bool = setting(True, "An owner that has no room for the model (its capacity "
                                     "`RESOURCE_EXHAUSTED`, HTTP 429) passes the request on to the next owner "
                                     "within the deadline, without being marked down; the client sees the 429 "
                                     "only when every owner answers it.")
    secret: OptionalText = setting(None, "Shared by every node, 16 bytes at least (`openssl rand -hex 32`; or "
                                         "`$TFSCACHE_CLUSTER__SECRET`): forwards between nodes carry a token "
                                         "derived from it, and a node serves a request as forwarded only when "
                                         "its token verifies (see Authenticated forwards).",
                                   shown="required with more than one member")
    secret_file: OptionalText = setting(None, "A file holding `cluster.secret` (a mounted Kubernetes Secret).")
    discovery: DiscoverySettings = _section(DiscoverySettings)

    @model_validator(mode="after")
    def _secret(self) -> ClusterSettings:
        """A cluster of more than one node authenticates its forwards (a client's forwarded
        marker must not bypass routing): no secret, no multi-node start.  One node needs none."""
        if self.secret and self.secret_file:
            raise _at("secret_file", "give cluster.secret or cluster.secret_file, not both")
        secret = self.secret.encode() if self.secret else None
        if self.secret_file:
            try:
                with open(self.secret_file, "rb") as f:
                    secret = f.read().strip()
            except OSError as e:
                raise _at("secret_file", f"cannot read {self.secret_file}: {e.strerror or e}")
        if secret is not None and len(secret) < MIN_SECRET_BYTES:
            raise _at("secret_file" if self.secret_file else "secret",
                      f"the secret must have {MIN_SECRET_BYTES} bytes at least, got {len(secret)}")
        d = self.discovery
        if secret is None and (d.type != "static" or len(d.members) > 1):
            where = f"{len(d.members)} static members" if d.type == "static" else f"discovery type {d.type}"
            raise _at("secret", f"a value is required with more than one member ({where}): the nodes "
                                "authenticate their forwards with it (or set cluster.secret_file, or "
                                "$TFSCACHE_CLUSTER__SECRET; the same on every node, e.g. openssl rand -hex 32)")
        return self


MIN_SECRET_BYTES = 16


class MetricsSettings(Section):
    enabled: bool = setting(True, "Prometheus metrics on the REST port; `false`: the metrics paths answer 404.")
    per_model_labels: bool = setting(False, "Label hits, misses, fetches, loads, unloads and load failures by "
                                            "`model` (high cardinality).")
    relay_backend: bool = setting(True, "Append TF Serving's own metrics (its "
                                        "`/monitoring/prometheus/metrics`) when it exposes them.")


class AdminSettings(Section):
    enabled: bool = setting(False, "The `/admin` API.")
    token: OptionalText = setting(None, "Bearer token for `/admin`.", shown="required when enabled")

    @model_validator(mode="after")
    def _token(self) -> AdminSettings:
        if self.enabled and not self.token:
            raise _at("token", "a value is required when admin.enabled is true")
        return self


class LoggingSettings(Section):
    level: Literal["debug", "info", "warn", "error"] = setting("info", "Lowest level logged.")
    format: Literal["text", "json"] = setting("text", "Text lines, or one JSON object a line.")
    repeat_interval_seconds: float = setting(30.0, "A warning repeated for the same model (the same kind of "
                                                   "line, e.g. every request while TF Serving is down) is "
                                                   "written once per interval, then one line with the count "
                                                   "of the others; 0: every line.", ge=0)
    access_log: bool = setting(False, "One line per model API request (namespace `tfscache.access`): method, "
                                "model, version, code, duration.")


class Config(Section):
    """The whole configuration of a node."""

    node: NodeSettings = _section(NodeSettings)
    listen: ListenSettings = _section(ListenSettings)
    model_provider: ProviderSettings = _section(ProviderSettings)
    disk_cache: DiskCacheSettings = _section(DiskCacheSettings)
    serving: ServingSettings = _section(ServingSettings)
    cluster: ClusterSettings = _section(ClusterSettings)
    metrics: MetricsSettings = _section(MetricsSettings)
    admin: AdminSettings = _section(AdminSettings)
    logging: LoggingSettings = _section(LoggingSettings)

    @model_validator(mode="before")
    @classmethod
    def _sections(cls, data: object) -> object:
        # a section left out (or `serving:` with nothing under it) is validated as an empty
        # mapping, so its required keys are named (`disk_cache.path: a value is required`)
        return _fill_sections(cls, data)


def _fill_sections(cls: type[Section], data: object) -> object:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        return data
    data = dict(data)
    for name, info in cls.model_fields.items():
        sub = _section_type(info)
        if sub is not None and data.get(name) is None:
            data[name] = _fill_sections(sub, {})
        elif sub is not None:
            data[name] = _fill_sections(sub, data[name])
    return data


def _section_type(info: FieldInfo) -> type[Section] | None:
    a = info.annotation
    return a if isinstance(a, type) and issubclass(a, Section) else None


# -- errors as one line ---------------------------------------------------------------------------
def _key(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "config"


def _one_line(err: ErrorDetails) -> str:
    key, kind, value = _key(err["loc"]), err["type"], err.get("input")
    ctx = err.get("ctx") or {}
    if kind == "tfscache":
        sub = ctx.get("key")
        return f"{key}.{sub}: {ctx['text']}" if sub else f"{key}: {ctx['text']}"
    if kind == "missing" or value is None:
        # an explicit null (or an empty variable) where a value is needed: said here, not
        # with a traceback later
        return f"{key}: a value is required"
    if kind == "extra_forbidden":
        return f"{key}: unknown key"
    messages = {
        "int_type": f"expected an integer, got {value!r}",
        "float_type": f"expected a number, got {value!r}",
        "bool_type": f"expected true or false, got {value!r}",
        "string_type": f"expected a string, got {type(value).__name__}",
        "list_type": f"expected a list, got {type(value).__name__}",
        "literal_error": f"expected one of {_choices(ctx.get('expected'))}, got {value!r}",
        "greater_than_equal": f"must be at least {ctx.get('ge', 0):g}, got {value}",
        "less_than_equal": f"must be at most {ctx.get('le', 0):g}, got {value}",
    }
    return f"{key}: {messages.get(kind, err['msg'])}"


def _choices(expected: object) -> str:
    # pydantic says "'lru' or 'adaptive'"; the one line says "lru, adaptive"
    return str(expected or "").replace("'", "").replace(" or ", ", ")


# -- loading --------------------------------------------------------------------------------------
def load_config(data: Mapping[str, object] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Validate a parsed mapping (plus environment overrides) into a ``Config``."""
    merged: dict[str, object] = copy.deepcopy(dict(data or {}))
    env = os.environ if environ is None else environ
    _apply_env(merged, env)
    try:
        return Config.model_validate(merged, context={"environ": env})
    except ValidationError as e:
        raise ConfigError(_one_line(e.errors()[0])) from None


def load_config_file(path: str, environ: Mapping[str, str] | None = None) -> Config:
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


def _apply_env(data: dict[str, object], environ: Mapping[str, str]) -> None:
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
        setting_ = _setting_at(path)
        if raw == "":
            node[path[-1]] = None
        elif setting_ is not None and setting_.kind in ("string", "choice"):
            # as written: YAML would turn a token 0123 into 83, 0x1F into 31, 12:30 into 750,
            # and refuse true
            node[path[-1]] = raw
        else:
            try:
                node[path[-1]] = yaml.safe_load(raw)
            except yaml.YAMLError:
                node[path[-1]] = raw


# -- the schema, key by key (the reference, the environment layer, SIGHUP) -------------------------
@dataclass(frozen=True)
class Setting:
    """One key of the schema, as the reference documents it."""

    key: str
    kind: str  # string | integer | number | boolean | size | choice | list
    default: object  # REQUIRED: none
    doc: str
    shown: str | None = None  # how the reference shows the default, where the value says little
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None


REQUIRED = object()


def _kind(info: FieldInfo) -> tuple[str, tuple[str, ...]]:
    for meta in info.metadata:
        if isinstance(meta, Kind):
            return meta.name, ()
    a = info.annotation
    if getattr(a, "__origin__", None) is Literal:
        return "choice", tuple(str(c) for c in get_args(a))
    if getattr(a, "__origin__", None) is list:
        return "list", ()
    names = {int: "integer", float: "number", bool: "boolean", str: "string"}
    return names.get(a, "string") if isinstance(a, type) else "string", ()


def _bounds(info: FieldInfo) -> tuple[float | None, float | None]:
    low = high = None
    for meta in info.metadata:
        low = getattr(meta, "ge", low)
        high = getattr(meta, "le", high)
    return low, high


def settings(model: type[Section] = Config, prefix: str = "") -> Iterator[Setting]:
    """Every key of ``model``, depth first, in the schema's order."""
    for name, info in model.model_fields.items():
        sub = _section_type(info)
        if sub is not None:
            yield from settings(sub, prefix + name + ".")
            continue
        kind, choices = _kind(info)
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        shown = extra.get("shown")
        low, high = _bounds(info)
        yield Setting(prefix + name, kind, REQUIRED if info.is_required() else info.default,
                      info.description or "", shown if isinstance(shown, str) else None, choices, low, high)


def walk_schema(visit: Callable[[str, Setting], None]) -> None:
    """Call ``visit(key, setting)`` for every key."""
    for s in settings():
        visit(s.key, s)


def _setting_at(path: list[str]) -> Setting | None:
    key = ".".join(path)
    return next((s for s in settings() if s.key == key), None)


def flatten(cfg: Section, prefix: str = "") -> dict[str, object]:
    """``{"serving.max_models": 10, ...}`` of a loaded config."""
    out: dict[str, object] = {}
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        if isinstance(value, Section):
            out.update(flatten(value, prefix + name + "."))
        else:
            out[prefix + name] = value
    return out


S = TypeVar("S", bound=Section)


def replace(cfg: S, key: str, value: object) -> S:
    """A copy of ``cfg`` with ``key`` (``"serving.max_models"``) set to ``value``, which has
    been validated already (it comes from another loaded config)."""
    head, _, rest = key.partition(".")
    if not rest:
        return cfg.model_copy(update={head: value})
    section = getattr(cfg, head)
    assert isinstance(section, Section), key
    return cfg.model_copy(update={head: replace(section, rest, value)})


# -- the README's reference -----------------------------------------------------------------------
REFERENCE_START = "<!-- config-reference: generated by `python -m tfscache.config --reference`; do not edit -->"
REFERENCE_END = "<!-- config-reference: end -->"


def _shown_default(s: Setting) -> str:
    if s.shown:
        return s.shown
    if s.default is REQUIRED:
        return "required"
    if s.default is None:
        return "none"
    if isinstance(s.default, bool):
        return f"`{str(s.default).lower()}`"
    if s.kind == "size" and isinstance(s.default, int):
        return f"`{format_size(s.default)}`"
    if isinstance(s.default, float):
        return f"`{s.default:g}`"
    if s.default == "":
        return '`""`'
    return f"`{s.default}`"


def _shown_kind(s: Setting) -> str:
    if s.choices:
        return " \\| ".join(f"`{c}`" for c in s.choices)
    kind = s.kind
    if s.minimum is not None and s.maximum is not None:
        kind += f" {s.minimum:g}..{s.maximum:g}"
    elif s.minimum is not None:
        shown = format_size(int(s.minimum)) if s.kind == "size" else f"{s.minimum:g}"
        kind += f" ≥ {shown}"
    return kind


def reference() -> str:
    """The README's configuration reference: one table row per key."""
    lines = [REFERENCE_START, "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for s in settings():
        doc = s.doc.replace("|", "\\|")
        lines.append(f"| `{s.key}` | {_shown_kind(s)} | {_shown_default(s)} | {doc} |")
    lines += ["", REFERENCE_END]
    return "\n".join(lines)


def with_reference(readme: str) -> str:
    """``readme`` with its generated section replaced by the current reference."""
    start, end = readme.find(REFERENCE_START), readme.find(REFERENCE_END)
    if start < 0 or end < start:
        raise ValueError("README.md has no config-reference markers")
    return readme[:start] + reference() + readme[end + len(REFERENCE_END):]


def main(argv: list[str] | None = None) -> int:
    """``python -m tfscache.config --reference [README.md]`` rewrites the README's reference;
    ``--check`` exits 1 when it is out of date."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tfscache.config")
    parser.add_argument("--reference", action="store_true", help="rewrite the README's config reference")
    parser.add_argument("--check", action="store_true", help="exit 1 if the README's reference is stale")
    parser.add_argument("readme", nargs="?", default="README.md")
    args = parser.parse_args(argv)
    if not (args.reference or args.check):
        parser.error("give --reference or --check")
    with open(args.readme, encoding="utf-8") as f:
        text = f.read()
    new = with_reference(text)
    if args.check:
        if new != text:
            print(f"{args.readme}: the config reference is out of date: run python -m tfscache.config "
                  "--reference", file=sys.stderr)
            return 1
        return 0
    if new != text:
        with open(args.readme, "w", encoding="utf-8") as f:
            f.write(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
