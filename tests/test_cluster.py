"""A cluster of real processes: three tfscache nodes (twistd), each beside its own TF Serving
backend, finding each other through a real etcd, and again through a real Consul agent.

One scenario per discovery backend, because every step builds on the state the previous one
left (a 3-node cluster takes seconds to start):
1. requests for 30 models through ANY node reach the models' owners: each model is loaded
   once, by the backend of its first owner;
2. a node is SIGKILLed: requests for its models still succeed through the next owner, none
   waits past its deadline; the dead node leaves the member list when its lease/check expires;
   restarted, it rejoins;
3. the discovery server stops while traffic runs: no request fails; started again, a new
   node becomes visible to the others.
"""

from __future__ import annotations

import json
import os
import shutil
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


def get_json(url: str, timeout: float = 10) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
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


class ClusterScenario:
    """Mixed into a TestCase with ``discovery_server()`` and ``discovery_config()``."""

    timeout = 300
    nodes: list[NodeProcess]
    backends: list[DevServer]

    def discovery_server(self) -> Any:
        raise NotImplementedError

    def discovery_config(self) -> dict[str, Any]:
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

    def loads(self) -> dict[str, set[str]]:
        """model -> the node ids whose backend loaded it."""
        out: dict[str, set[str]] = {}
        for i, b in enumerate(self.backends):
            for key in get_json(b.rest_url + "/devserver/loads")["loads"]:
                out.setdefault(key.split("/")[0], set()).add(f"node-{i}")
        return out

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
            self.assertEqual(loads.get(name), {first_owner}, name)
        counts = [sum(1 for n in MODELS if owners(n, members, 2)[0].id == f"node-{i}") for i in range(3)]
        self.assertTrue(all(counts), f"a node owns no model: {counts}")

        # 2. SIGKILL a node: failover to the next owner, within the deadline
        victim = self.nodes[1]
        victim.kill()
        killed_at = time.monotonic()
        orphans = [n for n in MODELS if owners(n, members, 2)[0].id == "node-1"]
        results = list(pool.map(lambda n: predict(self.nodes[0], n, timeout=25), orphans))
        self.assertEqual([r[0] for r in results], [200] * len(orphans), results[:3])
        failover = max(r[1] for r in results)
        self.assertLess(failover, 20)  # the forward timeout: nobody waited past the deadline
        survivors = [self.nodes[0], self.nodes[2]]
        wait_until("the dead node to leave the member list",
                   lambda: self.all_see(survivors, {"node-0", "node-2"}), timeout=TTL * 6)
        self.dropped_after = time.monotonic() - killed_at
        self.failover_seconds = failover
        victim.start()
        wait_until("the restarted node to rejoin", lambda: self.all_see(self.nodes, ids), timeout=30)

        # 3. the discovery server goes away while traffic runs, then comes back
        server.stop()
        results = list(pool.map(lambda i: predict(self.nodes[i % 3], MODELS[i]), range(len(MODELS))))
        self.assertEqual([r[0] for r in results], [200] * len(MODELS), [r for r in results if r[0] != 200][:3])
        self.assertTrue(self.all_see(self.nodes, ids), "members were dropped while discovery was down")
        server.start()
        newcomer = self.make_node(3, self.backends[3]).start()
        self.addCleanup(newcomer.stop)
        self.nodes.append(newcomer)
        wait_until("the new node to become visible", lambda: self.all_see(self.nodes, ids | {"node-3"}),
                   timeout=30)
        status, _, _ = predict(newcomer, MODELS[0])
        self.assertEqual(status, 200)

        # graceful stop withdraws at once (no TTL wait)
        self.assertEqual(newcomer.stop(), 0)
        wait_until("the stopped node to be withdrawn", lambda: self.all_see(self.nodes[:3], ids), timeout=TTL)
        print(f"\n{type(self).__name__}: failover {self.failover_seconds:.2f}s, dead node dropped after "
              f"{self.dropped_after:.2f}s (TTL {TTL}s)")


class EtcdClusterTests(ClusterScenario, unittest.TestCase):
    def discovery_server(self) -> EtcdServer:
        self.etcd = EtcdServer()
        return self.etcd

    def discovery_config(self) -> dict[str, Any]:
        return {"type": "etcd", "endpoints": [self.etcd.endpoint], "ttl_seconds": TTL, "prefix": "/tfscache-test"}

    def test_cluster_through_etcd(self) -> defer.Deferred[None]:
        return threads.deferToThread(self.scenario)


class ConsulClusterTests(ClusterScenario, unittest.TestCase):
    def discovery_server(self) -> ConsulAgent:
        self.consul = ConsulAgent()
        return self.consul

    def discovery_config(self) -> dict[str, Any]:
        return {"type": "consul", "endpoints": [self.consul.http_addr], "ttl_seconds": TTL, "prefix": "tfscache"}

    def test_cluster_through_consul(self) -> defer.Deferred[None]:
        return threads.deferToThread(self.scenario)
