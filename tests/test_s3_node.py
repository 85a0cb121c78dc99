"""A node serving from a bucket: ``model_provider.type: s3`` against a real MinIO."""

from __future__ import annotations

import os
import tempfile

from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.clients import GrpcClient, rest_predict
from tests.harness import shared
from tests.harness.node import InProcessNode, node_config
from tests.harness.servers import S3Server
from tfscache.devserver.models import write_half_plus_two
from tfscache.errors import Code, ServingError


def upload(client, bucket: str, prefix: str, root: str) -> None:  # type: ignore[no-untyped-def]
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            client.upload_file(path, bucket, prefix + os.path.relpath(path, root))


class S3NodeTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_serve_from_a_bucket(self):  # type: ignore[no-untyped-def]
        backend = shared.backend()
        s3 = yield threads.deferToThread(S3Server().start)
        self.addCleanup(s3.stop)
        local = tempfile.mkdtemp(prefix="tfscache-s3-src-")
        write_half_plus_two(local, "tenant-a", 1, 2.0, 1.0)
        write_half_plus_two(local, "tenant-a", 2, 3.0, 1.0)
        client = s3.boto3_client()
        client.create_bucket(Bucket="models")
        yield threads.deferToThread(upload, client, "models", "prod/", local)
        cfg = node_config(local, backend, model_provider={
            "type": "s3", "s3": {"bucket": "models", "prefix": "prod/", "region": "us-east-1",
                                 "endpoint_url": s3.endpoint_url, "access_key_id": s3.access_key,
                                 "secret_access_key": s3.secret_key}})
        del cfg["model_provider"]["disk"]
        node = InProcessNode(cfg)
        yield node.start()
        self.addCleanup(node.stop)
        reply = yield rest_predict(node.rest_url, "tenant-a", [2.0])  # latest in the bucket: 2
        self.assertEqual((reply.code, reply.json()), (200, {"predictions": [7.0]}))
        grpc = GrpcClient(node.grpc_target)
        self.addCleanup(grpc.close)
        resp = yield grpc.predict("tenant-a", [2.0], version=1)
        self.assertEqual(list(resp.outputs["y"].float_val), [5.0])
        err = yield self.assertFailure(grpc.predict("tenant-b", [1.0]), ServingError)
        self.assertEqual(err.code, Code.NOT_FOUND)
        self.assertTrue(os.path.isfile(os.path.join(node.cache.disk.root, "tenant-a", "2", "saved_model.pb")))
        self.assertEqual(node.cache.fetches, 2)
