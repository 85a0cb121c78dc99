"""Real etcd, Consul, S3-compatible, Azure Blob and GCS servers for the tests, on loopback ports.

etcd comes from Debian's ``etcd-server`` (or ``binary``: the v3.6 that Kubernetes' harness
builds, tests/harness/kube.py); Consul and MinIO are built from their Go modules by
``tests/harness/build_go_servers.sh`` into ``$TFSCACHE_CACHE/bin``.  If MinIO could not be
built, ``S3Server`` runs moto's server mode instead (``kind`` says which).  ``restart()`` keeps
the ports and the data, so a test can stop a server while traffic runs and bring it back.

``AzuriteServer`` runs Microsoft's emulator from npm (installed by scripts/setup under
``$TFSCACHE_CACHE/npm``) on a port 0 that it binds and prints; ``FakeGCSServer`` runs
fake-gcs-server (built like MinIO), which takes a port from the command line only: a start
that finds the port taken retries on another.

``EtcdServer`` and ``ConsulAgent`` take optional ``tls`` files (from ``tests/harness/certs.py``):
their client API is then HTTPS only, and with ``verify_clients`` a client certificate signed by
the same CA is required.  The paths are read again on ``restart()``, so a test can rotate the
certificate under a running client.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from typing import Any

from tests.harness.process import CACHE_DIR, ManagedProcess, ProcessFixture, http_ready, listen_port, tcp_ready


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
        self.tls, self.verify_clients, self.extra_args = tls, verify_clients, list(extra_args or [])
        self.data_dir = tempfile.mkdtemp(prefix="tfscache-etcd-")
        self.binary = binary or shutil.which("etcd") or "/usr/bin/etcd"
        # etcd cannot report a port 0 it bound: ports below the ephemeral range, retried on a collision
        self.port, self.peer_port = listen_port(), listen_port()
        ready = http_ready(self.endpoint + "/health")
        if tls:
            ready = _https_ready(self.endpoint + "/health", tls, lambda resp: resp.status == 200)
        self.process = ManagedProcess("etcd", self._argv(), ready=self._ready, log_dir=self.data_dir)
        self._probe = ready

    def _ready(self) -> bool:
        return self._probe()

    def _argv(self) -> list[str]:
        argv = [self.binary, "--name", "test", "--data-dir", os.path.join(self.data_dir, "data"),
                "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
                "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
                "--initial-cluster", f"test=http://127.0.0.1:{self.peer_port}",
                "--log-level", "warn", *self.extra_args]
        if self.tls:
            argv += ["--cert-file", self.tls["cert"], "--key-file", self.tls["key"]]
            if self.verify_clients:
                argv += ["--client-cert-auth", "--trusted-ca-file", self.tls["ca"]]
        return argv

    def choose_ports(self) -> bool:
        self.port, self.peer_port = listen_port(), listen_port()
        if self.tls:
            self._probe = _https_ready(self.endpoint + "/health", self.tls, lambda resp: resp.status == 200)
        else:
            self._probe = http_ready(self.endpoint + "/health")
        self.process.argv = self._argv()
        return True

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"


class ConsulAgent(ProcessFixture):
    def __init__(self, tls: dict[str, str] | None = None, verify_clients: bool = False,
                 extra_config: dict[str, Any] | None = None) -> None:
        self.host = "127.0.0.1"
        self.tls, self.verify_clients, self.extra_config = tls, verify_clients, extra_config
        self.dir = tempfile.mkdtemp(prefix="tfscache-consul-")
        self.config = os.path.join(self.dir, "consul.json")
        self._write_config()
        ready = _https_ready(self.http_addr + "/v1/status/leader", tls, _has_leader) if tls else self._has_leader
        self.process = ManagedProcess(
            "consul", [binary_path("consul"), "agent", "-dev", "-config-file", self.config],
            ready=ready, log_dir=self.dir,
        )

    def choose_ports(self) -> bool:
        self._write_config()  # the argv names the file: new ports in it, same argv
        if self.tls:
            self.process.ready = _https_ready(self.http_addr + "/v1/status/leader", self.tls, _has_leader)
        return True

    def _write_config(self) -> None:
        """Consul cannot report a port 0 it bound: ports below the ephemeral range, retried on a
        collision (``choose_ports``)."""
        tls, verify_clients, extra_config = self.tls, self.verify_clients, self.extra_config
        self.port = listen_port()
        ports = {"http": self.port, "dns": -1, "grpc": -1, "grpc_tls": -1,
                 "serf_lan": listen_port(), "serf_wan": listen_port(), "server": listen_port()}
        settings: dict[str, Any] = {
            "ports": ports, "bind_addr": "127.0.0.1", "client_addr": "127.0.0.1",
            "data_dir": os.path.join(self.dir, "data"), "log_level": "WARN", "disable_update_check": True}
        if tls:
            # the HTTP API on HTTPS only (no plaintext port); internal RPC stays as it is
            ports.update(http=-1, https=self.port)
            settings["tls"] = {"https": {"ca_file": tls["ca"], "cert_file": tls["cert"], "key_file": tls["key"],
                                         "verify_incoming": verify_clients}}
        settings.update(extra_config or {})
        with open(self.config, "w") as f:
            json.dump(settings, f)

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
        # MinIO and moto cannot report a port 0 they bound: below the ephemeral range, retried
        self.port = listen_port()
        self.dir = tempfile.mkdtemp(prefix="tfscache-s3-")
        try:
            self.minio: str | None = binary_path("minio")
        except RuntimeError:
            self.minio = None
        self.kind = "minio" if self.minio else "moto"
        self.process = ManagedProcess(
            "s3", self._argv(), ready=self._ready, log_dir=self.dir,
            env={"MINIO_ROOT_USER": self.access_key, "MINIO_ROOT_PASSWORD": self.secret_key,
                 "MINIO_BROWSER": "off", "MINIO_UPDATE": "off"},
        )

    def _argv(self) -> list[str]:
        if self.minio:
            return [self.minio, "server", os.path.join(self.dir, "data"), "--address", f"127.0.0.1:{self.port}",
                    "--console-address", f"127.0.0.1:{listen_port()}", "--quiet"]
        return [os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)]

    def _ready(self) -> bool:
        if self.minio:
            return http_ready(self.endpoint_url + "/minio/health/live")()
        return http_ready(self.endpoint_url + "/", accept=(200, 403, 404))()

    def choose_ports(self) -> bool:
        self.port = listen_port()
        self.process.argv = self._argv()
        return True

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


AZURITE_VERSION = "3.35.0"  # the last release that runs on Node 20 (3.36 wants Node 21+)


def azurite_path() -> str:
    """azurite-blob as scripts/setup installs it from npm, under $TFSCACHE_CACHE."""
    path = os.path.join(CACHE_DIR, "npm", f"azurite-{AZURITE_VERSION}", "node_modules", ".bin", "azurite-blob")
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"{path} is missing: scripts/setup installs Azurite from npm (needs node and npm)")
    return path


class _PortFromLog:
    """A readiness probe for a server started on port 0: the port it printed, then a TCP connect.

    Used where the server can bind port 0 and says which port it got; a restart binds that
    port again (retried by the caller if something else took it meanwhile)."""

    def __init__(self, fixture: Any, pattern: str) -> None:
        self.fixture = fixture
        self.pattern = re.compile(pattern)

    def __call__(self) -> bool:
        if not self.fixture.port:
            try:
                with open(self.fixture.process.log_path, errors="replace") as f:
                    m = self.pattern.search(f.read())
            except OSError:
                return False
            if not m:
                return False
            self.fixture.port = int(m.group(1))
        return tcp_ready(self.fixture.port)()


class AzuriteServer(ProcessFixture):
    """Azurite's Blob service (Microsoft's emulator) on 127.0.0.1, its data in a directory so a
    restart keeps it.  The well-known development account, which Azurite checks keys and SAS
    signatures of."""

    account = "devstoreaccount1"
    account_key = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq"
                   "/K1SZFPTOtr/KBHBeksoGMGw==")

    def __init__(self) -> None:
        self.port = 0  # Azurite binds port 0 and prints the port it got
        self.dir = tempfile.mkdtemp(prefix="tfscache-azurite-")
        self.kind = "azurite"
        self.process = ManagedProcess("azurite", self._argv(), ready=_PortFromLog(
            self, r"successfully listens on http://127\.0\.0\.1:(\d+)"), log_dir=self.dir)

    def _argv(self) -> list[str]:
        return [azurite_path(), "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
                "--location", os.path.join(self.dir, "data"), "--skipApiVersionCheck",
                "--disableTelemetry", "--silent"]

    def restart(self, timeout: float = 60.0):  # type: ignore[no-untyped-def]
        self.process.stop()
        self.process.argv = self._argv()  # the same port as before
        return self.start(timeout)

    @property
    def account_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{self.account}"

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={self.account};"
                f"AccountKey={self.account_key};BlobEndpoint={self.account_url};")

    def service_client(self) -> Any:
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string)


class FakeGCSServer(ProcessFixture):
    """fake-gcs-server (built from its Go module by build_go_servers.sh) on 127.0.0.1, its data
    in a directory so a restart keeps it.  It checks no credentials."""

    def __init__(self) -> None:
        self.port = listen_port()  # it cannot report a port 0 it bound: retried on a collision
        self.dir = tempfile.mkdtemp(prefix="tfscache-fake-gcs-")
        self.kind = "fake-gcs-server"
        self.binary = binary_path("fake-gcs-server")
        self.process = ManagedProcess("fake-gcs", self._argv(), ready=self._ready, log_dir=self.dir)

    def _argv(self) -> list[str]:
        return [self.binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                "-backend", "filesystem", "-filesystem-root", os.path.join(self.dir, "data"),
                "-public-host", f"127.0.0.1:{self.port}", "-external-url", self.endpoint_url,
                "-log-level", "warn"]

    def _ready(self) -> bool:
        return http_ready(self.endpoint_url + "/storage/v1/b")()

    def choose_ports(self) -> bool:
        self.port = listen_port()
        self.process.argv = self._argv()
        return True

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> Any:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project="tfscache-test", credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.endpoint_url})
