"""tfscache nodes for the tests: in the test process (inspectable) or as a twistd process."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import yaml
from twisted.internet import defer, reactor

from tests.harness.process import REPO_ROOT, ManagedProcess, ProcessFixture, free_port, http_ready, tcp_ready
from tfscache.config import load_config
from tfscache.service import NodeService


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


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

    def __init__(self, config: dict[str, Any], name: str = "tfscache",
                 preexec_fn: Callable[[], None] | None = None) -> None:
        self.rest_port = config["listen"]["rest_port"] = config["listen"].get("rest_port") or free_port()
        self.grpc_port = config["listen"]["grpc_port"] = config["listen"].get("grpc_port") or free_port()
        self.config = config
        self.dir = tempfile.mkdtemp(prefix="tfscache-node-")
        self.config_path = os.path.join(self.dir, "tfscache.yaml")
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        self.process = ManagedProcess(
            name,
            [twistd, "-n", "--pidfile=", "tfscache", "--config", self.config_path],
            ready=lambda: http_ready(self.rest_url + "/healthz")() and tcp_ready(self.grpc_port)(),
            env={"PYTHONPATH": REPO_ROOT},
            cwd=self.dir,
            log_dir=self.dir,
            preexec_fn=preexec_fn,
        )

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

