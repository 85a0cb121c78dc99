"""Discovery over TLS against real servers: etcd with TLS on its client port (then with
``--client-cert-auth``) and a Consul agent serving its API on HTTPS only (then with
``verify_incoming``).

Nodes with the CA find each other; a wrong or missing CA, a server certificate from an
untrusted CA, a plaintext server or a missing client certificate each give one clear warning
(no crash, the last members kept, nothing registered, never a plaintext request); the etcd
password and the Consul ACL token never reach a log event.  REQUESTS_CA_BUNDLE is pointed at
the wrong CA throughout: ``ca_cert`` must win over it."""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
import urllib.request
import uuid
from typing import Any

from twisted.internet import defer, reactor, task, threads
from twisted.logger import LogLevel, formatEvent
from twisted.trial import unittest

from tests.harness import shared
from tests.harness.certs import make_tls_files
from tests.harness.node import CLUSTER_SECRET
from tests.test_discovery import LogCapture, _consul_missing, ids, member, wait_until
from tfscache.cluster.discovery import DiscoveryBase
from tfscache.cluster.members import Member
from tfscache.config import ConfigError, load_config

try:
    from tests.harness.servers import ConsulAgent, EtcdServer, tls_context
except ImportError:  # pragma: no cover - the harness is part of the tree
    ConsulAgent = EtcdServer = None  # type: ignore[assignment,misc]

TLS = shared.shared("tls:discovery", make_tls_files, lambda _p: None)
WRONG = shared.shared("tls:discovery-wrong", make_tls_files, lambda _p: None)  # another CA, same names


