"""The deployment files cannot run here (no container engine): check that they agree with the
code — ports, probe paths, TF Serving's flags, and configs that validate."""

from __future__ import annotations

import os
import re

import yaml
from twisted.trial import unittest

from tests.harness.process import REPO_ROOT
from tfscache.config import SCHEMA, load_config

DEPLOY = os.path.join(REPO_ROOT, "deploy")
REQUIRED_TFSERVING_FLAGS = {
    "--model_config_file_poll_wait_seconds=0",  # else TF Serving undoes tfscache's reloads
    "--file_system_poll_wait_seconds=1",       # 0 makes a reload that adds a model hang
    "--max_num_load_retries=0",                # a broken model fails fast, not after ~5 min
}


def read(*parts: str) -> str:
    with open(os.path.join(DEPLOY, *parts)) as f:
        return f.read()


def tfserving_ports(args: list[str]) -> tuple[int, int]:
    flags = dict(a.split("=", 1) for a in args if "=" in a)
    return int(flags["--port"]), int(flags["--rest_api_port"])


def image_user() -> tuple[int, int, list[str]]:
    """The Dockerfile's fixed uid and gid, and its USER lines."""
    text = read("Dockerfile")
    uid = int(re.search(r"useradd [^\n]*--uid (\d+)", text).group(1))  # type: ignore[union-attr]
    gid = int(re.search(r"groupadd [^\n]*--gid (\d+)", text).group(1))  # type: ignore[union-attr]
    return uid, gid, re.findall(r"^USER (\S+)", text, re.M)


def published(ports: list[str]) -> dict[int, int]:
    """compose ``ports`` entries "HOST:CONTAINER" as {container port: host port}."""
    out = {}
    for p in ports:
        host, container = str(p).rsplit(":", 1)
        out[int(container)] = int(host.rsplit(":", 1)[-1])
    return out


