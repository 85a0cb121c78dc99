"""The daemon as an operator runs it (``twistd -n tfscache --config``): serving, metrics,
readiness, admin API and CLI, SIGHUP and a SIGTERM drain that lets in-flight requests finish."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.clients import GrpcClient, http, rest_predict
from tests.harness import shared
from tests.harness.node import NodeProcess, node_config
from tests.harness.process import REPO_ROOT
from tfscache.devserver.models import set_load_delay, write_corrupt_model, write_half_plus_two
from tfscache.util.grpc_twisted import future_to_deferred

TOKEN = "test-admin-token"


def write_models(path: str) -> None:
    for i in range(3):
        write_half_plus_two(path, f"d{i}", 1, 2.0, float(i))
    set_load_delay(write_half_plus_two(path, "slow", 1, 2.0, 0.0), 2.0)
    write_corrupt_model(path, "broken", 1)


def metrics(base: str) -> dict[str, float]:
    with urllib.request.urlopen(base + "/monitoring/prometheus/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


class DaemonTests(unittest.TestCase):
    timeout = 180

    def setUp(self) -> None:
        self.backend = shared.backend()
        self.models = shared.model_dir("daemon", write_models)

    def start(self, **overrides: object) -> NodeProcess:
        cfg = node_config(self.models, self.backend, admin={"enabled": True, "token": TOKEN},
                          serving={"max_models": 2, "failure_backoff_seconds": 60}, **overrides)
        node = NodeProcess(cfg).start()
        self.addCleanup(node.stop)
        return node

    @defer.inlineCallbacks
    def test_metrics_move_through_a_scenario(self):  # type: ignore[no-untyped-def]
        node = yield threads.deferToThread(self.start)
        m = metrics(node.rest_url)
        self.assertEqual(m.get("tfscache_cache_misses_total", 0), 0)
        for name in ("d0", "d0", "d1", "d2"):  # miss, hit, miss, miss + unload of d0
            reply = yield rest_predict(node.rest_url, name, [1.0])
            self.assertEqual(reply.code, 200, reply.body)
        reply = yield rest_predict(node.rest_url, "broken", [1.0])  # unloads d1, then fails
        self.assertEqual(reply.code, 500)
        client = GrpcClient(node.grpc_target)
        self.addCleanup(client.close)
        yield client.predict("d2", [1.0])
        m = metrics(node.rest_url)
        self.assertEqual(m["tfscache_cache_hits_total"], 2)
        self.assertEqual(m["tfscache_cache_misses_total"], 4)
        self.assertEqual(m['tfscache_loads_total{outcome="ok"}'], 3)
        self.assertEqual(m['tfscache_loads_total{outcome="error"}'], 1)
        self.assertEqual(m['tfscache_unloads_total{reason="capacity"}'], 2)
        self.assertEqual(m["tfscache_load_failures_total"], 1)
        self.assertEqual(m["tfscache_models_loaded"], 1)
        self.assertEqual(m["tfscache_models_on_disk"], 3)  # the broken copy is deleted
        self.assertEqual(m['tfscache_requests_total{api="predict",code="OK",protocol="rest"}'], 4)
        self.assertEqual(m['tfscache_requests_total{api="Predict",code="OK",protocol="grpc"}'], 1)
        self.assertEqual(m['tfscache_load_seconds_count'], 3)
        with urllib.request.urlopen(node.rest_url + "/metrics", timeout=10) as resp:
            page = resp.read()
        self.assertIn(b"tfscache_cache_hits_total", page)
        self.assertIn(b":tensorflow:cc:saved_model:load_attempt_count", page)  # TF Serving's, relayed

    @defer.inlineCallbacks
    def test_admin_api_and_cli(self):  # type: ignore[no-untyped-def]
        node = yield threads.deferToThread(self.start)
        reply = yield http("GET", node.rest_url + "/admin/models")
        self.assertEqual(reply.code, 401)
        reply = yield http("GET", node.rest_url + "/admin/models", headers={b"authorization": [b"Bearer wrong"]})
        self.assertEqual(reply.code, 401)

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "tfscache", "--url", node.rest_url, *args],
                                  capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
                                  env=dict(os.environ, TFSCACHE_ADMIN_TOKEN=TOKEN, PYTHONPATH=REPO_ROOT))

        out = yield threads.deferToThread(cli, "preload", "d1")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(json.loads(out.stdout)["model"]["state"], "available")
        out = yield threads.deferToThread(cli, "models")
        self.assertIn("d1", out.stdout)
        self.assertIn("available", out.stdout)
        out = yield threads.deferToThread(cli, "pin", "d1", "1")
        self.assertTrue(json.loads(out.stdout)["model"]["pinned"])
        for name in ("d0", "d2"):  # room for 2: d1 is pinned, so d0 is the one unloaded
            reply = yield rest_predict(node.rest_url, name, [1.0])
            self.assertEqual(reply.code, 200)
        out = yield threads.deferToThread(cli, "--json", "models")
        states = {m["name"]: m["state"] for m in json.loads(out.stdout)["models"]}
        self.assertEqual((states["d1"], states["d2"], states["d0"]), ("available", "available", "on_disk"))
        out = yield threads.deferToThread(cli, "evict", "d1", "1")
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("pinned", out.stderr)
        yield threads.deferToThread(cli, "unpin", "d1", "1")
        out = yield threads.deferToThread(cli, "evict", "d1", "1")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertFalse(os.path.exists(os.path.join(node.config["disk_cache"]["path"], "d1")))
        out = yield threads.deferToThread(cli, "owners", "d1")
        self.assertIn("127.0.0.1", out.stdout)

    @defer.inlineCallbacks
    def test_sigterm_drains_in_flight_requests(self):  # type: ignore[no-untyped-def]
        node = yield threads.deferToThread(self.start)
        slow = rest_predict(node.rest_url, "slow", [2.0])  # a 2 s load: in flight at SIGTERM
        yield self.wait_for_state(node, "slow", "loading")
        node.process.signal(signal.SIGTERM)
        reply = yield slow
        self.assertEqual((reply.code, reply.json()), (200, {"predictions": [4.0]}))
        code = yield threads.deferToThread(node.process.proc.wait, 60)
        self.assertEqual(code, 0)

    @defer.inlineCallbacks
    def wait_for_state(self, node: NodeProcess, name: str, state: str):  # type: ignore[no-untyped-def]
        for _ in range(400):
            reply = yield http("GET", node.rest_url + "/admin/models",
                               headers={b"authorization": [f"Bearer {TOKEN}".encode()]})
            if any(m["name"] == name and m["state"] == state for m in reply.json()["models"]):
                return
            yield threads.deferToThread(lambda: None)  # let the node run; the poll is bounded
        self.fail(f"{name} never reached {state}")

    @defer.inlineCallbacks
    def test_readiness_follows_the_backend(self):  # type: ignore[no-untyped-def]
        from tests.harness.devserver import DevServer

        own = DevServer()
        yield threads.deferToThread(own.start)
        self.addCleanup(own.stop)
        cfg = node_config(self.models, own, serving={"health_interval_seconds": 0.2})
        node = yield threads.deferToThread(NodeProcess(cfg).start)
        self.addCleanup(node.stop)
        reply = yield http("GET", node.rest_url + "/readyz")
        self.assertEqual(reply.code, 200, reply.body)
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(node.grpc_target))
        check = health_pb2.HealthCheckRequest(service="tensorflow.serving.PredictionService")
        SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        resp = yield future_to_deferred(health.Check.future(check, timeout=10))
        self.assertEqual(resp.status, SERVING)
        yield threads.deferToThread(own.kill)
        reply = yield http("GET", node.rest_url + "/readyz")
        self.assertEqual(reply.code, 503)
        self.assertIn("tfserving", reply.json())
        for _ in range(200):  # the monitor probes every 0.2 s: no event reaches this process
            resp = yield future_to_deferred(health.Check.future(check, timeout=10))
            if resp.status == NOT_SERVING:
                break
            yield threads.deferToThread(time.sleep, 0.05)
        self.assertEqual(resp.status, NOT_SERVING)
        reply = yield http("GET", node.rest_url + "/healthz")
        self.assertEqual(reply.code, 200)

    @defer.inlineCallbacks
    def test_sighup_applies_capacity_and_names_the_rest(self):  # type: ignore[no-untyped-def]
        node = yield threads.deferToThread(self.start)
        cfg = dict(node.config)
        cfg["serving"] = dict(cfg["serving"], max_models=1)
        cfg["listen"] = dict(cfg["listen"], grpc_threads=3)
        with open(node.config_path, "w") as f:
            yaml.safe_dump(cfg, f)
        node.process.signal(signal.SIGHUP)
        for _ in range(200):
            log = open(node.process.log_path).read()
            if "SIGHUP" in log:
                break
            yield threads.deferToThread(lambda: None)
        self.assertIn("applied serving.max_models; need a restart to change: listen.grpc_threads", log)
        for name in ("d0", "d1"):
            reply = yield rest_predict(node.rest_url, name, [1.0])
            self.assertEqual(reply.code, 200)
        m = metrics(node.rest_url)
        self.assertEqual(m["tfscache_models_loaded"], 1)


class ConfigErrorTests(unittest.TestCase):
    def test_unreadable_config(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "missing.yaml")
            proc = subprocess.run(
                [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "tfscache", "--config", path],
                capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
                env=dict(os.environ, PYTHONPATH=REPO_ROOT))
        self.assertNotEqual(proc.returncode, 0)
        self.assertEqual(proc.stderr.strip(),
                         f"tfscache: configuration error: config file {path}: No such file or directory")
