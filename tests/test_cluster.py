"""A cluster of real processes: three tfscache nodes (twistd), each beside its own TF Serving
backend, finding each other through a real etcd, and again through a real Consul agent.

One scenario per discovery backend, because every step builds on the state the previous one
left (a 3-node cluster takes seconds to start):
1. requests for 30 models through ANY node reach the models' owners: each model is loaded
   once, by the backend of its first owner;
2. a node is SIGKILLed: requests for its models still succeed through the next owner: within
   the lease/check TTL when the next owner holds the model already (warm), within the
   deadline when it must load it (cold); the dead node leaves the member list when its
   lease/check expires; restarted, it rejoins;
3. the discovery server stops for 2 TTLs and starts again while traffic runs: no request
   fails, no owner changes (a Consul -dev agent comes back empty); then a new node becomes
   visible to the others.
The figures (failover times, when the dead node was dropped) are printed on a line starting
``cluster figures:`` and written to ``cluster-figures-<backend>.json`` in the trial directory.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.harness import shared
from tests.harness.devserver import DevServer
from tests.harness.node import NodeProcess, node_config
from tests.harness.servers import ConsulAgent, EtcdServer
from tfscache.cluster.members import Member
from tfscache.cluster.ring import owners
from tfscache.devserver.models import write_half_plus_two

MODELS = [f"c{i:02d}" for i in range(30)]
TOKEN = "cluster-admin"
TTL = 3.0


def write_models(path: str) -> None:
    first = write_half_plus_two(path, MODELS[0], 1, 2.0, 1.0)
    for name in MODELS[1:]:  # the same small model under 29 more names: routing is what counts
        shutil.copytree(first, os.path.join(path, name, "1"))


def get_json(url: str, timeout: float = 10, method: str = "GET") -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"}, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.load(resp)


def predict(node: NodeProcess, name: str, timeout: float = 30) -> tuple[int, float, Any]:
    """Blocking REST predict (run from a thread): status code, seconds, body."""
    body = json.dumps({"instances": [1.0]}).encode()
    req = urllib.request.Request(f"{node.rest_url}/v1/models/{name}:predict", data=body, method="POST")
    started = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, time.monotonic() - started, json.load(resp)
    except urllib.error.HTTPError as e:
        return e.code, time.monotonic() - started, e.read()
    except OSError as e:
        return 0, time.monotonic() - started, str(e)


def wait_until(what: str, check: Any, timeout: float = 30.0) -> None:
    """Poll ``check()`` (a cluster-wide condition with no event to wait on) until it holds."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


