"""AzureBlobModelProvider against Azurite (Microsoft's emulator, from npm), started by the test
process: the object-store cases, plus Azure's own credentials (connection string, SAS token,
account key) and its config."""

from __future__ import annotations

import datetime
import os
import uuid
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.harness import shared
from tests.harness.servers import AzuriteServer, azurite_path
from tests.objectstore_cases import ObjectStoreCases
from tfscache.errors import Code, ServingError

WRONG_KEY = "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3Jvbmc="


def azurite() -> AzuriteServer:
    """One Azurite for this test module; restarted, never replaced, by tests."""
    try:
        azurite_path()
    except RuntimeError as e:
        raise unittest.SkipTest(str(e))
    return shared.shared("azurite", lambda: AzuriteServer().start(), lambda s: s.stop())


class AzureProviderTests(ObjectStoreCases, unittest.TestCase):
    label = "Azure"
    container = "models-under-test"
    where = f"Azure container '{container}'"

    def setUp(self) -> None:
        self.azurite = azurite()
        self.server_restarted()
        super().setUp()

    def server_restarted(self) -> None:
        self.service = self.azurite.service_client()
        try:
            self.service.create_container(self.container)
        except Exception as e:
            if "ContainerAlreadyExists" not in str(e):
                raise
        self.blobs = self.service.get_container_client(self.container)

    def server(self) -> AzuriteServer:
        return self.azurite

    def make_provider(self, **kw: Any) -> Any:
        from tfscache.providers.azure import AzureBlobModelProvider

        args: dict[str, Any] = dict(account_url=self.azurite.account_url,
                                    account_key=self.azurite.account_key, max_attempts=2, reactor=reactor)
        args.update(kw)
        return AzureBlobModelProvider(args.pop("container", self.container), args.pop("prefix", self.prefix), **args)

    def upload(self, key: str, body: bytes, blocks: bool = False) -> None:
        blob = self.blobs.get_blob_client(f"{self.prefix}/{key}")
        if blocks:  # Put Block + Put Block List: no Content-MD5 for the whole blob
            blob.upload_blob(body, overwrite=True, max_concurrency=2)
        else:
            blob.upload_blob(body, overwrite=True)

    def secrets(self) -> list[str]:
        return [self.azurite.account_key, WRONG_KEY] + getattr(self, "_sas", [])

    def bad_credentials(self, **kw: Any) -> Any:
        return self.make_provider(account_key=WRONG_KEY, **kw)

    def sas(self, **permissions: bool) -> str:
        from azure.storage.blob import ContainerSasPermissions, generate_container_sas

        token = generate_container_sas(
            self.azurite.account, self.container, account_key=self.azurite.account_key,
            permission=ContainerSasPermissions(**permissions),
            expiry=datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1))
        self._sas = getattr(self, "_sas", []) + [token]
        return token

    def denied_provider(self, **kw: Any) -> Any:
        # a SAS token that may list the container but not read its blobs
        return self.make_provider(account_key=None, sas_token=self.sas(list=True), **kw)

    # -- Azure's own ---------------------------------------------------------------------------
    @defer.inlineCallbacks
    def test_listed_content_md5_is_checked(self):  # type: ignore[no-untyped-def]
        body = os.urandom(100_000)
        self.upload("md5/1/saved_model.pb", body)
        p = self.provider()
        objects = yield p._in_thread(p._objects, p._key_prefix("md5", 1))
        self.assertEqual(len(objects), 1)
        import hashlib

        self.assertEqual(objects[0].md5, hashlib.md5(body).digest())  # Put Blob: Azure has its MD5
        yield p.fetch("md5", 1, os.path.join(self.cache, "md5", "1"))

    @defer.inlineCallbacks
    def test_connection_string_and_sas_token(self):  # type: ignore[no-untyped-def]
        self.upload("cs/4/saved_model.pb", b"pb")
        for p in (self.provider(account_url=None, account_key=None,
                                connection_string=self.azurite.connection_string),
                  self.provider(account_key=None, sas_token=self.sas(list=True, read=True))):
            self.assertEqual((yield p.list_versions("cs")), [4])
            self.assertEqual((yield p.fetch("cs", 4, os.path.join(self.cache, f"cs-{uuid.uuid4().hex}", "4"))), 2)
            yield p.check()
            text = self.log_text() + repr(p)
            self.assertIn("Azure model source", text)
            for secret in self.secrets():
                self.assertNotIn(secret, text)

    @defer.inlineCallbacks
    def test_check_and_a_missing_container(self):  # type: ignore[no-untyped-def]
        yield self.provider().check()
        p = self.provider(container="no-such-container")
        for d in (p.check(), p.list_versions("m")):
            err = yield self.assertFailure(d, ServingError)
            self.assertEqual(err.code, Code.UNAVAILABLE, err.message)
            self.assertIn("does not exist", err.message)
            self.assertIn("no-such-container", err.message)

    def test_one_credential_at_most(self) -> None:
        from tfscache.providers.azure import AzureBlobModelProvider, account_name

        self.assertRaises(ValueError, AzureBlobModelProvider, "c", account_url="https://a.blob.core.windows.net",
                          sas_token="x", account_key="y", reactor=reactor)
        self.assertRaises(ValueError, AzureBlobModelProvider, "c", reactor=reactor)  # no URL, no connection string
        self.assertEqual(account_name("https://acct.blob.core.windows.net"), "acct")
        self.assertEqual(account_name("http://127.0.0.1:10000/devstoreaccount1"), "devstoreaccount1")

    @defer.inlineCallbacks
    def test_from_config(self):  # type: ignore[no-untyped-def]
        from tfscache.config import load_config
        from tfscache.service import make_provider

        cfg = load_config({
            "disk_cache": {"path": self.cache},
            "model_provider": {
                "type": "azure", "listing_ttl_seconds": 1.5, "fetch_timeout_seconds": 33,
                "azure": {"container": self.container, "prefix": self.prefix,
                          "account_url": self.azurite.account_url, "account_key": self.azurite.account_key,
                          "max_concurrency": 3, "chunk_size_bytes": "6MiB"},
            },
        }, environ={})
        p: Any = make_provider(cfg, reactor)
        self.addCleanup(p.close)
        self.assertEqual((p.kind, p.container, p.prefix, p.max_concurrency, p.multipart_threshold),
                         ("azure", self.container, self.prefix + "/", 3, 6 * 1024 * 1024))
        self.assertEqual((p.listings.ttl, p.fetch_timeout), (1.5, 33))
        self.upload("cfg/5/saved_model.pb", b"x")
        self.assertEqual((yield p.list_versions("cfg")), [5])
