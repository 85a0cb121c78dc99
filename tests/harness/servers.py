"""Real etcd, Consul and S3-compatible servers for the tests, on free loopback ports.

etcd comes from Debian's ``etcd-server`` (or ``binary``: the v3.6 that Kubernetes' harness
builds, tests/harness/kube.py); Consul and MinIO are built from their Go modules by
``tests/harness/build_go_servers.sh`` into ``$TFSCACHE_CACHE/bin``.  If MinIO could not be
built, ``S3Server`` runs moto's server mode instead (``kind`` says which).  ``restart()`` keeps
the ports and the data, so a test can stop a server while traffic runs and bring it back.

``EtcdServer`` and ``ConsulAgent`` take optional ``tls`` files (from ``tests/harness/certs.py``):
their client API is then HTTPS only, and with ``verify_clients`` a client certificate signed by
the same CA is required.  The paths are read again on ``restart()``, so a test can rotate the
certificate under a running client.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from typing import Any

from tests.harness.process import CACHE_DIR, ManagedProcess, ProcessFixture, free_port, http_ready


def binary_path(name: str) -> str:
    path = os.path.join(CACHE_DIR, "bin", name)
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"{path} is missing: run tests/harness/build_go_servers.sh (scripts/setup --go-servers)")
    return path


def tls_context(tls: dict[str, str], client_cert: bool = True) -> ssl.SSLContext:
    """A client SSL context trusting ``tls["ca"]`` (and presenting its client certificate)."""
    context = ssl.create_default_context(cafile=tls["ca"])
    if client_cert:
        context.load_cert_chain(tls["client_cert"], tls["client_key"])
    return context


def _https_ready(url: str, tls: dict[str, str], ok: Callable[[Any], bool]) -> Callable[[], bool]:
    # up is up whoever signed the certificate it serves (a test may serve an untrusted one)
    context = tls_context(tls)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE

    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as resp:
                return ok(resp)
        except (OSError, ValueError):
            return False

    return probe


class EtcdServer(ProcessFixture):
    def __init__(self, tls: dict[str, str] | None = None, verify_clients: bool = False,
                 extra_args: list[str] | None = None, binary: str | None = None) -> None:
        self.host = "127.0.0.1"
        self.port, self.peer_port = free_port(), free_port()
        self.tls = tls
        self.data_dir = tempfile.mkdtemp(prefix="tfscache-etcd-")
        etcd = binary or shutil.which("etcd") or "/usr/bin/etcd"
        argv = [etcd, "--name", "test", "--data-dir", os.path.join(self.data_dir, "data"),
                "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
                "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
                "--initial-cluster", f"test=http://127.0.0.1:{self.peer_port}",
                "--log-level", "warn", *(extra_args or [])]
        ready = http_ready(self.endpoint + "/health")
        if tls:
            argv += ["--cert-file", tls["cert"], "--key-file", tls["key"]]
            if verify_clients:
                argv += ["--client-cert-auth", "--trusted-ca-file", tls["ca"]]
            ready = _https_ready(self.endpoint + "/health", tls, lambda resp: resp.status == 200)
        self.process = ManagedProcess("etcd", argv, ready=ready, log_dir=self.data_dir)

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"


class ConsulAgent(ProcessFixture):
    def __init__(self, tls: dict[str, str] | None = None, verify_clients: bool = False,
                 extra_config: dict[str, Any] | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        self.tls = tls
        self.dir = tempfile.mkdtemp(prefix="tfscache-consul-")
        ports = {"http": self.port, "dns": -1, "grpc": -1, "grpc_tls": -1,
                 "serf_lan": free_port(), "serf_wan": free_port(), "server": free_port()}
        settings: dict[str, Any] = {
            "ports": ports, "bind_addr": "127.0.0.1", "client_addr": "127.0.0.1",
            "data_dir": os.path.join(self.dir, "data"), "log_level": "WARN", "disable_update_check": True}
        if tls:
            # the HTTP API on HTTPS only (no plaintext port); internal RPC stays as it is
            ports.update(http=-1, https=self.port)
            settings["tls"] = {"https": {"ca_file": tls["ca"], "cert_file": tls["cert"], "key_file": tls["key"],
                                         "verify_incoming": verify_clients}}
        settings.update(extra_config or {})
        config = os.path.join(self.dir, "consul.json")
        with open(config, "w") as f:
            json.dump(settings, f)
        ready = _https_ready(self.http_addr + "/v1/status/leader", tls, _has_leader) if tls else self._has_leader
        self.process = ManagedProcess(
            "consul", [binary_path("consul"), "agent", "-dev", "-config-file", config],
            ready=ready, log_dir=self.dir,
        )

    @property
    def http_addr(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def _has_leader(self) -> bool:
        try:
            with urllib.request.urlopen(self.http_addr + "/v1/status/leader", timeout=1) as resp:
                return _has_leader(resp)
        except (OSError, ValueError):
            return False


def _has_leader(resp: Any) -> bool:
    return bool(json.load(resp))


class S3Server(ProcessFixture):
    access_key = "tfscache-test"
    secret_key = "tfscache-test-secret-key"

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="tfscache-s3-")
        try:
            minio = binary_path("minio")
        except RuntimeError:
            minio = None
        if minio:
            self.kind = "minio"
            argv = [minio, "server", os.path.join(self.dir, "data"), "--address", f"127.0.0.1:{self.port}",
                    "--console-address", f"127.0.0.1:{free_port()}", "--quiet"]
            ready = http_ready(self.endpoint_url + "/minio/health/live")
        else:
            self.kind = "moto"
            argv = [os.path.join(os.path.dirname(sys.executable), "moto_server"),
                    "-H", "127.0.0.1", "-p", str(self.port)]
            ready = http_ready(self.endpoint_url + "/", accept=(200, 403, 404))
        self.process = ManagedProcess(
            "s3", argv, ready=ready, log_dir=self.dir,
            env={"MINIO_ROOT_USER": self.access_key, "MINIO_ROOT_PASSWORD": self.secret_key,
                 "MINIO_BROWSER": "off", "MINIO_UPDATE": "off"},
        )

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def boto3_client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )
