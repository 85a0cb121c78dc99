"""GCSModelProvider against fake-gcs-server (built from its Go module at a pinned release by
tests/harness/build_go_servers.sh), started by the test process: the object-store cases, plus
GCS's own credentials and config.

fake-gcs-server checks no credentials and has no IAM, so "bad credentials" here are key files
that cannot be used (what the client itself refuses before any request), and the permission
denial is GCS's own 403 answer, as google-cloud-storage raises it, through the provider's
error mapping."""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.harness import shared
from tests.harness.servers import FakeGCSServer, binary_path
from tests.objectstore_cases import ObjectStoreCases
from tfscache.errors import Code, ServingError

BAD_KEY = "-----BEGIN PRIVATE KEY-----\nTFSCACHEnotAkeyZq8vT3kLp0sXw7yR2mN5cB1\n-----END PRIVATE KEY-----\n"


def fake_gcs() -> FakeGCSServer:
    """One fake-gcs-server for this test module; restarted, never replaced, by tests."""
    try:
        binary_path("fake-gcs-server")
    except RuntimeError as e:
        raise unittest.SkipTest(str(e))
    return shared.shared("fake-gcs", lambda: FakeGCSServer().start(), lambda s: s.stop())


class GCSProviderTests(ObjectStoreCases, unittest.TestCase):
    label = "GCS"
    container = "models-under-test"
    where = f"GCS bucket '{container}'"

    def setUp(self) -> None:
        self.gcs = fake_gcs()
        self.server_restarted()
        super().setUp()

    def server_restarted(self) -> None:
        self.client = self.gcs.client()
        self.bucket = self.client.bucket(self.container)
        if not self.bucket.exists():
            self.client.create_bucket(self.container)

    def server(self) -> FakeGCSServer:
        return self.gcs

    def make_provider(self, **kw: Any) -> Any:
        from tfscache.providers.gcs import GCSModelProvider

        args: dict[str, Any] = dict(endpoint_url=self.gcs.endpoint_url, anonymous=True, retry_timeout=3.0,
                                    reactor=reactor)
        args.update(kw)
        return GCSModelProvider(args.pop("bucket", self.container), args.pop("prefix", self.prefix), **args)

    def upload(self, key: str, body: bytes, blocks: bool = False) -> None:
        blob = self.bucket.blob(f"{self.prefix}/{key}")
        if blocks:  # a resumable upload in chunks
            blob.chunk_size = 4 * 1024 * 1024
        blob.upload_from_string(body)

    def key_file(self) -> str:
        path = os.path.join(self.cache, "..", f"{os.path.basename(self.cache)}-key.json")
        with open(path, "w") as f:
            json.dump({"type": "service_account", "project_id": "p", "private_key_id": "k",
                       "private_key": BAD_KEY, "client_email": "tfscache@p.iam.gserviceaccount.com",
                       "client_id": "1", "token_uri": "http://127.0.0.1:9/token"}, f)
        self.addCleanup(os.unlink, path)
        return path

    def secrets(self) -> list[str]:
        return ["TFSCACHEnotAkeyZq8vT3kLp0sXw7yR2mN5cB1"]

    def bad_credentials(self, **kw: Any) -> Any:
        return self.make_provider(anonymous=False, credentials_file=self.key_file(), **kw)

    def denied_provider(self, **kw: Any) -> Any:
        raise unittest.SkipTest("fake-gcs-server has no IAM: test_a_403_is_permission_denied maps GCS's answer")

    # -- GCS's own -------------------------------------------------------------------------------
    @defer.inlineCallbacks
    def test_a_403_is_permission_denied(self):  # type: ignore[no-untyped-def]
        from google.api_core import exceptions as gx

        p = self.provider()
        yield p.check()
        forbidden = gx.from_http_status(
            403, "tfscache@p.iam.gserviceaccount.com does not have storage.objects.get access to the "
            "Google Cloud Storage object.")
        err = p._error(forbidden, "pol", 1, "copying")
        self.assertEqual(err.code, Code.PERMISSION_DENIED)
        self.assertIn("model pol version 1", err.message)
        self.assertIn(self.where, err.message)
        self.assertIn("denied", err.message)
        err = p._error(gx.RetryError("gave up", cause=gx.from_http_status(503, "busy")), "pol", 1, "copying")
        self.assertEqual(err.code, Code.UNAVAILABLE)

    @defer.inlineCallbacks
    def test_listed_md5_and_crc32c(self):  # type: ignore[no-untyped-def]
        import hashlib

        import google_crc32c

        body = os.urandom(100_000)
        self.upload("sum/1/saved_model.pb", body)
        p = self.provider()
        objects = yield p._in_thread(p._objects, p._key_prefix("sum", 1))
        self.assertEqual(objects[0].md5, hashlib.md5(body).digest())
        self.assertEqual(objects[0].crc32c, google_crc32c.value(body).to_bytes(4, "big"))
        yield p.fetch("sum", 1, os.path.join(self.cache, "sum", "1"))

    @defer.inlineCallbacks
    def test_check_and_a_missing_bucket(self):  # type: ignore[no-untyped-def]
        yield self.provider().check()
        p = self.provider(bucket="no-such-bucket")
        for d in (p.check(), p.list_versions("m")):
            err = yield self.assertFailure(d, ServingError)
            self.assertEqual(err.code, Code.UNAVAILABLE, err.message)
            self.assertIn("does not exist", err.message)
            self.assertIn("no-such-bucket", err.message)

    @defer.inlineCallbacks
    def test_from_config(self):  # type: ignore[no-untyped-def]
        from tfscache.config import ConfigError, load_config
        from tfscache.service import make_provider

        cfg = load_config({
            "disk_cache": {"path": self.cache},
            "model_provider": {
                "type": "gcs", "listing_ttl_seconds": 1.5, "fetch_timeout_seconds": 33,
                "gcs": {"bucket": self.container, "prefix": self.prefix, "anonymous": True,
                        "endpoint_url": self.gcs.endpoint_url, "max_concurrency": 3,
                        "chunk_size_bytes": "6MiB"},
            },
        }, environ={})
        p: Any = make_provider(cfg, reactor)
        self.addCleanup(p.close)
        self.assertEqual((p.kind, p.bucket, p.prefix, p.max_concurrency, p.multipart_threshold),
                         ("gcs", self.container, self.prefix + "/", 3, 6 * 1024 * 1024))
        self.assertEqual((p.listings.ttl, p.fetch_timeout), (1.5, 33))
        self.upload("cfg/5/saved_model.pb", b"x")
        self.assertEqual((yield p.list_versions("cfg")), [5])
        with self.assertRaises(ConfigError) as e:
            load_config({"disk_cache": {"path": self.cache},
                         "model_provider": {"type": "gcs", "gcs": {}}}, environ={})
        self.assertIn("model_provider.gcs.bucket", str(e.exception))
