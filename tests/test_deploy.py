"""The deployment files cannot run here (no container engine): check that they agree with the
code — ports, probe paths, TF Serving's flags, and configs that validate."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from typing import Any

import yaml
from twisted.internet import threads
from twisted.trial import unittest

from tests.harness.process import REPO_ROOT
from tfscache.config import ListenSettings, load_config

DEFAULT_PORTS = (ListenSettings.model_fields["grpc_port"].default, ListenSettings.model_fields["rest_port"].default)

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


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d and d.get("kind") == kind]


def containers_of(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod["containers"]}


def check_kubernetes(test: unittest.TestCase, docs: list[dict[str, Any]]) -> None:
    """What the plain manifests and the chart's render must both hold: the pair's ports and
    flags, probes, discovery through the members' Service, RBAC limited to what discovery
    reads, a PDB, resources, a drain shorter than the grace period, and no etcd."""
    (config_map,), (statefulset,) = by_kind(docs, "ConfigMap"), by_kind(docs, "StatefulSet")
    cfg_data = yaml.safe_load(config_map["data"]["tfscache.yaml"])
    cfg = load_config(cfg_data, environ={})
    pod = statefulset["spec"]["template"]["spec"]
    containers = containers_of(pod)
    check_pair(test, containers["tfserving"]["args"], cfg_data)
    cache = containers["tfscache"]
    test.assertEqual(cache["livenessProbe"]["httpGet"]["path"], "/healthz")
    test.assertEqual(cache["readinessProbe"]["httpGet"]["path"], "/readyz")
    ports = {p["name"]: p["containerPort"] for p in cache["ports"]}
    test.assertEqual(ports, {"grpc": cfg.listen.grpc_port, "rest": cfg.listen.rest_port})
    for probe in ("livenessProbe", "readinessProbe"):
        test.assertIn(cache[probe]["httpGet"]["port"], ("rest", cfg.listen.rest_port))
    # discovery: the StatefulSet's headless Service, its ports found by name
    d = cfg.cluster.discovery
    test.assertEqual(d.type, "kubernetes")
    services = {svc["metadata"]["name"]: svc["spec"] for svc in by_kind(docs, "Service")}
    members = services[d.service]
    test.assertEqual(members.get("clusterIP"), "None")
    test.assertFalse(members.get("publishNotReadyAddresses", False))  # readiness is membership
    test.assertEqual(statefulset["spec"]["serviceName"], d.service)
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    for spec in services.values():
        test.assertTrue(set(spec["selector"].items()) <= set(labels.items()), spec["selector"])
        named = {p["name"]: p["targetPort"] for p in spec["ports"]}
        test.assertEqual({n: ports[t] if isinstance(t, str) else t for n, t in named.items()}, ports)
    test.assertEqual({d.rest_port_name: ports["rest"], d.grpc_port_name: ports["grpc"]},
                     {p["name"]: p["port"] for p in members["ports"]})
    test.assertEqual(len(services), 2)  # members (headless) and clients
    # RBAC: exactly get/list/watch on endpointslices, bound to the pod's service account
    (role,), (binding,) = by_kind(docs, "Role"), by_kind(docs, "RoleBinding")
    test.assertEqual(role["rules"], [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                                      "verbs": ["get", "list", "watch"]}])
    test.assertEqual(binding["roleRef"]["name"], role["metadata"]["name"])
    test.assertEqual([(s["kind"], s["name"]) for s in binding["subjects"]],
                     [("ServiceAccount", pod["serviceAccountName"])])
    test.assertEqual([sa["metadata"]["name"] for sa in by_kind(docs, "ServiceAccount")],
                     [pod["serviceAccountName"]])
    test.assertFalse(by_kind(docs, "ClusterRole") or by_kind(docs, "ClusterRoleBinding"))
    # the PDB covers the pods, one at a time
    (pdb,) = by_kind(docs, "PodDisruptionBudget")
    selector = pdb["spec"]["selector"]["matchLabels"]
    test.assertEqual(selector, {k: labels.get(k) for k in selector})
    test.assertEqual(pdb["spec"]["maxUnavailable"], 1)
    # every container has requests and a memory limit; an image from a registry, not :latest
    for name, c in containers.items():
        test.assertTrue({"cpu", "memory"} <= set(c["resources"]["requests"]), name)
        test.assertIn("memory", c["resources"]["limits"], name)
        test.assertFalse(c["image"].endswith(":latest") or ":" not in c["image"], c["image"])
    # the drain fits in the grace period, and TF Serving outlives it
    grace = pod["terminationGracePeriodSeconds"]
    test.assertGreater(grace, cfg.listen.drain_timeout_seconds)
    sleep = containers["tfserving"]["lifecycle"]["preStop"]["exec"]["command"][-1]
    test.assertGreaterEqual(int(sleep.split()[-1]), cfg.listen.drain_timeout_seconds)
    test.assertLess(int(sleep.split()[-1]), grace)
    # TF Serving reads the cache where serving.model_path says; tfscache writes it at disk_cache.path
    tfs_mounts = {m["name"]: m for m in containers["tfserving"]["volumeMounts"]}
    cache_mounts = {m["name"]: m for m in cache["volumeMounts"]}
    test.assertEqual(tfs_mounts["cache"]["mountPath"], cfg.serving.model_path or cfg.disk_cache.path)
    test.assertTrue(tfs_mounts["cache"].get("readOnly"))
    test.assertEqual(cache_mounts["cache"]["mountPath"], cfg.disk_cache.path)
    if cfg.model_provider.type == "disk":
        test.assertEqual(cache_mounts["model-source"]["mountPath"], cfg.model_provider.disk.base_path)
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"]
           for e in cache["env"] if "fieldRef" in e.get("valueFrom", {})}
    test.assertEqual(env, {"POD_NAME": "metadata.name", "POD_IP": "status.podIP",
                           "POD_NAMESPACE": "metadata.namespace"})
    test.assertFalse([doc for doc in docs if doc and "etcd" in json.dumps(doc)])


def check_pair(test: unittest.TestCase, tfserving_args: list[str], cfg_data: dict[str, Any]) -> None:
    """TF Serving's flags and ports agree with the tfscache config beside it."""
    test.assertTrue(REQUIRED_TFSERVING_FLAGS <= set(tfserving_args), tfserving_args)
    test.assertTrue(any(a.startswith("--model_config_file=") for a in tfserving_args))
    cfg = load_config(cfg_data, environ={})
    grpc_port, rest_port = tfserving_ports(tfserving_args)
    test.assertEqual(cfg.serving.grpc_target, f"127.0.0.1:{grpc_port}")
    test.assertEqual(cfg.serving.rest_url, f"http://127.0.0.1:{rest_port}")
    test.assertEqual((cfg.listen.grpc_port, cfg.listen.rest_port),
                     DEFAULT_PORTS)


