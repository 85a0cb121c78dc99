"""The daemon as an operator runs it (``twistd -n tfscache --config``): serving, metrics,
readiness, admin API and CLI, SIGHUP and a SIGTERM drain that lets in-flight requests finish."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from tests.clients import GrpcClient, http, rest_predict
from tests.harness import shared
from tests.harness.node import NodeProcess, metrics, node_config
from tests.harness.process import REPO_ROOT, listen_port, retry_on_collision, unused_port
from tests.test_faults import until
from tfscache.devserver.models import set_load_delay, write_corrupt_model, write_half_plus_two
from tfscache.errors import Code, ServingError
from tfscache.util.grpc_twisted import future_to_deferred

TOKEN = "test-admin-token"


def write_models(path: str) -> None:
    for i in range(3):
        write_half_plus_two(path, f"d{i}", 1, 2.0, float(i))
    set_load_delay(write_half_plus_two(path, "slow", 1, 2.0, 0.0), 2.0)
    # longer than grpcio's old fixed 5 s stop grace: a drain must wait for it
    set_load_delay(write_half_plus_two(path, "slower", 1, 2.0, 0.0), 7.0)
    write_corrupt_model(path, "broken", 1)


def wait_for_log(node: NodeProcess, text: str, tries: int = 400) -> defer.Deferred[str]:
    """The node's log once it contains ``text`` (polled a bounded number of times)."""

    @defer.inlineCallbacks
    def poll():  # type: ignore[no-untyped-def]
        log = ""
        for _ in range(tries):
            with open(node.process.log_path) as f:
                log = f.read()
            if text in log:
                return log
            yield threads.deferToThread(time.sleep, 0.05)
        return log

    return poll()  # type: ignore[no-any-return]


