"""One node end to end: a real TF Serving backend (DevServer), a real disk source and cache,
the node on the test's reactor, and clients over real HTTP and gRPC."""

from __future__ import annotations

import json
import os
import tempfile
import urllib.request

from tensorflow_serving.apis import get_model_metadata_pb2
from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from tests.clients import GrpcClient, http, predict_request, rest_predict
from tests.harness import shared
from tests.harness.devserver import DevServer
from tests.harness.node import InProcessNode, node_config
from tfscache.devserver.models import set_load_delay, write_corrupt_model, write_half_plus_two
from tfscache.errors import Code, ServingError
from tfscache.modelspec import ModelId
from tfscache.node.manager import State

MODELS = 6


def coef(i: int, version: int) -> tuple[float, float]:
    return 1.0 + i, 10.0 * version


def backend_loads(backend: DevServer) -> dict[str, int]:
    with urllib.request.urlopen(backend.rest_url + "/devserver/loads", timeout=10) as resp:
        return json.load(resp)["loads"]


def write_models(path: str) -> None:
    for i in range(MODELS):
        for v in (1, 2):
            write_half_plus_two(path, f"m{i}", v, *coef(i, v))


class NodeTestCase(unittest.TestCase):
    """A DevServer and a model source shared by the test process; a fresh node per test."""

    timeout = 120
    backend: DevServer
    models: str

    def setUp(self) -> None:
        self.backend = shared.backend()
        self.models = shared.model_dir("m", write_models)

    @defer.inlineCallbacks
    def node(self, cache_dir: str | None = None, **overrides):  # type: ignore[no-untyped-def]
        cfg = node_config(self.models, self.backend, cache_dir, **overrides)
        node = InProcessNode(cfg)
        yield node.start()
        self.addCleanup(node.stop)
        return node

    def assertPrediction(self, reply, i: int, version: int, xs: list[float]) -> None:  # type: ignore[no-untyped-def]
        self.assertEqual(reply.code, 200, reply.body)
        a, b = coef(i, version)
        self.assertEqual(reply.json()["predictions"], [a * x + b for x in xs])


