"""A model source that cannot be read at start: a disk base_path that does not exist, a bucket
that does not exist.  One log line says so, /readyz is not ready and says why, a request gets
UNAVAILABLE with that reason (it got TF Serving's 404 "Servable not found" before), and once
the source can be read the node is ready and serves, without a restart."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from twisted.internet import defer, reactor, task, threads
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from tests.clients import http, rest_predict
from tests.harness import shared
from tests.harness.node import InProcessNode, node_config
from tests.harness.servers import S3Server
from tests.test_faults import until
from tests.test_node import write_models
from tfscache.node.source import SourceMonitor
from tfscache.providers.disk import DiskModelProvider

BAD, GOOD = "model source ({kind}) cannot be read", "model source ({kind}) is readable again"


class LogLines:
    """The log lines of the SourceMonitor, as they come."""

    def __init__(self, test: unittest.TestCase) -> None:
        self.lines: list[str] = []
        globalLogPublisher.addObserver(self._observe)
        test.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace", "").endswith("SourceMonitor"):
            self.lines.append(event.get("log_format", "").split(":")[0])


class SourceMonitorTests(unittest.TestCase):
    """The re-check runs on the monitor's clock (a task.Clock here): nothing waits for time."""

    @defer.inlineCallbacks
    def test_missing_directory_then_created(self):  # type: ignore[no-untyped-def]
        base = os.path.join(tempfile.mkdtemp(prefix="tfscache-src-"), "models")
        clock = task.Clock()
        monitor = SourceMonitor(DiskModelProvider(base, reactor=reactor), interval=10.0, clock=clock, kind="disk")
        seen: list[str | None] = []
        changed: list[defer.Deferred[None]] = []

        def listener(problem: str | None) -> None:
            seen.append(problem)
            if changed:
                changed.pop().callback(None)

        monitor.subscribe(listener)
        logs = LogLines(self)
        monitor.startService()
        self.addCleanup(monitor.stopService)
        yield monitor.first_check()
        self.assertEqual(len(seen), 1)
        self.assertIn(base, seen[0])
        self.assertEqual(monitor.problem, seen[0])
        for _ in range(3):  # still missing: checked again, nothing new said
            yield monitor.check()
        self.assertEqual(len(seen), 1)
        self.assertEqual(len(logs.lines), 1)

        os.makedirs(base)
        back: defer.Deferred[None] = defer.Deferred()
        changed.append(back)
        clock.advance(10.0)
        yield back
        self.assertEqual(seen[1:], [None])
        self.assertIsNone(monitor.problem)
        self.assertEqual(logs.lines, [BAD, GOOD])


class MissingSourceNodeTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_disk_base_path_missing_at_start_then_created(self):  # type: ignore[no-untyped-def]
        base = os.path.join(tempfile.mkdtemp(prefix="tfscache-src-"), "models")
        logs = LogLines(self)
        node = InProcessNode(node_config(base, shared.backend(),
                                         model_provider={"check_interval_seconds": 0.2}))
        yield node.start()
        self.addCleanup(node.stop)
        self.assertEqual(logs.lines, [BAD])
        ready = yield http("GET", node.rest_url + "/readyz", timeout=10)
        self.assertEqual(ready.code, 503, ready.body)
        self.assertIn(base, ready.json()["provider"])
        reply = yield rest_predict(node.rest_url, "m0", [1.0])
        self.assertEqual(reply.code, 503, reply.body)  # was 404 "Servable not found"
        self.assertIn("model source cannot be read", reply.json()["error"])
        self.assertIn(base, reply.json()["error"])

        yield threads.deferToThread(shutil.copytree, shared.model_dir("m", write_models), base)

        @defer.inlineCallbacks
        def ready_now():  # type: ignore[no-untyped-def]
            reply = yield http("GET", node.rest_url + "/readyz", timeout=10)
            return reply.code == 200

        yield until(ready_now, "the node to be ready")
        reply = yield rest_predict(node.rest_url, "m0", [1.0])
        self.assertEqual(reply.code, 200, reply.body)
        self.assertEqual(logs.lines, [BAD, GOOD])

    @defer.inlineCallbacks
    def test_bucket_missing_at_start_then_created(self):  # type: ignore[no-untyped-def]
        s3 = yield threads.deferToThread(S3Server().start)
        self.addCleanup(s3.stop)
        logs = LogLines(self)
        cfg = node_config("", shared.backend(), model_provider={
            "type": "s3", "check_interval_seconds": 0.2,
            "s3": {"bucket": "no-such-bucket", "region": "us-east-1", "endpoint_url": s3.endpoint_url,
                   "access_key_id": s3.access_key, "secret_access_key": s3.secret_key}})
        del cfg["model_provider"]["disk"]
        node = InProcessNode(cfg)
        yield node.start()
        self.addCleanup(node.stop)
        self.assertEqual(logs.lines, [BAD])
        ready = yield http("GET", node.rest_url + "/readyz", timeout=10)
        self.assertEqual(ready.code, 503, ready.body)
        self.assertIn("no-such-bucket", ready.json()["provider"])
        reply = yield rest_predict(node.rest_url, "m0", [1.0])
        self.assertEqual(reply.code, 503, reply.body)
        self.assertIn("no-such-bucket", reply.json()["error"])

        yield threads.deferToThread(s3.boto3_client().create_bucket, Bucket="no-such-bucket")

        @defer.inlineCallbacks
        def ready_now():  # type: ignore[no-untyped-def]
            reply = yield http("GET", node.rest_url + "/readyz", timeout=10)
            return reply.code == 200

        yield until(ready_now, "the node to be ready")
        self.assertEqual(logs.lines, [BAD, GOOD])
