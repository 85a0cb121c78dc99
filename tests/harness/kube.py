"""A real Kubernetes API server for the tests: kube-apiserver (built from k8s.io/kubernetes by
``tests/harness/build_go_servers.sh``) on loopback, over an etcd of its own.

No controllers or kubelets run: the tests create Services and EndpointSlices through the API
as the endpointslice controller would, and turn endpoints ready or not by hand.

Authentication: the admin is a static token in ``system:masters``; service accounts get real
tokens from the TokenRequest API (``service_account_token``); a client certificate signed by
the test CA authenticates as user ``tfscache-client``.  Authorization is RBAC.  The TLS
serving certificate is for 127.0.0.1, signed by the test CA (``tls["ca"]``).

The secure port is picked free and bound by the server a moment later: when another process
took it meanwhile, the start is retried on another port.
"""

from __future__ import annotations

import json
import os
import ssl
import tempfile
import urllib.error
import urllib.request
from typing import Any

import yaml

from tests.harness.certs import make_tls_files
from tests.harness.process import CACHE_DIR, ManagedProcess, ProcessFixture, listen_port
from tests.harness.servers import EtcdServer, binary_path

ADMIN_TOKEN = "tfscache-test-admin-token"
CLIENT_CERT_USER = "tfscache-client"   # the CN of make_tls_files()'s client certificate


def missing() -> str | None:
    """Why the Kubernetes tests cannot run here, or None."""
    try:
        binary_path("kube-apiserver")
    except RuntimeError as e:
        return str(e)
    return None


def etcd_binary() -> str | None:
    """etcd v3.6 built by build_go_servers.sh when there is one (Debian's 3.4 lacks the
    streaming list the API server's own informers may ask for), else Debian's."""
    path = os.path.join(CACHE_DIR, "bin", "etcd")
    return path if os.access(path, os.X_OK) else None


