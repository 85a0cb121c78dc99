"""Version labels from an object store, end to end through a node: the model source is a real
MinIO (S3), Azurite (Azure Blob Storage) or fake-gcs-server (GCS) holding ``labels.json`` beside
the version directories, as the disk source does (tests/test_labels.py).  REST ``/labels/<l>``
and gRPC ``model_spec.version_label``, a label change in the store taking effect within the
listing TTL (0 here: at once; the TTL itself is ObjectStoreCases'), and an unknown label
answering as TF Serving does."""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from typing import Any

from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.clients import GrpcClient, http, predict_request
from tests.harness import shared
from tests.harness.node import InProcessNode, node_config
from tests.test_azure_provider import azurite
from tests.test_gcs_provider import fake_gcs
from tests.test_s3_provider import s3_server
from tfscache.devserver.models import write_half_plus_two
from tfscache.errors import Code, ServingError

MODEL = "tenant-lab"
CONTAINER = "label-models"


def model_files() -> dict[str, bytes]:
    """Versions 1 and 2 of MODEL (y = v * x; 2 in a zero-padded directory), as object keys."""

    def write(path: str) -> None:
        for v in (1, 2):
            write_half_plus_two(path, MODEL, v, float(v), 0.0)
        os.rename(os.path.join(path, MODEL, "2"), os.path.join(path, MODEL, "00000002"))

    return shared.as_objects(shared.model_dir("cloud-labels", write))


class CloudLabelCases:
    """Set by the TestCase: ``put(key, body)`` (blocking, the key below ``self.prefix``) and
    ``provider_config()`` (the ``model_provider`` section, without ``listing_ttl_seconds``)."""

    timeout = 180
    prefix: str

    def put(self, key: str, body: bytes) -> None:
        raise NotImplementedError

    def provider_config(self) -> dict[str, Any]:
        raise NotImplementedError

    def put_labels(self, labels: dict[str, Any]) -> defer.Deferred[None]:
        return threads.deferToThread(self.put, f"{MODEL}/labels.json", json.dumps(labels).encode())

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.prefix = f"t-{uuid.uuid4().hex[:8]}/"
        self.backend = shared.backend()
        files = yield threads.deferToThread(model_files)

        def upload() -> None:
            for key, body in files.items():
                self.put(key, body)

        yield threads.deferToThread(upload)
        yield self.put_labels({"stable": 1, "canary": "00000002"})
        # a TTL of 0: every request by label reads the labels again, so a change shows at once
        provider = dict(self.provider_config(), listing_ttl_seconds=0)
        cfg = node_config(tempfile.mkdtemp(prefix="tfscache-cloud-labels-"), self.backend,
                          model_provider=provider)
        del cfg["model_provider"]["disk"]
        self.node = InProcessNode(cfg)
        yield self.node.start()
        self.addCleanup(self.node.stop)  # type: ignore[attr-defined]
        self.client = GrpcClient(self.node.grpc_target)
        self.addCleanup(self.client.close)  # type: ignore[attr-defined]

    def rest(self, path: str, body: Any = None, method: str = "POST") -> defer.Deferred[Any]:
        return http(method, f"{self.node.rest_url}/v1/models/{MODEL}{path}", body)

    def by_label(self, label: str, xs: list[float]) -> defer.Deferred[Any]:
        req = predict_request(MODEL, xs)
        req.model_spec.version_label = label
        return self.client.call(self.client.predictions.Predict, req)

    def told_tf_serving(self) -> dict[str, int]:
        config = self.node.service.backend._config().config.model_config_list.config
        return next((dict(mc.version_labels) for mc in config if mc.name == MODEL), {})

    @defer.inlineCallbacks
    def test_labels_rest_grpc_a_change_and_an_unknown_label(self):  # type: ignore[no-untyped-def]
        eq = self.assertEqual  # type: ignore[attr-defined]
        reply = yield self.rest("/labels/stable:predict", {"instances": [3.0]})
        eq((reply.code, reply.json()), (200, {"predictions": [3.0]}))
        reply = yield self.rest("/labels/canary:predict", {"instances": [3.0]})
        eq((reply.code, reply.json()), (200, {"predictions": [6.0]}))
        resp = yield self.by_label("canary", [3.0])
        eq((list(resp.outputs["y"].float_val), resp.model_spec.version.value), ([6.0], 2))
        reply = yield self.rest("/labels/stable", method="GET")
        eq([s["version"] for s in reply.json()["model_version_status"]], ["1"])
        eq(self.told_tf_serving(), {"stable": 1, "canary": 2})

        # unknown: TF Serving's words and codes
        reply = yield self.rest("/labels/nope:predict", {"instances": [1.0]})
        eq((reply.code, reply.json()), (400, {"error": "Unrecognized servable version label: nope"}))
        err = yield self.assertFailure(self.by_label("nope", [1.0]), ServingError)  # type: ignore[attr-defined]
        eq((err.code, err.message), (Code.INVALID_ARGUMENT, "Unrecognized servable version label: nope"))

        # the store's labels.json changes: stable moves to 2, canary goes
        yield self.put_labels({"stable": 2})
        reply = yield self.rest("/labels/stable:predict", {"instances": [3.0]})
        eq((reply.code, reply.json()), (200, {"predictions": [6.0]}))
        resp = yield self.by_label("stable", [1.0])
        eq((list(resp.outputs["y"].float_val), resp.model_spec.version.value), ([2.0], 2))
        eq(self.told_tf_serving(), {"stable": 2})
        reply = yield self.rest("/labels/canary:predict", {"instances": [1.0]})
        eq((reply.code, reply.json()), (400, {"error": "Unrecognized servable version label: canary"}))

    @defer.inlineCallbacks
    def test_a_broken_labels_file_leaves_requests_by_number_alone(self):  # type: ignore[no-untyped-def]
        yield threads.deferToThread(self.put, f"{MODEL}/labels.json", b"{not json")
        reply = yield self.rest("/labels/stable:predict", {"instances": [1.0]})
        self.assertEqual(reply.code, 400, reply.body)  # type: ignore[attr-defined]  # FAILED_PRECONDITION
        self.assertIn(f"model {MODEL} (labels.json)", reply.json()["error"])  # type: ignore[attr-defined]
        reply = yield self.rest(":predict", {"instances": [1.0]})  # the latest: 2
        self.assertEqual((reply.code, reply.json()), (200, {"predictions": [2.0]}))  # type: ignore[attr-defined]


