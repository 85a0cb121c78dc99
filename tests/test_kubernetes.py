"""Kubernetes discovery against a real kube-apiserver (tests/harness/kube.py): members follow
the EndpointSlices' readiness, the watch survives a 410 and an API server restart, an RBAC
denial says what is missing; in-cluster (service-account token, read again) and kubeconfig
(client certificate) access.  Plus the kubeconfig parsing and the configuration, offline."""

from __future__ import annotations

import os
import tempfile
import uuid
from typing import Any

from twisted.internet import defer, reactor, task, threads
from twisted.logger import formatEvent
from twisted.protocols import portforward
from twisted.trial import unittest

from tests.harness import kube, shared
from tests.test_discovery import Health, LogCapture, ids, member, wait_until
from tfscache.cluster.discovery import make_discovery
from tfscache.cluster.discovery.kubeconfig import ApiAccess, KubeConfigError, from_kubeconfig, in_cluster
from tfscache.cluster.discovery.kubernetes import KubernetesDiscovery
from tfscache.cluster.members import Member
from tfscache.config import ConfigError, load_config

SERVICE = "tfscache-members"
BASE_CONFIG = {"disk_cache": {"path": "/tmp/x"}, "model_provider": {"disk": {"base_path": "/tmp/m"}}}


def shared_api_server() -> kube.KubeAPIServer:
    # watches served from etcd, not the watch cache: compacting etcd's history makes a resumed
    # watch 410 for certain (the cache could still replay it); the restart test runs a server
    # with the watch cache, as clusters do
    return shared.shared("kube-apiserver", lambda: kube.KubeAPIServer(["--watch-cache=false"]).start(),
                         lambda s: s.stop())


def pod(node_id: str) -> Member:
    """A member as its pod's endpoint gives it: a pod IP (the API refuses loopback ones)."""
    m = member(node_id)
    return Member(node_id, f"10.0.0.{sum(node_id.encode()) % 250 + 1}", m.rest_port, m.grpc_port)


def endpoint(node_id: str, namespace: str, ready: bool | None = True) -> dict[str, Any]:
    conditions = {} if ready is None else {"ready": ready}
    return {"addresses": [pod(node_id).host], "conditions": conditions,
            "targetRef": {"kind": "Pod", "name": node_id, "namespace": namespace}}


def ports_of(m: Member) -> dict[str, int]:
    return {"rest": m.rest_port, "grpc": m.grpc_port}


