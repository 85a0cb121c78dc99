"""tfscache nodes for the tests: in the test process (inspectable) or as a twistd process."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import yaml
from twisted.internet import defer, reactor

from tests.harness.process import (
    REPO_ROOT,
    ManagedProcess,
    ProcessFixture,
    http_ready,
    listen_port,
    retry_on_collision,
    tcp_ready,
)
from tfscache.config import load_config
from tfscache.service import NodeService


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# every test node shares it: the nodes of one test authenticate each other's forwards
CLUSTER_SECRET = "test-cluster-secret-0123456789abcdef"


def node_config(
    models: str, backend: Any, cache_dir: str | None = None, **overrides: Any
) -> dict[str, Any]:
    """A config dict for a node in front of ``backend`` (a harness DevServer)."""
    cfg = {
        "node": {"id": overrides.pop("node_id", "node-test"), "advertise_host": "127.0.0.1"},
        "listen": {"host": "127.0.0.1", "rest_port": 0, "grpc_port": 0, "grpc_threads": 16},
        "model_provider": {"type": "disk", "disk": {"base_path": models}, "listing_ttl_seconds": 1.0},
        "disk_cache": {"path": cache_dir or tempfile.mkdtemp(prefix="tfscache-cache-")},
        "serving": {
            "grpc_target": backend.grpc_target,
            "rest_url": backend.rest_url,
            "load_timeout_seconds": 60,
            "failure_backoff_seconds": 30,
            "churn_guard_seconds": 0,
            "capacity_wait_seconds": 10,
        },
        "cluster": {"secret": CLUSTER_SECRET},
    }
    return merge(cfg, overrides)


class InProcessNode:
    """A NodeService running on the test's reactor, on free ports."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.service = NodeService(load_config(config, environ={}), reactor)

    @defer.inlineCallbacks
    def start(self):  # type: ignore[no-untyped-def]
        self.service.startService()
        yield self.service.started
        return self

    def stop(self) -> defer.Deferred[None]:
        return defer.maybeDeferred(self.service.stopService)

    @property
    def cache(self) -> Any:
        return self.service.cache

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.service.rest_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.service.grpc.bound_port}"


class NodeProcess(ProcessFixture):
    """``twistd -n tfscache --config FILE`` as a child process, as an operator runs it."""

    def __init__(self, config: dict[str, Any], name: str = "tfscache", limits: Sequence[str] = ()) -> None:
        # port 0 unless the test gave ports (a static cluster's members): the node writes the
        # ports it bound to listen.ports_file, read back at start; a restart binds the same again
        self.dir = tempfile.mkdtemp(prefix="tfscache-node-")
        listen = config.setdefault("listen", {})
        self.rest_port = listen["rest_port"] = listen.get("rest_port") or 0
        self.grpc_port = listen["grpc_port"] = listen.get("grpc_port") or 0
        # given ports need no file (and an older checkout, bench.data_plane's --before, knows no
        # listen.ports_file)
        self.ports_file = (None if self.rest_port and self.grpc_port
                           else listen.setdefault("ports_file", os.path.join(self.dir, "ports.json")))
        self.config = config
        self.config_path = os.path.join(self.dir, "tfscache.yaml")
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        self.process = ManagedProcess(
            name,
            [twistd, "-n", "--pidfile=", "tfscache", "--config", self.config_path],
            ready=self._ready,
            env={"PYTHONPATH": REPO_ROOT},
            cwd=self.dir,
            log_dir=self.dir,
            limits=limits,
        )

    def start(self, timeout: float = 60.0) -> NodeProcess:
        """Start; a later start (after stop, kill or restart) binds the ports the first one got,
        which its cluster and the test know (they are written into its config file)."""
        if self.ports_file is not None and os.path.exists(self.ports_file):
            os.unlink(self.ports_file)
        if self.rest_port and self.grpc_port:
            with open(self.config_path) as f:
                cfg = yaml.safe_load(f)
            listen = cfg.setdefault("listen", {})
            if (listen.get("rest_port"), listen.get("grpc_port")) != (self.rest_port, self.grpc_port):
                listen.update(rest_port=self.rest_port, grpc_port=self.grpc_port)
                with open(self.config_path, "w") as f:
                    yaml.safe_dump(cfg, f)
        return super().start(timeout)  # type: ignore[no-any-return]

    def _ready(self) -> bool:
        if not (self.rest_port and self.grpc_port):
            assert self.ports_file is not None
            try:
                with open(self.ports_file) as f:
                    ports = json.load(f)
            except (OSError, ValueError):
                return False
            self.rest_port, self.grpc_port = ports["rest_port"], ports["grpc_port"]
        return http_ready(self.rest_url + "/healthz")() and tcp_ready(self.grpc_port)()

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"



def static_cluster(make: Callable[[int, list[dict[str, Any]]], NodeProcess], size: int,
                   start: Callable[[list[NodeProcess]], None] | None = None) -> list[NodeProcess]:
    """``size`` nodes in one static cluster, started: every member's ports must be in every
    config before any node starts, so they are chosen (``listen_port``) rather than read back,
    and the whole cluster starts again on new ports if one was taken meanwhile.
    ``make(i, members)`` builds node i (its listen ports are ``members[i]``'s); ``start``
    starts them all (default: one after the other)."""

    def attempt() -> list[NodeProcess]:
        members = [{"id": f"node-{i}", "host": "127.0.0.1", "rest_port": listen_port(), "grpc_port": listen_port()}
                   for i in range(size)]
        nodes = [make(i, members) for i in range(size)]
        try:
            if start is None:
                for n in nodes:
                    n.start()
            else:
                start(nodes)
        except BaseException:
            for n in nodes:
                n.stop()
            raise
        return nodes

    return retry_on_collision(attempt)


def metrics(base: str, path: str = "/monitoring/prometheus/metrics") -> dict[str, float]:
    """A running node's metrics page as ``{'name{labels as printed}': value}``."""
    with urllib.request.urlopen(base + path, timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