class S3LabelTests(CloudLabelCases, unittest.TestCase):
    def setUp(self):  # type: ignore[no-untyped-def]
        self.s3 = s3_server()
        self.s3client = self.s3.boto3_client()
        try:
            self.s3client.head_bucket(Bucket=CONTAINER)
        except Exception:
            self.s3client.create_bucket(Bucket=CONTAINER)
        return super().setUp()

    def put(self, key: str, body: bytes) -> None:
        self.s3client.put_object(Bucket=CONTAINER, Key=self.prefix + key, Body=body)

    def provider_config(self) -> dict[str, Any]:
        return {"type": "s3", "s3": {
            "bucket": CONTAINER, "prefix": self.prefix, "region": "us-east-1", "endpoint_url": self.s3.endpoint_url,
            "access_key_id": self.s3.access_key, "secret_access_key": self.s3.secret_key}}


class AzureLabelTests(CloudLabelCases, unittest.TestCase):
    def setUp(self):  # type: ignore[no-untyped-def]
        self.azurite = azurite()
        self.blobs = self.azurite.service_client().get_container_client(CONTAINER)
        if not self.blobs.exists():
            self.blobs.create_container()
        return super().setUp()

    def put(self, key: str, body: bytes) -> None:
        self.blobs.upload_blob(self.prefix + key, body, overwrite=True)

    def provider_config(self) -> dict[str, Any]:
        return {"type": "azure", "azure": {
            "container": CONTAINER, "prefix": self.prefix, "connection_string": self.azurite.connection_string}}


class GCSLabelTests(CloudLabelCases, unittest.TestCase):
    def setUp(self):  # type: ignore[no-untyped-def]
        self.gcs = fake_gcs()
        client = self.gcs.client()
        self.bucket = client.bucket(CONTAINER)
        if not self.bucket.exists():
            self.bucket = client.create_bucket(CONTAINER)
        return super().setUp()

    def put(self, key: str, body: bytes) -> None:
        self.bucket.blob(self.prefix + key).upload_from_string(body)

    def provider_config(self) -> dict[str, Any]:
        return {"type": "gcs", "gcs": {
            "bucket": CONTAINER, "prefix": self.prefix, "anonymous": True, "endpoint_url": self.gcs.endpoint_url}}