class DeployFilesTests(unittest.TestCase):
    def check_pair(self, tfserving_args: list[str], cfg_data: dict[str, Any]) -> None:
        check_pair(self, tfserving_args, cfg_data)

    def test_dockerfile(self) -> None:
        text = read("Dockerfile")
        exposed = {int(p) for line in text.splitlines() if line.startswith("EXPOSE") for p in line.split()[1:]}
        self.assertEqual(exposed, set(DEFAULT_PORTS))
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
        pod = docs["StatefulSet"]["spec"]["template"]["spec"]  # one StatefulSet: the last of a kind is it
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
        docs = list(yaml.safe_load_all(read("k8s", "tfscache.yaml")))
        check_kubernetes(self, docs)
        text = read("k8s", "tfscache.yaml")
        self.assertNotIn("etcd", text.split("\n---", 1)[1])  # past the header: no etcd anywhere
        cfg = yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["tfscache.yaml"])
        self.assertEqual(cfg["model_provider"]["type"], "s3")
        pod = by_kind(docs, "StatefulSet")[0]["spec"]["template"]["spec"]
        env = {e["name"]: e for e in containers_of(pod)["tfscache"]["env"]}
        self.assertEqual(env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["key"], "AWS_ACCESS_KEY_ID")

    def test_probe_paths_exist_in_the_node(self) -> None:
        with open(os.path.join(REPO_ROOT, "tfscache", "service.py")) as f:
            service = f.read()
        for path in ("/healthz", "/readyz", "/monitoring/prometheus/metrics", "/metrics"):
            self.assertIn(f'"{path}"', service)


# -- the Helm chart ---------------------------------------------------------------------------------
CHART = os.path.join(DEPLOY, "helm", "tfscache")
S3_VALUES = ["--set", "modelSource.type=s3", "--set", "modelSource.s3.bucket=models",
             "--set", "modelSource.s3.credentialsSecret=models-s3",
             "--set", "image.repository=registry.example.com/tfscache"]


def _tool_missing(name: str) -> str | None:
    from tests.harness.servers import binary_path

    try:
        binary_path(name)
    except RuntimeError as e:
        return str(e)
    return None


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    from tests.harness.servers import binary_path

    home = tempfile.mkdtemp(prefix="tfscache-helm-")  # helm's cache and config: not the user's
    env = dict(os.environ, HELM_CACHE_HOME=home, HELM_CONFIG_HOME=home, HELM_DATA_HOME=home)
    return subprocess.run([binary_path("helm"), *args], capture_output=True, text=True, env=env, timeout=120)


