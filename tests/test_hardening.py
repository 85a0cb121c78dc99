"""Issue 13, items 1, 7 and 9 against real processes (twistd nodes, DevServers):

- a client's forged ``x-tfscache-forwarded`` marker does not bypass routing (REST and gRPC),
  while the nodes' own forwards, which carry the cluster's token, are still served as forwards;
- the daemon raises its soft open-files limit and logs it; 1,100 idle connections held by one
  client (REST and gRPC) do not make a warm request fail;
- 20 requests while TF Serving is down give a bounded number of warning lines, not two each.

Plus the pieces on their own: the marker's check, and the repeat filter on a Clock."""

from __future__ import annotations

import io
import json
import resource
import socket
import urllib.error
import urllib.request
from typing import Any

import grpc
from tensorflow_serving.apis import prediction_service_pb2_grpc
from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.trial import unittest

from tests.clients import predict_request
from tests.harness import shared
from tests.harness.devserver import DevServer
from tests.harness.node import CLUSTER_SECRET, NodeProcess, metrics, node_config, static_cluster
from tfscache.cluster.forward_auth import ForwardMarker
from tfscache.cluster.members import Member
from tfscache.cluster.ring import owners
from tfscache.devserver.models import write_half_plus_two
from tfscache.logs import DaemonLog
from tfscache.util.repeats import RepeatFilter

MODELS = [f"h{i}" for i in range(12)]


def write_models(path: str) -> None:
    for i, name in enumerate(MODELS):
        write_half_plus_two(path, name, 1, 2.0, float(i))