def https_json(url: str, body: Any = None, method: str | None = None, headers: dict[str, str] | None = None,
               tls: dict[str, str] = TLS) -> Any:
    """A JSON request to a TLS test server, with the right CA and client certificate (blocking)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data, headers or {}, method=method)
    with urllib.request.urlopen(req, timeout=5, context=tls_context(tls)) as resp:
        return json.load(resp)


def rotatable_tls() -> dict[str, str]:
    """A copy of TLS whose server certificate files a test may overwrite."""
    d = tempfile.mkdtemp(prefix="tfscache-tls-rotate-")
    paths = dict(TLS)
    for key in ("cert", "key"):
        paths[key] = shutil.copy(TLS[key], os.path.join(d, os.path.basename(TLS[key])))
    return paths


def serve_cert_from(tls: dict[str, str], source: dict[str, str]) -> None:
    for key in ("cert", "key"):
        shutil.copyfile(source[key], tls[key])


def text_of(event: dict[str, Any]) -> str:
    text = formatEvent(event) + repr(event)
    failure = event.get("log_failure")
    return text + (failure.getTraceback() if failure is not None else "")


class _TlsTests:
    """The same TLS behaviour checked against etcd and against Consul."""

    timeout = 60
    backend = ""

    # -- backend hooks ------------------------------------------------------------------------
    def new_server(self, **kw: Any) -> Any:
        raise NotImplementedError

    def plain_server(self) -> Any:
        raise NotImplementedError

    def url(self, server: Any) -> str:
        raise NotImplementedError

    def discovery(self, endpoint: str, me: Member, **kw: Any) -> DiscoveryBase:
        raise NotImplementedError

    def registered(self, server: Any) -> set[str]:
        """The node ids with a record in ``server`` under this test's prefix (blocking)."""
        raise NotImplementedError

    # -- helpers ------------------------------------------------------------------------------
    def setUp(self) -> None:
        self.prefix = f"/tfscache-tls-{uuid.uuid4().hex[:8]}"
        old = os.environ.get("REQUESTS_CA_BUNDLE")
        os.environ["REQUESTS_CA_BUNDLE"] = WRONG["ca"]
        self.addCleanup(self._restore_env, old)  # type: ignore[attr-defined]
        self.logs = LogCapture(self)  # type: ignore[arg-type]

    @staticmethod
    def _restore_env(old: str | None) -> None:
        if old is None:
            os.environ.pop("REQUESTS_CA_BUNDLE", None)
        else:
            os.environ["REQUESTS_CA_BUNDLE"] = old

    def server(self, verify_clients: bool = False) -> Any:
        """A TLS server shared by the tests of this module (one per backend and mode)."""
        return shared.shared(f"{self.backend}:tls:{verify_clients}",
                             lambda: self.new_server(tls=TLS, verify_clients=verify_clients).start(),
                             lambda s: s.stop())

    def own_server(self, **kw: Any) -> Any:
        server = self.new_server(**kw).start()
        self.addCleanup(server.stop)  # type: ignore[attr-defined]
        return server

    def make(self, node_id: str, server: Any = None, endpoint: str | None = None, **kw: Any) -> DiscoveryBase:
        kw.setdefault("ttl", 3.0)
        kw.setdefault("min_backoff", 0.05)  # quick retries: the tests count them
        kw.setdefault("max_backoff", 0.3)
        d = self.discovery(endpoint or self.url(server or self.server()), member(node_id), **kw)
        d.startService()
        self.addCleanup(lambda: d.stopService() if d.running else None)  # type: ignore[attr-defined]
        return d

    def good(self, node_id: str, server: Any = None, **kw: Any) -> DiscoveryBase:
        return self.make(node_id, server, ca_cert=TLS["ca"], **kw)

    def count_follows(self, d: DiscoveryBase) -> list[int]:
        follows: list[int] = []
        original = d._follow

        async def counting() -> None:
            follows.append(1)
            await original()

        d._follow = counting  # type: ignore[method-assign]
        return follows

    def warnings(self, d: DiscoveryBase, fragment: str | None = None) -> list[str]:
        """``d``'s outage warnings (each outage logs one), or its warnings that say ``fragment``."""
        texts = [formatEvent(e) for e in self.logs.events
                 if e.get("log_source") is d and e.get("log_level") == LogLevel.warn]
        if fragment is None:
            return [t for t in texts if " unreachable from " in t]
        return [t for t in texts if fragment in t]

    @defer.inlineCallbacks
    def assert_refused(self, d: DiscoveryBase, *reasons: str, handshake: bool = True):  # type: ignore[no-untyped-def]
        """``d`` cannot talk to its server: one clear warning however many retries, no
        crash, no members, not published."""
        follows = self.count_follows(d)
        yield d.publish()  # fires after the first attempt, never fails
        yield wait_until(lambda: len(follows) >= 3 and not d.reachable, what="several failed reads")
        warnings = self.warnings(d)
        self.assertEqual(len(warnings), 1, warnings)  # type: ignore[attr-defined]
        if handshake:
            self.assertIn("TLS handshake failed", warnings[0])  # type: ignore[attr-defined]
        self.assertTrue(any(r in warnings[0] for r in reasons), warnings[0])  # type: ignore[attr-defined]
        self.assertEqual((d.members(), d.published), ([], False))  # type: ignore[attr-defined]
        assert d._follow_loop is not None
        self.assertFalse(d._follow_loop.called)  # type: ignore[attr-defined]  # still retrying

    # -- tests --------------------------------------------------------------------------------
    @defer.inlineCallbacks
    def test_two_nodes_over_tls(self):  # type: ignore[no-untyped-def]
        server = self.server()
        host_port = self.url(server).split("://", 1)[1]
        a = self.good("a")
        b = self.make("b", endpoint=host_port, ca_cert=TLS["ca"])  # no scheme: https, as a TLS option is set
        yield defer.gatherResults([a.publish(), b.publish()])
        yield wait_until(lambda: ids(a.members()) == {"a", "b"} == ids(b.members()), what="a and b")
        self.assertEqual((yield threads.deferToThread(self.registered, server)), {"a", "b"})  # type: ignore[attr-defined]
        yield b.withdraw()
        # the record is gone when withdraw() returns (not left to expire); a's view follows
        self.assertEqual((yield threads.deferToThread(self.registered, server)), {"a"})  # type: ignore[attr-defined]
        yield wait_until(lambda: ids(a.members()) == {"a"}, what="b gone")
        yield a.stopService()
        self.assertEqual((yield threads.deferToThread(self.registered, server)), set())  # type: ignore[attr-defined]
        yield wait_until(lambda: ids(b.members()) == set(), what="a gone")
        self.assertEqual(self.warnings(a) + self.warnings(b), [])  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_wrong_or_missing_ca_fails_clearly(self):  # type: ignore[no-untyped-def]
        server = self.server()
        ok = self.good("ok")
        yield ok.publish()
        wrong = self.make("wrong", ca_cert=WRONG["ca"])
        missing = self.make("missing")  # https endpoint, no ca_cert: the system roots
        yield defer.gatherResults([self.assert_refused(wrong, "certificate verify failed"),
                                   self.assert_refused(missing, "certificate verify failed")])
        self.assertEqual(ids(ok.members()), {"ok"})  # type: ignore[attr-defined]
        self.assertEqual((yield threads.deferToThread(self.registered, server)), {"ok"})  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_plaintext_server_is_never_spoken_to(self):  # type: ignore[no-untyped-def]
        """A client asked to use TLS, pointed at a plaintext server, fails the handshake and
        does not fall back to plain HTTP."""
        plain = self.plain_server()
        port = self.url(plain).rsplit(":", 1)[1]
        d = self.make("p", endpoint=f"https://127.0.0.1:{port}", ca_cert=TLS["ca"])
        # the plaintext server answers the ClientHello with an HTTP 400 and a close, which the
        # client sees as a failed handshake or, when the close races the hello, as a reset;
        # etcd's port multiplexer hangs up on bytes it does not recognise (the connection lost
        # during the handshake)
        yield self.assert_refused(d, "wrong version number", "packet length too long", "EOF occurred",
                                  "Connection reset by peer", "Connection to the other side was lost",
                                  handshake=False)
        self.assertEqual((yield threads.deferToThread(self.registered, plain)), set())  # type: ignore[attr-defined]
        for endpoints in ([f"http://127.0.0.1:{port}"], [f"127.0.0.1:{port}", f"http://127.0.0.1:{port}"]):
            with self.assertRaisesRegex(ValueError, "plain http"):  # type: ignore[attr-defined]
                self.discovery_many(endpoints, member("p"), ca_cert=TLS["ca"])
        with self.assertRaisesRegex(ValueError, "client_cert and client_key go together"):  # type: ignore[attr-defined]
            self.discovery(self.url(plain), member("p"), client_cert=TLS["client_cert"])

    def discovery_many(self, endpoints: list[str], me: Member, **kw: Any) -> DiscoveryBase:
        raise NotImplementedError

    @defer.inlineCallbacks
    def test_certificate_from_an_untrusted_ca_keeps_members(self):  # type: ignore[no-untyped-def]
        """The server comes back with a certificate from another CA: the nodes log it once,
        keep the members they knew, and recover when the trusted certificate is back."""
        tls = rotatable_tls()
        server = self.own_server(tls=tls)
        a, b = self.good("a", server), self.good("b", server)
        follows = self.count_follows(a)
        yield defer.gatherResults([a.publish(), b.publish()])
        yield wait_until(lambda: ids(a.members()) == {"a", "b"}, what="a and b")
        serve_cert_from(tls, WRONG)
        yield threads.deferToThread(server.restart)
        yield wait_until(lambda: not a.reachable, what="a notices")
        n = len(follows)
        yield wait_until(lambda: len(follows) >= n + 3, what="retries")
        self.assertEqual(ids(a.members()), {"a", "b"})  # type: ignore[attr-defined]
        # one outage warning (its first error is the server going away), and the TLS failure
        # that follows it said once, however many retries
        self.assertEqual(len(self.warnings(a)), 1, self.warnings(a))  # type: ignore[attr-defined]
        tls_warnings = self.warnings(a, "TLS handshake failed")
        self.assertEqual(len(tls_warnings), 1, tls_warnings)  # type: ignore[attr-defined]
        self.assertIn("certificate verify failed", tls_warnings[0])  # type: ignore[attr-defined]
        serve_cert_from(tls, TLS)
        yield threads.deferToThread(server.restart)
        yield wait_until(lambda: a.reachable and a.published and b.published, timeout=20, what="recovery")
        yield wait_until(lambda: ids(b.members()) == {"a", "b"}, what="both again")
        self.assertEqual(self.logs.count(a, "reachable again"), 1)  # type: ignore[attr-defined]
        self.assertEqual(len(self.warnings(a)), 1)  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_client_certificate_required(self):  # type: ignore[no-untyped-def]
        server = self.server(verify_clients=True)
        anonymous = self.good("anonymous", server)
        # a certificate signed by another CA is refused too
        stranger = self.make("stranger", server, ca_cert=TLS["ca"], client_cert=WRONG["client_cert"],
                             client_key=WRONG["client_key"])
        certs = {"client_cert": TLS["client_cert"], "client_key": TLS["client_key"]}
        c1, c2 = self.good("c1", server, **certs), self.good("c2", server, **certs)
        yield defer.gatherResults([c1.publish(), c2.publish(),
                                   self.assert_refused(anonymous, "bad certificate", "certificate required"),
                                   self.assert_refused(stranger, "bad certificate", "unknown ca")])
        yield wait_until(lambda: ids(c1.members()) == {"c1", "c2"} == ids(c2.members()), what="c1 and c2")
        self.assertEqual(anonymous.members(), [])  # type: ignore[attr-defined]
        self.assertEqual(stranger.members(), [])  # type: ignore[attr-defined]
        self.assertEqual((yield threads.deferToThread(self.registered, server)), {"c1", "c2"})  # type: ignore[attr-defined]

    def assert_never_logged(self, secrets: list[str]) -> None:
        self.assertGreaterEqual(len(self.logs.events), 3)  # type: ignore[attr-defined]
        for event in self.logs.events:
            text = text_of(event)
            for secret in secrets:
                self.assertNotIn(secret, text, event)  # type: ignore[attr-defined]