def render(*args: str) -> list[dict[str, Any]]:
    out = helm("template", "models", CHART, "--namespace", "ml", *args)
    if out.returncode:
        raise AssertionError(f"helm template failed: {out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


class ChartTests(unittest.TestCase):
    skip = _tool_missing("helm")

    def test_lint(self) -> None:
        for values in ([], S3_VALUES):
            out = helm("lint", "--strict", CHART, *values)
            self.assertEqual(out.returncode, 0, out.stdout + out.stderr)

    def test_rendered_with_a_pvc(self) -> None:
        docs = render()
        check_kubernetes(self, docs)
        (statefulset,) = by_kind(docs, "StatefulSet")
        pod = statefulset["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        self.assertEqual(volumes["model-source"]["persistentVolumeClaim"],
                         {"claimName": "tfscache-models", "readOnly": True})
        self.assertEqual(by_kind(docs, "RoleBinding")[0]["subjects"][0]["namespace"], "ml")
        cfg = load_config(yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["tfscache.yaml"]), environ={})
        self.assertEqual((cfg.disk_cache.capacity_bytes, cfg.serving.max_models, cfg.cluster.replicas_per_model),
                         (50 * 1024**3, 10, 2))

    def test_rendered_with_s3(self) -> None:
        docs = render(*S3_VALUES, "--set", "cache.maxModels=25", "--set", "tfserving.extraArgs={--enable_batching}",
                      "--set", "tfscache.drainTimeoutSeconds=45")
        check_kubernetes(self, docs)
        cfg = load_config(yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["tfscache.yaml"]), environ={})
        self.assertEqual((cfg.model_provider.type, cfg.model_provider.s3.bucket, cfg.serving.max_models,
                          cfg.listen.drain_timeout_seconds), ("s3", "models", 25, 45.0))
        pod = by_kind(docs, "StatefulSet")[0]["spec"]["template"]["spec"]
        self.assertEqual(pod["terminationGracePeriodSeconds"], 75)
        containers = containers_of(pod)
        self.assertIn("--enable_batching", containers["tfserving"]["args"])
        self.assertEqual(containers["tfscache"]["image"], "registry.example.com/tfscache:0.1.0")
        secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in containers["tfscache"]["env"]
                   if "secretKeyRef" in e.get("valueFrom", {})}
        self.assertEqual(secrets, {"AWS_ACCESS_KEY_ID": {"name": "models-s3", "key": "AWS_ACCESS_KEY_ID"},
                                   "AWS_SECRET_ACCESS_KEY": {"name": "models-s3", "key": "AWS_SECRET_ACCESS_KEY"}})
        self.assertNotIn("model-source", {v["name"] for v in pod["volumes"]})

    def test_bad_values_are_refused_with_the_key(self) -> None:
        cases = {
            ("--set", "modelSource.type=s3"): "modelSource.s3.bucket: a value is required",
            ("--set", "modelSource.type=nfs"): 'modelSource.type: expected pvc or s3, got "nfs"',
            ("--set", "terminationGracePeriodSeconds=20"): "must be longer than tfscache.drainTimeoutSeconds (30)",
        }
        for values, message in cases.items():
            out = helm("template", "models", CHART, *values)
            self.assertNotEqual(out.returncode, 0, values)
            self.assertIn(message, out.stderr)


def _dry_run_missing() -> str | None:
    from tests.harness import kube

    return _tool_missing("helm") or kube.missing() or (None if shutil.which("kubectl") else "kubectl is missing")


class ServerSideDryRunTests(unittest.TestCase):
    """The manifests as a real API server (tests/harness/kube.py) accepts them: schema,
    defaulting and admission, with nothing created."""

    skip = _dry_run_missing()
    timeout = 300

    def apply(self, docs: list[dict[str, Any]]) -> None:
        out, namespace = self.dry_run(docs)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        kinds = {line.split("/")[0].split(".")[0] for line in out.stdout.splitlines() if "(server dry run)" in line}
        self.assertEqual(kinds, {d["kind"].lower() for d in docs}, out.stdout)
        from tests.test_kubernetes import shared_api_server

        listed = shared_api_server().must("GET", f"/apis/apps/v1/namespaces/{namespace}/statefulsets")
        self.assertEqual(listed["items"], [])  # a dry run: nothing was created

    def dry_run(self, docs: list[dict[str, Any]]) -> tuple[subprocess.CompletedProcess[str], str]:
        from tests.harness import kube
        from tests.test_kubernetes import shared_api_server

        api = shared_api_server()
        namespace = "ml-" + uuid.uuid4().hex[:8]
        api.create_namespace(namespace)
        path = os.path.join(tempfile.mkdtemp(prefix="tfscache-manifests-"), "all.yaml")
        with open(path, "w") as f:
            yaml.safe_dump_all(docs, f)
        out = subprocess.run(["kubectl", "--kubeconfig", api.kubeconfig(namespace, token=kube.ADMIN_TOKEN),
                              "apply", "--dry-run=server", "-n", namespace, "-f", path],
                             capture_output=True, text=True, timeout=120)
        return out, namespace

    def test_chart(self) -> None:
        return threads.deferToThread(self.apply, render())  # type: ignore[return-value]

    def test_chart_with_s3(self) -> None:
        return threads.deferToThread(self.apply, render(*S3_VALUES))  # type: ignore[return-value]

    def test_plain_manifests(self) -> None:
        docs = [d for d in yaml.safe_load_all(read("k8s", "tfscache.yaml")) if d]
        return threads.deferToThread(self.apply, docs)  # type: ignore[return-value]

    def test_the_server_refuses_what_helm_lets_through(self) -> None:
        def check() -> None:
            out, _ = self.dry_run(render("--set", "cache.storage=lots"))
            self.assertNotEqual(out.returncode, 0, out.stdout)
            self.assertIn("quantities must match", out.stderr)

        return threads.deferToThread(check)  # type: ignore[return-value]
