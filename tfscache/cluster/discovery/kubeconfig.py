"""Where the Kubernetes API is and how to authenticate to it: the pod's service account (in
the cluster) or a kubeconfig file (outside it).

In-cluster, as client-go does it: ``KUBERNETES_SERVICE_HOST`` / ``KUBERNETES_SERVICE_PORT``,
the service-account token, CA and namespace under
``/var/run/secrets/kubernetes.io/serviceaccount``.  The token is a projected one that the
kubelet rotates (it expires after an hour or so), so it is read again for every request: a
request is rare here (a list, then one watch every few minutes), and the file is a small one
on a tmpfs.

A kubeconfig: its current context's cluster (``server``, ``certificate-authority`` or
``-data``) and user (``token``, ``tokenFile``, ``client-certificate``/``client-key`` or their
``-data``); relative paths are relative to the file.  Exec and auth-provider plugins (cloud
logins) are refused with a clear error: a daemon should use a service account or a token.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class KubeConfigError(ValueError):
    """The API's location or credentials cannot be worked out: one line naming the cause."""


@dataclass
class ApiAccess:
    """The API server's base URL, what to trust, and the credentials to send."""

    server: str
    ca_pem: bytes | None = None             # None: the system's roots
    client_pem: bytes | None = None         # client certificate + key, PEM
    token: Callable[[], str | None] = field(default=lambda: None)
    namespace: str | None = None            # the context's or the pod's namespace
    source: str = ""                        # for logs: "in-cluster" or the kubeconfig path

    def authorization(self) -> bytes | None:
        token = self.token()
        return f"Bearer {token}".encode() if token else None


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise KubeConfigError(f"{what}: cannot read {path}: {e.strerror or e}")


def _token_file(path: str, what: str) -> Callable[[], str | None]:
    def read() -> str | None:
        return _read(path, what).decode("utf-8", "replace").strip() or None

    read()  # a missing or unreadable file is a start-up error, not a retry loop
    return read


def in_cluster(environ: Mapping[str, str] | None = None, directory: str = SERVICE_ACCOUNT_DIR) -> ApiAccess:
    env = os.environ if environ is None else environ
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise KubeConfigError("cluster.discovery.kubeconfig: not in a Kubernetes pod (KUBERNETES_SERVICE_HOST "
                              "and KUBERNETES_SERVICE_PORT unset): set a kubeconfig file")
    what = "cluster.discovery: the service account"
    host = f"[{host}]" if ":" in host else host
    ca_path = os.path.join(directory, "ca.crt")
    namespace_path = os.path.join(directory, "namespace")
    namespace = _read(namespace_path, what).decode().strip() if os.path.exists(namespace_path) else None
    return ApiAccess(server=f"https://{host}:{port}", ca_pem=_read(ca_path, what),
                     token=_token_file(os.path.join(directory, "token"), what),
                     namespace=namespace, source="in-cluster")


def _named(entries: Any, name: str, kind: str, path: str) -> dict[str, Any]:
    for entry in entries or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(kind)
            return value if isinstance(value, dict) else {}
    raise KubeConfigError(f"cluster.discovery.kubeconfig: {path} has no {kind} named {name!r}")


def from_kubeconfig(path: str, context: str | None = None) -> ApiAccess:
    what = "cluster.discovery.kubeconfig"
    try:
        data = yaml.safe_load(_read(path, what))
    except yaml.YAMLError as e:
        raise KubeConfigError(f"{what}: {path} is not valid YAML: {str(e).splitlines()[0]}")
    if not isinstance(data, dict):
        raise KubeConfigError(f"{what}: {path} is not a kubeconfig (expected a mapping)")
    name = context or data.get("current-context")
    if not name:
        raise KubeConfigError(f"{what}: {path} has no current-context")
    ctx = _named(data.get("contexts"), name, "context", path)
    cluster = _named(data.get("clusters"), str(ctx.get("cluster")), "cluster", path)
    user = _named(data.get("users"), str(ctx.get("user")), "user", path) if ctx.get("user") else {}
    base = os.path.dirname(os.path.abspath(path))

    def pem(data_key: str, file_key: str, entry: dict[str, Any]) -> bytes | None:
        if entry.get(data_key):
            try:
                return base64.b64decode(entry[data_key], validate=True)
            except ValueError:
                raise KubeConfigError(f"{what}: {data_key} in {path} is not base64")
        if entry.get(file_key):
            return _read(os.path.join(base, os.path.expanduser(entry[file_key])), f"{what} ({file_key})")
        return None

    server = cluster.get("server")
    if not isinstance(server, str) or not server.startswith(("https://", "http://")):
        raise KubeConfigError(f"{what}: cluster {ctx.get('cluster')!r} in {path} has no server URL")
    if cluster.get("insecure-skip-tls-verify"):
        raise KubeConfigError(f"{what}: cluster {ctx.get('cluster')!r} in {path} skips TLS verification, "
                              "which tfscache refuses: give its certificate-authority")
    for plugin in ("exec", "auth-provider"):
        if user.get(plugin):
            raise KubeConfigError(f"{what}: user {ctx.get('user')!r} in {path} logs in through an {plugin} "
                                  "plugin, which tfscache does not run: use a token or a client certificate")
    token: Callable[[], str | None] = lambda: None  # noqa: E731
    if user.get("token"):
        static = str(user["token"])
        token = lambda: static  # noqa: E731
    elif user.get("tokenFile"):
        token = _token_file(os.path.join(base, os.path.expanduser(user["tokenFile"])), f"{what} (tokenFile)")
    cert = pem("client-certificate-data", "client-certificate", user)
    key = pem("client-key-data", "client-key", user)
    if bool(cert) != bool(key):
        raise KubeConfigError(f"{what}: user {ctx.get('user')!r} in {path} has a client certificate without "
                              "its key (or a key without its certificate)")
    return ApiAccess(server=server.rstrip("/"), ca_pem=pem("certificate-authority-data", "certificate-authority",
                                                            cluster),
                     client_pem=(cert + b"\n" + key) if cert and key else None, token=token,
                     namespace=ctx.get("namespace") or None, source=path)
