"""Configuration: defaults, validation with one line naming the key, environment overrides."""

import os
import subprocess
import sys
import tempfile

import yaml
from twisted.internet import reactor
from twisted.trial import unittest

from tests.harness.process import REPO_ROOT
from tfscache.config import (
    ConfigError,
    EvictionPolicy,
    load_config,
    load_config_file,
    parse_size,
    reference,
    settings,
    walk_schema,
    with_reference,
)
from tfscache.node.eviction import POLICIES

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

    def test_environment_strings_are_kept_as_written(self) -> None:
        """A string key takes the variable's text as it is: YAML would read a token 0123 as
        octal (83), 0x1F as 31, 12:30 as sexagesimal 750, and true as a boolean."""
        for raw in ("0123", "0x1F", "12:30", "true", "null", "1e3", "~"):
            cfg = load_config(with_(MINIMAL, admin={"enabled": True}),
                              environ={"TFSCACHE_ADMIN__TOKEN": raw})
            self.assertEqual(cfg.admin.token, raw)
        cfg = load_config(MINIMAL, environ={"TFSCACHE_SERVING__GRPC_TARGET": "10.0.0.1:0123",
                                            "TFSCACHE_NODE__ID": "007",
                                            "TFSCACHE_LOGGING__LEVEL": "debug"})
        self.assertEqual((cfg.serving.grpc_target, cfg.node.id, cfg.logging.level),
                         ("10.0.0.1:0123", "007", "debug"))
        # the other kinds are still read as YAML
        cfg = load_config(MINIMAL, environ={"TFSCACHE_SERVING__RESET_ON_START": "false",
                                            "TFSCACHE_SERVING__MEMORY_FACTOR": "1.5",
                                            "TFSCACHE_DISK_CACHE__CAPACITY_BYTES": "1GiB"})
        self.assertEqual((cfg.serving.reset_on_start, cfg.serving.memory_factor, cfg.disk_cache.capacity_bytes),
                         (False, 1.5, 1024**3))
        # an empty variable is null: fine where null is the default, refused elsewhere
        cfg = load_config(MINIMAL, environ={"TFSCACHE_LISTEN__TLS_CERT": ""})
        self.assertIsNone(cfg.listen.tls_cert)
        msg = self.assertConfigError(MINIMAL, "serving.grpc_target", {"TFSCACHE_SERVING__GRPC_TARGET": ""})
        self.assertEqual(msg, "serving.grpc_target: a value is required")

    def test_explicit_null_is_refused_where_a_value_is_needed(self) -> None:
        for section, key in (("serving", "max_models"), ("serving", "rest_url"), ("listen", "rest_port"),
                             ("serving", "reset_on_start"), ("disk_cache", "capacity_bytes"),
                             ("logging", "level"), ("cluster", "replicas_per_model")):
            msg = self.assertConfigError(with_(MINIMAL, **{section: {key: None}}), f"{section}.{key}")
            self.assertEqual(msg, f"{section}.{key}: a value is required")
        msg = self.assertConfigError(with_(MINIMAL, cluster={"discovery": {"members": None}}),
                                     "cluster.discovery.members")
        self.assertEqual(msg, "cluster.discovery.members: a value is required")
        # keys whose default is null take null
        cfg = load_config(with_(MINIMAL, node={"id": None}, listen={"tls_cert": None}), environ={})
        self.assertTrue(cfg.node.id)
        self.assertIsNone(cfg.listen.tls_cert)

    def test_ports(self) -> None:
        self.assertConfigError(with_(MINIMAL, listen={"rest_port": 65536}), "listen.rest_port")
        self.assertConfigError(with_(MINIMAL, listen={"grpc_port": -1}), "listen.grpc_port")
        self.assertConfigError(with_(MINIMAL, listen={"grpc_port": "8500"}), "listen.grpc_port")
        cfg = load_config(with_(MINIMAL, listen={"rest_port": 0, "grpc_port": 65535}), environ={})
        self.assertEqual((cfg.listen.rest_port, cfg.listen.grpc_port), (0, 65535))

    def test_static_members(self) -> None:
        good = {"id": "n1", "host": "10.0.0.1", "rest_port": 8501, "grpc_port": 8500}

        def members(*entries: object) -> dict:
            return with_(MINIMAL, cluster={"discovery": {"type": "static", "members": list(entries)}})

        cfg = load_config(members(good, {"host": "10.0.0.2", "rest_port": 1, "grpc_port": 65535}), environ={})
        self.assertEqual(len(cfg.cluster.discovery.members), 2)
        key = "cluster.discovery.members[1]"
        for bad, where in (
            (dict(good, id=7), ".id"), (dict(good, id=""), ".id"), (dict(good, host=None), ".host"),
            (dict(good, host=["a"]), ".host"), (dict(good, rest_port="8501"), ".rest_port"),
            (dict(good, grpc_port=True), ".grpc_port"), (dict(good, rest_port=70000), ".rest_port"),
            (dict(good, grpc_port=0), ".grpc_port"), (dict(good, grcp_port=1), ".grcp_port"),
            ({"id": "x", "host": "h"}, ""), ("h:1", ""),
        ):
            msg = self.assertConfigError(members(good, bad), key + where)
            self.assertNotIn("Traceback", msg)

    def test_discovery_endpoints_are_checked_at_load(self) -> None:
        """What the etcd and Consul clients would refuse is refused by the schema, as one line."""
        for kind, backend in (("etcd", "etcd"), ("consul", "Consul")):
            msg = self.assertConfigError(
                with_(MINIMAL, cluster={"discovery": {"type": kind, "endpoints": ["ftp://h:1"]}}),
                "cluster.discovery.endpoints")
            self.assertEqual(msg, f"cluster.discovery.endpoints: not a {backend} URL: 'ftp://h:1'")
            self.assertConfigError(with_(MINIMAL, cluster={"discovery": {"type": kind}}), "cluster.discovery.endpoints")

    def test_provider_settings_reach_the_provider(self) -> None:
        from tfscache.service import make_provider

        cfg = load_config({"model_provider": {"type": "s3", "copy_threads": 2,
                                              "s3": {"bucket": "b", "verify_md5": False}},
                           "disk_cache": {"path": "/cache"}}, environ={})
        provider = make_provider(cfg, reactor, own_shutdown=False)
        self.assertIs(provider.verify_md5, False)  # type: ignore[attr-defined]
        self.assertEqual(provider._copies.size, 2)  # type: ignore[attr-defined]
        disk = make_provider(load_config(with_(MINIMAL, model_provider={"copy_threads": 3}), environ={}), reactor)
        self.assertEqual(disk._threads.size, 3)  # type: ignore[attr-defined]

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

    def test_example_config_covers_every_key(self) -> None:
        """etc/tfscache.yaml has every key of the schema, except the secrets, which it shows
        commented out (a secret in an example gets copied into real files)."""
        deliberately_commented = {
            "model_provider.s3.access_key_id", "model_provider.s3.secret_access_key",
            "model_provider.azure.connection_string", "model_provider.azure.sas_token",
            "model_provider.azure.account_key", "cluster.discovery.username", "cluster.discovery.password",
            "cluster.discovery.token", "admin.token",
        }
        with open(os.path.join(REPO_ROOT, "etc", "tfscache.yaml")) as f:
            text = f.read()
        keys = {s.key for s in settings()}

        def present(data: object, prefix: str = "") -> set[str]:
            out = set()
            for k, v in (data.items() if isinstance(data, dict) else ()):
                key = prefix + k
                out |= present(v, key + ".") if key not in keys and isinstance(v, dict) else {key}
            return out

        written = present(yaml.safe_load(text))
        self.assertEqual(sorted(written - keys), [])  # loading it checks that too
        self.assertEqual(sorted(keys - written - deliberately_commented), [])
        self.assertEqual(sorted(written & deliberately_commented), [])
        for key in deliberately_commented:
            self.assertIn(f"# {key.rsplit('.', 1)[-1]}:", text)

    def test_readme_reference_is_generated_from_the_schema(self) -> None:
        """README.md's configuration reference is what ``python -m tfscache.config --reference``
        writes: regenerate it after changing the schema."""
        with open(os.path.join(REPO_ROOT, "README.md")) as f:
            readme = f.read()
        self.assertEqual(with_reference(readme), readme)
        for s in settings():
            self.assertIn(f"| `{s.key}` |", reference())
        proc = subprocess.run([sys.executable, "-m", "tfscache.config", "--check"], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=REPO_ROOT))
        self.assertEqual((proc.returncode, proc.stderr), (0, ""))

    def test_eviction_choices_are_the_policies(self) -> None:
        from typing import get_args

        self.assertEqual(set(get_args(EvictionPolicy)), set(POLICIES))

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