class CacheBehaviourTests(NodeTestCase):
    @defer.inlineCallbacks
    def test_miss_then_hit(self):  # type: ignore[no-untyped-def]
        node = yield self.node()
        before = backend_loads(self.backend).get("m0/2", 0)
        reply = yield rest_predict(node.rest_url, "m0", [1.0, 2.0])
        self.assertPrediction(reply, 0, 2, [1.0, 2.0])  # no version: the latest in the source
        self.assertEqual((node.cache.fetches, node.cache.loads), (1, 1))
        for _ in range(3):
            reply = yield rest_predict(node.rest_url, "m0", [3.0])
            self.assertPrediction(reply, 0, 2, [3.0])
        self.assertEqual((node.cache.fetches, node.cache.loads), (1, 1))
        self.assertEqual(backend_loads(self.backend).get("m0/2", 0), before + 1)
        hits = node.service.metrics.hits._value.get()
        self.assertEqual(hits, 3)

    @defer.inlineCallbacks
    def test_grpc_versions(self):  # type: ignore[no-untyped-def]
        node = yield self.node()
        client = GrpcClient(node.grpc_target)
        self.addCleanup(client.close)
        resp = yield client.predict("m1", [2.0], version=1)
        a, b = coef(1, 1)
        self.assertEqual(list(resp.outputs["y"].float_val), [a * 2.0 + b])
        self.assertEqual(resp.model_spec.version.value, 1)
        resp = yield client.predict("m1", [2.0])
        a, b = coef(1, 2)
        self.assertEqual(list(resp.outputs["y"].float_val), [a * 2.0 + b])
        self.assertEqual(resp.model_spec.version.value, 2)

    @defer.inlineCallbacks
    def test_lru_unload_order(self):  # type: ignore[no-untyped-def]
        node = yield self.node(serving={"max_models": 2, "eviction": "lru"})
        for name in ("m0", "m1", "m0", "m2"):  # m1 is least recently used when m2 needs room
            reply = yield rest_predict(node.rest_url, name, [1.0])
            self.assertEqual(reply.code, 200, reply.body)
        self.assertEqual([str(m) for m in node.cache.loaded()], ["m0/2", "m2/2"])
        self.assertEqual(node.cache.unloads, 1)
        self.assertEqual(node.service.backend.served(), {"m0": {2}, "m2": {2}})
        reply = yield rest_predict(node.rest_url, "m1", [1.0])  # comes back: m0 goes now
        self.assertPrediction(reply, 1, 2, [1.0])
        self.assertEqual([str(m) for m in node.cache.loaded()], ["m1/2", "m2/2"])
        self.assertEqual(node.cache.fetches, 3)  # m1 was still on disk

    @defer.inlineCallbacks
    def test_disk_eviction_deletes_whole_directories(self):  # type: ignore[no-untyped-def]
        probe = yield self.node()
        size = yield probe.cache.provider.version_size("m0", 2)
        yield probe.stop()
        cache_dir = tempfile.mkdtemp(prefix="tfscache-cache-")
        node = yield self.node(cache_dir, disk_cache={"capacity_bytes": int(size * 2.5)},
                               serving={"max_models": 1})
        for name in ("m0", "m1", "m2"):
            reply = yield rest_predict(node.rest_url, name, [1.0])
            self.assertEqual(reply.code, 200, reply.body)
        self.assertFalse(os.path.exists(os.path.join(cache_dir, "m0")))
        self.assertTrue(os.path.isdir(os.path.join(cache_dir, "m1", "2", "variables")))
        self.assertTrue(os.path.isdir(os.path.join(cache_dir, "m2", "2")))
        self.assertEqual(node.cache.disk.evictions, 1)
        self.assertLessEqual(node.cache.disk.used_bytes, int(size * 2.5))

    @defer.inlineCallbacks
    def test_restart_keeps_disk_cache(self):  # type: ignore[no-untyped-def]
        cache_dir = tempfile.mkdtemp(prefix="tfscache-cache-")
        first = yield self.node(cache_dir)
        reply = yield rest_predict(first.rest_url, "m3", [1.0], version=1)
        self.assertPrediction(reply, 3, 1, [1.0])
        yield first.stop()
        # a crash during a copy leaves a staging directory: it must not count as a model
        os.makedirs(os.path.join(cache_dir, "m3", ".tmp-2-crashed", "variables"))
        second = yield self.node(cache_dir)
        self.assertIn("m3/1", [str(m) for m in second.cache.disk.model_ids()])
        self.assertFalse(os.path.exists(os.path.join(cache_dir, "m3", ".tmp-2-crashed")))
        reply = yield rest_predict(second.rest_url, "m3", [1.0], version=1)
        self.assertPrediction(reply, 3, 1, [1.0])
        self.assertEqual((second.cache.fetches, second.cache.loads), (0, 1))

    @defer.inlineCallbacks
    def test_hundred_concurrent_requests_one_copy_one_load(self):  # type: ignore[no-untyped-def]
        # m4's latest version, in a source of its own whose load takes 3 s: every request
        # arrives while the model is still cold (100 misses, no hit), so they provably overlap
        # and share the one copy and the one load
        models = tempfile.mkdtemp(prefix="tfscache-hundred-")
        write_half_plus_two(models, "m4", 1, *coef(4, 1))
        set_load_delay(write_half_plus_two(models, "m4", 2, *coef(4, 2)), 3.0)
        # a gRPC call holds a worker thread while it waits for the load: one each
        node = InProcessNode(node_config(models, self.backend, listen={"grpc_threads": 64}))
        yield node.start()
        self.addCleanup(node.stop)
        before = backend_loads(self.backend).get("m4/2", 0)
        client = GrpcClient(node.grpc_target)
        self.addCleanup(client.close)
        calls = [rest_predict(node.rest_url, "m4", [float(i)]) for i in range(50)]
        calls += [client.predict("m4", [float(i)]) for i in range(50)]
        results = yield defer.gatherResults(calls, consumeErrors=True)
        a, b = coef(4, 2)
        for i, r in enumerate(results[:50]):
            self.assertPrediction(r, 4, 2, [float(i)])
        for i, r in enumerate(results[50:]):
            self.assertEqual(list(r.outputs["y"].float_val), [a * i + b])
        self.assertEqual((node.cache.fetches, node.cache.loads), (1, 1))
        self.assertEqual(backend_loads(self.backend).get("m4/2", 0), before + 1)
        metrics = node.service.metrics
        self.assertEqual((metrics.misses._value.get(), metrics.hits._value.get()), (100, 0))

    @defer.inlineCallbacks
    def test_slow_load_does_not_delay_warm_model(self):  # type: ignore[no-untyped-def]
        models = tempfile.mkdtemp(prefix="tfscache-slow-")
        write_half_plus_two(models, "warm", 1, 2.0, 1.0)
        set_load_delay(write_half_plus_two(models, "slow", 1, 3.0, 1.0), 5.0)
        cfg = node_config(models, self.backend)
        node = InProcessNode(cfg)
        yield node.start()
        self.addCleanup(node.stop)
        reply = yield rest_predict(node.rest_url, "warm", [1.0])
        self.assertEqual(reply.code, 200)
        slow = rest_predict(node.rest_url, "slow", [1.0])
        answered_while_loading = []
        for _ in range(10):
            reply = yield rest_predict(node.rest_url, "warm", [2.0])
            self.assertEqual(reply.json()["predictions"], [5.0])
            answered_while_loading.append(not slow.called)
        self.assertTrue(all(answered_while_loading), "warm requests waited for the slow load")
        reply = yield slow
        self.assertEqual(reply.json()["predictions"], [4.0])

    @defer.inlineCallbacks
    def test_model_in_flight_is_never_unloaded(self):  # type: ignore[no-untyped-def]
        node = yield self.node(serving={"max_models": 1, "capacity_wait_seconds": 0.5})
        mid = yield node.cache.resolve("m0", None)
        lease = yield node.cache.acquire(mid)
        reply = yield rest_predict(node.rest_url, "m1", [1.0])
        self.assertEqual(reply.code, 429, reply.body)
        self.assertIn("No room to load model m1", reply.json()["error"])
        self.assertEqual([str(m) for m in node.cache.loaded()], ["m0/2"])
        lease.release()
        reply = yield rest_predict(node.rest_url, "m1", [1.0])
        self.assertPrediction(reply, 1, 2, [1.0])
        self.assertEqual([str(m) for m in node.cache.loaded()], ["m1/2"])

    @defer.inlineCallbacks
    def test_slow_load_does_not_delay_a_cold_load_of_another_model(self):  # type: ignore[no-untyped-def]
        # TF Serving serialises config reloads (its reload call returns when the new model is
        # AVAILABLE), so C's load may wait for A's; tfscache must add nothing: C is copied and
        # handed to TF Serving while A still loads, and answers soon after A, not after another
        # slow load
        delay = 5.0
        models = tempfile.mkdtemp(prefix="tfscache-slowcold-")
        set_load_delay(write_half_plus_two(models, "sc-a", 1, 2.0, 1.0), delay)
        write_half_plus_two(models, "sc-c", 1, 3.0, 1.0)
        node = InProcessNode(node_config(models, self.backend))
        yield node.start()
        self.addCleanup(node.stop)
        a_mid, c_mid = ModelId("sc-a", 1), ModelId("sc-c", 1)
        seen: dict[str, float] = {}
        state_of_a_when_c_copied: list[object] = []
        c_when_a_loaded: list[object] = []

        def observe(event: dict) -> None:
            fmt = event.get("log_format", "")
            for what in ("fetched", "loaded"):
                if fmt.startswith(what + " model=") and event.get("model") in ("sc-a", "sc-c"):
                    seen[f"{what} {event['model']}"] = event["log_time"]
                    if (what, event["model"]) == ("fetched", "sc-a"):
                        # A goes on to LOADING in this same tick: C's request starts now
                        reactor.callLater(0, lambda: rest_predict(node.rest_url, "sc-c", [1.0]).chainDeferred(reply_c))
                    if (what, event["model"]) == ("fetched", "sc-c"):
                        state_of_a_when_c_copied.append(node.cache.entries[a_mid].state)
                    if (what, event["model"]) == ("loaded", "sc-a"):
                        c_entry = node.cache.entries[c_mid]
                        c_when_a_loaded.extend([c_entry.state, "sc-c" in node.service.backend.served()])

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        reply_c: defer.Deferred = defer.Deferred()
        replies = yield defer.gatherResults([rest_predict(node.rest_url, "sc-a", [1.0]), reply_c])
        self.assertEqual([r.json()["predictions"] for r in replies], [[3.0], [4.0]])
        self.assertEqual(state_of_a_when_c_copied, [State.LOADING])
        # by the time A is AVAILABLE, C's load is with TF Serving (or done), not held in tfscache
        self.assertIn(c_when_a_loaded[0], (State.LOADING, State.AVAILABLE))
        self.assertTrue(c_when_a_loaded[1])
        self.assertIn("loaded sc-c", seen)

    @defer.inlineCallbacks
    def test_lru_order_survives_a_restart(self):  # type: ignore[no-untyped-def]
        cache_dir = tempfile.mkdtemp(prefix="tfscache-cache-")
        first = yield self.node(cache_dir)
        sizes = {}
        for name in ("m0", "m1", "m2", "m3"):
            sizes[name] = yield first.cache.provider.version_size(name, 2)
        for name in ("m0", "m1", "m2", "m0"):  # m1 is the least recently used now
            reply = yield rest_predict(first.rest_url, name, [1.0])
            self.assertEqual(reply.code, 200, reply.body)
        yield first.stop()
        # room for m0, m2 and m3, not for m1 too: m3's copy must delete m1 and only m1
        capacity = sizes["m0"] + sizes["m2"] + sizes["m3"] + sizes["m1"] // 2
        second = yield self.node(cache_dir, disk_cache={"capacity_bytes": capacity})
        self.assertEqual([str(m) for m in second.cache.disk.model_ids()], ["m1/2", "m2/2", "m0/2"])
        reply = yield rest_predict(second.rest_url, "m3", [1.0])
        self.assertPrediction(reply, 3, 2, [1.0])
        self.assertEqual(second.cache.disk.evictions, 1)
        self.assertFalse(os.path.exists(os.path.join(cache_dir, "m1")))
        for name in ("m0", "m2", "m3"):
            self.assertTrue(os.path.isdir(os.path.join(cache_dir, name, "2")), name)

    @defer.inlineCallbacks
    def test_no_version_is_answered_by_the_leased_version(self):  # type: ignore[no-untyped-def]
        # the latest in the source is 1, but TF Serving also has 2 loaded (asked for explicitly
        # while the source had it): a call without a version must be answered by 1, which it
        # leased, not by 2 (TF Serving's highest loaded), which nobody holds
        import shutil

        models = tempfile.mkdtemp(prefix="tfscache-pin-")
        write_half_plus_two(models, "pin", 1, 2.0, 1.0)
        node = yield self.node(model_provider={"type": "disk", "disk": {"base_path": models},
                                               "listing_ttl_seconds": 0})
        client = GrpcClient(node.grpc_target)
        self.addCleanup(client.close)
        direct = GrpcClient(self.backend.grpc_target)
        self.addCleanup(direct.close)
        # only 1 loaded: a pinned call answers exactly as TF Serving answers the unpinned one
        ours = yield http("GET", node.rest_url + "/v1/models/pin/metadata")
        theirs = yield http("GET", self.backend.rest_url + "/v1/models/pin/metadata")
        self.assertEqual((ours.code, ours.body), (theirs.code, theirs.body))
        ours = yield client.predict("pin", [1.0])
        theirs = yield direct.predict("pin", [1.0])
        self.assertEqual(ours.SerializeToString(deterministic=True), theirs.SerializeToString(deterministic=True))
        ours = yield client.metadata("pin")
        theirs = yield direct.metadata("pin")
        self.assertEqual(ours.SerializeToString(deterministic=True), theirs.SerializeToString(deterministic=True))

        write_half_plus_two(models, "pin", 2, 3.0, 1.0)
        reply = yield rest_predict(node.rest_url, "pin", [1.0], version=2)
        self.assertEqual(reply.json()["predictions"], [4.0])
        shutil.rmtree(os.path.join(models, "pin", "2"))  # the source's latest is 1 again
        self.assertEqual(node.service.backend.served(), {"pin": {1, 2}})
        reply = yield rest_predict(node.rest_url, "pin", [1.0])
        self.assertEqual(reply.json()["predictions"], [3.0])  # version 1: 2 * 1 + 1
        reply = yield http("POST", node.rest_url + "/v1/models/pin:regress",
                           {"signature_name": "regress_x_to_y", "examples": [{"x": 1.0}]})
        self.assertEqual(reply.json(), {"results": [3.0]}, reply.body)
        reply = yield http("GET", node.rest_url + "/v1/models/pin/metadata")
        self.assertEqual(reply.json()["model_spec"]["version"], "1")
        resp = yield client.predict("pin", [1.0])
        self.assertEqual((list(resp.outputs["y"].float_val), resp.model_spec.version.value), ([3.0], 1))
        self.assertEqual(resp.model_spec.name, "pin")
        resp = yield client.metadata("pin")
        self.assertEqual(resp.model_spec.version.value, 1)
        # status is not pinned: without a version TF Serving lists every version, so do we
        ours = yield http("GET", node.rest_url + "/v1/models/pin")
        theirs = yield http("GET", self.backend.rest_url + "/v1/models/pin")
        self.assertEqual((ours.code, ours.body), (theirs.code, theirs.body))
        self.assertEqual(sorted(v["version"] for v in ours.json()["model_version_status"]), ["1", "2"])
        ours = yield client.status("pin")
        theirs = yield direct.status("pin")
        self.assertEqual(ours.SerializeToString(deterministic=True), theirs.SerializeToString(deterministic=True))
        self.assertEqual(sorted(v.version for v in ours.model_version_status), [1, 2])