class DaemonTests(unittest.TestCase):
    timeout = 180

    def setUp(self) -> None:
        self.backend = shared.backend()
        self.models = shared.model_dir("daemon", write_models)

    def start(self, **overrides: object) -> NodeProcess:
        cfg = node_config(self.models, self.backend, admin={"enabled": True, "token": TOKEN},
                          # the scenarios below count LRU's unloads
                          serving={"max_models": 2, "failure_backoff_seconds": 60, "eviction": "lru"},
                          disk_cache={"eviction": "lru"}, **overrides)
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
        self.assertEqual(reply.code, 404)  # TF Serving's code for a servable that did not load
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
        self.assertEqual(m['tfscache_requests_total{api="Predict",code="OK",protocol="rest"}'], 4)
        self.assertEqual(m['tfscache_requests_total{api="Predict",code="OK",protocol="grpc"}'], 1)
        self.assertEqual(m['tfscache_load_seconds_count'], 3)
        with urllib.request.urlopen(node.rest_url + "/metrics", timeout=10) as resp:
            page = resp.read()
        self.assertIn(b"tfscache_cache_hits_total", page)
        self.assertIn(b":tensorflow:cc:saved_model:load_attempt_count", page)  # TF Serving's, relayed
        # shrink the disk cache to what it holds now: the next copy has to delete the least
        # recently used model on disk (d0; d2 is loaded, so protected)
        self.assertEqual(m["tfscache_disk_evictions_total"], 1)  # the broken copy
        evicted, on_disk_bytes = m["tfscache_disk_evictions_total"], m["tfscache_disk_bytes"]
        cfg = dict(node.config)
        cfg["disk_cache"] = dict(cfg["disk_cache"], capacity_bytes=int(on_disk_bytes))
        with open(node.config_path, "w") as f:
            yaml.safe_dump(cfg, f)
        node.process.signal(signal.SIGHUP)
        log = yield wait_for_log(node, "SIGHUP")
        self.assertIn("applied disk_cache.capacity_bytes;", log)
        reply = yield rest_predict(node.rest_url, "slow", [1.0])
        self.assertEqual(reply.code, 200, reply.body)
        m = metrics(node.rest_url)
        evicted = m["tfscache_disk_evictions_total"] - evicted
        self.assertGreaterEqual(evicted, 1)
        self.assertGreater(m["tfscache_disk_evicted_bytes_total"], 0)
        self.assertLessEqual(m["tfscache_disk_bytes"], on_disk_bytes)
        self.assertEqual(m["tfscache_models_on_disk"], 3 + 1 - evicted)  # slow in, the evicted out

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
        header, *rows = out.stdout.splitlines()
        [d1] = [r.split() for r in rows if r.startswith("d1 ")]
        self.assertEqual(d1[header.split().index("ERROR")], "-")  # no error: "-", never "None"
        self.assertNotIn("None", out.stdout)
        out = yield threads.deferToThread(cli, "pin", "d1", "1")
        self.assertTrue(json.loads(out.stdout)["model"]["pinned"])
        # a model or version the source does not have: a clear failure, and no phantom entry
        for args in (("pin", "nope", "5"), ("pin", "d1", "7"), ("unpin", "nope", "5")):
            out = yield threads.deferToThread(cli, *args)
            self.assertNotEqual(out.returncode, 0, args)
            self.assertIn("404", out.stderr)
            self.assertIn(args[1], out.stderr)
        out = yield threads.deferToThread(cli, "--json", "models")
        self.assertEqual({(m["name"], m["version"]) for m in json.loads(out.stdout)["models"]}, {("d1", 1)})
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
        out = yield threads.deferToThread(cli, "members")
        self.assertEqual(out.returncode, 0, out.stderr)
        header, *rows = out.stdout.splitlines()
        self.assertEqual(header.split(), ["ID", "HOST", "REST_PORT", "GRPC_PORT"])
        self.assertEqual([r.split() for r in rows],
                         [["node-test", "127.0.0.1", str(node.rest_port), str(node.grpc_port)]])
        out = yield threads.deferToThread(cli, "--json", "members")
        self.assertEqual([(m["id"], m["self"]) for m in json.loads(out.stdout)["members"]], [("node-test", True)])

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
    def test_sigterm_drains_in_flight_grpc_calls(self):  # type: ignore[no-untyped-def]
        """A gRPC call in flight at SIGTERM finishes, even past grpcio's old fixed 5 s grace:
        the drain waits for gRPC calls as for REST requests, up to drain_timeout_seconds."""
        node = yield threads.deferToThread(self.start)
        client = GrpcClient(node.grpc_target)
        self.addCleanup(client.close)
        slow = client.predict("slower", [2.0])  # a 7 s load: in flight at SIGTERM
        yield self.wait_for_state(node, "slower", "loading")
        node.process.signal(signal.SIGTERM)
        reply = yield slow
        self.assertEqual(list(reply.outputs["y"].float_val), [4.0])
        code = yield threads.deferToThread(node.process.proc.wait, 60)
        self.assertEqual(code, 0)
        log = open(node.process.log_path).read()
        self.assertNotIn("drain timeout", log)  # within drain_timeout_seconds

    @defer.inlineCallbacks
    def test_drain_timeout_bounds_grpc_calls(self):  # type: ignore[no-untyped-def]
        """Past listen.drain_timeout_seconds a call still in flight is given up: the process
        exits without waiting for the load."""
        node = yield threads.deferToThread(self.start, listen={"drain_timeout_seconds": 1})
        client = GrpcClient(node.grpc_target)
        self.addCleanup(client.close)
        slow = client.predict("slower", [2.0])
        yield self.wait_for_state(node, "slower", "loading")
        node.process.signal(signal.SIGTERM)
        code = yield threads.deferToThread(node.process.proc.wait, 60)
        self.assertEqual(code, 0)
        failure = yield self.assertFailure(slow, ServingError)
        self.assertIn(failure.code, (Code.UNAVAILABLE, Code.CANCELLED))
        log = open(node.process.log_path).read()
        self.assertIn("drain timeout: 0 REST and 1 gRPC requests still in flight", log)
        # not the 7 s load: the process stopped before it had seen that load end
        self.assertIn("tfscache node node-test stopped", log)
        self.assertNotIn("loaded model=slower", log)

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
        resp = yield future_to_deferred(reactor, health.Check.future(check, timeout=10))
        self.assertEqual(resp.status, SERVING)
        yield threads.deferToThread(own.kill)
        reply = yield http("GET", node.rest_url + "/readyz")
        self.assertEqual(reply.code, 503)
        self.assertIn("tfserving", reply.json())
        for _ in range(200):  # the monitor probes every 0.2 s: no event reaches this process
            resp = yield future_to_deferred(reactor, health.Check.future(check, timeout=10))
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
        # polled with a pause (200 bare thread round trips took less time than a loaded
        # machine needs to handle the signal)
        log = yield wait_for_log(node, "SIGHUP")
        self.assertIn("applied serving.max_models; need a restart to change: listen.grpc_threads", log)
        for name in ("d0", "d1"):
            reply = yield rest_predict(node.rest_url, name, [1.0])
            self.assertEqual(reply.code, 200)
        m = metrics(node.rest_url)
        self.assertEqual(m["tfscache_models_loaded"], 1)
        # the timeouts reload too, each into every place that holds it: a 0.5 s load timeout
        # now fails the 2 s load of "slow" with DEADLINE_EXCEEDED
        cfg["serving"] = dict(cfg["serving"], load_timeout_seconds=0.5, request_timeout_seconds=5)
        cfg["model_provider"] = dict(cfg["model_provider"], fetch_timeout_seconds=30)
        with open(node.config_path, "w") as f:
            yaml.safe_dump(cfg, f)
        node.process.signal(signal.SIGHUP)
        log = yield wait_for_log(node, "applied model_provider")
        self.assertIn("SIGHUP: applied model_provider.fetch_timeout_seconds, serving.load_timeout_seconds, "
                      "serving.request_timeout_seconds; need a restart to change: listen.grpc_threads", log)
        reply = yield rest_predict(node.rest_url, "slow", [1.0])
        # the new bound, not the 2 s load (the old 60 s load timeout would have waited for it: 200)
        self.assertEqual(reply.code, 504, reply.body)
        self.assertIn("slow", reply.json()["error"])
        # the write of the model list is bounded by the new load timeout too: TF Serving's
        # reload call still waits for "slow", so the node's loads are stuck (/readyz says so)
        # until that load has ended, then the next cold model loads
        stuck: list[bool] = []  # /readyz's "loads", probe by probe: stuck, then not

        def stuck_then_not(reply: Any) -> bool:
            stuck.append(reply.json()["loads"] != "ok")
            return any(stuck) and not stuck[-1]

        yield until(lambda: http("GET", node.rest_url + "/readyz").addCallback(stuck_then_not),
                    "the loads to be stuck, then go on after the slow one", timeout=30)
        reply = yield rest_predict(node.rest_url, "d0", [1.0])
        self.assertEqual(reply.code, 200, reply.body)

    @defer.inlineCallbacks
    def test_json_logs(self):  # type: ignore[no-untyped-def]
        node = yield threads.deferToThread(self.start, logging={"format": "json"})
        reply = yield rest_predict(node.rest_url, "d1", [1.0])
        self.assertEqual(reply.code, 200, reply.body)
        yield wait_for_log(node, '"loaded model=d1')
        records = []
        with open(node.process.log_path) as f:
            for line in f:
                if line.startswith("{"):
                    records.append(json.loads(line))
        with open(node.process.log_path) as f:
            lines = [line for line in f if line.strip()]
        # every line JSON, twistd's own start-up lines included
        self.assertEqual([line for line in lines if not line.startswith("{")], [])
        self.assertIn("starting up", records[0]["message"])
        loaded = [r for r in records if r["message"].startswith("loaded model=d1 ")]
        self.assertEqual(len(loaded), 1, records)
        r = loaded[0]
        self.assertEqual((r["model"], r["version"], r["level"]), ("d1", 1, "info"))
        self.assertIsInstance(r["bytes"], int)
        self.assertGreater(r["bytes"], 0)
        self.assertIsInstance(r["seconds"], float)
        self.assertIsInstance(r["time"], float)

    @defer.inlineCallbacks
    def test_debug_traces_a_models_life(self):  # type: ignore[no-untyped-def]
        """``logging.level: debug`` and the access log: each model's fetch, load, route and
        eviction is a line naming the model and version; each request one access line."""
        node = yield threads.deferToThread(self.start, logging={"format": "json", "level": "debug",
                                                                "access_log": True})
        for name in ("d0", "d1", "d2"):  # max_models 2: d2's load unloads d0 (LRU)
            reply = yield rest_predict(node.rest_url, name, [1.0])
            self.assertEqual(reply.code, 200, reply.body)
        client = GrpcClient(node.grpc_target)
        self.addCleanup(client.close)
        yield client.predict("d2", [1.0], version=1)
        yield wait_for_log(node, "grpc Predict d2 1 OK")
        with open(node.process.log_path) as f:
            records = [json.loads(line) for line in f if line.startswith("{")]

        def about(model: str, fragment: str) -> list[dict[str, object]]:
            return [r for r in records if str(r["message"]).startswith(fragment) and r.get("model") == model]

        for fragment, versions in (("route model=", ["latest", 1]), ("fetching model=", [1]),
                                   ("loading model=", [1]), ("loaded model=", [1])):
            got = about("d2", fragment)  # the REST request, then the gRPC one (a hit)
            self.assertEqual([r["version"] for r in got], versions, (fragment, records))
        self.assertEqual(about("d2", "fetching model=")[0]["level"], "debug")
        [evict] = about("d2", "no room for model=d2")  # the eviction decision, then its result
        self.assertEqual((evict["victim"], evict["victim_version"]), ("d0", 1))
        self.assertEqual(len(about("d0", "unloaded model=d0")), 1)
        access = [r for r in records if r["namespace"] == "tfscache.access"]
        self.assertEqual([(r["protocol"], r["method"], r["model"], r["version"], r["code"]) for r in access],
                         [*(("rest", "POST", name, "-", 200) for name in ("d0", "d1", "d2")),
                          ("grpc", "Predict", "d2", 1, "OK")])
        self.assertTrue(all(isinstance(r["seconds"], float) for r in access))

    @defer.inlineCallbacks
    def test_no_debug_or_access_lines_by_default(self):  # type: ignore[no-untyped-def]
        node = yield threads.deferToThread(self.start)
        reply = yield rest_predict(node.rest_url, "d0", [1.0])
        self.assertEqual(reply.code, 200, reply.body)
        log = yield wait_for_log(node, "loaded model=d0")
        self.assertIn("loaded model=d0", log)
        for fragment in ("fetching model=", "route model=", "rest POST", "Starting factory"):
            self.assertNotIn(fragment, log)

    @defer.inlineCallbacks
    def test_start_up_objects_are_frozen_for_the_garbage_collector(self):  # type: ignore[no-untyped-def]
        """Full collections under load skip what start-up made (bench/README §6e: they stopped
        the reactor for 40-55 ms every few seconds): the daemon says how much it froze, once
        it is ready, and still serves."""
        node = yield threads.deferToThread(self.start)
        log = yield wait_for_log(node, "start-up objects frozen")
        (line,) = [ln for ln in log.splitlines() if "start-up objects frozen" in ln]
        count = int(line.split("garbage collector: ", 1)[1].split()[0])
        self.assertGreater(count, 10_000, line)
        reply = yield rest_predict(node.rest_url, "d0", [1.0])
        self.assertEqual(reply.code, 200, reply.body)

    @defer.inlineCallbacks
    def test_metrics_can_be_disabled(self):  # type: ignore[no-untyped-def]
        node = yield threads.deferToThread(self.start, metrics={"enabled": False})
        for path in ("/metrics", "/monitoring/prometheus/metrics"):
            reply = yield http("GET", node.rest_url + path)
            self.assertEqual(reply.code, 404, path)
            self.assertIn("metrics.enabled", reply.json()["error"])
        reply = yield rest_predict(node.rest_url, "d0", [1.0])  # serving is unaffected
        self.assertEqual(reply.code, 200, reply.body)

    @defer.inlineCallbacks
    def test_per_model_labels(self):  # type: ignore[no-untyped-def]
        node = yield threads.deferToThread(self.start, metrics={"per_model_labels": True})
        for name in ("d0", "d0", "d1", "d2"):  # miss, hit, miss, miss + unload of d0
            reply = yield rest_predict(node.rest_url, name, [1.0])
            self.assertEqual(reply.code, 200, reply.body)
        reply = yield rest_predict(node.rest_url, "broken", [1.0])
        self.assertEqual(reply.code, 404)
        m = metrics(node.rest_url)
        self.assertEqual(m['tfscache_cache_hits_total{model="d0"}'], 1)
        self.assertEqual(m['tfscache_cache_misses_total{model="d1"}'], 1)
        self.assertEqual(m['tfscache_load_failures_total{model="broken"}'], 1)
        for name in ("d0", "d1", "d2"):
            self.assertEqual(m[f'tfscache_fetches_total{{model="{name}",outcome="ok"}}'], 1)
            self.assertEqual(m[f'tfscache_loads_total{{model="{name}",outcome="ok"}}'], 1)
        self.assertEqual(m['tfscache_loads_total{model="broken",outcome="error"}'], 1)
        self.assertEqual(m['tfscache_unloads_total{model="d0",reason="capacity"}'], 1)
        self.assertEqual(m['tfscache_unloads_total{model="d1",reason="capacity"}'], 1)
        self.assertNotIn('tfscache_loads_total{outcome="ok"}', m)

    @defer.inlineCallbacks
    def test_readyz_waits_for_discovery(self):  # type: ignore[no-untyped-def]
        """Serving but not yet published (its etcd is not there): not ready."""
        dead = f"http://127.0.0.1:{unused_port()}"
        node = yield threads.deferToThread(
            self.start, cluster={"discovery": {"type": "etcd", "endpoints": [dead], "ttl_seconds": 3}})
        reply = yield http("GET", node.rest_url + "/readyz")
        self.assertEqual(reply.code, 503, reply.body)
        body = reply.json()
        self.assertEqual((body["tfserving"], body["node"]), ("ok", "ok"))
        self.assertNotEqual(body["discovery"], "ok")
        reply = yield http("GET", node.rest_url + "/healthz")
        self.assertEqual(reply.code, 200)

    @defer.inlineCallbacks
    def test_preload_on_a_node_that_does_not_own_the_model(self):  # type: ignore[no-untyped-def]
        from tfscache.cluster.members import Member
        from tfscache.cluster.ring import owners

        other = {"id": "node-other", "host": "127.0.0.1", "rest_port": unused_port(), "grpc_port": unused_port()}
        # the owners depend on the member ids only
        members = [Member("node-test", "127.0.0.1", 1, 1), Member(**other)]
        name = next(n for n in ("d0", "d1", "d2") if owners(n, members, 1)[0].id == "node-other")

        def start() -> NodeProcess:
            # its own ports are in its member list, so chosen before it starts (retried if taken)
            me = {"id": "node-test", "host": "127.0.0.1", "rest_port": listen_port(), "grpc_port": listen_port()}
            return self.start(listen={"rest_port": me["rest_port"], "grpc_port": me["grpc_port"]},
                              cluster={"replicas_per_model": 1, "discovery": {"type": "static",
                                                                              "members": [me, other]}})

        node = yield threads.deferToThread(retry_on_collision, start)
        reply = yield http("POST", node.rest_url + f"/admin/models/{name}:preload",
                           headers={b"authorization": [f"Bearer {TOKEN}".encode()]})
        self.assertEqual(reply.code, 200, reply.body)
        body = reply.json()
        self.assertEqual(body["model"]["state"], "available")  # done here, as asked
        self.assertEqual([o["id"] for o in body["owners"]], ["node-other"])
        self.assertIn(f"not an owner of model {name}", body["warning"])
        self.assertIn("node-other", body["warning"])
        for mine in [n for n in ("d0", "d1", "d2") if owners(n, members, 1)[0].id == "node-test"][:1]:
            reply = yield http("POST", node.rest_url + f"/admin/models/{mine}:preload",
                               headers={b"authorization": [f"Bearer {TOKEN}".encode()]})
            self.assertEqual(reply.code, 200, reply.body)
            self.assertNotIn("warning", reply.json())