class EtcdTlsTests(_TlsTests, unittest.TestCase):
    backend = "etcd"

    def new_server(self, **kw: Any) -> Any:
        return EtcdServer(**kw)

    def plain_server(self) -> Any:
        return shared.shared("etcd", lambda: EtcdServer().start(), lambda s: s.stop())

    def url(self, server: Any) -> str:
        return str(server.endpoint)

    def discovery(self, endpoint: str, me: Member, **kw: Any) -> DiscoveryBase:
        return self.discovery_many([endpoint], me, **kw)

    def discovery_many(self, endpoints: list[str], me: Member, **kw: Any) -> DiscoveryBase:
        from tfscache.cluster.discovery.etcd import EtcdDiscovery

        return EtcdDiscovery(endpoints, me, prefix=self.prefix, reactor=reactor, **kw)

    def registered(self, server: Any, headers: dict[str, str] | None = None) -> set[str]:
        key = f"{self.prefix}/members/".encode()
        body = {"key": base64.b64encode(key).decode(), "range_end": base64.b64encode(key[:-1] + b"0").decode()}
        url = server.endpoint + "/v3/kv/range"
        if server.tls is None:
            req = urllib.request.Request(url, json.dumps(body).encode())
            with urllib.request.urlopen(req, timeout=5) as resp:
                result = json.load(resp)
        else:
            result = https_json(url, body, headers=headers)
        return {base64.b64decode(kv["key"]).decode().rsplit("/", 1)[1] for kv in result.get("kvs", [])}

    @defer.inlineCallbacks
    def test_password_and_token_never_logged(self):  # type: ignore[no-untyped-def]
        password, wrong_password = "pw-" + os.urandom(12).hex(), "pw-" + os.urandom(12).hex()
        server = self.own_server(tls=TLS)

        def setup() -> str:
            for path, body in (("auth/user/add", {"name": "root", "password": password}),
                               ("auth/role/add", {"name": "root"}),
                               ("auth/user/grant", {"user": "root", "role": "root"}), ("auth/enable", {})):
                https_json(f"{server.endpoint}/v3/{path}", body)
            return str(https_json(f"{server.endpoint}/v3/auth/authenticate",
                                  {"name": "root", "password": password})["token"])

        admin_token = yield threads.deferToThread(setup)
        a = self.good("a", server, username="root", password=password)
        yield a.publish()
        yield wait_until(lambda: ids(a.members()) == {"a"}, what="a with auth over TLS")
        tokens = set(a.conn.tokens.values())  # type: ignore[attr-defined]
        for index in list(a.conn.tokens):  # type: ignore[attr-defined]
            a.conn.tokens[index] = "bogus-" + admin_token  # type: ignore[attr-defined]  # etcd refuses it: a new token
        yield defer.ensureDeferred(a.conn.range_prefix(a.prefix))  # type: ignore[attr-defined]
        tokens |= set(a.conn.tokens.values())  # type: ignore[attr-defined]
        refused = self.good("refused", server, username="root", password=wrong_password)
        follows = self.count_follows(refused)
        yield refused.publish()
        yield wait_until(lambda: len(follows) >= 3 and not refused.reachable, what="wrong password retried")
        [warning] = self.warnings(refused)
        self.assertIn("authentication failed", warning)
        untrusted = self.make("untrusted", server, ca_cert=WRONG["ca"], username="root", password=password)
        yield self.assert_refused(untrusted, "certificate verify failed")
        yield a.stopService()
        self.assertEqual(ids(refused.members()), set())
        self.assertGreaterEqual(len(tokens), 2)
        self.assert_never_logged([password, wrong_password, admin_token, *tokens])


