"""Configuration: defaults, validation with one line naming the key, environment overrides."""

import os
import subprocess
import sys
import tempfile

from twisted.trial import unittest

from tests.harness.process import REPO_ROOT
from tfscache.config import ConfigError, load_config, load_config_file, parse_size, walk_schema

MINIMAL = {"model_provider": {"disk": {"base_path": "/models"}}, "disk_cache": {"path": "/cache"}}


def with_(base: dict, **sections: dict) -> dict:
    out = {k: dict(v) for k, v in base.items()}
    for k, v in sections.items():
        out[k] = {**out.get(k, {}), **v}
    return out


class ConfigTests(unittest.TestCase):
    def test_defaults(self) -> None:
        cfg = load_config(MINIMAL, environ={})
        self.assertEqual(cfg.serving.max_models, 10)
        self.assertEqual(cfg.listen.rest_port, 8501)
        self.assertEqual(cfg.cluster.discovery.type, "static")
        self.assertEqual(cfg.disk_cache.capacity_bytes, 10 * 1024**3)
        self.assertTrue(cfg.node.id)

    def assertConfigError(self, data: dict, key: str, environ: dict | None = None) -> str:
        err = self.assertRaises(ConfigError, load_config, data, environ or {})
        msg = str(err)
        self.assertTrue(msg.startswith(key + ":"), msg)
        self.assertNotIn("\n", msg)
        return msg

    def test_unknown_key(self) -> None:
        self.assertConfigError(with_(MINIMAL, serving={"max_modles": 3}), "serving.max_modles")
        self.assertConfigError(dict(MINIMAL, extra=1), "extra")

    def test_wrong_types(self) -> None:
        self.assertConfigError(with_(MINIMAL, serving={"max_models": "ten"}), "serving.max_models")
        self.assertConfigError(with_(MINIMAL, serving={"max_models": True}), "serving.max_models")
        self.assertConfigError(with_(MINIMAL, serving={"max_models": 0}), "serving.max_models")
        self.assertConfigError(with_(MINIMAL, disk_cache={"capacity_bytes": "lots"}), "disk_cache.capacity_bytes")
        self.assertConfigError(with_(MINIMAL, model_provider={"type": "ftp"}), "model_provider.type")
        self.assertConfigError(dict(MINIMAL, listen="8500"), "listen")

    def test_missing_values(self) -> None:
        self.assertConfigError({"model_provider": {"disk": {"base_path": "/m"}}}, "disk_cache.path")
        self.assertConfigError({"disk_cache": {"path": "/c"}}, "model_provider.disk.base_path")
        self.assertConfigError(with_(MINIMAL, admin={"enabled": True}), "admin.token")
        self.assertConfigError(with_(MINIMAL, model_provider={"type": "s3"}), "model_provider.s3.bucket")

    def test_sizes(self) -> None:
        self.assertEqual(parse_size("1GiB"), 1024**3)
        self.assertEqual(parse_size("1.5G"), 1_500_000_000)
        self.assertEqual(parse_size("512MiB"), 512 * 1024**2)
        self.assertEqual(parse_size(42), 42)
        cfg = load_config(with_(MINIMAL, disk_cache={"capacity_bytes": "2MiB"}), environ={})
        self.assertEqual(cfg.disk_cache.capacity_bytes, 2 * 1024**2)

    def test_environment_overrides(self) -> None:
        cfg = load_config(MINIMAL, environ={"TFSCACHE_SERVING__MAX_MODELS": "3",
                                            "TFSCACHE_LOGGING__FORMAT": "json", "HOME": "/x"})
        self.assertEqual((cfg.serving.max_models, cfg.logging.format), (3, "json"))
        self.assertConfigError(MINIMAL, "serving.max_models", {"TFSCACHE_SERVING__MAX_MODELS": "many"})
        self.assertConfigError(MINIMAL, "serving.bogus", {"TFSCACHE_SERVING__BOGUS": "1"})
        # the dev tools' and the CLI's own variables are not configuration
        cfg = load_config(MINIMAL, environ={"TFSCACHE_CACHE": "/x", "TFSCACHE_ADMIN_TOKEN": "t",
                                            "TFSCACHE_TEST_PIDS": "/tmp/p"})
        self.assertEqual(cfg.serving.max_models, 10)

    def test_files(self) -> None:
        err = self.assertRaises(ConfigError, load_config_file, "/nonexistent/tfscache.yaml", {})
        self.assertIn("/nonexistent/tfscache.yaml", str(err))
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write("serving: [unclosed\n")
        self.addCleanup(os.unlink, f.name)
        err = self.assertRaises(ConfigError, load_config_file, f.name, {})
        self.assertIn("not valid YAML", str(err))

    def test_example_config_is_valid(self) -> None:
        cfg = load_config_file(os.path.join(REPO_ROOT, "etc", "tfscache.yaml"), environ={})
        self.assertEqual(cfg.model_provider.type, "disk")

    def test_readme_documents_every_key(self) -> None:
        with open(os.path.join(REPO_ROOT, "README.md")) as f:
            readme = f.read()
        missing = []

        def visit(key: str, _field: object) -> None:
            last = key.rsplit(".", 1)[-1]
            if f"`{key}`" not in readme and not (f"`{last}`" in readme or f"/ `{last}`" in readme):
                missing.append(key)

        walk_schema(visit)
        self.assertEqual(missing, [])

    def test_twistd_stops_with_one_line(self) -> None:
        """A bad config stops ``twistd tfscache`` with one line naming the key, and exit 1."""
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write("disk_cache: {path: /tmp/x}\nmodel_provider: {disk: {base_path: /tmp}}\n"
                    "serving: {max_models: lots}\n")
        self.addCleanup(os.unlink, f.name)
        proc = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "tfscache", "--config", f.name],
            capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
            env=dict(os.environ, PYTHONPATH=REPO_ROOT),
        )
        self.assertNotEqual(proc.returncode, 0)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        self.assertEqual(lines, ["tfscache: configuration error: serving.max_models: expected an integer, got 'lots'"])
