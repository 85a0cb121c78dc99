"""tfscache's own small protos: regenerated modules match the committed ones, and the bytes
are TF Serving's (checked against the official tensorflow-serving-api messages)."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import tempfile

from tensorflow_serving.apis import get_model_status_pb2, model_management_pb2
from twisted.trial import unittest

from tests.harness.process import REPO_ROOT
from tfscache.proto import model_service_pb2 as ours


class ProtoTests(unittest.TestCase):
    def test_generated_modules_are_current(self) -> None:
        out = tempfile.mkdtemp(prefix="tfscache-protoc-")
        protos = ["tfscache/proto/model_spec.proto", "tfscache/proto/model_service.proto"]
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--python_out={out}",
                        f"--pyi_out={out}", *protos], cwd=REPO_ROOT, check=True)
        for proto in protos:
            for suffix in ("_pb2.py", "_pb2.pyi"):
                name = proto[: -len(".proto")] + suffix
                self.assertTrue(filecmp.cmp(os.path.join(out, name), os.path.join(REPO_ROOT, name), shallow=False),
                                f"{name} is stale: regenerate it (README, Development)")

    def test_reload_config_request_is_tf_servings(self) -> None:
        req = ours.ReloadConfigRequest()
        mc = req.config.model_config_list.config.add(name="m", base_path="/cache/m", model_platform="tensorflow")
        mc.model_version_policy.specific.versions.extend([3, 5])
        mc.version_labels["stable"] = 3
        official = model_management_pb2.ReloadConfigRequest.FromString(req.SerializeToString())
        omc = official.config.model_config_list.config[0]
        self.assertEqual((omc.name, omc.base_path, omc.model_platform), ("m", "/cache/m", "tensorflow"))
        self.assertEqual(list(omc.model_version_policy.specific.versions), [3, 5])
        self.assertEqual(dict(omc.version_labels), {"stable": 3})
        self.assertEqual(official.SerializeToString(deterministic=True), req.SerializeToString(deterministic=True))

    def test_status_response_reads_tf_servings(self) -> None:
        official = get_model_status_pb2.GetModelStatusResponse()
        st = official.model_version_status.add(version=7, state=30)
        st.status.error_code = 3
        st.status.error_message = "bad"
        parsed = ours.GetModelStatusResponse.FromString(official.SerializeToString())
        s = parsed.model_version_status[0]
        self.assertEqual((s.version, s.state, s.status.error_code, s.status.error_message),
                         (7, ours.ModelVersionStatus.AVAILABLE, 3, "bad"))