class MetricsLabelTests(unittest.TestCase):
    def test_model_label_only_when_asked(self) -> None:
        from prometheus_client import generate_latest

        from tfscache.metrics import Metrics

        for per_model, label in ((True, 'model="m1",'), (False, "")):
            metrics = Metrics(per_model_labels=per_model)
            metrics.fetch_done("m1", "ok")
            metrics.load_done("m1", "error")
            metrics.unload_done("m1", "capacity")
            metrics.loads.labels(outcome="ok").inc()  # a caller that does not name the model
            page = generate_latest(metrics.registry).decode()
            self.assertIn(f'tfscache_fetches_total{{{label}outcome="ok"}} 1.0', page)
            self.assertIn(f'tfscache_loads_total{{{label}outcome="error"}} 1.0', page)
            self.assertIn(f'tfscache_unloads_total{{{label}reason="capacity"}} 1.0', page)
            self.assertEqual('model="m1"' in page, per_model)
            unnamed = 'tfscache_loads_total{model="",outcome="ok"} 1.0' if per_model \
                else 'tfscache_loads_total{outcome="ok"} 1.0'
            self.assertIn(unnamed, page)


class ProviderLifecycleTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_the_node_closes_its_s3_provider_after_the_drain(self):  # type: ignore[no-untyped-def]
        """The S3 provider registers no shutdown trigger of its own when a node owns it (that
        trigger fired with the node's stopService and stopped copies the drain waits for):
        the node closes it at the end of stopService."""
        from tfscache.config import load_config
        from tfscache.service import NodeService

        cfg = load_config({
            "listen": {"host": "127.0.0.1", "rest_port": 0, "grpc_port": 0},
            "model_provider": {"type": "s3", "s3": {"bucket": "models", "endpoint_url": "http://127.0.0.1:1",
                                                    "access_key_id": "k", "secret_access_key": "s"}},
            "disk_cache": {"path": self.mktemp()},
        }, environ={})
        node = NodeService(cfg, reactor)
        provider = node.provider
        self.assertIsNone(provider._trigger)
        self.assertFalse(provider._closed)
        yield node.stopService()
        self.assertTrue(provider._closed)


