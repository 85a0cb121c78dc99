"""Discovery: static lists; etcd and Consul against the real servers (membership, withdraw,
expiry, outage and recovery, health-gated publishing); the timing logic on a fake clock."""

from __future__ import annotations

import json
import threading
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor, task, threads
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from tests.harness import shared
from tests.harness.node import CLUSTER_SECRET
from tfscache.cluster.discovery import DiscoveryBase, make_discovery
from tfscache.cluster.discovery.static import StaticDiscovery
from tfscache.cluster.members import Member
from tfscache.config import load_config

try:
    from tests.harness.servers import ConsulAgent, EtcdServer, binary_path
except ImportError:  # pragma: no cover - the harness is part of the tree
    ConsulAgent = EtcdServer = None  # type: ignore[assignment,misc]


def member(node_id: str, port: int = 0) -> Member:
    base = 20000 + (sum(node_id.encode()) % 1000) * 2 if not port else port
    return Member(node_id, "127.0.0.1", base, base + 1)


def ids(members: list[Member]) -> set[str]:
    return {m.id for m in members}


@defer.inlineCallbacks
def wait_until(condition: Callable[[], bool], timeout: float = 15.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``condition`` on the reactor until it holds (fail after ``timeout`` seconds)."""
    end = reactor.seconds() + timeout  # type: ignore[attr-defined]
    while not condition():
        if reactor.seconds() > end:  # type: ignore[attr-defined]
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        yield task.deferLater(reactor, 0.05, lambda: None)


class Health:
    """A health check the test switches on and off."""

    def __init__(self, ok: bool = True) -> None:
        self.ok = ok

    def __call__(self) -> defer.Deferred[None]:
        return defer.succeed(None) if self.ok else defer.fail(RuntimeError("TF Serving is down"))


class LogCapture:
    def __init__(self, test: unittest.TestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def count(self, source: Any, fragment: str) -> int:
        return sum(1 for e in self.events
                   if e.get("log_source") is source and fragment in e.get("log_format", ""))


# -- static ---------------------------------------------------------------------------------
class StaticTests(unittest.TestCase):
    def test_empty_list_is_a_one_node_cluster(self) -> None:
        me = member("me")
        d = StaticDiscovery([], me)
        self.assertEqual(d.members(), [me])

    def test_listed_members_with_self_by_address(self) -> None:
        me = member("me")
        d = StaticDiscovery.from_config(
            [{"host": "127.0.0.1", "rest_port": me.rest_port, "grpc_port": me.grpc_port},
             {"id": "b", "host": "10.0.0.2", "rest_port": 8501, "grpc_port": 8500},
             {"host": "10.0.0.3", "rest_port": 8501, "grpc_port": 8500}], me)
        self.assertEqual(ids(d.members()), {"me", "b", "10.0.0.3:8501"})

    def test_self_missing_is_added(self) -> None:
        d = StaticDiscovery([member("b")], member("me"))
        self.assertEqual(ids(d.members()), {"me", "b"})

    @defer.inlineCallbacks
    def test_factory(self):  # type: ignore[no-untyped-def]
        base = {"disk_cache": {"path": "/tmp/x"}, "model_provider": {"disk": {"base_path": "/tmp/m"}}}
        me = member("me")
        self.assertIsInstance(make_discovery(load_config(base, environ={}), me, reactor), StaticDiscovery)
        cfg = load_config(dict(base, cluster={"secret": CLUSTER_SECRET, "discovery": {
            "type": "etcd", "endpoints": ["http://127.0.0.1:1"], "ttl_seconds": 6}}), environ={})
        from tfscache.cluster.discovery.etcd import EtcdDiscovery

        d = make_discovery(cfg, me, reactor, Health())
        self.assertIsInstance(d, EtcdDiscovery)
        self.assertEqual((d.lease_ttl, d.refresh_interval, d.key), (6, 2.0, "/tfscache/members/me"))
        cfg = load_config(dict(base, cluster={"secret": CLUSTER_SECRET, "discovery": {
            "type": "consul", "endpoints": ["http://127.0.0.1:1"], "prefix": "/tfs/prod"}}), environ={})
        from tfscache.cluster.discovery.consul import ConsulDiscovery

        d = make_discovery(cfg, me, reactor, Health())
        self.assertIsInstance(d, ConsulDiscovery)
        self.assertEqual(d.service, "tfs-prod")
        cfg = load_config(dict(base, cluster={"secret": CLUSTER_SECRET, "discovery": {
            "type": "consul", "endpoints": ["127.0.0.1:8500"], "service": "models", "token": "t"}}), environ={})
        d = make_discovery(cfg, me, reactor, Health())
        self.assertEqual((d.service, d.endpoints, d.token), ("models", ["http://127.0.0.1:8500"], "t"))
        yield d._closed()

    def test_member_json_round_trip(self) -> None:
        m = Member("n\u00e9", "::1", 1, 2)
        self.assertEqual(Member.from_json(m.to_json()), m)
        self.assertEqual(m.rest_base, "http://[::1]:1")


# -- timing on a fake clock -----------------------------------------------------------------
class FakeEtcd:
    """EtcdGateway's operations in memory; ``down`` makes them fail like a lost etcd."""

    def __init__(self) -> None:
        self.down = False
        self.calls: list[str] = []
        self.leases: set[int] = set()
        self.keys: dict[str, tuple[str, int]] = {}
        self.next_lease = 1

    def _op(self, name: str) -> None:
        self.calls.append(name)
        if self.down:
            raise ConnectionRefusedError("connection refused")

    async def grant(self, ttl: int) -> int:
        self._op("grant")
        self.next_lease += 1
        self.leases.add(self.next_lease)
        return self.next_lease

    async def keepalive(self, lease_id: int) -> int:
        self._op("keepalive")
        return 10 if lease_id in self.leases else -1

    async def put(self, key: str, value: str, lease_id: int) -> None:
        self._op("put")
        self.keys[key] = (value, lease_id)

    async def revoke(self, lease_id: int) -> None:
        self._op("revoke")
        self.leases.discard(lease_id)
        self.keys = {k: v for k, v in self.keys.items() if v[1] != lease_id}


def run_now(fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    return defer.ensureDeferred(fn(*args))


class ClockTests(unittest.TestCase):
    def make(self, health: Health | None = None) -> tuple[Any, FakeEtcd, task.Clock]:
        from tfscache.cluster.discovery.etcd import EtcdDiscovery

        clock, fake = task.Clock(), FakeEtcd()
        d = EtcdDiscovery(["http://127.0.0.1:1"], member("me"), health or Health(), ttl=9.0, clock=clock,
                          connection=fake, max_backoff=30.0, reactor=reactor)  # type: ignore[arg-type]
        return d, fake, clock

    def test_refresh_every_third_of_the_ttl(self) -> None:
        d, fake, clock = self.make()
        d.publish()
        self.assertEqual(fake.calls, ["grant", "put"])
        clock.advance(2.9)
        self.assertEqual(fake.calls, ["grant", "put"])
        clock.advance(0.1)
        self.assertEqual(fake.calls, ["grant", "put", "keepalive"])
        clock.pump([3.0] * 3)
        self.assertEqual(fake.calls.count("keepalive"), 4)

    def test_backoff_is_exponential_capped_and_logged_once(self) -> None:
        logs = LogCapture(self)
        d, fake, clock = self.make()
        times: list[float] = []
        op = fake._op

        def timed(name: str) -> None:
            times.append(clock.seconds())
            op(name)

        fake._op = timed  # type: ignore[method-assign]
        d.publish()
        fake.down = True
        clock.pump([0.25] * 80)  # 20 s
        gaps = [round(b - a, 2) for a, b in zip(times, times[1:], strict=False)]
        # grant+put at 0, keepalive at 3 fails; then 0.25, 0.5, 1, 2, capped at ttl/3 = 3
        self.assertEqual(gaps[:7], [0.0, 3.0, 0.25, 0.5, 1.0, 2.0, 3.0])
        self.assertEqual(set(gaps[6:]), {3.0})
        self.assertEqual(logs.count(d, "unreachable"), 1)
        self.assertFalse(d.reachable)
        # etcd is back, but the lease expired meanwhile: granted again and the key put again
        fake.down = False
        fake.leases.clear()
        clock.advance(3.0)
        self.assertEqual(fake.calls[-3:], ["keepalive", "grant", "put"])
        self.assertTrue(d.reachable and d.published)
        self.assertEqual(logs.count(d, "reachable again"), 1)
        clock.advance(3.0)
        self.assertEqual(fake.calls[-1], "keepalive")

    def test_health_gates_publishing(self) -> None:
        health = Health(False)
        d, fake, clock = self.make(health)
        d.publish()
        self.assertEqual(fake.calls, [])  # unhealthy: nothing published
        clock.advance(3.0)
        self.assertEqual(fake.calls, [])
        health.ok = True
        clock.advance(3.0)
        self.assertEqual(fake.calls, ["grant", "put"])
        self.assertEqual(len(fake.keys), 1)
        health.ok = False
        clock.advance(3.0)
        self.assertEqual(fake.calls[-1], "revoke")
        self.assertEqual(fake.keys, {})
        clock.advance(9.0)
        self.assertEqual(fake.calls[-1], "revoke")  # no refresh while unhealthy
        health.ok = True
        clock.advance(3.0)
        self.assertEqual(fake.calls[-2:], ["grant", "put"])
        d.withdraw()
        self.assertEqual((fake.calls[-1], fake.keys), ("revoke", {}))
        n = len(fake.calls)
        clock.advance(30)
        self.assertEqual(len(fake.calls), n)  # withdrawn: the loop stopped

    def test_a_list_without_this_node_keeps_the_last_and_republishes_at_once(self) -> None:
        d, fake, clock = self.make()
        seen: list[set[str]] = []
        d.subscribe(lambda ms: seen.append(ids(ms)))
        d._set_members([member("other")])  # before publishing: taken as it is
        self.assertEqual(ids(d.members()), {"other"})
        d.publish()
        d._set_members([member("me"), member("other")])
        for lost in ([], [member("other")]):  # a wiped backend, then the others republishing first
            fake.calls.clear()
            fake.keys.clear()
            d._set_members(lost)
            self.assertEqual(ids(d.members()), {"me", "other"})  # routing goes on as it was
            self.assertEqual(fake.calls, ["keepalive", "put"])  # at once, not at the next refresh
            self.assertIn("/tfscache/members/me", fake.keys)
            self.assertTrue(d.published)
        d._set_members([member("me")])  # the record is back: a real change is taken
        self.assertEqual(seen, [{"other"}, {"me", "other"}, {"me"}])
        d.withdraw()
        d._set_members([])  # withdrawn: an empty list is the truth
        self.assertEqual((d.members(), fake.calls[-1]), ([], "revoke"))

    def test_a_watch_not_caught_up_with_our_record_is_not_a_lost_record(self) -> None:
        # just published, the first lists may predate our record (another node's, say): that is
        # no reason to warn and publish again; once our record has been seen, its absence is
        logs = LogCapture(self)
        d, fake, clock = self.make()
        d.publish()
        fake.calls.clear()
        d._set_members([member("other")])
        self.assertEqual(ids(d.members()), {"other"})
        self.assertEqual((fake.calls, logs.count(d, "came back without this node")), ([], 0))
        self.assertTrue(d.published)
        d._set_members([member("me"), member("other")])
        d._set_members([member("other")])
        self.assertEqual(ids(d.members()), {"me", "other"})
        self.assertEqual((fake.calls, logs.count(d, "came back without this node")), (["keepalive", "put"], 1))

    def test_republish_waits_for_the_round_in_flight(self) -> None:
        d, fake, clock = self.make()
        d.publish()
        d._set_members([member("me")])
        held: list[defer.Deferred[Any]] = []

        def hold(fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
            held.append(defer.Deferred().addCallback(lambda _: defer.ensureDeferred(fn(*args))))
            return held[-1]

        d._call = hold  # type: ignore[method-assign]
        clock.advance(3.0)  # a keepalive starts and waits
        self.assertEqual(len(held), 1)
        d._set_members([])
        d._call = run_now  # type: ignore[method-assign]
        fake.calls.clear()
        held[0].callback(None)  # the keepalive answers: that round puts the record, then one more round
        self.assertEqual(fake.calls, ["keepalive", "put", "keepalive"])
        self.assertEqual(ids(d.members()), {"me"})


# -- real servers ---------------------------------------------------------------------------
class _RealServerTests:
    """The same behaviour checked against etcd and against Consul."""

    timeout = 60
    server: Any

    def start_server(self) -> Any:
        raise NotImplementedError

    def shared_server(self) -> Any:
        raise NotImplementedError

    def endpoint(self, server: Any) -> str:
        raise NotImplementedError

    def discovery(self, server: Any, me: Member, prefix: str, **kw: Any) -> DiscoveryBase:
        raise NotImplementedError

    def setUp(self) -> None:
        self.prefix = f"/tfscache-test-{uuid.uuid4().hex[:8]}"

    def make(self, node_id: str, server: Any = None, follow: bool = True, **kw: Any) -> DiscoveryBase:
        kw.setdefault("ttl", 3.0)
        kw.setdefault("max_backoff", 0.5)
        d = self.discovery(server or self.shared_server(), member(node_id), self.prefix, **kw)
        if follow:
            d.startService()

        @defer.inlineCallbacks
        def cleanup():  # type: ignore[no-untyped-def]
            if d.running:
                yield d.stopService()
            else:
                yield d.withdraw()
                yield d._closed()

        self.addCleanup(cleanup)  # type: ignore[attr-defined]
        return d

    @defer.inlineCallbacks
    def test_two_nodes_see_each_other(self):  # type: ignore[no-untyped-def]
        a, b = self.make("a"), self.make("b")
        seen: list[set[str]] = []
        a.subscribe(lambda ms: seen.append(ids(ms)))
        yield defer.gatherResults([a.publish(), b.publish()])
        yield wait_until(lambda: ids(a.members()) == {"a", "b"} == ids(b.members()), what="a and b")
        self.assertEqual(seen[-1], {"a", "b"})
        self.assertEqual([m for m in a.members() if m.id == "b"], [member("b")])

    @defer.inlineCallbacks
    def test_withdraw_removes_promptly(self):  # type: ignore[no-untyped-def]
        a, b = self.make("a", ttl=30.0), self.make("b", ttl=30.0)
        yield defer.gatherResults([a.publish(), b.publish()])
        yield wait_until(lambda: ids(a.members()) == {"a", "b"} == ids(b.members()), what="a and b")
        yield b.withdraw()
        # promptly: the record is gone when withdraw() returns (left to expire, it would stay
        # for the 30 s TTL); a's view follows by its watch
        self.assertNotIn("b", (yield threads.deferToThread(self.records, self.shared_server())))
        yield wait_until(lambda: ids(a.members()) == {"a"}, what="b gone")
        yield a.stopService()  # a graceful stop withdraws too
        self.assertNotIn("a", (yield threads.deferToThread(self.records, self.shared_server())))
        yield wait_until(lambda: ids(b.members()) == set(), what="a gone")

    @defer.inlineCallbacks
    def test_expired_registration_disappears(self):  # type: ignore[no-untyped-def]
        a = self.make("a")
        frozen = task.Clock()  # b's refresh never comes: like a node that hangs or crashed
        b = self.make("b", follow=False, ttl=2.0, clock=frozen)
        yield defer.gatherResults([a.publish(), b.publish()])
        yield wait_until(lambda: ids(a.members()) == {"a", "b"}, what="a and b")
        yield wait_until(lambda: ids(a.members()) == {"a"}, timeout=15, what="b expired")

    @defer.inlineCallbacks
    def test_health_gated_publishing(self):  # type: ignore[no-untyped-def]
        health = Health(False)
        a, b = self.make("a", health=health), self.make("b")
        yield defer.gatherResults([a.publish(), b.publish()])
        yield wait_until(lambda: "b" in ids(a.members()), what="b")
        self.assertEqual(ids(a.members()), {"b"})  # a is not healthy: not published
        health.ok = True
        yield wait_until(lambda: ids(b.members()) == {"a", "b"}, what="a healthy")
        health.ok = False
        yield wait_until(lambda: ids(b.members()) == {"b"}, what="a unhealthy")
        health.ok = True
        yield wait_until(lambda: ids(b.members()) == {"a", "b"}, what="a healthy again")

    def delete_record(self, server: Any, node_id: str) -> None:
        raise NotImplementedError

    def records(self, server: Any) -> set[str]:
        """The ids of the live records in the server (blocking)."""
        raise NotImplementedError

    @defer.inlineCallbacks
    def wait_records(self, expected: set[str], timeout: float):  # type: ignore[no-untyped-def]
        end = reactor.seconds() + timeout  # type: ignore[attr-defined]
        while (got := (yield threads.deferToThread(self.records, self.shared_server()))) != expected:
            if reactor.seconds() > end:  # type: ignore[attr-defined]
                raise AssertionError(f"the server holds {got} after {timeout}s, not {expected}")
            yield task.deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def test_records_wiped_are_republished_at_once(self):  # type: ignore[no-untyped-def]
        # the backend loses every record (a Consul -dev agent restarted, etcd wiped) while the
        # nodes run: they keep routing with the last list and publish again at once, not at
        # their next refresh (10 s away with this TTL)
        logs = LogCapture(self)  # type: ignore[arg-type]
        a, b = self.make("a", ttl=30.0), self.make("b", ttl=30.0)
        observer = self.make("observer", ttl=30.0)  # follows, never publishes
        seen: dict[str, list[set[str]]] = {"a": [], "b": []}
        a.subscribe(lambda ms: seen["a"].append(ids(ms)))
        b.subscribe(lambda ms: seen["b"].append(ids(ms)))
        yield defer.gatherResults([a.publish(), b.publish()])
        yield wait_until(lambda: ids(a.members()) == ids(b.members()) == ids(observer.members()) == {"a", "b"},
                         what="a and b")
        seen["a"].clear()  # the lists of the start (published one after the other) do not count
        seen["b"].clear()
        for node_id in ("a", "b"):
            yield threads.deferToThread(self.delete_record, self.shared_server(), node_id)
        lost = "came back without this node"
        yield wait_until(lambda: logs.count(a, lost) == 1 == logs.count(b, lost), timeout=5, what="both notice")
        yield self.wait_records({"a", "b"}, timeout=3)  # at once: their next refresh is 10 s away
        yield wait_until(lambda: ids(observer.members()) == {"a", "b"}, timeout=3, what="the observer sees them")
        self.assertEqual((ids(a.members()), ids(b.members())), ({"a", "b"}, {"a", "b"}))
        for node_id, lists in seen.items():
            self.assertEqual([s for s in lists if node_id not in s], [], node_id)

    @defer.inlineCallbacks
    def test_record_removed_behind_its_back_is_restored(self):  # type: ignore[no-untyped-def]
        logs = LogCapture(self)  # type: ignore[arg-type]
        a, b = self.make("a"), self.make("b")
        yield defer.gatherResults([a.publish(), b.publish()])
        yield wait_until(lambda: ids(a.members()) == {"a", "b"}, what="a and b")
        # b has seen its own record (on a busy machine its watch can lag a's): only a record it
        # saw can be missed, and put back
        yield wait_until(lambda: ids(b.members()) == {"a", "b"}, what="b sees itself")
        yield threads.deferToThread(self.delete_record, self.shared_server(), "b")
        # b sees its record go and puts it back at once: a may not even see the gap
        yield wait_until(lambda: logs.count(b, "came back without this node") == 1, what="b notices")
        yield self.wait_records({"a", "b"}, timeout=5)
        yield wait_until(lambda: ids(a.members()) == {"a", "b"}, what="b restored")

    @defer.inlineCallbacks
    def test_outage_keeps_members_logs_once_and_recovers(self):  # type: ignore[no-untyped-def]
        logs = LogCapture(self)  # type: ignore[arg-type]
        server = self.start_server()
        a, b = self.make("a", server), self.make("b", server)
        yield defer.gatherResults([a.publish(), b.publish()])
        yield wait_until(lambda: ids(a.members()) == {"a", "b"}, what="a and b")
        seen: list[set[str]] = []
        a.subscribe(lambda ms: seen.append(ids(ms)))
        follows = []
        original = a._follow

        async def counting() -> None:
            follows.append(1)
            await original()

        a._follow = counting  # type: ignore[method-assign]
        yield threads.deferToThread(server.stop)
        yield wait_until(lambda: not a.reachable, what="a notices the outage")
        # several failed retries, and one warning only
        yield wait_until(lambda: len(follows) >= 4, what="retries")
        self.assertEqual(ids(a.members()), {"a", "b"})  # the last known members
        self.assertEqual(logs.count(a, "unreachable"), 1)
        yield threads.deferToThread(server.start)
        c = self.make("c", server)
        yield c.publish()
        yield wait_until(lambda: ids(a.members()) == {"a", "b", "c"}, timeout=30, what="recovery")
        yield wait_until(lambda: a.reachable and a.published and b.published, what="all published")
        self.assertEqual(logs.count(a, "unreachable"), 1)
        self.assertEqual(logs.count(a, "reachable again"), 1)
        # a server that came back empty (Consul -dev keeps nothing) never emptied a's list nor
        # dropped a itself; b may be missing for a moment, between c's publish and b's own
        # republish after the restart (their order is a race)
        self.assertEqual([s for s in seen if "a" not in s or len(s) < 2], [])


class EtcdTests(_RealServerTests, unittest.TestCase):
    def shared_server(self) -> Any:
        return shared.shared("etcd", lambda: EtcdServer().start(), lambda s: s.stop())

    def start_server(self) -> Any:
        server = EtcdServer().start()
        self.addCleanup(server.stop)
        return server

    def discovery(self, server: Any, me: Member, prefix: str, **kw: Any) -> DiscoveryBase:
        from tfscache.cluster.discovery.etcd import EtcdDiscovery

        return EtcdDiscovery([server.endpoint], me, kw.pop("health", None), prefix=prefix, reactor=reactor, **kw)

    def delete_record(self, server: Any, node_id: str) -> None:
        import base64

        key = base64.b64encode(f"{self.prefix}/members/{node_id}".encode()).decode()
        req = urllib.request.Request(server.endpoint + "/v3/kv/deleterange", json.dumps({"key": key}).encode())
        urllib.request.urlopen(req, timeout=5).close()

    def records(self, server: Any) -> set[str]:
        import base64

        prefix = f"{self.prefix}/members/".encode()
        end = prefix[:-1] + bytes([prefix[-1] + 1])
        req = urllib.request.Request(server.endpoint + "/v3/kv/range", json.dumps(
            {"key": base64.b64encode(prefix).decode(), "range_end": base64.b64encode(end).decode()}).encode())
        with urllib.request.urlopen(req, timeout=5) as resp:
            kvs = json.load(resp).get("kvs", [])
        return {base64.b64decode(kv["key"]).decode()[len(prefix):] for kv in kvs}

    @defer.inlineCallbacks
    def test_keepalives_go_on_while_the_reactor_pool_is_saturated(self):  # type: ignore[no-untyped-def]
        # disk/S3 copies and DNS lookups can fill the reactor's shared thread pool: etcd calls
        # need no thread (not even to resolve an IP address), so the lease (2 s here) outlives
        # a long burst
        a = self.make("a", ttl=2.0)
        observer = self.make("observer", ttl=2.0)
        yield a.publish()
        yield wait_until(lambda: ids(observer.members()) == {"a"}, what="a")
        lease, keepalives = a.lease_id, []  # type: ignore[attr-defined]
        keepalive = a.conn.keepalive  # type: ignore[attr-defined]

        def counting(lease_id: int) -> Any:
            keepalives.append(threading.current_thread().name)
            return keepalive(lease_id)

        a.conn.keepalive = counting  # type: ignore[attr-defined]
        pool, release = reactor.getThreadPool(), threading.Event()  # type: ignore[attr-defined]
        self.addCleanup(release.set)
        for _ in range(pool.max):
            pool.callInThread(release.wait)
        probe = threads.deferToThread(lambda: None)  # queued behind the blocked threads
        yield task.deferLater(reactor, 3 * 2.0, lambda: None)  # 3 lease TTLs
        self.assertFalse(probe.called, "the reactor's pool was not saturated")
        self.assertGreaterEqual(len(keepalives), 6)  # every ttl/3
        # on the reactor's thread: no thread is involved
        self.assertEqual(set(keepalives), {threading.current_thread().name})
        self.assertEqual((a.lease_id, ids(observer.members())), (lease, {"a"}))  # type: ignore[attr-defined]
        release.set()
        yield probe

    @defer.inlineCallbacks
    def test_a_silent_watch_is_restarted(self):  # type: ignore[no-untyped-def]
        # etcd sends progress notifications every 10 minutes by default: a watch silent for
        # longer than watch_silence may sit on a dead connection, so the prefix is read again
        logs = LogCapture(self)  # type: ignore[arg-type]
        a = self.make("a", watch_silence=0.5)
        yield a.publish()
        yield wait_until(lambda: a.watch_restarts >= 3, timeout=10, what="restarts")  # type: ignore[attr-defined]
        self.assertEqual((ids(a.members()), a.reachable), ({"a"}, True))
        self.assertEqual(logs.count(a, "unreachable"), 0)
        # and a restarted watch still sees changes
        b = self.make("b")
        yield b.publish()
        yield wait_until(lambda: ids(a.members()) == {"a", "b"}, what="b")

    @defer.inlineCallbacks
    def test_progress_notifications_keep_a_quiet_watch(self):  # type: ignore[no-untyped-def]
        server = EtcdServer(extra_args=["--experimental-watch-progress-notify-interval", "200ms"]).start()
        self.addCleanup(server.stop)
        a = self.make("a", server, watch_silence=1.0)
        yield a.publish()
        yield wait_until(lambda: a._watch is not None and a._watch.messages >= 5, what="progress")  # type: ignore[attr-defined]
        self.assertEqual(a.watch_restarts, 0)  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_publish_recovery_restarts_the_watch(self):  # type: ignore[no-untyped-def]
        a = self.make("a")
        yield a.publish()
        yield wait_until(lambda: a._watch is not None, what="a watch")  # type: ignore[attr-defined]
        stream = a._watch  # type: ignore[attr-defined]
        a._unreachable("publishing this node", RuntimeError("a test outage"))
        a._reached("publish")  # as the publish loop does when it gets through again
        self.assertEqual(a.watch_restarts, 1)  # type: ignore[attr-defined]
        yield wait_until(lambda: a._watch is not None and a._watch is not stream, what="a new watch")  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_username_and_password(self):  # type: ignore[no-untyped-def]
        server = self.start_server()

        def post(path: str, body: dict[str, Any], token: str | None = None) -> dict[str, Any]:
            req = urllib.request.Request(server.endpoint + "/v3/" + path, json.dumps(body).encode(),
                                         {"Authorization": token} if token else {})
            with urllib.request.urlopen(req, timeout=5) as resp:
                return json.load(resp)  # type: ignore[no-any-return]

        post("auth/user/add", {"name": "root", "password": "secret"})
        post("auth/role/add", {"name": "root"})
        post("auth/user/grant", {"user": "root", "role": "root"})
        post("auth/enable", {})
        a = self.make("a", server, username="root", password="secret")
        yield a.publish()
        yield wait_until(lambda: ids(a.members()) == {"a"}, what="a with auth")
        self.assertTrue(a.published)
        # a token that etcd no longer accepts is replaced
        for index in list(a.conn.tokens):  # type: ignore[attr-defined]
            a.conn.tokens[index] = "bogus"  # type: ignore[attr-defined]
        _revision, kvs = yield defer.ensureDeferred(a.conn.range_prefix(a.prefix))  # type: ignore[attr-defined]
        self.assertEqual(list(kvs), [a.key])  # type: ignore[attr-defined]


def _consul_missing() -> str | None:
    if ConsulAgent is None:
        return "tests/harness/servers.py has no ConsulAgent"
    try:
        binary_path("consul")
    except RuntimeError as e:
        return str(e)
    return None


class ConsulTests(_RealServerTests, unittest.TestCase):
    skip = _consul_missing()

    def shared_server(self) -> Any:
        return shared.shared("consul", lambda: ConsulAgent().start(), lambda s: s.stop())

    def start_server(self) -> Any:
        server = ConsulAgent().start()
        self.addCleanup(server.stop)
        return server

    def discovery(self, server: Any, me: Member, prefix: str, **kw: Any) -> DiscoveryBase:
        from tfscache.cluster.discovery.consul import ConsulDiscovery

        kw.setdefault("wait_seconds", 5.0)
        return ConsulDiscovery([server.http_addr], me, kw.pop("health", None), prefix=prefix, reactor=reactor, **kw)

    def delete_record(self, server: Any, node_id: str) -> None:
        req = urllib.request.Request(f"{server.http_addr}/v1/agent/service/deregister/{node_id}", method="PUT")
        urllib.request.urlopen(req, timeout=5).close()

    def records(self, server: Any) -> set[str]:
        url = f"{server.http_addr}/v1/health/service/{self.prefix.strip('/')}?passing=true"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return {entry["Service"]["ID"] for entry in json.load(resp)}

    @defer.inlineCallbacks
    def test_registration_carries_the_grpc_port(self):  # type: ignore[no-untyped-def]
        a = self.make("a")
        yield a.publish()
        server = self.shared_server()
        url = f"{server.http_addr}/v1/agent/service/a"
        body = yield threads.deferToThread(lambda: json.load(urllib.request.urlopen(url, timeout=5)))
        self.assertEqual((body["Service"], body["Port"], body["Meta"]["grpc_port"]),
                         (self.prefix.strip("/"), member("a").rest_port, str(member("a").grpc_port)))