class ConsulTlsTests(_TlsTests, unittest.TestCase):
    backend = "consul"
    skip = _consul_missing()

    def new_server(self, **kw: Any) -> Any:
        return ConsulAgent(**kw)

    def plain_server(self) -> Any:
        return shared.shared("consul", lambda: ConsulAgent().start(), lambda s: s.stop())

    def url(self, server: Any) -> str:
        return str(server.http_addr)

    def discovery(self, endpoint: str, me: Member, **kw: Any) -> DiscoveryBase:
        return self.discovery_many([endpoint], me, **kw)

    def discovery_many(self, endpoints: list[str], me: Member, **kw: Any) -> DiscoveryBase:
        from tfscache.cluster.discovery.consul import ConsulDiscovery

        kw.setdefault("wait_seconds", 5.0)
        return ConsulDiscovery(endpoints, me, prefix=self.prefix, reactor=reactor, **kw)

    def registered(self, server: Any, headers: dict[str, str] | None = None) -> set[str]:
        url = f"{server.http_addr}/v1/agent/services"
        if server.tls is None:
            with urllib.request.urlopen(url, timeout=5) as resp:
                services = json.load(resp)
        else:
            services = https_json(url, headers=headers)
        return {s["ID"] for s in services.values() if s["Service"] == self.prefix.strip("/")}

    @defer.inlineCallbacks
    def test_token_never_logged(self):  # type: ignore[no-untyped-def]
        token, wrong_token = str(uuid.uuid4()), str(uuid.uuid4())
        acl = {"acl": {"enabled": True, "default_policy": "deny", "tokens": {"initial_management": token}}}
        server = self.own_server(tls=TLS, extra_config=acl)
        a = self.good("a", server, token=token)
        yield a.publish()
        yield wait_until(lambda: ids(a.members()) == {"a"}, what="a with its token over TLS")
        registered = yield threads.deferToThread(self.registered, server, {"X-Consul-Token": token})
        self.assertEqual(registered, {"a"})
        refused = self.good("refused", server, token=wrong_token)
        follows = self.count_follows(refused)
        yield refused.publish()
        yield wait_until(lambda: len(follows) >= 3 and not refused.reachable, what="wrong token retried")
        [warning] = self.warnings(refused)
        self.assertIn("HTTP 403", warning)
        untrusted = self.make("untrusted", server, ca_cert=WRONG["ca"], token=token)
        yield self.assert_refused(untrusted, "certificate verify failed")
        yield a.stopService()
        self.assert_never_logged([token, wrong_token])