class StartupErrorTests(unittest.TestCase):
    def test_unusable_disk_cache_stops_the_daemon(self) -> None:
        """A disk cache that cannot be scanned is fatal: one line naming disk_cache.path, exit 1
        (not a warning about TF Serving, and not a node that serves on without its cache)."""
        with tempfile.TemporaryDirectory() as d:
            not_a_dir = os.path.join(d, "cache")
            open(not_a_dir, "w").close()
            path = os.path.join(d, "tfscache.yaml")
            with open(path, "w") as f:
                yaml.safe_dump({
                    "listen": {"host": "127.0.0.1", "rest_port": 0, "grpc_port": 0},
                    "model_provider": {"disk": {"base_path": d}}, "disk_cache": {"path": not_a_dir},
                    "serving": {"grpc_target": f"127.0.0.1:{unused_port()}"},
                }, f)
            proc = subprocess.run(
                [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile=", "tfscache",
                 "--config", path],
                capture_output=True, text=True, cwd=d, timeout=60, env=dict(os.environ, PYTHONPATH=REPO_ROOT))
        self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
        lines = [ln for ln in proc.stdout.splitlines() if "disk_cache.path" in ln]
        self.assertEqual(len(lines), 1, proc.stdout)
        self.assertIn(f"disk cache at {not_a_dir} (disk_cache.path) cannot be used", lines[0])
        self.assertNotIn("did not take the initial model list", proc.stdout)
        self.assertNotIn("Traceback", proc.stdout + proc.stderr)
        self.assertNotIn("ready:", proc.stdout)

    def test_a_port_in_use_stops_the_daemon(self) -> None:
        """A REST or gRPC port that cannot be bound is fatal: one line naming the listen keys and
        exit 1, so a supervisor's Restart=on-failure fires (it used to serve on with no listener
        and exit 0 on SIGTERM)."""
        for taken in ("rest_port", "grpc_port"):
            holder = socket.socket()
            holder.bind(("127.0.0.1", 0))
            holder.listen(1)
            self.addCleanup(holder.close)
            with tempfile.TemporaryDirectory() as d:
                ports = {"rest_port": 0, "grpc_port": 0, taken: holder.getsockname()[1]}
                path = os.path.join(d, "tfscache.yaml")
                with open(path, "w") as f:
                    yaml.safe_dump({
                        "listen": {"host": "127.0.0.1", **ports},
                        "model_provider": {"disk": {"base_path": d}}, "disk_cache": {"path": os.path.join(d, "c")},
                        "serving": {"grpc_target": f"127.0.0.1:{holder.getsockname()[1]}", "reset_on_start": False},
                    }, f)
                proc = subprocess.run(
                    [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile=", "tfscache",
                     "--config", path],
                    capture_output=True, text=True, cwd=d, timeout=60, env=dict(os.environ, PYTHONPATH=REPO_ROOT))
            self.assertEqual(proc.returncode, 1, (taken, proc.stdout + proc.stderr))
            lines = [ln for ln in proc.stdout.splitlines() if "cannot listen on" in ln]
            self.assertEqual(len(lines), 1, (taken, proc.stdout))
            self.assertIn(f"listen.{taken} {ports[taken]}", lines[0])
            self.assertNotIn("Traceback", proc.stdout + proc.stderr)
            self.assertNotIn("ready:", proc.stdout)


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
