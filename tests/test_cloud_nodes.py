"""A node serving from Azure Blob Storage (Azurite) and from GCS (fake-gcs-server): switching
``model_provider.type`` is all it takes, zero-padded version directories included."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.clients import GrpcClient, rest_predict
from tests.harness import shared
from tests.harness.node import InProcessNode, node_config
from tests.test_azure_provider import azurite
from tests.test_gcs_provider import fake_gcs
from tfscache.devserver.models import write_half_plus_two
from tfscache.errors import Code, ServingError


def model_files() -> dict[str, bytes]:
    """tenant-a versions 1 and 2 (2 in a zero-padded directory, 00000002/), as object keys."""
    local = tempfile.mkdtemp(prefix="tfscache-cloud-src-")
    write_half_plus_two(local, "tenant-a", 1, 2.0, 1.0)
    write_half_plus_two(local, "tenant-a", 2, 3.0, 1.0)
    os.rename(os.path.join(local, "tenant-a", "2"), os.path.join(local, "tenant-a", "00000002"))
    return shared.as_objects(local)


class CloudNodeTests(unittest.TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def serve(self, provider: dict[str, Any]):  # type: ignore[no-untyped-def]
        backend = shared.backend()
        cfg = node_config(tempfile.mkdtemp(), backend, model_provider=provider)
        del cfg["model_provider"]["disk"]
        node = InProcessNode(cfg)
        yield node.start()
        self.addCleanup(node.stop)
        reply = yield rest_predict(node.rest_url, "tenant-a", [2.0])  # latest: 2, from 00000002/
        self.assertEqual((reply.code, reply.json()), (200, {"predictions": [7.0]}))
        grpc = GrpcClient(node.grpc_target)
        self.addCleanup(grpc.close)
        resp = yield grpc.predict("tenant-a", [2.0], version=1)
        self.assertEqual(list(resp.outputs["y"].float_val), [5.0])
        err = yield self.assertFailure(grpc.predict("tenant-b", [1.0]), ServingError)
        self.assertEqual(err.code, Code.NOT_FOUND)
        self.assertTrue(os.path.isfile(os.path.join(node.cache.disk.root, "tenant-a", "2", "saved_model.pb")))
        self.assertEqual(node.cache.fetches, 2)

    @defer.inlineCallbacks
    def test_serve_from_an_azure_container(self):  # type: ignore[no-untyped-def]
        server = azurite()
        files = yield threads.deferToThread(model_files)

        def upload() -> None:
            container = server.service_client().get_container_client("node-models")
            if not container.exists():
                container.create_container()
            for key, body in files.items():
                container.upload_blob(f"prod/{key}", body, overwrite=True)

        yield threads.deferToThread(upload)
        yield self.serve({"type": "azure", "azure": {
            "container": "node-models", "prefix": "prod/", "connection_string": server.connection_string}})

    @defer.inlineCallbacks
    def test_serve_from_a_gcs_bucket(self):  # type: ignore[no-untyped-def]
        server = fake_gcs()
        files = yield threads.deferToThread(model_files)

        def upload() -> None:
            client = server.client()
            bucket = client.bucket("node-models")
            if not bucket.exists():
                bucket = client.create_bucket("node-models")
            for key, body in files.items():
                bucket.blob(f"prod/{key}").upload_from_string(body)

        yield threads.deferToThread(upload)
        yield self.serve({"type": "gcs", "gcs": {
            "bucket": "node-models", "prefix": "prod/", "anonymous": True, "endpoint_url": server.endpoint_url}})