class _Scripted(DiscoveryBase):
    """A discovery whose backend calls are Deferreds the test fires: the loops' bookkeeping
    without a server, on a fake clock."""

    backend = "scripted"

    def __init__(self, clock: task.Clock) -> None:
        super().__init__(member("me"), ttl=3.0, clock=clock)
        self.reads: list[defer.Deferred[bool]] = []
        self.refreshes: list[defer.Deferred[None]] = []

    async def _follow(self) -> None:
        read: defer.Deferred[bool] = defer.Deferred()
        self.reads.append(read)
        if await read:  # True: the read worked, then a watch runs until the test ends it
            self._reached()
            watch: defer.Deferred[bool] = defer.Deferred()
            self.reads.append(watch)
            await watch

    async def _refresh(self) -> None:
        d: defer.Deferred[None] = defer.Deferred()
        self.refreshes.append(d)
        await d

    async def _suspend(self) -> None:
        pass

    async def _remove(self) -> None:
        pass


class LateFailureTests(unittest.TestCase):
    """A request made while the server was down can fail only after the server is back (a
    refused connection surfaces 0.3 s late through Twisted's HostnameEndpoint): seen first in
    the certificate rotation test above, as a second outage and recovery logged right after
    the first.  Such a failure is retried, not logged as a new outage."""

    def start(self) -> tuple[_Scripted, task.Clock, LogCapture]:
        logs, clock = LogCapture(self), task.Clock()
        d = _Scripted(clock)
        d.startService()  # a read in flight
        d.publish()       # a refresh in flight
        self.addCleanup(d.stopService)
        return d, clock, logs

    def test_late_read_failure(self) -> None:
        d, clock, logs = self.start()
        d.refreshes[0].errback(ConnectionRefusedError())  # the outage: logged once
        self.assertEqual((d.reachable, logs.count(d, "unreachable")), (False, 1))
        clock.advance(d.min_backoff)
        d.refreshes[1].callback(None)  # the server is back
        self.assertEqual((d.reachable, logs.count(d, "reachable again")), (True, 1))
        d.reads[0].errback(ConnectionRefusedError())  # the read begun during the outage fails now
        self.assertEqual((d.reachable, logs.count(d, "unreachable")), (True, 1))
        clock.advance(d.min_backoff)  # retried soon
        d.reads[1].callback(True)
        d.reads[2].errback(ConnectionRefusedError())  # a watch that broke after its own read is news
        self.assertEqual((d.reachable, logs.count(d, "unreachable")), (False, 2))

    def test_late_refresh_failure(self) -> None:
        d, clock, logs = self.start()
        d.reads[0].errback(ConnectionRefusedError())  # the outage: logged once
        self.assertEqual((d.reachable, logs.count(d, "unreachable")), (False, 1))
        clock.advance(d.min_backoff)
        d.reads[1].callback(True)  # the server is back
        self.assertEqual((d.reachable, logs.count(d, "reachable again")), (True, 1))
        d.refreshes[0].errback(ConnectionRefusedError())  # the refresh begun during the outage fails now
        self.assertEqual((d.reachable, logs.count(d, "unreachable")), (True, 1))
        clock.advance(d.min_backoff)  # retried soon
        self.assertEqual(len(d.refreshes), 2)
        d.refreshes[1].errback(ConnectionRefusedError())  # a refresh begun since: a real failure
        self.assertEqual((d.reachable, logs.count(d, "unreachable")), (False, 2))
        clock.advance(d.min_backoff)
        d.refreshes[2].callback(None)
        self.assertEqual((d.reachable, logs.count(d, "reachable again")), (True, 2))


