"""The DevServer behaves like TF Serving where the cache relies on it: checked with the official
client against predictions computed directly with TensorFlow, and ModelService semantics."""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import model_management_pb2
from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.clients import GrpcClient, http, predict_request
from tests.harness import shared
from tfscache.devserver.models import hold_load, release_load, set_load_delay, write_corrupt_model, write_half_plus_two
from tfscache.errors import Code, ServingError

AVAILABLE, END = 30, 50


def reload_request(models: dict[str, str], specific: dict[str, list[int]] | None = None) -> Any:
    req = model_management_pb2.ReloadConfigRequest()
    for name, base in models.items():
        mc = req.config.model_config_list.config.add(name=name, base_path=base, model_platform="tensorflow")
        if specific and name in specific:
            mc.model_version_policy.specific.versions.extend(specific[name])
    return req


class DevServerTests(unittest.TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.backend = shared.backend()
        self.client = GrpcClient(self.backend.grpc_target)
        self.addCleanup(self.client.close)
        self.base = tempfile.mkdtemp(prefix="tfscache-devserver-")

    def reload(self, models: dict[str, str], specific: dict[str, list[int]] | None = None,
               timeout: float = 60) -> defer.Deferred[Any]:
        return self.client.call(self.client.models.HandleReloadConfigRequest,
                                reload_request(models, specific), timeout=timeout)

    @defer.inlineCallbacks
    def versions(self, name: str):  # type: ignore[no-untyped-def]
        resp = yield self.client.status(name)
        return {s.version: s.state for s in resp.model_version_status}

    @defer.inlineCallbacks
    def test_predictions_equal_tensorflow(self):  # type: ignore[no-untyped-def]
        path = write_half_plus_two(self.base, "hp", 1, 0.75, -3.0)
        resp = yield self.reload({"hp": os.path.join(self.base, "hp")})
        self.assertEqual(resp.status.error_code, 0)
        xs = [0.0, 1.5, -2.25, 1e6]
        expected = tf.saved_model.load(path, tags=["serve"]).signatures["serving_default"](
            x=tf.constant(xs))["y"].numpy().tolist()
        got = yield self.client.predict("hp", xs)
        self.assertEqual(list(got.outputs["y"].float_val), expected)
        self.assertEqual((got.model_spec.name, got.model_spec.version.value), ("hp", 1))
        reply = yield http("POST", self.backend.rest_url + "/v1/models/hp:predict", {"instances": xs})
        self.assertEqual(reply.json()["predictions"], [float(str(np.float32(v))) for v in expected])
        # two inputs, two outputs: row format gives one object per instance
        reply = yield http("POST", self.backend.rest_url + "/v1/models/hp:predict", {
            "signature_name": "two_inputs", "instances": [{"x": 1.0, "z": [1.0, 2.0]}]})
        self.assertEqual(reply.json(), {"predictions": [{"y": -2.25, "w": [-2.25, -1.5]}]})
        reply = yield http("POST", self.backend.rest_url + "/v1/models/hp:predict", {
            "signature_name": "two_inputs", "inputs": {"x": [1.0], "z": [[1.0, 2.0]]}})
        self.assertEqual(reply.json(), {"outputs": {"y": [-2.25], "w": [[-2.25, -1.5]]}})

    @defer.inlineCallbacks
    def test_reload_replaces_the_list_and_end_after_unload(self):  # type: ignore[no-untyped-def]
        for name in ("ra", "rb"):
            write_half_plus_two(self.base, name, 1)
        yield self.reload({n: os.path.join(self.base, n) for n in ("ra", "rb")})
        self.assertEqual((yield self.versions("ra")), {1: AVAILABLE})
        yield self.reload({"rb": os.path.join(self.base, "rb")})  # ra left out: unloaded
        while (yield self.versions("ra")) != {1: END}:  # polled: bounded by the test's timeout
            yield threads.deferToThread(time.sleep, 0.05)
        err = yield self.assertFailure(self.client.predict("ra", [1.0]), ServingError)
        self.assertEqual((err.code, err.message), (Code.NOT_FOUND, "Servable not found for request: Latest(ra)"))
        err = yield self.assertFailure(self.client.status("never-configured"), ServingError)
        self.assertEqual(err.code, Code.NOT_FOUND)

    @defer.inlineCallbacks
    def test_new_version_of_known_name_is_not_waited_for(self):  # type: ignore[no-untyped-def]
        write_half_plus_two(self.base, "nv", 1, 1.0, 0.0)
        base = {"nv": os.path.join(self.base, "nv")}
        yield self.reload(base, {"nv": [1]})
        v2 = write_half_plus_two(self.base, "nv", 2, 2.0, 0.0)
        hold_load(v2)  # version 2's load cannot end before release_load
        # a reload that waited for version 2 would run into its deadline instead of returning
        yield self.reload(base, {"nv": [1, 2]}, timeout=30)
        versions = yield self.versions("nv")
        self.assertEqual(versions.get(1), AVAILABLE)
        self.assertNotEqual(versions.get(2), AVAILABLE, "the reload waited for a new version")
        release_load(v2)
        while (yield self.versions("nv")).get(2) != AVAILABLE:  # polled: bounded by the test's timeout
            yield threads.deferToThread(time.sleep, 0.05)
        got = yield self.client.predict("nv", [3.0])  # latest = highest AVAILABLE
        self.assertEqual((list(got.outputs["y"].float_val), got.model_spec.version.value), ([6.0], 2))

    @defer.inlineCallbacks
    def test_new_name_is_waited_for(self):  # type: ignore[no-untyped-def]
        set_load_delay(write_half_plus_two(self.base, "slowname", 1), 1.0)
        yield self.reload({"slowname": os.path.join(self.base, "slowname")})
        self.assertEqual((yield self.versions("slowname")), {1: AVAILABLE})

    @defer.inlineCallbacks
    def test_corrupt_model_ends_with_an_error(self):  # type: ignore[no-untyped-def]
        write_corrupt_model(self.base, "bad", 1)
        resp = yield self.reload({"bad": os.path.join(self.base, "bad")})
        self.assertNotEqual(resp.status.error_code, 0)
        self.assertIn("bad", resp.status.error_message)
        status = yield self.client.status("bad")
        st = status.model_version_status[0]
        self.assertEqual((st.version, st.state), (1, END))
        self.assertIn("bad", st.status.error_message)

    @defer.inlineCallbacks
    def test_rest_errors_and_codes(self):  # type: ignore[no-untyped-def]
        write_half_plus_two(self.base, "re", 1)
        yield self.reload({"re": os.path.join(self.base, "re")})
        base = self.backend.rest_url
        cases = [
            ("GET", "/v1/models", None, 400),
            ("GET", "/v1/models/re/labels/nope", None, 400),
            ("POST", "/v1/models/re/versions/3:predict", {"instances": [1.0]}, 404),
            ("POST", "/v1/models/re:predict", {"instances": [1.0], "inputs": [1.0]}, 400),
            ("POST", "/v1/models/re:classify", {"signature_name": "serving_default", "examples": [{"x": 1.0}]}, 400),
        ]
        for method, path, body, code in cases:
            reply = yield http(method, base + path, body)
            self.assertEqual(reply.code, code, (path, reply.body))
            self.assertIn("error", reply.json())
        reply = yield http("GET", base + "/V1/MODELS/re")
        self.assertEqual(reply.json(), {"model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]})
        reply = yield http("POST", base + "/v1/models/re:predict", raw=b'{"instances": [NaN, Infinity]}')
        self.assertEqual(reply.code, 200)
        self.assertIn(b"NaN", reply.body)

    @defer.inlineCallbacks
    def test_grpc_errors(self):  # type: ignore[no-untyped-def]
        write_half_plus_two(self.base, "ge", 1)
        yield self.reload({"ge": os.path.join(self.base, "ge")})
        req = predict_request("ge", [1.0])
        req.model_spec.version_label = "canary"
        err = yield self.assertFailure(self.client.call(self.client.predictions.Predict, req), ServingError)
        self.assertEqual(err.code, Code.INVALID_ARGUMENT)
        self.assertIn("Unrecognized servable version label: canary", err.message)
        err = yield self.assertFailure(self.client.predict("ge", [1.0], version=5), ServingError)
        self.assertEqual(err.message, "Servable not found for request: Specific(ge, 5)")


class ServableManagerTests(unittest.TestCase):
    """The DevServer's ModelService semantics in-process, where a race can be forced."""

    timeout = 120

    def setUp(self) -> None:
        from tfscache.devserver.servables import ServableManager

        self.base = tempfile.mkdtemp(prefix="tfscache-servables-")
        self.manager = ServableManager(poll_wait=0)
        self.addCleanup(self.manager.stop)

    def config(self, models: dict[str, str], labels: dict[str, dict[str, int]] | None = None) -> Any:
        req = reload_request(models)
        for mc in req.config.model_config_list.config:
            mc.version_labels.update((labels or {}).get(mc.name, {}))
        return req.config

    def reload(self, models: dict[str, str], labels: dict[str, dict[str, int]] | None = None) -> Any:
        return threads.deferToThread(self.manager.reload, self.config(models, labels), time.monotonic() + 60)

    @defer.inlineCallbacks
    def test_readded_while_unloading_is_loaded_again(self):  # type: ignore[no-untyped-def]
        write_half_plus_two(self.base, "race", 1)
        models = {"race": os.path.join(self.base, "race")}
        yield self.reload(models)

        def unload_and_readd() -> None:
            # the unload's thread cannot finish before the model is asked for again: it needs
            # the lock held here (an RLock; the second reload's wait releases it)
            with self.manager.lock:
                self.manager.reload(self.config({}), None)
                self.assertEqual(self.manager.versions[("race", 1)].state, 40)  # UNLOADING
                self.manager.reload(self.config(models), time.monotonic() + 60)

        yield threads.deferToThread(unload_and_readd)
        self.assertEqual(self.manager.resolve("race", None, None).state, AVAILABLE)

    @defer.inlineCallbacks
    def test_a_label_must_name_an_available_version(self):  # type: ignore[no-untyped-def]
        write_half_plus_two(self.base, "lb", 1)
        models = {"lb": os.path.join(self.base, "lb")}
        err = yield self.assertFailure(self.reload(models, {"lb": {"stable": 2}}), ServingError)
        self.assertEqual(err.code, Code.FAILED_PRECONDITION)
        self.assertIn("Request to assign label to version 2 of model lb", err.message)
        self.assertEqual(self.manager.resolve("lb", None, None).version, 1)  # the list applied
        yield self.reload(models, {"lb": {"stable": 1}})
        self.assertEqual(self.manager.resolve("lb", None, "stable").version, 1)


class StartUpConfigTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_a_model_that_fails_at_start_up_does_not_stop_the_server(self):  # type: ignore[no-untyped-def]
        from tests.harness.devserver import DevServer

        base = tempfile.mkdtemp(prefix="tfscache-startup-")
        write_corrupt_model(base, "bad", 1)
        write_half_plus_two(base, "good", 1)
        config = ("model_config_list { "
                  + " ".join(f'config {{ name: "{n}" base_path: "{os.path.join(base, n)}" model_platform: '
                             f'"tensorflow" }}' for n in ("bad", "good")) + " }\n")
        server = yield threads.deferToThread(DevServer(model_config=config).start)
        self.addCleanup(server.stop)
        client = GrpcClient(server.grpc_target)
        self.addCleanup(client.close)
        got = yield client.predict("good", [2.0])
        self.assertEqual(list(got.outputs["y"].float_val), [3.0])
        status = yield client.status("bad")
        self.assertEqual(status.model_version_status[0].state, END)


class PackagingTests(unittest.TestCase):
    def test_the_devserver_extra_brings_what_the_devserver_imports(self) -> None:
        """``pip install 'tfscache[devserver]'`` then ``tfscache-devserver``: every distribution
        the DevServer imports from is a requirement of tfscache, of its ``devserver`` extra, or
        a dependency of one of those (TensorFlow comes with ``tensorflow-serving-api``)."""
        import ast
        import sys
        from importlib import metadata

        from packaging.requirements import Requirement
        from packaging.utils import canonicalize_name

        def requirements(dist: str, extra: str | None = None) -> set[str]:
            out = set()
            for line in metadata.requires(dist) or ():
                req = Requirement(line)
                env = {"extra": extra or ""}
                if req.marker is None or req.marker.evaluate(env):
                    out.add(canonicalize_name(req.name))
            return out

        closure = requirements("tfscache", "devserver")
        self.assertIn("tensorflow-serving-api", closure)
        todo = list(closure)
        while todo:
            try:
                more = requirements(todo.pop()) - closure
            except metadata.PackageNotFoundError:
                continue
            closure |= more
            todo.extend(more)
        providers = metadata.packages_distributions()
        here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tfscache", "devserver")
        imported = set()
        for f in os.listdir(here):
            if f.endswith(".py"):
                with open(os.path.join(here, f)) as fh:
                    for node in ast.walk(ast.parse(fh.read())):
                        if isinstance(node, ast.Import):
                            imported |= {a.name.split(".")[0] for a in node.names}
                        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                            imported.add(node.module.split(".")[0])
        third_party = imported - set(sys.stdlib_module_names) - {"__future__", "tfscache"}
        self.assertIn("tensorflow_serving", third_party)
        for module in sorted(third_party):
            names = {canonicalize_name(module)} | {canonicalize_name(d) for d in providers.get(module, ())}
            self.assertTrue(names & closure, f"{module} ({names}) is not brought by tfscache[devserver]")