class Traffic:
    """Requests for every model through every node, one after the other in a thread, until
    ``stop()``: the results say whether any failed meanwhile."""

    def __init__(self, nodes: list[NodeProcess]) -> None:
        self.nodes = list(nodes)
        self.results: list[tuple[str, int, float, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cluster-traffic", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            name = MODELS[i % len(MODELS)]
            status, took, body = predict(self.nodes[i % len(self.nodes)], name, timeout=10)
            self.results.append((name, status, took, body))
            i += 1

    def stop(self) -> list[tuple[str, int, float, Any]]:
        self._stop.set()
        self._thread.join(30)
        return self.results


class ClusterScenario:
    """Mixed into a TestCase with ``discovery_server()``, ``discovery_config()`` and
    ``records()``."""

    timeout = 300
    nodes: list[NodeProcess]
    backends: list[DevServer]

    def discovery_server(self) -> Any:
        raise NotImplementedError

    def discovery_config(self) -> dict[str, Any]:
        raise NotImplementedError

    def records(self) -> set[str]:
        """The member ids that the discovery server holds (blocking)."""
        raise NotImplementedError

    def make_node(self, i: int, backend: DevServer) -> NodeProcess:
        cfg = node_config(
            self.models, backend, node_id=f"node-{i}",
            cluster={"replicas_per_model": 2, "forward_timeout_seconds": 20,
                     "discovery": self.discovery_config()},
            admin={"enabled": True, "token": TOKEN},
            serving={"max_models": 40, "health_interval_seconds": 0.5},
            listen={"drain_timeout_seconds": 5},
        )
        return NodeProcess(cfg, name=f"node-{i}")

    def members_seen(self, node: NodeProcess) -> set[str]:
        try:
            return {m["id"] for m in get_json(node.rest_url + "/admin/members")["members"]}
        except OSError:
            return set()

    def all_see(self, nodes: list[NodeProcess], ids: set[str]) -> bool:
        return all(self.members_seen(n) == ids for n in nodes)

    def loads(self) -> dict[str, dict[str, int]]:
        """model -> {node id: how many times its backend loaded the model}."""
        out: dict[str, dict[str, int]] = {}
        for i, b in enumerate(self.backends):
            for key, n in get_json(b.rest_url + "/devserver/loads")["loads"].items():
                name = key.split("/")[0]
                out.setdefault(name, {})[f"node-{i}"] = out.get(name, {}).get(f"node-{i}", 0) + n
        return out

    def owners_seen(self, nodes: list[NodeProcess], names: list[str]) -> dict[tuple[int, str], list[str]]:
        """(node index, model) -> the owners that node routes the model to."""
        return {(i, name): [m["id"] for m in get_json(f"{n.rest_url}/admin/owners/{name}")["owners"]]
                for i, n in enumerate(nodes) for name in names}

    def members(self) -> list[Member]:
        return [Member(f"node-{i}", "127.0.0.1", n.rest_port, n.grpc_port) for i, n in enumerate(self.nodes)]

    def scenario(self) -> None:
        self.models = shared.model_dir("cluster", write_models)
        server = self.discovery_server().start()
        self.addCleanup(server.stop)
        pool = ThreadPoolExecutor(4)
        self.addCleanup(pool.shutdown)
        self.backends = list(pool.map(lambda _: DevServer().start(), range(4)))
        for b in self.backends:
            self.addCleanup(b.stop)
        self.nodes = [self.make_node(i, self.backends[i]) for i in range(3)]
        list(pool.map(lambda n: n.start(), self.nodes))
        for n in self.nodes:
            self.addCleanup(n.stop)
        ids = {"node-0", "node-1", "node-2"}
        wait_until("every node to see 3 members", lambda: self.all_see(self.nodes, ids))

        # 1. any node, right owner, one load per model
        results = list(pool.map(lambda i: predict(self.nodes[i % 3], MODELS[i]), range(len(MODELS))))
        results += list(pool.map(lambda i: predict(self.nodes[(i + 1) % 3], MODELS[i]), range(len(MODELS))))
        self.assertEqual([r[0] for r in results], [200] * 60, [r for r in results if r[0] != 200][:3])
        loads = self.loads()
        members = self.members()
        for name in MODELS:
            first_owner = owners(name, members, 2)[0].id
            self.assertEqual(loads.get(name), {first_owner: 1}, name)  # that node only, and once
        counts = [sum(1 for n in MODELS if owners(n, members, 2)[0].id == f"node-{i}") for i in range(3)]
        self.assertTrue(all(counts), f"a node owns no model: {counts}")

        # 2. SIGKILL a node: failover to the next owner; warm it first for half of the victim's models
        orphans = [n for n in MODELS if owners(n, members, 2)[0].id == "node-1"]
        warm, cold = orphans[::2], orphans[1::2]
        self.assertTrue(warm and cold, orphans)
        by_id = {f"node-{i}": n for i, n in enumerate(self.nodes)}
        for name in warm:
            second = by_id[owners(name, members, 2)[1].id]
            get_json(f"{second.rest_url}/admin/models/{name}:preload", timeout=30, method="POST")
        victim = self.nodes[1]
        survivors = [self.nodes[0], self.nodes[2]]
        victim.kill()
        killed_at = time.monotonic()
        dropped = pool.submit(lambda: (wait_until(
            "the dead node to leave the member list", lambda: self.all_see(survivors, {"node-0", "node-2"}),
            timeout=TTL * 6), time.monotonic() - killed_at)[1])
        results = list(pool.map(lambda n: predict(self.nodes[0], n, timeout=25), warm))
        self.assertEqual([r[0] for r in results], [200] * len(warm), results[:3])
        # measured for the figures below, not bounded (a busy machine): bench/ measures failover
        warm_failover = max(r[1] for r in results)
        results = list(pool.map(lambda n: predict(self.nodes[0], n, timeout=25), cold))
        self.assertEqual([r[0] for r in results], [200] * len(cold), results[:3])
        # nobody waited past the forward timeout (20 s): that would have been a 504, and the
        # client gives up at 25 s (status 0)
        cold_failover = max(r[1] for r in results)
        dropped_after = dropped.result()
        victim.start()
        wait_until("the restarted node to rejoin", lambda: self.all_see(self.nodes, ids), timeout=30)

        # 3. the discovery server goes away for 2 TTLs while traffic runs, then comes back
        sample = MODELS[:6]
        before = self.owners_seen(self.nodes, sample)
        traffic = Traffic(self.nodes)
        wait_until("traffic to flow", lambda: len(traffic.results) >= 3)
        server.stop()
        time.sleep(2 * TTL)  # the outage itself: longer than a lease/check TTL
        self.assertTrue(self.all_see(self.nodes, ids), "members were dropped while discovery was down")
        self.assertEqual(self.owners_seen(self.nodes, sample), before)
        during = len(traffic.results)
        server.start()
        wait_until("every node published again", lambda: self.records() == ids, timeout=5 * TTL)
        time.sleep(TTL / 3)  # one refresh round and one watch event more, still under traffic
        self.assertEqual(self.owners_seen(self.nodes, sample), before)
        self.assertTrue(self.all_see(self.nodes, ids), "members changed after discovery came back")
        results = traffic.stop()
        failed = [r for r in results if r[1] != 200]
        self.assertEqual(failed, [], f"{len(failed)} of {len(results)} requests failed")
        self.assertGreater(during, 10, "too little traffic during the outage to tell")
        newcomer = self.make_node(3, self.backends[3]).start()
        self.addCleanup(newcomer.stop)
        self.nodes.append(newcomer)
        wait_until("the new node to become visible", lambda: self.all_see(self.nodes, ids | {"node-3"}),
                   timeout=30)
        status, _, _ = predict(newcomer, MODELS[0])
        self.assertEqual(status, 200)

        # graceful stop withdraws at once (no TTL wait): its record is gone by the time the
        # process has exited (a record left to expire outlives a live lease by a TTL)
        self.assertEqual(newcomer.stop(), 0)
        self.assertNotIn("node-3", self.records())
        wait_until("the stopped node to be withdrawn", lambda: self.all_see(self.nodes[:3], ids))
        figures = {"backend": self.backend, "ttl_s": TTL, "warm_failover_max_s": round(warm_failover, 3),
                   "cold_failover_max_s": round(cold_failover, 3), "dead_node_dropped_after_s": round(dropped_after, 3),
                   "warm_models": len(warm), "cold_models": len(cold),
                   "outage_requests": len(results), "outage_failures": len(failed)}
        print("\ncluster figures: " + " ".join(f"{k}={v}" for k, v in figures.items()))
        with open(os.path.abspath(f"cluster-figures-{self.backend}.json"), "w") as f:  # the trial directory
            json.dump(figures, f, indent=1)


class EtcdClusterTests(ClusterScenario, unittest.TestCase):
    backend = "etcd"

    def discovery_server(self) -> EtcdServer:
        self.etcd = EtcdServer()
        return self.etcd

    def discovery_config(self) -> dict[str, Any]:
        return {"type": "etcd", "endpoints": [self.etcd.endpoint], "ttl_seconds": TTL, "prefix": "/tfscache-test"}

    def records(self) -> set[str]:
        prefix = b"/tfscache-test/members/"
        body = json.dumps({"key": base64.b64encode(prefix).decode(),
                           "range_end": base64.b64encode(prefix[:-1] + b"0").decode()}).encode()
        try:
            with urllib.request.urlopen(urllib.request.Request(self.etcd.endpoint + "/v3/kv/range", body),
                                        timeout=5) as resp:
                kvs = json.load(resp).get("kvs", [])
        except OSError:
            return set()
        return {json.loads(base64.b64decode(kv["value"]))["id"] for kv in kvs}

    def test_cluster_through_etcd(self) -> defer.Deferred[None]:
        return threads.deferToThread(self.scenario)


class ConsulClusterTests(ClusterScenario, unittest.TestCase):
    backend = "consul"

    def discovery_server(self) -> ConsulAgent:
        self.consul = ConsulAgent()
        return self.consul

    def discovery_config(self) -> dict[str, Any]:
        return {"type": "consul", "endpoints": [self.consul.http_addr], "ttl_seconds": TTL, "prefix": "tfscache"}

    def records(self) -> set[str]:
        try:
            with urllib.request.urlopen(f"{self.consul.http_addr}/v1/health/service/tfscache?passing=true",
                                        timeout=5) as resp:
                return {entry["Service"]["ID"] for entry in json.load(resp)}
        except OSError:
            return set()

    def test_cluster_through_consul(self) -> defer.Deferred[None]:
        return threads.deferToThread(self.scenario)