class DeployFilesTests(unittest.TestCase):
    def check_pair(self, tfserving_args: list[str], cfg_data: dict) -> None:
        self.assertTrue(REQUIRED_TFSERVING_FLAGS <= set(tfserving_args), tfserving_args)
        self.assertTrue(any(a.startswith("--model_config_file=") for a in tfserving_args))
        cfg = load_config(cfg_data, environ={})
        grpc_port, rest_port = tfserving_ports(tfserving_args)
        self.assertEqual(cfg.serving.grpc_target, f"127.0.0.1:{grpc_port}")
        self.assertEqual(cfg.serving.rest_url, f"http://127.0.0.1:{rest_port}")
        self.assertEqual((cfg.listen.grpc_port, cfg.listen.rest_port),
                         (SCHEMA["listen"]["grpc_port"].default, SCHEMA["listen"]["rest_port"].default))

    def test_dockerfile(self) -> None:
        text = read("Dockerfile")
        exposed = {int(p) for line in text.splitlines() if line.startswith("EXPOSE") for p in line.split()[1:]}
        self.assertEqual(exposed, {SCHEMA["listen"]["grpc_port"].default, SCHEMA["listen"]["rest_port"].default})
        self.assertIn('"twistd", "--nodaemon", "--pidfile=", "tfscache"', text)
        self.assertIn("/healthz", text)
        self.assertIn("STOPSIGNAL SIGTERM", text)
        for path in re.findall(r"^COPY (\S+)", text, re.M):
            self.assertTrue(os.path.exists(os.path.join(REPO_ROOT, path)), path)

    def test_compose(self) -> None:
        compose = yaml.safe_load(read("docker-compose.yml"))
        services = compose["services"]
        with open(os.path.join(DEPLOY, "tfscache-compose.yaml")) as f:
            cfg = yaml.safe_load(f)
        for suffix in ("a", "b"):
            tfs, cache = services[f"tfserving-{suffix}"], services[f"tfscache-{suffix}"]
            self.check_pair(tfs["command"], cfg)
            self.assertEqual(cache["network_mode"], f"service:tfserving-{suffix}")
            # TF Serving reads the models from tfscache's disk cache, at the same path
            cache_mount = [v for v in cache["volumes"] if v.endswith(":/var/cache/tfscache")]
            tfs_mount = [v for v in tfs["volumes"] if ":/var/cache/tfscache" in v]
            self.assertEqual(cache_mount[0].split(":")[0], tfs_mount[0].split(":")[0])
        self.assertEqual(load_config(cfg, environ={}).disk_cache.path, "/var/cache/tfscache")
        self.assertIn("etcd", services)
        self.assertEqual(cfg["cluster"]["discovery"]["type"], "etcd")

    def test_compose_publishes_the_cache_ports(self) -> None:
        services = yaml.safe_load(read("docker-compose.yml"))["services"]
        with open(os.path.join(DEPLOY, "tfscache-compose.yaml")) as f:
            listen = load_config(yaml.safe_load(f), environ={}).listen
        # the host ports the header promises, per sidecar pair
        header = {"a": {listen.grpc_port: 8500, listen.rest_port: 8501},
                  "b": {listen.grpc_port: 8510, listen.rest_port: 8511}}
        text = read("docker-compose.yml")
        self.assertIn("8500/8501", text.split("services:")[0])
        self.assertIn("8510/8511", text.split("services:")[0])
        host_ports: list[int] = []
        for suffix, expected in header.items():
            tfs, cache = services[f"tfserving-{suffix}"], services[f"tfscache-{suffix}"]
            # a service in another's network namespace cannot publish ports (compose refuses)
            self.assertNotIn("ports", cache)
            ports = published(tfs["ports"])
            # tfscache's listen ports, not TF Serving's own (clients must go through the cache)
            self.assertEqual(ports, expected, suffix)
            grpc_port, rest_port = tfserving_ports(tfs["command"])
            self.assertFalse({grpc_port, rest_port} & set(ports), ports)
            host_ports += ports.values()
        self.assertEqual(len(host_ports), len(set(host_ports)), host_ports)
        self.assertNotIn("ports", services["etcd"])

    def test_one_fixed_user_everywhere(self) -> None:
        uid, gid, users = image_user()
        self.assertEqual((uid, gid), (10001, 10001))
        self.assertEqual(users, [f"{uid}:{gid}"])  # numeric: runAsNonRoot can check it
        text = read("Dockerfile")
        self.assertIn(f"chown {uid}:{gid} /var/cache/tfscache", text)
        docs = {d["kind"]: d for d in yaml.safe_load_all(read("k8s", "tfscache.yaml"))}
        pod = docs["StatefulSet"]["spec"]["template"]["spec"]
        security = pod["securityContext"]
        self.assertEqual(security["runAsUser"], uid)
        # fsGroup: a fresh (root-owned) volume is made group-writable for the cache's user
        self.assertEqual(security["fsGroup"], gid)
        self.assertEqual(security.get("runAsGroup", gid), gid)
        for c in pod["containers"]:  # no container overrides the user the volume is made for
            self.assertNotIn("runAsUser", c.get("securityContext", {}), c["name"])
        claims = {t["metadata"]["name"] for t in docs["StatefulSet"]["spec"]["volumeClaimTemplates"]}
        self.assertIn("cache", claims)

    def test_kubernetes(self) -> None:
        docs = {d["kind"]: d for d in yaml.safe_load_all(read("k8s", "tfscache.yaml"))}
        cfg = yaml.safe_load(docs["ConfigMap"]["data"]["tfscache.yaml"])
        pod = docs["StatefulSet"]["spec"]["template"]["spec"]
        containers = {c["name"]: c for c in pod["containers"]}
        self.check_pair(containers["tfserving"]["args"], cfg)
        cache = containers["tfscache"]
        self.assertEqual(cache["livenessProbe"]["httpGet"]["path"], "/healthz")
        self.assertEqual(cache["readinessProbe"]["httpGet"]["path"], "/readyz")
        ports = {p["name"]: p["containerPort"] for p in cache["ports"]}
        self.assertEqual(ports, {"grpc": 8500, "rest": 8501})
        svc_ports = {p["name"]: p["targetPort"] for p in docs["Service"]["spec"]["ports"]}
        self.assertEqual(svc_ports, ports)
        self.assertGreaterEqual(pod["terminationGracePeriodSeconds"],
                                SCHEMA["listen"]["drain_timeout_seconds"].default)
        mounts = {m["name"]: m["mountPath"] for m in containers["tfserving"]["volumeMounts"]}
        self.assertEqual(mounts["cache"], load_config(cfg, environ={}).disk_cache.path)

    def test_probe_paths_exist_in_the_node(self) -> None:
        with open(os.path.join(REPO_ROOT, "tfscache", "service.py")) as f:
            service = f.read()
        for path in ("/healthz", "/readyz", "/monitoring/prometheus/metrics", "/metrics"):
            self.assertIn(f'"{path}"', service)