class ModelPathTests(NodeTestCase):
    @defer.inlineCallbacks
    def test_tf_serving_is_sent_its_own_path_of_the_cache(self):  # type: ignore[no-untyped-def]
        # TF Serving's container mounts the cache volume elsewhere: a symlink stands for that mount
        root = tempfile.mkdtemp(prefix="tfscache-mounts-")
        cache_dir, seen_by_serving = os.path.join(root, "cache"), os.path.join(root, "models")
        os.mkdir(cache_dir)
        os.symlink(cache_dir, seen_by_serving)
        node = yield self.node(cache_dir, serving={"model_path": seen_by_serving})
        reply = yield rest_predict(node.rest_url, "m1", [1.0])
        self.assertPrediction(reply, 1, 2, [1.0])
        # the base_path in the model list sent to TF Serving: its path, not ours
        self.assertEqual(node.service.backend._desired["m1"][0], os.path.join(seen_by_serving, "m1"))
        self.assertTrue(os.path.isdir(os.path.join(cache_dir, "m1", "2")))  # copied where tfscache writes


class ErrorTests(NodeTestCase):
    @defer.inlineCallbacks
    def test_unknown_model(self):  # type: ignore[no-untyped-def]
        node = yield self.node()
        reply = yield rest_predict(node.rest_url, "nope", [1.0])
        self.assertEqual((reply.code, reply.json()), (404, {"error": "Servable not found for request: Latest(nope)"}))
        reply = yield rest_predict(node.rest_url, "m0", [1.0], version=7)
        self.assertEqual(reply.code, 404)
        self.assertEqual(reply.json()["error"], "Servable not found for request: Specific(m0, 7)")
        client = GrpcClient(node.grpc_target)
        self.addCleanup(client.close)
        err = yield self.assertFailure(client.predict("nope", [1.0]), ServingError)
        self.assertEqual(err.code, Code.NOT_FOUND)
        self.assertEqual(node.cache.entries, {})  # unknown names leave nothing behind

    @defer.inlineCallbacks
    def test_malformed_requests(self):  # type: ignore[no-untyped-def]
        node = yield self.node()
        for method, path, code in (("GET", "/v1/models", 400), ("POST", "/v1/models/m0:explode", 400),
                                   ("POST", "/v1/models/..:predict", 400),
                                   ("POST", "/v1/models/a%2F..%2Fb:predict", 400),
                                   ("POST", "/v1/models/m0/labels/stable:predict", 400)):
            reply = yield http(method, node.rest_url + path, {"instances": [1.0]})
            self.assertEqual(reply.code, code, (path, reply.body))
            self.assertIn("error", reply.json())
            self.assertEqual(reply.headers.getRawHeaders(b"content-type"), [b"application/json"])
        reply = yield http("POST", node.rest_url + "/v1/models/m0/labels/stable:predict", {"instances": [1.0]})
        # m0 declares no labels: TF Serving's answer for an unknown label
        self.assertEqual(reply.json()["error"], "Unrecognized servable version label: stable")
        # the backend's own INVALID_ARGUMENT passes through unchanged
        reply = yield http("POST", node.rest_url + "/v1/models/m0:predict", raw=b"{not json")
        self.assertEqual(reply.code, 400)
        self.assertIn("error", reply.json())
        self.assertFalse(os.listdir(node.cache.disk.root) == ["..", "a"])

    @defer.inlineCallbacks
    def test_backend_down_is_unavailable(self):  # type: ignore[no-untyped-def]
        from tests.harness.process import unused_port

        class Gone:
            grpc_target = f"127.0.0.1:{unused_port()}"
            rest_url = f"http://127.0.0.1:{unused_port()}"

        node = InProcessNode(node_config(self.models, Gone, serving={"load_timeout_seconds": 5}))
        yield node.start()
        self.addCleanup(node.stop)
        reply = yield rest_predict(node.rest_url, "m0", [1.0])
        self.assertEqual(reply.code, 503, reply.body)
        self.assertIn("error", reply.json())

    @defer.inlineCallbacks
    def test_load_timeout_is_deadline_exceeded_and_load_goes_on(self):  # type: ignore[no-untyped-def]
        models = tempfile.mkdtemp(prefix="tfscache-slow-")
        set_load_delay(write_half_plus_two(models, "slow2", 1, 3.0, 1.0), 3.0)
        node = InProcessNode(node_config(models, self.backend))
        yield node.start()
        self.addCleanup(node.stop)
        client = GrpcClient(node.grpc_target)
        self.addCleanup(client.close)
        err = yield self.assertFailure(client.predict("slow2", [1.0], timeout=1.0), ServingError)
        self.assertEqual(err.code, Code.DEADLINE_EXCEEDED)
        resp = yield client.predict("slow2", [1.0], timeout=60)  # the same load, not a new one
        self.assertEqual(list(resp.outputs["y"].float_val), [4.0])
        self.assertEqual(node.cache.loads, 1)

    @defer.inlineCallbacks
    def test_broken_model_fails_clearly_and_backs_off(self):  # type: ignore[no-untyped-def]
        models = tempfile.mkdtemp(prefix="tfscache-broken-")
        write_corrupt_model(models, "broken", 1)
        write_half_plus_two(models, "fine", 1, 1.0, 1.0)
        node = InProcessNode(node_config(models, self.backend))
        yield node.start()
        self.addCleanup(node.stop)
        reply = yield rest_predict(node.rest_url, "broken", [1.0])
        self.assertGreaterEqual(reply.code, 400)
        self.assertIn("broken", reply.json()["error"])
        failures = node.service.metrics.loads.labels(outcome="error")._value.get()
        self.assertEqual(failures, 1)
        reply = yield rest_predict(node.rest_url, "broken", [1.0])
        self.assertIn("broken", reply.json()["error"])
        self.assertEqual(node.service.metrics.loads.labels(outcome="error")._value.get(), 1)  # backed off
        reply = yield rest_predict(node.rest_url, "fine", [1.0])
        self.assertEqual(reply.json()["predictions"], [2.0])

    @defer.inlineCallbacks
    def test_load_timeout_without_client_deadline(self):  # type: ignore[no-untyped-def]
        # serving.load_timeout_seconds bounds a request that has no deadline of its own: 504 /
        # DEADLINE_EXCEEDED; that is not the model's fault, so it is not negatively cached
        # (failure_backoff is 30 s): the load goes on in TF Serving and a later request gets it
        models = tempfile.mkdtemp(prefix="tfscache-lt-")
        set_load_delay(write_half_plus_two(models, "lt-slow", 1, 3.0, 1.0), 4.0)
        node = InProcessNode(node_config(models, self.backend, serving={"load_timeout_seconds": 1.5}))
        yield node.start()
        self.addCleanup(node.stop)
        before = backend_loads(self.backend).get("lt-slow/1", 0)
        client = GrpcClient(node.grpc_target)
        self.addCleanup(client.close)
        rest = rest_predict(node.rest_url, "lt-slow", [1.0])
        grpc_call = client.predict("lt-slow", [1.0], timeout=None)  # no gRPC deadline at all
        reply = yield rest
        self.assertEqual(reply.code, 504, reply.body)
        self.assertIn("lt-slow", reply.json()["error"])
        err = yield self.assertFailure(grpc_call, ServingError)
        self.assertEqual(err.code, Code.DEADLINE_EXCEEDED)
        entry = node.cache.entries[ModelId("lt-slow", 1)]
        if entry.pending is not None and not entry.pending.done:  # the bring-up's own timeout
            yield entry.pending.observe().addErrback(lambda f: f.trap(ServingError))
        self.assertNotEqual(entry.state, State.FAILED)
        self.assertIsNone(entry.failure)
        self.assertEqual(node.service.metrics.load_failures._value.get(), 0)
        # try again (each try is bounded by the 1.5 s): until the backend's load is done, only
        # DEADLINE_EXCEEDED, never a remembered failure; then the answer
        for _ in range(10):
            reply = yield rest_predict(node.rest_url, "lt-slow", [1.0])
            if reply.code != 504:
                break
        self.assertEqual(reply.code, 200, reply.body)
        self.assertEqual(reply.json()["predictions"], [4.0])
        self.assertEqual(backend_loads(self.backend).get("lt-slow/1", 0), before + 1)

    @defer.inlineCallbacks
    def test_grpc_unknown_version_label(self):  # type: ignore[no-untyped-def]
        node = yield self.node()
        client = GrpcClient(node.grpc_target)
        self.addCleanup(client.close)
        req = predict_request("m0", [1.0])
        req.model_spec.version_label = "stable"
        err = yield self.assertFailure(client.call(client.predictions.Predict, req), ServingError)
        self.assertEqual(err.code, Code.INVALID_ARGUMENT)
        self.assertEqual(err.message, "Unrecognized servable version label: stable")
        meta = get_model_metadata_pb2.GetModelMetadataRequest()
        meta.model_spec.name, meta.model_spec.version_label = "m0", "canary"
        meta.metadata_field.append("signature_def")
        err = yield self.assertFailure(client.call(client.predictions.GetModelMetadata, meta), ServingError)
        self.assertEqual(err.code, Code.INVALID_ARGUMENT)
        self.assertIn("canary", err.message)
        self.assertEqual((node.cache.entries, node.cache.fetches), ({}, 0))  # nothing copied
