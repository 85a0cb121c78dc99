"""Real etcd, Consul and S3-compatible servers for the tests, on free loopback ports.

etcd comes from Debian's ``etcd-server``; Consul and MinIO are built from their Go modules by
``tests/harness/build_go_servers.sh`` into ``$TFSCACHE_CACHE/bin``.  If MinIO could not be
built, ``S3Server`` runs moto's server mode instead (``kind`` says which).  ``restart()`` keeps
the ports and the data, so a test can stop a server while traffic runs and bring it back.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import urllib.request
from typing import Any

from tests.harness.process import CACHE_DIR, ManagedProcess, ProcessFixture, free_port, http_ready


def binary_path(name: str) -> str:
    path = os.path.join(CACHE_DIR, "bin", name)
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"{path} is missing: run tests/harness/build_go_servers.sh (scripts/setup --go-servers)")
    return path


class EtcdServer(ProcessFixture):
    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port, self.peer_port = free_port(), free_port()
        self.data_dir = tempfile.mkdtemp(prefix="tfscache-etcd-")
        etcd = shutil.which("etcd") or "/usr/bin/etcd"
        self.process = ManagedProcess(
            "etcd",
            [etcd, "--name", "test", "--data-dir", os.path.join(self.data_dir, "data"),
             "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
             "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
             "--initial-cluster", f"test=http://127.0.0.1:{self.peer_port}",
             "--log-level", "warn"],
            ready=http_ready(self.endpoint + "/health"),
            log_dir=self.data_dir,
        )

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class ConsulAgent(ProcessFixture):
    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="tfscache-consul-")
        ports = {"http": self.port, "dns": -1, "grpc": -1, "grpc_tls": -1,
                 "serf_lan": free_port(), "serf_wan": free_port(), "server": free_port()}
        config = os.path.join(self.dir, "consul.json")
        with open(config, "w") as f:
            json.dump({"ports": ports, "bind_addr": "127.0.0.1", "client_addr": "127.0.0.1",
                       "data_dir": os.path.join(self.dir, "data"), "log_level": "WARN",
                       "disable_update_check": True}, f)
        self.process = ManagedProcess(
            "consul", [binary_path("consul"), "agent", "-dev", "-config-file", config],
            ready=self._has_leader, log_dir=self.dir,
        )

    @property
    def http_addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _has_leader(self) -> bool:
        try:
            with urllib.request.urlopen(self.http_addr + "/v1/status/leader", timeout=1) as resp:
                return bool(json.load(resp))
        except (OSError, ValueError):
            return False


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
