"""The proof that a request was forwarded by a member of the cluster, not sent by a client.

A node serves a request that carries the forwarded marker (``x-tfscache-forwarded``, REST
header / gRPC metadata) itself, without routing it: that is what stops a forward from being
routed again.  A client that could set the marker would make any node load any model, so the
marker's value is a token derived from the cluster's secret (``cluster.secret``): HMAC-SHA256
of a fixed label under the secret.  The secret itself never travels; the token does, as a
bearer credential between nodes (node TLS, ``listen.tls_cert``, keeps it unreadable on a
network that is not trusted).  A marker that does not verify is ignored: the request is routed
as any client's (its marker is dropped on the way, as every marker is).

One token, computed once: the check is a constant-time compare per request (the hot path),
not an HMAC over each request (a gRPC payload can be 64 MiB)."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from twisted.logger import Logger

_LABEL = b"tfscache node-to-node forward v1"
_PREFIX = "v1."


class ForwardMarker:
    """The marker a router sends on its forwards, and the check of a received one."""

    __slots__ = ("value", "header", "_expected")

    def __init__(self, secret: bytes | str) -> None:
        key = secret.encode() if isinstance(secret, str) else secret
        self.value = _PREFIX + hmac.new(key, _LABEL, hashlib.sha256).hexdigest()
        self.header = self.value.encode("ascii")
        self._expected = self.header

    @classmethod
    def node_local(cls) -> ForwardMarker:
        """A marker no other process can produce (a single node has no member to hear from)."""
        return cls(secrets.token_bytes(32))

    def verify(self, received: bytes | str | None) -> bool:
        """True only for this cluster's token; constant time in the received value."""
        if received is None:
            return False
        if isinstance(received, str):
            try:
                received = received.encode("ascii")
            except UnicodeEncodeError:
                return False
        return hmac.compare_digest(received, self._expected)


_log = Logger()


def unverified_marker(model: str, api: str) -> None:
    """A forwarded marker that is not this cluster's: a client's forgery, or a node whose
    cluster.secret differs (its forwards are then routed once more here).  The daemon's log
    filter keeps this to one line per model and interval (util/repeats.py)."""
    _log.warn("{api} request for model={model} carried an x-tfscache-forwarded marker that does not verify: "
              "routed as a client's request (is cluster.secret the same on every node?)", api=api, model=model)


_process_default: ForwardMarker | None = None


def process_marker() -> ForwardMarker:
    """One node-local marker per process: routers and front ends built without a marker (tests,
    benchmarks in one process) still recognise each other's forwards, and nothing else's."""
    global _process_default
    if _process_default is None:
        _process_default = ForwardMarker.node_local()
    return _process_default


def read_secret(secret: str | None, secret_file: str | None) -> bytes | None:
    """The configured secret: ``cluster.secret`` (or ``TFSCACHE_CLUSTER__SECRET``), else the
    content of ``cluster.secret_file`` (a mounted Kubernetes Secret, say), whitespace stripped."""
    if secret:
        return secret.encode()
    if secret_file:
        with open(secret_file, "rb") as f:
            return f.read().strip()
    return None