class _Cuttable(portforward.ProxyFactory):
    """A TCP forwarder in front of the API server whose connections the test can cut."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.noisy = False
        self.servers: list[portforward.ProxyServer] = []

    def buildProtocol(self, addr: Any) -> portforward.ProxyServer:
        proto = super().buildProtocol(addr)
        self.servers.append(proto)
        return proto  # type: ignore[no-any-return]


class Proxy:
    def __init__(self, port: int) -> None:
        self.factory = _Cuttable("127.0.0.1", port)
        self.listening: Any = reactor.listenTCP(0, self.factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.port = self.listening.getHost().port

    @defer.inlineCallbacks
    def cut(self):  # type: ignore[no-untyped-def]
        """Refuse new connections and drop the open ones (a network partition)."""
        yield self.listening.stopListening()
        for server in self.factory.servers:
            server.transport.abortConnection()
        self.factory.servers.clear()

    def heal(self) -> None:
        self.listening = reactor.listenTCP(self.port, self.factory, interface="127.0.0.1")  # type: ignore[attr-defined]

    def close(self) -> defer.Deferred[None]:
        for server in self.factory.servers:
            server.transport.abortConnection()
        return defer.maybeDeferred(self.listening.stopListening)


class KubernetesTests(unittest.TestCase):
    skip = kube.missing()
    timeout = 240

    def setUp(self) -> defer.Deferred[None]:
        return threads.deferToThread(self._set_up)

    def _set_up(self) -> None:
        self.api = shared_api_server()
        self.namespace = f"t-{uuid.uuid4().hex[:10]}"
        self.api.create_namespace(self.namespace)
        self.api.create_service_account(self.namespace, "tfscache")
        self.api.grant_endpointslice_reader(
            self.namespace, {"kind": "ServiceAccount", "name": "tfscache", "namespace": self.namespace})

    # -- helpers ---------------------------------------------------------------------------------
    def service_account_dir(self, api: kube.KubeAPIServer, token: str) -> str:
        """The files a pod's service account mounts (token, ca.crt, namespace)."""
        d = tempfile.mkdtemp(prefix="tfscache-sa-")
        for name, content in (("token", token), ("namespace", self.namespace)):
            with open(os.path.join(d, name), "w") as f:
                f.write(content)
        with open(api.tls["ca"], "rb") as src, open(os.path.join(d, "ca.crt"), "wb") as dst:
            dst.write(src.read())
        return d

    def make(self, node_id: str, api: kube.KubeAPIServer | None = None, sa_dir: str | None = None,
             port: int | None = None, start: bool = True, **kw: Any) -> KubernetesDiscovery:
        api = api or self.api
        if sa_dir is None:
            sa_dir = self.service_account_dir(api, api.service_account_token(self.namespace, "tfscache"))
        access = in_cluster({"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(port or api.port)},
                            sa_dir)
        kw.setdefault("max_backoff", 0.5)
        d = KubernetesDiscovery(member(node_id), kw.pop("health", Health()), service=SERVICE, access=access,
                                reactor=reactor, **kw)
        if start:
            d.startService()
        self.addCleanup(lambda: d.stopService() if d.running else d._closed())
        return d

    def put(self, node_id: str, ready: bool | None = True, api: kube.KubeAPIServer | None = None,
            ports: dict[str, int] | None = None) -> defer.Deferred[None]:
        """One slice per node (as each node here has ports of its own)."""
        return threads.deferToThread((api or self.api).put_endpoint_slice, self.namespace, f"{SERVICE}-{node_id}",
                                     SERVICE, [endpoint(node_id, self.namespace, ready)],
                                     ports or ports_of(member(node_id)))

    def delete(self, node_id: str, api: kube.KubeAPIServer | None = None) -> defer.Deferred[None]:
        return threads.deferToThread((api or self.api).delete_endpoint_slice, self.namespace, f"{SERVICE}-{node_id}")

    # -- membership --------------------------------------------------------------------------------
    @defer.inlineCallbacks
    def test_members_follow_readiness_and_slices(self):  # type: ignore[no-untyped-def]
        logs = LogCapture(self)
        yield self.put("a")
        yield self.put("b", ready=None)  # no ready condition: ready, by the API's definition
        d = self.make("a")
        seen: list[set[str]] = []
        d.subscribe(lambda ms: seen.append(ids(ms)))
        yield wait_until(lambda: ids(d.members()) == {"a", "b"}, what="a and b")
        self.assertEqual(d.members(), [pod("a"), pod("b")])
        yield self.put("b", ready=False)
        yield wait_until(lambda: ids(d.members()) == {"a"}, what="b not ready")
        yield self.put("b", ready=True)
        yield wait_until(lambda: ids(d.members()) == {"a", "b"}, what="b ready again")
        yield self.put("c")
        yield wait_until(lambda: ids(d.members()) == {"a", "b", "c"}, what="slice c added")
        yield self.delete("a")
        yield wait_until(lambda: ids(d.members()) == {"b", "c"}, what="slice a deleted")
        # a slice without the port names: ignored, said once
        yield self.put("x", ports={"http": 1234, "grpc": 1235})
        yield self.put("x", ports={"http": 1234, "grpc": 1236})
        yield self.put("d")
        yield wait_until(lambda: ids(d.members()) == {"b", "c", "d"}, what="slice d added")
        self.assertEqual(logs.count(d, "has no ports named"), 1)
        self.assertEqual(seen, [{"a", "b"}, {"a"}, {"a", "b"}, {"a", "b", "c"}, {"b", "c"}, {"b", "c", "d"}])
        self.assertEqual((d.lists, d.expiries, logs.count(d, "unreachable")), (1, 0, 0))

    @defer.inlineCallbacks
    def test_a_watch_that_ends_resumes_from_the_last_version(self):  # type: ignore[no-untyped-def]
        # the server ends every watch after timeoutSeconds (1 s here): the next one starts where
        # it stopped, with no list in between and no change missed
        logs = LogCapture(self)
        yield self.put("a")
        d = self.make("a", watch_seconds=1)
        yield wait_until(lambda: d.watches >= 3, what="three watches")
        yield self.put("b")
        yield wait_until(lambda: ids(d.members()) == {"a", "b"}, what="b")
        yield wait_until(lambda: d.watches >= 5, what="two more watches")
        yield self.put("b", ready=False)
        yield wait_until(lambda: ids(d.members()) == {"a"}, what="b not ready")
        self.assertEqual((d.lists, d.expiries, logs.count(d, "unreachable")), (1, 0, 0))

    @defer.inlineCallbacks
    def test_readiness_is_the_record(self):  # type: ignore[no-untyped-def]
        # publishing writes nothing: `published` (what /readyz reports) follows health, and a
        # list without this node is the truth (its pod is not ready), not a record to put back
        logs = LogCapture(self)
        health = Health(True)
        d = self.make("a", health=health, ttl=0.6)
        yield d.publish()
        self.assertTrue(d.published)
        yield self.put("a")
        yield wait_until(lambda: ids(d.members()) == {"a"}, what="a")
        yield self.put("a", ready=False)
        yield wait_until(lambda: ids(d.members()) == set(), what="a not ready")
        self.assertEqual(logs.count(d, "came back without this node"), 0)
        health.ok = False
        yield wait_until(lambda: not d.published, what="unhealthy")
        health.ok = True
        yield wait_until(lambda: d.published, what="healthy")
        yield d.withdraw()
        self.assertFalse(d.published)

    @defer.inlineCallbacks
    def test_watch_expired_410_lists_again_and_loses_nothing(self):  # type: ignore[no-untyped-def]
        logs = LogCapture(self)
        proxy = Proxy(self.api.port)
        self.addCleanup(proxy.close)
        yield self.put("a")
        yield self.put("b")
        d = self.make("a", port=proxy.port)
        seen: list[set[str]] = []
        d.subscribe(lambda ms: seen.append(ids(ms)))
        yield wait_until(lambda: ids(d.members()) == {"a", "b"}, what="a and b")
        yield proxy.cut()  # the node loses the API; meanwhile the cluster changes and etcd compacts
        yield wait_until(lambda: not d.reachable, what="the outage noticed")
        yield self.put("b", ready=False)
        yield self.put("c")
        yield threads.deferToThread(self.api.compact_etcd)
        self.assertEqual(ids(d.members()), {"a", "b"})  # the last known members
        proxy.heal()
        yield wait_until(lambda: ids(d.members()) == {"a", "c"}, what="the changes made meanwhile")
        self.assertEqual((d.expiries, d.lists), (1, 2))  # the resumed watch got 410: listed again
        self.assertEqual(logs.count(d, "expired"), 1)
        self.assertEqual((logs.count(d, "unreachable"), logs.count(d, "reachable again")), (1, 1))
        self.assertNotIn(set(), seen)
        yield self.put("e")  # and the new watch follows
        yield wait_until(lambda: ids(d.members()) == {"a", "c", "e"}, what="e")

    @defer.inlineCallbacks
    def test_api_server_restart_keeps_members_and_resumes(self):  # type: ignore[no-untyped-def]
        logs = LogCapture(self)
        api = yield threads.deferToThread(lambda: kube.KubeAPIServer().start())  # with its watch cache
        self.addCleanup(lambda: threads.deferToThread(api.stop))
        yield threads.deferToThread(self._grant_on, api)
        yield self.put("a", api=api)
        yield self.put("b", api=api)
        d = self.make("a", api=api)
        seen: list[set[str]] = []
        d.subscribe(lambda ms: seen.append(ids(ms)))
        yield wait_until(lambda: ids(d.members()) == {"a", "b"}, what="a and b")
        yield threads.deferToThread(api.process.stop)
        yield wait_until(lambda: not d.reachable, what="the outage noticed")
        self.assertEqual(ids(d.members()), {"a", "b"})
        yield threads.deferToThread(api.process.start, 120.0)
        yield self.put("c", api=api)
        yield wait_until(lambda: ids(d.members()) == {"a", "b", "c"}, timeout=60, what="c after the restart")
        self.assertEqual((logs.count(d, "unreachable"), logs.count(d, "reachable again")), (1, 1))
        self.assertEqual([s for s in seen if not {"a", "b"} <= s], [])
        # resumed from the last resourceVersion, or listed again after a 410: either way, once
        self.assertEqual(d.lists, 1 + d.expiries)
        self.assertLessEqual(d.expiries, 1)

    def _grant_on(self, api: kube.KubeAPIServer) -> None:
        api.create_namespace(self.namespace)
        api.create_service_account(self.namespace, "tfscache")
        api.grant_endpointslice_reader(
            self.namespace, {"kind": "ServiceAccount", "name": "tfscache", "namespace": self.namespace})

    # -- credentials ----------------------------------------------------------------------------------
    @defer.inlineCallbacks
    def test_rbac_denial_says_what_is_missing_once(self):  # type: ignore[no-untyped-def]
        logs = LogCapture(self)
        yield threads.deferToThread(self.api.create_service_account, self.namespace, "nobody")
        token = yield threads.deferToThread(self.api.service_account_token, self.namespace, "nobody")
        yield self.put("a")
        d = self.make("a", sa_dir=self.service_account_dir(self.api, token))
        attempts: list[int] = []
        original = d._list

        async def counting() -> None:
            attempts.append(1)
            await original()

        d._list = counting  # type: ignore[method-assign]
        yield wait_until(lambda: len(attempts) >= 4, what="retries")
        lines = [e for e in logs.events if e.get("log_source") is d and e.get("log_level").name in ("warn", "error")]
        self.assertEqual(len(lines), 1, [e["log_format"] for e in lines])
        text = formatEvent(lines[0])
        self.assertIn(f"not allowed to list endpointslices.discovery.k8s.io in namespace {self.namespace}", text)
        self.assertIn("verbs get, list, watch on resource endpointslices in apiGroup discovery.k8s.io", text)
        self.assertIn(f"system:serviceaccount:{self.namespace}:nobody", text)
        self.assertEqual(d.members(), [])
        # granted: the retries get through
        yield threads.deferToThread(self.api.grant_endpointslice_reader, self.namespace,
                                    {"kind": "ServiceAccount", "name": "nobody", "namespace": self.namespace},
                                    "nobody-reader")
        yield wait_until(lambda: ids(d.members()) == {"a"}, what="a once allowed")
        self.assertEqual(logs.count(d, "reachable again"), 1)

    @defer.inlineCallbacks
    def test_the_token_is_read_again(self):  # type: ignore[no-untyped-def]
        logs = LogCapture(self)
        sa_dir = self.service_account_dir(self.api, "expired-or-rotated-away")
        yield self.put("a")
        d = self.make("a", sa_dir=sa_dir)
        yield wait_until(lambda: logs.count(d, "refuses this node's credentials") == 1, what="401")
        token = yield threads.deferToThread(self.api.service_account_token, self.namespace, "tfscache")
        with open(os.path.join(sa_dir, "token.new"), "w") as f:
            f.write(token)
        os.rename(os.path.join(sa_dir, "token.new"), os.path.join(sa_dir, "token"))  # as the kubelet swaps it
        yield wait_until(lambda: ids(d.members()) == {"a"}, what="a with the new token")
        self.assertEqual(logs.count(d, "refuses this node's credentials"), 1)

    @defer.inlineCallbacks
    def test_kubeconfig_with_a_client_certificate(self):  # type: ignore[no-untyped-def]
        yield threads.deferToThread(self.api.grant_endpointslice_reader, self.namespace,
                                    {"kind": "User", "name": kube.CLIENT_CERT_USER,
                                     "apiGroup": "rbac.authorization.k8s.io"}, "client-cert-reader")
        path = self.api.kubeconfig(self.namespace, client_cert=True)
        cfg = load_config(dict(BASE_CONFIG, cluster={"discovery": {
            "type": "kubernetes", "kubeconfig": path, "service": SERVICE}}), environ={})
        d = make_discovery(cfg, member("a"), reactor, Health())
        self.assertIsInstance(d, KubernetesDiscovery)
        self.assertEqual(d.namespace, self.namespace)  # the context's
        d.startService()
        self.addCleanup(d.stopService)
        yield self.put("a")
        yield wait_until(lambda: ids(d.members()) == {"a"}, what="a through the kubeconfig")

    # -- a node -------------------------------------------------------------------------------------------
    @defer.inlineCallbacks
    def test_the_router_follows(self):  # type: ignore[no-untyped-def]
        from tests.harness.node import InProcessNode, node_config

        backend = yield threads.deferToThread(shared.backend)
        path = self.api.kubeconfig(self.namespace, token=(yield threads.deferToThread(
            self.api.service_account_token, self.namespace, "tfscache")))
        models = tempfile.mkdtemp(prefix="tfscache-models-")
        nodes = {}
        for node_id in ("pod-0", "pod-1"):
            node = InProcessNode(node_config(models, backend, node_id=node_id, serving={"reset_on_start": False},
                                             cluster={"discovery": {"type": "kubernetes", "kubeconfig": path,
                                                                    "service": SERVICE}}))
            yield node.start()
            self.addCleanup(node.stop)
            nodes[node_id] = node

        def put(node_id: str, ready: bool) -> defer.Deferred[None]:
            s = nodes[node_id].service
            return self.put(node_id, ready, ports={"rest": s.rest_port, "grpc": s.grpc.bound_port})

        def routed(node: InProcessNode) -> set[str]:
            return {m.id for m in node.service.router.members()}

        yield put("pod-0", True)
        yield put("pod-1", True)
        yield wait_until(lambda: all(routed(n) == {"pod-0", "pod-1"} for n in nodes.values()), what="both")
        owners = {m.id for m in nodes["pod-0"].service.router.owners_for("some-model")}
        self.assertEqual(owners, {"pod-0", "pod-1"})  # replicas_per_model 2
        yield put("pod-1", False)  # pod-1's readiness probe fails (draining, TF Serving down)
        yield wait_until(lambda: all(routed(n) == {"pod-0"} for n in nodes.values()), what="pod-1 out")
        self.assertEqual([m.id for m in nodes["pod-0"].service.router.owners_for("some-model")], ["pod-0"])
        yield put("pod-1", True)
        yield wait_until(lambda: routed(nodes["pod-0"]) == {"pod-0", "pod-1"}, what="pod-1 back")


# -- offline: configuration and kubeconfig files ------------------------------------------------------
class OfflineTests(unittest.TestCase):
    def write(self, text: str) -> str:
        d = tempfile.mkdtemp(prefix="tfscache-kubeconfig-")
        with open(os.path.join(d, "ca.pem"), "w") as f:
            f.write("not used here")
        with open(os.path.join(d, "token"), "w") as f:
            f.write("from-a-file\n")
        path = os.path.join(d, "config")
        with open(path, "w") as f:
            f.write(text)
        return path

    def config(self, user: str,
               cluster: str = "{server: 'https://10.0.0.1:6443', certificate-authority: ca.pem}") -> str:
        return self.write(f"""
current-context: c
contexts: [{{name: c, context: {{cluster: k, user: u, namespace: models}}}}]
clusters: [{{name: k, cluster: {cluster}}}]
users: [{{name: u, user: {user}}}]
""")

    def test_token_file_relative_to_the_kubeconfig(self) -> None:
        access = from_kubeconfig(self.config("{tokenFile: token}"))
        self.assertEqual((access.server, access.namespace, access.authorization(), access.ca_pem),
                         ("https://10.0.0.1:6443", "models", b"Bearer from-a-file", b"not used here"))

    def test_refused(self) -> None:
        cases = {
            self.config("{exec: {command: aws}}"): "exec plugin",
            self.config("{token: t}", "{server: 'https://h', insecure-skip-tls-verify: true}"): "skips TLS",
            self.config("{client-certificate: ca.pem}"): "without its key",
            self.config("{tokenFile: missing}"): "cannot read",
            self.write("current-context: other\ncontexts: []\n"): "no context named 'other'",
        }
        for path, fragment in cases.items():
            with self.assertRaises(KubeConfigError) as e:
                from_kubeconfig(path)
            self.assertIn(fragment, str(e.exception))
            self.assertTrue(str(e.exception).startswith("cluster.discovery.kubeconfig"), str(e.exception))

    def test_in_cluster_needs_the_pod_environment(self) -> None:
        with self.assertRaises(KubeConfigError) as e:
            in_cluster({}, tempfile.mkdtemp())
        self.assertIn("KUBERNETES_SERVICE_HOST", str(e.exception))

    def test_config(self) -> None:
        cfg = load_config(dict(BASE_CONFIG, cluster={"discovery": {"type": "kubernetes"}}),
                          environ={"POD_NAME": "tfscache-2", "POD_IP": "10.1.2.3"})
        self.assertEqual((cfg.node.id, cfg.node.advertise_host), ("tfscache-2", "10.1.2.3"))
        d = cfg.cluster.discovery
        self.assertEqual((d.rest_port_name, d.grpc_port_name, d.namespace), ("rest", "grpc", None))
        cfg = load_config(BASE_CONFIG, environ={})
        self.assertEqual(cfg.node.advertise_host, "127.0.0.1")
        with self.assertRaises(ConfigError) as e:
            load_config(dict(BASE_CONFIG, cluster={"discovery": {"type": "kubernetes", "kubeconfig": "/nonexistent"}}),
                        environ={})
        self.assertEqual(str(e.exception), "cluster.discovery.kubeconfig: cannot read /nonexistent")

    def test_publishing_is_health_and_does_not_say_the_api_is_back(self) -> None:
        # the publish loop never calls the API: a passing health check is no news about it
        clock, health = task.Clock(), Health(True)
        access = ApiAccess(server="https://127.0.0.1:1")
        d = KubernetesDiscovery(member("a"), health, access=access, clock=clock, ttl=3.0, reactor=reactor)
        self.addCleanup(d._closed)
        d._unreachable("reading the member list", ConnectionRefusedError("refused"))
        d.publish()
        self.assertTrue(d.published)
        health.ok = False
        clock.advance(1.0)
        self.assertFalse(d.published)
        health.ok = True
        clock.advance(1.0)
        self.assertEqual((d.published, d.reachable), (True, False))
        d.withdraw()
        self.assertFalse(d.published)