def _write_service_account_keys(private_path: str, public_path: str) -> None:
    """The key pair that signs and verifies service-account tokens."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    with open(private_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(public_path, "wb") as f:
        f.write(key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo))


class KubeAPIServer(ProcessFixture):
    def __init__(self, extra_args: list[str] | None = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="tfscache-kube-")
        self.etcd = EtcdServer(binary=etcd_binary())
        self.tls = make_tls_files()
        self.sa_key = os.path.join(self.dir, "service-account.key")
        self.sa_public_key = os.path.join(self.dir, "service-account.pub")
        _write_service_account_keys(self.sa_key, self.sa_public_key)
        self.tokens = os.path.join(self.dir, "tokens.csv")
        with open(self.tokens, "w") as f:
            f.write(f'{ADMIN_TOKEN},tfscache-test-admin,admin-uid,"system:masters"\n')
        self.extra_args = list(extra_args or [])
        self.port = listen_port()  # it cannot report a port 0 it bound: retried on a collision
        self.process = self._process()

    def _process(self) -> ManagedProcess:
        argv = [binary_path("kube-apiserver"),
                "--etcd-servers", self.etcd.endpoint,
                "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
                "--secure-port", str(self.port),
                "--tls-cert-file", self.tls["cert"], "--tls-private-key-file", self.tls["key"],
                "--client-ca-file", self.tls["ca"],
                "--token-auth-file", self.tokens,
                "--authorization-mode", "RBAC",
                "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
                "--service-account-key-file", self.sa_public_key,
                "--service-account-signing-key-file", self.sa_key,
                "--service-cluster-ip-range", "10.96.0.0/24",
                # no kube-proxy, no real node: the API server would put its loopback address in
                # the `kubernetes` Service's endpoints and refuse; nothing here needs them
                "--endpoint-reconciler-type", "none",
                # the test deletes etcd's history (compaction) itself, when it wants a 410
                "--etcd-compaction-interval", "0",
                "--enable-priority-and-fairness=false",
                "--profiling=false",
                "-v", "1",
                *self.extra_args]
        return ManagedProcess("kube-apiserver", argv, ready=self._ready, log_dir=self.dir)

    # -- life cycle -----------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> KubeAPIServer:
        if not self.etcd.process.running:
            self.etcd.start()
        super().start(timeout)
        return self

    def choose_ports(self) -> bool:
        self.port = listen_port()
        self.process = self._process()
        return True

    def stop(self) -> int | None:
        code = self.process.stop()
        self.etcd.stop()
        return code

    def restart(self, timeout: float = 120.0) -> KubeAPIServer:
        """The API server only (etcd keeps running, and the data)."""
        self.process.stop()
        self.process.start(timeout)
        return self

    def _ready(self) -> bool:
        try:
            code, _ = self.request("GET", "/readyz")
        except OSError:
            return False
        return code == 200

    # -- clients ----------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def ssl_context(self, client_cert: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.tls["ca"])
        if client_cert:
            context.load_cert_chain(self.tls["client_cert"], self.tls["client_key"])
        return context

    def request(self, method: str, path: str, body: Any = None, token: str | None = ADMIN_TOKEN,
                content_type: str = "application/json") -> tuple[int, Any]:
        """A blocking call (for set-up, or in a thread): (status, parsed JSON body)."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json", "Content-Type": content_type}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10, context=self.ssl_context()) as resp:
                raw, code = resp.read(), resp.status
        except urllib.error.HTTPError as e:
            raw, code = e.read(), e.code
        try:
            return code, json.loads(raw) if raw else None
        except ValueError:
            return code, raw.decode("utf-8", "replace")

    def must(self, method: str, path: str, body: Any = None) -> Any:
        code, out = self.request(method, path, body)
        if code >= 300:
            raise AssertionError(f"{method} {path}: HTTP {code}: {out}")
        return out

    # -- objects ------------------------------------------------------------------------------------
    def create_namespace(self, name: str) -> None:
        self.must("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def create_service_account(self, namespace: str, name: str) -> None:
        self.must("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts",
                  {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}})

    def service_account_token(self, namespace: str, name: str) -> str:
        """A real, signed token of the service account (TokenRequest, as the kubelet asks)."""
        out = self.must("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
                        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                         "spec": {"expirationSeconds": 3600}})
        return str(out["status"]["token"])

    def grant_endpointslice_reader(self, namespace: str, subject: dict[str, str], name: str = "reader") -> None:
        """The Role the chart gives tfscache: get, list, watch endpointslices."""
        self.must("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": name},
            "rules": [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                       "verbs": ["get", "list", "watch"]}]})
        self.must("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [subject]})

    def put_endpoint_slice(self, namespace: str, name: str, service: str, endpoints: list[dict[str, Any]],
                           ports: dict[str, int]) -> None:
        """Create or replace one EndpointSlice of ``service``.  (The API refuses loopback IPs
        in endpoints, and FQDN ones need a dot: the tests give their members pod IPs.)"""
        body = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
                "addressType": "IPv4",
                "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports.items()],
                "endpoints": endpoints}
        path = f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
        code, out = self.request("GET", f"{path}/{name}")
        if code == 404:
            self.must("POST", path, body)
        else:
            body["metadata"]["resourceVersion"] = out["metadata"]["resourceVersion"]
            self.must("PUT", f"{path}/{name}", body)

    def delete_endpoint_slice(self, namespace: str, name: str) -> None:
        self.must("DELETE", f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices/{name}")

    def compact_etcd(self) -> int:
        """Drop etcd's history up to now: a watch from an older resourceVersion gets 410 Gone."""
        with urllib.request.urlopen(urllib.request.Request(
                self.etcd.endpoint + "/v3/kv/range", json.dumps({"key": "AA=="}).encode()), timeout=10) as resp:
            revision = int(json.load(resp)["header"]["revision"])
        with urllib.request.urlopen(urllib.request.Request(
                self.etcd.endpoint + "/v3/kv/compaction", json.dumps({"revision": revision, "physical": True})
                .encode()), timeout=10) as resp:
            resp.read()
        return revision

    def kubeconfig(self, namespace: str = "default", token: str | None = None, client_cert: bool = False) -> str:
        """A kubeconfig file for this server (a token, or the test client certificate)."""
        user: dict[str, Any] = {}
        if token:
            user["token"] = token
        if client_cert:
            user.update({"client-certificate": self.tls["client_cert"], "client-key": self.tls["client_key"]})
        config = {"apiVersion": "v1", "kind": "Config", "current-context": "test",
                  "clusters": [{"name": "test", "cluster": {"server": self.url,
                                                            "certificate-authority": self.tls["ca"]}}],
                  "users": [{"name": "test", "user": user}],
                  "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test",
                                                            "namespace": namespace}}]}
        fd, path = tempfile.mkstemp(prefix="kubeconfig-", suffix=".yaml", dir=self.dir)
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(config, f)
        return path