def rest_predict(base: str, name: str, headers: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, Any]:
    req = urllib.request.Request(f"{base}/v1/models/{name}:predict", data=json.dumps({"instances": [1.0]}).encode(),
                                 headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def grpc_predict(target: str, name: str, metadata: tuple[tuple[str, str], ...] = (), timeout: float = 60) -> Any:
    with grpc.insecure_channel(target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        return stub.Predict(predict_request(name, [1.0]), timeout=timeout, metadata=metadata)


def loads(backend: DevServer) -> dict[str, int]:
    """model name -> loads by this backend."""
    with urllib.request.urlopen(backend.rest_url + "/devserver/loads", timeout=10) as resp:
        counts = json.load(resp)["loads"]
    out: dict[str, int] = {}
    for key, n in counts.items():
        out[key.split("/")[0]] = out.get(key.split("/")[0], 0) + n
    return out


class ForwardMarkerTests(unittest.TestCase):
    def test_only_the_clusters_token_verifies(self) -> None:
        marker = ForwardMarker(CLUSTER_SECRET)
        self.assertTrue(marker.verify(marker.value))
        self.assertTrue(marker.verify(marker.header))
        self.assertTrue(ForwardMarker(CLUSTER_SECRET).verify(marker.value))  # another node, same secret
        self.assertNotIn(CLUSTER_SECRET, marker.value)  # the secret itself never travels
        for forged in (None, "", "1", "true", marker.value[:-1], marker.value + "0", "v1.é",
                       ForwardMarker(CLUSTER_SECRET + "x").value, ForwardMarker.node_local().value):
            self.assertFalse(marker.verify(forged), forged)


class RepeatFilterTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.lines: list[dict[str, Any]] = []
        self.filter = RepeatFilter(self.lines.append, self.clock, interval=30.0)

    def warn(self, fmt: str, **fields: Any) -> None:
        self.filter(dict(log_level=LogLevel.warn, log_namespace="tfscache.node.manager", log_format=fmt,
                         log_time=self.clock.seconds(), **fields))

    def test_one_line_per_kind_and_model_per_interval_then_the_count(self) -> None:
        for i in range(20):
            self.warn("model={model} version={version} failed: {error}", model="m", version=1, error=f"e{i}")
            self.warn("reload config failed: {err}", err=f"connection refused {i}")
            self.clock.advance(0.1)
        self.assertEqual([e["log_format"] for e in self.lines],
                         ["model={model} version={version} failed: {error}", "reload config failed: {err}"])
        self.clock.advance(30)  # the interval ends: one line each with the count of the others
        self.assertEqual(len(self.lines), 4)
        summaries = self.lines[2:]
        self.assertEqual([s["suppressed"] for s in summaries], [19, 19])
        self.assertIn("(19 similar in the last 30 s)", summaries[0]["log_format"])
        self.assertEqual(summaries[0]["error"], "e19")  # the last one's details
        # nothing more came: no more lines, and the next one is written at once
        self.clock.advance(300)
        self.assertEqual(len(self.lines), 4)
        self.warn("reload config failed: {err}", err="again")
        self.assertEqual(len(self.lines), 5)

    def test_other_models_and_levels_are_lines_of_their_own(self) -> None:
        for name in ("a", "b", "c"):
            self.warn("model={model} version={version} failed: {error}", model=name, version=1, error="x")
        self.filter(dict(log_level=LogLevel.info, log_namespace="n", log_format="loaded {model}", model="a"))
        self.filter(dict(log_level=LogLevel.info, log_namespace="n", log_format="loaded {model}", model="a"))
        self.assertEqual(len(self.lines), 5)

    def test_the_daemon_log_writes_the_held_back_count_when_it_closes(self) -> None:
        out = io.StringIO()
        log = DaemonLog("info", "json", out, self.clock, repeat_interval=30.0)
        for i in range(3):
            log.observer(dict(log_level=LogLevel.warn, log_namespace="tfscache.node.manager",
                              log_format="reload config failed: {err}", err=f"refused {i}", log_time=0.0))
        self.assertEqual(len(out.getvalue().splitlines()), 1)
        log.close()  # at shutdown, before the interval ends
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual(len(lines), 2)
        self.assertEqual(lines[1]["suppressed"], 2)
        self.assertEqual(lines[1]["err"], "refused 2")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_interval_zero_writes_every_line(self) -> None:
        self.filter.interval = 0
        for _ in range(5):
            self.warn("reload config failed: {err}", err="x")
        self.assertEqual(len(self.lines), 5)


def raise_own_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class ClusterHardeningTests(unittest.TestCase):
    """Two nodes (static cluster, one owner per model), each beside its own DevServer."""

    timeout = 240

    def setUp(self) -> None:
        self.models = shared.model_dir("hardening", write_models)
        self.backends = [DevServer().start() for _ in range(2)]
        for b in self.backends:
            self.addCleanup(b.stop)

    def cluster(self, secrets: tuple[str, str] = (CLUSTER_SECRET, CLUSTER_SECRET)) -> list[NodeProcess]:
        def make(i: int, members: list[dict[str, Any]]) -> NodeProcess:
            cfg = node_config(self.models, self.backends[i], node_id=f"node-{i}",
                              listen={"rest_port": members[i]["rest_port"], "grpc_port": members[i]["grpc_port"]},
                              cluster={"replicas_per_model": 1, "secret": secrets[i],
                                       "discovery": {"type": "static", "members": members}})
            return NodeProcess(cfg, name=f"node-{i}")

        nodes = static_cluster(make, 2)
        for n in nodes:
            self.addCleanup(n.stop)
        return nodes

    def owned_by(self, index: int) -> list[str]:
        members = [Member(f"node-{i}", "127.0.0.1", 1, 1) for i in range(2)]  # owners depend on ids only
        return [n for n in MODELS if owners(n, members, 1)[0].id == f"node-{index}"]

    def test_a_forged_marker_is_routed_to_the_owner(self) -> None:
        nodes = self.cluster()
        owned = self.owned_by(0)
        self.assertGreaterEqual(len(owned), 4, owned)
        forged_rest, forged_grpc, plain_rest, plain_grpc = owned[:4]
        entry = nodes[1]  # not the owner of any of these
        # a client's marker on the node that does not own the model: routed to the owner,
        # which loads it; the entry node's backend never does
        code, body = rest_predict(entry.rest_url, forged_rest, headers={"x-tfscache-forwarded": "1"})
        self.assertEqual(code, 200, body)
        reply = grpc_predict(entry.grpc_target, forged_grpc, metadata=(("x-tfscache-forwarded", "1"),))
        self.assertTrue(reply.outputs)
        # the nodes' own forwards (no marker from the client) still work
        code, body = rest_predict(entry.rest_url, plain_rest)
        self.assertEqual(code, 200, body)
        self.assertTrue(grpc_predict(entry.grpc_target, plain_grpc).outputs)
        on_owner, on_entry = loads(self.backends[0]), loads(self.backends[1])
        for name in (forged_rest, forged_grpc, plain_rest, plain_grpc):
            self.assertEqual((on_owner.get(name), on_entry.get(name)), (1, None), name)
        # the owner served the four forwards itself: its marker verified, so its own router
        # did not route them again (it counts every request it routes)
        owner_routed = sum(v for k, v in metrics(nodes[0].rest_url, "/metrics").items()
                           if k.startswith("tfscache_router_forwards_total{"))
        self.assertEqual(owner_routed, 0)
        with open(entry.process.log_path) as f:
            log = f.read()
        self.assertIn(f"REST request for model={forged_rest} carried an x-tfscache-forwarded marker that does not "
                      "verify", log)
        self.assertIn(f"gRPC request for model={forged_grpc} carried", log)

    def test_a_node_with_another_secret_is_routed_again(self) -> None:
        """A misconfigured secret costs a hop and a warning, never a wrong owner."""
        nodes = self.cluster(secrets=(CLUSTER_SECRET, CLUSTER_SECRET + "-other"))
        name = self.owned_by(0)[0]
        code, body = rest_predict(nodes[1].rest_url, name)
        self.assertEqual(code, 200, body)
        self.assertEqual((loads(self.backends[0]).get(name), loads(self.backends[1]).get(name)), (1, None))
        routed = sum(v for k, v in metrics(nodes[0].rest_url, "/metrics").items()
                     if k.startswith("tfscache_router_forwards_total{"))
        self.assertEqual(routed, 1)  # the owner routed it once more (to itself)


class OpenFilesTests(unittest.TestCase):
    timeout = 240

    def test_soft_limit_raised_and_idle_connections_do_not_fail_a_warm_request(self) -> None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        idle = 1100
        if raise_own_limit() < 2 * idle + 200 or (hard != resource.RLIM_INFINITY and hard < 4 * idle):
            raise unittest.SkipTest(f"the hard open-files limit ({hard}) is too low for {idle} idle connections")
        models = shared.model_dir("hardening", write_models)
        backend = shared.backend()

        node = NodeProcess(node_config(models, backend, listen={"idle_timeout_seconds": 600,
                                                                      "header_timeout_seconds": 600}),
                           # it starts as under systemd's default soft limit
                           limits=(f"--nofile=1024:{hard}",)).start()
        self.addCleanup(node.stop)
        with open(node.process.log_path) as f:
            lines = [ln for ln in f if "open files limit" in ln]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(f"open files limit {hard} (was 1024, hard {hard})", lines[0])
        with open(f"/proc/{node.process.pid}/limits") as f:
            soft_now = next(ln for ln in f if ln.startswith("Max open files")).split()[3]
        self.assertEqual(int(soft_now), hard)

        self.assertEqual(rest_predict(node.rest_url, MODELS[0])[0], 200)  # warm
        self.assertTrue(grpc_predict(node.grpc_target, MODELS[0]).outputs)
        held: list[socket.socket] = []
        self.addCleanup(lambda: [s.close() for s in held])
        for port in (node.rest_port, node.grpc_port):  # one client, 1,100 idle connections per port
            for _ in range(idle):
                held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        # every one of them is still open (none was refused or reset)...
        for s in held[:: max(1, len(held) // 50)]:
            s.setblocking(False)
            try:
                self.assertNotEqual(s.recv(1), b"")
            except BlockingIOError:
                pass
            finally:
                s.setblocking(True)
        # ...and warm requests over new connections are answered
        for _ in range(5):
            code, body = rest_predict(node.rest_url, MODELS[0], timeout=30)
            self.assertEqual(code, 200, body)
            self.assertTrue(grpc_predict(node.grpc_target, MODELS[0], timeout=30).outputs)


class BackendDownTests(unittest.TestCase):
    timeout = 240

    def test_twenty_requests_while_tf_serving_is_down_log_a_few_warnings(self) -> None:
        models = shared.model_dir("hardening", write_models)
        backend = DevServer().start()
        node = NodeProcess(node_config(models, backend, serving={"health_interval_seconds": 0.5})).start()
        self.addCleanup(node.stop)
        backend.stop()  # a real TF Serving, stopped: its port refuses
        codes = []
        for i in range(20):
            code, _ = rest_predict(node.rest_url, MODELS[i % 2], timeout=30)
            codes.append(code)
        self.assertEqual(set(codes), {503}, codes)
        node.stop()  # the log is complete
        with open(node.process.log_path) as f:
            warnings = [ln for ln in f if "#warn]" in ln or "#error]" in ln or "#critical]" in ln]
        # per model: the failed model list once, the failed model once; TF Serving unhealthy once;
        # then, at the latest when the node stops, one line per kind with the count held back
        firsts = [ln for ln in warnings if "similar in the last" not in ln]
        counts = [ln for ln in warnings if "similar in the last" in ln]
        self.assertLessEqual(len(firsts), 6, "".join(warnings))
        self.assertTrue(any("failed" in ln for ln in firsts), warnings)
        self.assertTrue(counts, "".join(warnings))  # 20 requests repeat their kinds: counted, not lost
        self.assertLessEqual(len(counts), len(firsts), "".join(warnings))