class TlsOptionTests(unittest.TestCase):
    """The configuration refuses TLS options that would not be used as asked."""

    def load(self, **discovery: Any) -> Any:
        base = {"disk_cache": {"path": "/tmp/x"}, "model_provider": {"disk": {"base_path": "/tmp/m"}}}
        return load_config(dict(base, cluster={"secret": CLUSTER_SECRET, "discovery": discovery}), environ={})

    def test_config_checks(self) -> None:
        for kind in ("etcd", "consul"):
            cfg = self.load(type=kind, endpoints=["https://127.0.0.1:1", "127.0.0.1:2"], ca_cert=TLS["ca"],
                            client_cert=TLS["client_cert"], client_key=TLS["client_key"])
            self.assertEqual(cfg.cluster.discovery.ca_cert, TLS["ca"])
            for bad, key in (({"endpoints": ["http://127.0.0.1:1"], "ca_cert": TLS["ca"]}, "endpoints"),
                             ({"endpoints": ["https://127.0.0.1:1"], "client_cert": TLS["client_cert"]}, "client_key"),
                             ({"endpoints": ["https://127.0.0.1:1"], "client_key": TLS["client_key"]}, "client_key"),
                             ({"endpoints": ["https://127.0.0.1:1"], "ca_cert": "/nonexistent/ca.pem"}, "ca_cert")):
                with self.assertRaises(ConfigError) as caught:
                    self.load(type=kind, **bad)
                self.assertTrue(str(caught.exception).startswith(f"cluster.discovery.{key}:"), caught.exception)
