"""Data plane: what forwarding a warm predict costs, through tfscache and through the original
TFServingCache (Go), against the same backend driven directly; and what 500 cold loads at once
do to the warm calls beside them.

Contenders, measured in interleaved rounds (direct, original, tfscache, repeat) so that a
noisy neighbour slows all alike; the figures are medians over the rounds:
  direct    the client calls the backend itself.
  original  github.com/mKaloer/TFServingCache, built by bench/build_go_bench.sh from
            /work/shared/peers (never part of this repository). One node: its cache layer
            (cacheRestPort / cacheGrpcPort; it asks the backend for the model's status on every
            request). Router: two processes with etcd discovery, replicasPerModel 1; the client
            calls node A's proxy port for a model whose owner is node B, so the request goes
            proxy (A) -> cache (B) -> backend, two hops as through tfscache.
  tfscache  one node; router: two nodes in a static cluster (replicas_per_model 1), the client
            calls the node that does not own the model (node-0 -> node-1 -> backend).
  before    (--before DIR) tfscache as checked out in DIR, same configs and topology.
  floor     gRPC cells only: bench/grpc_floor, a bare grpc.aio relay with nothing of tfscache
            in it (router: relay -> relay -> backend), the least any forwarder built on
            grpc.aio costs: tfscache's CPU beyond it is tfscache's own work.

Backends: ``fast`` is bench/fastbackend (Go, answers at once with a fixed reply: what is measured
is the proxy); ``devserver`` is ``python -m tfscache.devserver`` (TensorFlow, half_plus_two; it
saturates at ~1,500 predictions/s here, so it bounds every contender alike). Every node has a
backend of its own (TF Serving's model list is per server; two drivers would undo each other's
lists); the router cells' non-owner nodes get a fast backend even in the devserver cells, as no
prediction reaches it. Every request names version 1 (the original requires a version).

Load: REST with ``wrk`` (Debian; 2 threads), gRPC with bench/fastbackend's ``grpcload`` (Go,
raw bytes; ceil(c/64) channels). CPU per request: utime + stime of the node process(es) over
the measured window (/proc), divided by the requests answered in it.

The cold cell (fast backend only): the backend makes models named ``slow-*`` take
``--slow-load-seconds`` to become AVAILABLE; ``--cold-models`` gRPC calls, each for a model of its
own, are sent at once to a node while a warm model is called at ``--cold-warm-concurrency``;
the warm calls' p50/p99 with and without the cold calls beside them.

The original binds every interface, so the whole benchmark (backends, nodes, etcd, load
generators) runs in a private network namespace (``unshare -n``, loopback only) when it can
(root); otherwise the original is left out and the report says why.

    python -m bench.data_plane            # 2 s per measurement, 3 rounds (~9 min)
    python -m bench.data_plane --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Self, TypeVar

from bench.common import (
    Processes,
    listen_port,
    parse_args,
    post_json,
    print_table,
    wait_until,
    write_models,
    write_report,
)
from bench.warm_overhead import INSTANCES, PREDICT_METHOD, WRK_LUA, choose_routed_name, cpu_seconds, wrk_cell
from tests.harness.node import CLUSTER_SECRET, NodeProcess
from tests.harness.process import CACHE_DIR, ManagedProcess, ProcessFixture, tcp_ready
from tests.harness.servers import EtcdServer

NETNS_ENV = "TFSCACHE_BENCH_NETNS"
BIN = os.path.join(CACHE_DIR, "bin")
CONTENDERS = ("direct", "original", "tfscache", "before", "floor")
VERSION = 1
ORIGINAL_PORT_BASE = 20000  # inside the private namespace nothing else binds; below the ephemeral range
TFSCACHE_PORT_BASE = 21000


class Ports:
    """Ports for the tfscache nodes, which must be known before they start (static members).
    Inside the private namespace: fixed ones below the ephemeral range, because a port picked
    free could be taken by another process's outgoing connection (the original's, started at the
    same time) before the node binds it; outside: free ones."""

    def __init__(self, base: int) -> None:
        self.next = base

    def __call__(self) -> int:
        if not os.environ.get(NETNS_ENV):
            return listen_port()
        self.next += 1
        return self.next


def extra_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--seconds", type=float, help="per measurement (default 2, --quick 0.5)")
    ap.add_argument("--rounds", type=int, help="rounds of (direct, original, tfscache) per cell (default 3, --quick 1)")
    ap.add_argument("--concurrency", type=int, nargs="+", help="fast backend (default 1 64 256, --quick 1 16)")
    ap.add_argument("--devserver-concurrency", type=int, nargs="+",
                    help="DevServer backend (default 1 64: it saturates below that; --quick 1)")
    ap.add_argument("--backends", nargs="+", choices=("fast", "devserver"),
                    help="default fast devserver (--quick: fast)")
    ap.add_argument("--protocols", nargs="+", choices=("rest", "grpc"), default=["rest", "grpc"])
    ap.add_argument("--scenarios", nargs="+", choices=("one_node", "router"), default=["one_node", "router"])
    ap.add_argument("--no-original", action="store_true", help="leave the original TFServingCache out")
    ap.add_argument("--cold-models", type=int, help="cold cell: concurrent calls for distinct cold models "
                    "(default 500, --quick 50; 0 = no cold cell)")
    ap.add_argument("--slow-load-seconds", type=float, help="cold cell: each cold model's load (default 5, --quick 1)")
    ap.add_argument("--cold-window", type=float,
                    help="cold cell: warm calls measured for this long (default 2 x slow load + 1)")
    ap.add_argument("--cold-warm-concurrency", type=int, default=8, help="cold cell: warm callers (default 8)")
    ap.add_argument("--cold-timeout", type=float,
                    help="cold cell: the cold calls' deadline (default 30 s, --quick 10 s); unanswered by then: errors")
    ap.add_argument("--name", default="data_plane", help="report name (JSON file stem)")
    ap.add_argument("--before", metavar="DIR",
                    help="a checkout of an earlier tfscache (git worktree add DIR <commit>): a fourth "
                         "contender, 'before', in every cell but the cold one")


# -- a private network namespace ------------------------------------------------------------

def enter_private_network(argv: Sequence[str]) -> str | None:
    """Re-execute this benchmark inside ``unshare -n`` with ``lo`` up (does not return), or
    return why it cannot (then the original, which binds every interface, is left out)."""
    if os.environ.get(NETNS_ENV):
        return None
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if os.geteuid() != 0:
        return "not root: no private network namespace (unshare -n) for the original, which binds every interface"
    if not unshare or not ip:
        return "unshare or ip (util-linux, iproute2) missing: no private network namespace for the original"
    probe = subprocess.run([unshare, "-n", ip, "link", "set", "lo", "up"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare -n failed ({probe.stderr.strip()}): no private network namespace for the original"
    sys.stdout.flush()
    os.execve(unshare, [unshare, "-n", "--", "sh", "-c", f'{ip} link set lo up && exec "$@"', "sh",
                        sys.executable, "-m", "bench.data_plane", *argv], dict(os.environ, **{NETNS_ENV: "1"}))
    raise AssertionError("unreachable")


# -- processes ------------------------------------------------------------------------------

def binary(name: str) -> str | None:
    path = os.path.join(BIN, name)
    return path if os.access(path, os.X_OK) else None


class PortsPrinted:
    """A process that binds ports the kernel chooses and prints them as one JSON line once
    it listens (bench/fastbackend, bench/grpc_floor)."""

    def __init__(self, argv: Sequence[str], name: str, cwd: str | None = None) -> None:
        self.argv, self.name, self.cwd = list(argv), name, cwd
        self.dir = tempfile.mkdtemp(prefix=f"tfscache-{name}-")
        self.proc: subprocess.Popen[str] | None = None
        self.ports: dict[str, int] = {}

    def start(self) -> Self:
        with open(os.path.join(self.dir, f"{self.name}.log"), "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=log, text=True,
                                         start_new_session=True, cwd=self.cwd)
        pids = os.environ.get("TFSCACHE_TEST_PIDS")
        if pids:  # scripts/test stops what a crashed run leaves behind
            with open(pids, "a") as f:
                f.write(f"{self.proc.pid}\n")
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the ports, once it listens; "" if it died
        if not line:
            self.proc.wait()
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before listening")
        self.ports = json.loads(line)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.ports['grpc_port']}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)


P = TypeVar("P", bound=PortsPrinted)


class FastBackend(PortsPrinted):
    """bench/fastbackend on ports the kernel chose."""

    def __init__(self, path: str, args: Sequence[str] = ()) -> None:
        super().__init__([path, *args], "fastbackend")

    @property
    def grpc_port(self) -> int:
        return self.ports["grpc_port"]

    @property
    def rest_port(self) -> int:
        return self.ports["rest_port"]

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"


class GrpcFloor(PortsPrinted):
    """bench/grpc_floor relaying every call to ``target``: the 'floor' contender."""

    def __init__(self, target: str) -> None:
        super().__init__([sys.executable, "-m", "bench.grpc_floor", "--target", target], "grpc-floor",
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class OriginalNode(ProcessFixture):
    """The original TFServingCache's ``taskhandler``: it reads ./config.yaml."""

    def __init__(self, path: str, name: str, config: dict[str, Any]) -> None:
        import yaml

        self.config = config
        self.dir = tempfile.mkdtemp(prefix=f"tfservingcache-{name}-")
        with open(os.path.join(self.dir, "config.yaml"), "w") as f:
            yaml.safe_dump(config, f)
        ports = [config["cacheRestPort"], config["cacheGrpcPort"], config["proxyRestPort"]]
        if "serviceDiscovery" in config:
            ports.append(config["proxyGrpcPort"])
        self.process = ManagedProcess(name, [path], ready=lambda: all(tcp_ready(p)() for p in ports),
                                      cwd=self.dir, log_dir=self.dir)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def cache_rest_url(self) -> str:
        return f"http://127.0.0.1:{self.config['cacheRestPort']}"

    @property
    def cache_grpc_target(self) -> str:
        return f"127.0.0.1:{self.config['cacheGrpcPort']}"

    @property
    def proxy_rest_url(self) -> str:
        return f"http://127.0.0.1:{self.config['proxyRestPort']}"

    @property
    def proxy_grpc_target(self) -> str:
        return f"127.0.0.1:{self.config['proxyGrpcPort']}"


# -- configs: the one place each contender's config is made ---------------------------------

def tfscache_config(node_id: str, models: str, cache_dir: str, backend: Any, max_models: int,
                    members: list[dict[str, Any]] | None = None,
                    port: Callable[[], int] = listen_port) -> dict[str, Any]:
    """A tfscache node's config: the configured defaults except the source, the cache, the
    backend, a model count that fits the cold cell, timeouts long enough for it, and warn-level
    logs. ``members``: a static cluster with replicas_per_model 1 (this node among them)."""
    me = next((m for m in members or [] if m["id"] == node_id), None)
    cfg: dict[str, Any] = {
        "node": {"id": node_id, "advertise_host": "127.0.0.1"},
        "listen": {"host": "127.0.0.1", "rest_port": me["rest_port"] if me else port(),
                   "grpc_port": me["grpc_port"] if me else port()},
        "model_provider": {"type": "disk", "disk": {"base_path": models}},
        "disk_cache": {"path": cache_dir},
        "serving": {"grpc_target": backend.grpc_target, "rest_url": backend.rest_url, "max_models": max_models,
                    "load_timeout_seconds": 600, "request_timeout_seconds": 600, "capacity_wait_seconds": 600},
        "logging": {"level": "warn"},
    }
    if members:
        cfg["cluster"] = {"replicas_per_model": 1, "secret": CLUSTER_SECRET,
                          "discovery": {"type": "static", "members": members}}
    return cfg


def original_config(port_base: int, models: str, cache_dir: str, backend: Any, max_models: int,
                    etcd: str | None = None) -> dict[str, Any]:
    """The original's config.yaml (its README's keys): disk provider, a cache big enough for
    every model, warning-level logs (it logs every request at info); with ``etcd``, its proxy
    with etcd discovery (heartbeat 2 s) and replicasPerModel 1, else the cache layer only."""
    cfg: dict[str, Any] = {
        "proxyRestPort": port_base, "proxyGrpcPort": port_base + 1,
        "cacheRestPort": port_base + 2, "cacheGrpcPort": port_base + 3,
        "metrics": {"path": "/monitoring/prometheus/metrics", "timeout": 3, "modelLabels": False},
        "modelProvider": {"type": "diskProvider", "diskProvider": {"baseDir": models}},
        "modelCache": {"hostModelPath": cache_dir, "size": 10**12},
        "serving": {"servingModelPath": cache_dir, "grpcHost": backend.grpc_target, "restHost": backend.rest_url,
                    "maxConcurrentModels": max_models, "grpcConfigTimeout": 10, "grpcPredictTimeout": 60},
        "proxy": {"replicasPerModel": 1, "grpcTimeout": 10},
        "logging": {"level": "warning"},
    }
    if etcd:
        cfg["serviceDiscovery"] = {"type": "etcd", "heartbeatTTL": 2, "etcd": {
            "serviceName": "tfservingcache", "endpoints": [etcd.split("://", 1)[1]], "allowLocalhost": True}}
    return cfg


def write_fake_models(base: str, names: Sequence[str]) -> None:
    """``<name>/1/saved_model.pb`` for the fast backend, which never reads them."""
    for name in names:
        d = os.path.join(base, name, str(VERSION))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "saved_model.pb"), "wb") as f:
            f.write(b"not a model: bench/fastbackend does not read it\n")


def _field(num: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    from google.protobuf.internal.encoder import _VarintBytes

    return _VarintBytes(num << 3 | 2) + _VarintBytes(len(payload)) + payload


def predict_payload(name: str) -> bytes:
    """PredictRequest{model_spec{name, version}, inputs{"x": float [INSTANCES]}}, encoded by hand:
    tensorflow-serving-api's module imports TensorFlow, which takes a minute on a busy machine."""
    from tfscache.proto import model_spec_pb2

    spec = model_spec_pb2.ModelSpec(name=name)
    spec.version.value = VERSION
    shape = _field(2, b"\x08" + bytes([len(INSTANCES)]))  # TensorShapeProto{dim{size}}
    tensor = b"\x08\x01" + _field(2, shape) + _field(5, struct.pack(f"<{len(INSTANCES)}f", *INSTANCES))  # DT_FLOAT
    return _field(1, spec.SerializeToString()) + _field(2, _field(1, b"x") + _field(2, tensor))


# -- measuring ------------------------------------------------------------------------------

def cpu_total(pids: Sequence[int]) -> float:
    return sum(cpu_seconds(p) for p in pids)


def per_request(cpu: dict[str, float], requests: int) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for group, used in cpu.items():
        out[f"{group}_cpu_s"] = used
        out[f"{group}_cpu_us_per_req"] = used / requests * 1e6 if requests else None
    return out


def rest_measure(url: str, lua: str, concurrency: int, seconds: float,
                 groups: dict[str, list[int]]) -> dict[str, Any]:
    before = {g: cpu_total(p) for g, p in groups.items()}
    r = wrk_cell(url, lua, concurrency, seconds)
    r.update(per_request({g: cpu_total(p) - before[g] for g, p in groups.items()}, r["requests"]))
    return r


def grpcload(target: str, payload_file: str, concurrency: int, seconds: float, groups: dict[str, list[int]],
             warmup: float = 0.3, extra: Sequence[str] = (), on_start: Callable[[], None] | None = None,
             ) -> dict[str, Any]:
    """One grpcload run; the servers' CPU over its measured window (its start/end events)."""
    path = binary("grpcload")
    assert path is not None
    argv = [path, "-target", target, "-method", PREDICT_METHOD, "-payload", payload_file,
            "-concurrency", str(concurrency), "-duration", f"{seconds}s", "-warmup", f"{warmup}s", *extra]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    before: dict[str, float] = {}
    cpu: dict[str, float] = {}
    result: dict[str, Any] | None = None
    for line in proc.stdout:
        msg = json.loads(line)
        if msg.get("event") == "start":
            before = {g: cpu_total(p) for g, p in groups.items()}
            if on_start:
                on_start()
        elif msg.get("event") == "end":
            cpu = {g: cpu_total(p) - before[g] for g, p in groups.items()}
        else:
            result = msg
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"grpcload exited with {proc.returncode}: {err.strip()}")
    result["error_codes"] = result.pop("errors")
    result["errors"] = sum(result["error_codes"].values())
    result["loadgen_cpu_s"] = usage.ru_utime + usage.ru_stime
    result.update(per_request(cpu, result["requests"]))
    return result


def warm(url: str, times: int = 3) -> None:
    for _ in range(times):
        status, body = post_json(url, {"instances": INSTANCES})
        if status != 200:
            raise RuntimeError(f"warm-up predict at {url}: {status} {body}")


def rest_state(url: str) -> int:
    """The HTTP status of a GET (a model's status on a backend: 200 loaded, 404 not)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


class Target:
    """Where one contender's requests go in one scenario, and whose CPU counts."""

    def __init__(self, rest_base: str, grpc_target: str, model: str, node_pids: list[int], backend_pid: int,
                 protocols: Sequence[str] = ("rest", "grpc")) -> None:
        self.rest_base, self.grpc_target, self.model = rest_base, grpc_target, model
        self.protocols = tuple(protocols)
        self.groups = {"node": node_pids, "backend": [backend_pid]} if node_pids else {"backend": [backend_pid]}

    @property
    def predict_url(self) -> str:
        return f"{self.rest_base}/v1/models/{self.model}/versions/{VERSION}:predict"


class Topology(contextlib.AbstractContextManager["Topology"]):
    """Every process of one backend kind: backends, tfscache nodes, original nodes (+ etcd)."""

    def __init__(self, kind: str, args: argparse.Namespace, procs: Processes, with_original: bool) -> None:
        self.kind, self.args, self.procs, self.with_original = kind, args, procs, with_original
        self.stack = contextlib.ExitStack()
        self.targets: dict[str, dict[str, Target]] = {}
        self.checks: dict[str, Any] = {}
        self.work = tempfile.mkdtemp(prefix=f"{kind}-", dir=procs.tmp)
        self.models = os.path.join(self.work, "models")
        self.max_models = max(10, args.cold_models + 10)

    def __exit__(self, *exc: Any) -> None:
        self.stack.close()

    def _fast(self, slow: bool = False) -> FastBackend:
        path = binary("fastbackend")
        assert path is not None
        extra = ["--slow-load-prefix", "slow-", "--slow-load-seconds", str(self.args.slow_load_seconds)] if slow else []
        return self._own(FastBackend(path, extra))

    def _own(self, proc: P) -> P:
        """``proc`` started, and stopped with the topology."""
        self.stack.callback(proc.stop)
        proc.start()
        return proc

    def _start(self, fixtures: Sequence[Any]) -> None:
        for f in fixtures:
            self.stack.callback(f.stop)
        with ThreadPoolExecutor(len(fixtures)) as pool:
            list(pool.map(lambda f: f.start(), fixtures))

    def start(self) -> Topology:
        started = time.monotonic()
        a = self.args
        routed = choose_routed_name(2, owner=1)
        orig_candidates = [f"orig-routed-{i}" for i in range(24)]
        names = ["warm", routed, *orig_candidates]
        cold = ([f"slow-cold-{who}-{i}" for who in ("t", "o") for i in range(a.cold_models)]
                if self.kind == "fast" else [])
        if self.kind == "fast":
            write_fake_models(self.models, names + cold)
            # one backend per node: [tfs single, tfs owner, tfs non-owner, orig single, orig B, orig A]
            backends: list[Any] = [self._fast(slow=True), self._fast(), self._fast(),
                                   self._fast(slow=True), self._fast(), self._fast()]
        else:
            n = (4 if self.with_original else 2) + (2 if a.before else 0)  # the last two: before's
            with ThreadPoolExecutor(1) as pool:
                devs = pool.submit(self.procs.devservers, n)
                write_models(self.models, names)
                dev = devs.result()
            # the non-owners' backends see no prediction: a fast one will do
            backends = [dev[0], dev[1], self._fast()]
            if self.with_original:
                backends += [dev[2], dev[3], self._fast()]
        # tfscache: a single node, and node-0 -> node-1 (the owner of `routed`)
        port = Ports(TFSCACHE_PORT_BASE + (0 if self.kind == "fast" else 100))
        ports = [(port(), port()) for _ in range(2)]
        members = [{"id": f"node-{i}", "host": "127.0.0.1", "rest_port": r, "grpc_port": g}
                   for i, (r, g) in enumerate(ports)]

        def cache() -> str:
            return tempfile.mkdtemp(prefix="cache-", dir=self.work)

        t_single = NodeProcess(tfscache_config("single", self.models, cache(), backends[0], self.max_models,
                                               port=port), "single")
        t_owner = NodeProcess(tfscache_config("node-1", self.models, cache(), backends[1], self.max_models, members),
                              "node-1")
        t_other = NodeProcess(tfscache_config("node-0", self.models, cache(), backends[2], self.max_models, members),
                              "node-0")
        fixtures: list[Any] = [t_single, t_owner, t_other]
        t_before = None
        before_router: list[NodeProcess] = []
        if a.before:
            before_backend = self._fast() if self.kind == "fast" else dev[-2]

            def before_node(node_id: str, backend: Any, cluster: list[dict[str, Any]] | None) -> NodeProcess:
                cfg = tfscache_config(node_id, self.models, cache(), backend, self.max_models, cluster, port=port)
                cfg.get("cluster", {}).pop("secret", None)  # the old code knows no cluster.secret
                node = NodeProcess(cfg, f"before-{node_id}")
                node.process.env["PYTHONPATH"] = os.path.abspath(a.before)
                return node

            t_before = before_node("single", before_backend, None)
            # the same ids as node-0 -> node-1 (so `routed` has the same owner), other ports
            before_members = [dict(m, rest_port=port(), grpc_port=port()) for m in members]
            before_owner_backend = self._fast() if self.kind == "fast" else dev[-1]
            before_other_backend = self._fast()
            before_router = [before_node("node-1", before_owner_backend, before_members),
                             before_node("node-0", before_other_backend, before_members)]
            fixtures += [t_before, *before_router]
        if self.with_original:
            path = binary("tfservingcache")
            assert path is not None
            etcd = EtcdServer()
            self.stack.callback(etcd.stop)
            etcd.start()
            base = ORIGINAL_PORT_BASE + (0 if self.kind == "fast" else 100)
            o_single = OriginalNode(path, "orig-single",
                                    original_config(base, self.models, cache(), backends[3], self.max_models))
            o_b = OriginalNode(path, "orig-b", original_config(base + 10, self.models, cache(), backends[4],
                                                                self.max_models, etcd.endpoint))
            o_a = OriginalNode(path, "orig-a", original_config(base + 20, self.models, cache(), backends[5],
                                                                self.max_models, etcd.endpoint))
            fixtures += [o_single, o_b, o_a]
        self._start(fixtures)

        pid = lambda x: x.process.pid  # noqa: E731
        self.targets["one_node"] = {
            "direct": Target(backends[0].rest_url, backends[0].grpc_target, "warm", [], pid_of(backends[0])),
            "tfscache": Target(t_single.rest_url, t_single.grpc_target, "warm", [pid(t_single)], pid_of(backends[0])),
        }
        self.targets["router"] = {
            "direct": Target(backends[1].rest_url, backends[1].grpc_target, routed, [], pid_of(backends[1])),
            "tfscache": Target(t_other.rest_url, t_other.grpc_target, routed, [pid(t_other), pid(t_owner)],
                               pid_of(backends[1])),
        }
        if t_before is not None:
            self.targets["one_node"]["before"] = Target(t_before.rest_url, t_before.grpc_target, "warm",
                                                        [pid(t_before)], pid_of(before_backend))
            warm(self.targets["one_node"]["before"].predict_url)
            b_owner, b_other = before_router
            self.targets["router"]["before"] = Target(b_other.rest_url, b_other.grpc_target, routed,
                                                      [pid(b_other), pid(b_owner)], pid_of(before_owner_backend))
            warm(self.targets["router"]["before"].predict_url)
            self.checks["before_router_owner_backend_has_model"] = rest_state(
                f"{before_owner_backend.rest_url}/v1/models/{routed}/versions/{VERSION}") == 200
            self.checks["before_router_non_owner_backend_has_model"] = rest_state(
                f"{before_other_backend.rest_url}/v1/models/{routed}/versions/{VERSION}") == 200
        warm(self.targets["one_node"]["tfscache"].predict_url)
        warm(self.targets["router"]["tfscache"].predict_url)
        # the routed model must have been forwarded: loaded by the owner's backend only
        self.checks["tfscache_router_owner_backend_has_model"] = rest_state(
            f"{backends[1].rest_url}/v1/models/{routed}/versions/{VERSION}") == 200
        self.checks["tfscache_router_non_owner_backend_has_model"] = rest_state(
            f"{backends[2].rest_url}/v1/models/{routed}/versions/{VERSION}") == 200
        if self.with_original:
            self.targets["one_node"]["original"] = Target(o_single.cache_rest_url, o_single.cache_grpc_target,
                                                          "warm", [o_single.pid], pid_of(backends[3]))
            warm(self.targets["one_node"]["original"].predict_url)
            name = self._original_routed_name(etcd, o_a, backends[4], backends[5], orig_candidates)
            self.targets["router"]["original"] = Target(o_a.proxy_rest_url, o_a.proxy_grpc_target, name,
                                                        [o_a.pid, o_b.pid], pid_of(backends[4]))
            warm(self.targets["router"]["original"].predict_url)
            self.checks["original_router_model"] = name
        self._start_floor(backends, routed)
        for sc in self.targets.values():  # the direct contender: the model is loaded there
            warm(sc["direct"].predict_url)
        self.cold_targets = {"tfscache": self.targets["one_node"]["tfscache"]}
        if self.with_original:
            self.cold_targets["original"] = self.targets["one_node"]["original"]
        self.setup_seconds = time.monotonic() - started
        return self

    def _start_floor(self, backends: list[Any], routed: str) -> None:
        """The grpc.aio floor (bench/grpc_floor): one relay to the single node's backend, and
        relay A -> relay B -> the owner's backend, where tfscache loaded the models."""
        single = self._own(GrpcFloor(backends[0].grpc_target))
        self.targets["one_node"]["floor"] = Target("", single.grpc_target, "warm", [single.pid],
                                                   pid_of(backends[0]), protocols=("grpc",))
        second = self._own(GrpcFloor(backends[1].grpc_target))
        first = self._own(GrpcFloor(second.grpc_target))
        self.targets["router"]["floor"] = Target("", first.grpc_target, routed, [first.pid, second.pid],
                                                 pid_of(backends[1]), protocols=("grpc",))

    def _original_routed_name(self, etcd: EtcdServer, proxy: OriginalNode, owner_backend: Any,
                              other_backend: Any, candidates: list[str]) -> str:
        """A model name the original's proxy on A sends to B: wait until etcd lists both nodes
        (each registers on its first heartbeat), then try names until one lands on B's backend."""
        wait_until("both original nodes registered in etcd", lambda: etcd_count(etcd.endpoint, "/service/") >= 2, 30)
        wait_until("the original's proxy routing", lambda: post_json(
            f"{proxy.proxy_rest_url}/v1/models/{candidates[0]}/versions/{VERSION}:predict",
            {"instances": INSTANCES}, timeout=30)[0] == 200, 30)
        for name in candidates:
            status, body = post_json(f"{proxy.proxy_rest_url}/v1/models/{name}/versions/{VERSION}:predict",
                                     {"instances": INSTANCES}, timeout=60)
            if status != 200:
                raise RuntimeError(f"the original's proxy answered {status} for {name}: {body}")
            on_b = rest_state(f"{owner_backend.rest_url}/v1/models/{name}/versions/{VERSION}") == 200
            on_a = rest_state(f"{other_backend.rest_url}/v1/models/{name}/versions/{VERSION}") == 200
            if on_b and not on_a:
                return name
        raise RuntimeError("no candidate model name is owned by the original's node B")


def pid_of(backend: Any) -> int:
    return backend.pid if isinstance(backend, FastBackend) else int(backend.process.pid)


def etcd_count(endpoint: str, prefix: str) -> int:
    import base64

    def b64(s: str) -> str:
        return base64.b64encode(s.encode()).decode()

    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    status, body = post_json(f"{endpoint}/v3/kv/range", {"key": b64(prefix), "range_end": b64(end),
                                                         "count_only": True}, timeout=5)
    return int(body.get("count", 0)) if status == 200 and isinstance(body, dict) else 0


# -- cells ----------------------------------------------------------------------------------

METRICS = ("rps", "p50_ms", "p99_ms", "node_cpu_us_per_req", "backend_cpu_us_per_req")


def median(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarise(cell: dict[str, Any]) -> None:
    cell["median"] = {c: {m: median([r.get(m) for r in runs]) for m in METRICS}
                      for c, runs in cell["rounds"].items()}
    cell["errors"] = {c: sum(r["errors"] for r in runs) for c, runs in cell["rounds"].items()}
    med = cell["median"]
    out: dict[str, dict[str, float | None]] = {}
    pairs = (("tfscache", "original"), ("tfscache", "direct"), ("original", "direct"), ("tfscache", "before"),
             ("tfscache", "floor"))
    for num, den in pairs:
        if num in med and den in med:
            out[f"{num}_vs_{den}"] = {m: ratio(med[num][m], med[den][m]) for m in METRICS[:3]}
    if "tfscache" in med and "original" in med:
        out["tfscache_vs_original"]["node_cpu_us_per_req"] = ratio(med["tfscache"]["node_cpu_us_per_req"],
                                                                   med["original"]["node_cpu_us_per_req"])
    for den in ("before", "floor"):
        if "tfscache" in med and den in med:
            out[f"tfscache_vs_{den}"]["node_cpu_us_per_req"] = ratio(med["tfscache"]["node_cpu_us_per_req"],
                                                                     med[den]["node_cpu_us_per_req"])
    cell["ratios"] = out


def run_cells(topo: Topology, args: argparse.Namespace, concurrency: list[int], contenders: list[str],
              log: Callable[[str], None]) -> list[dict[str, Any]]:
    lua = os.path.join(topo.work, "predict.lua")
    with open(lua, "w") as f:
        f.write(WRK_LUA % {"body": json.dumps({"instances": INSTANCES})})
    payloads: dict[str, str] = {}

    def payload_file(model: str) -> str:
        if model not in payloads:
            payloads[model] = os.path.join(topo.work, f"{model}.pb")
            with open(payloads[model], "wb") as f:
                f.write(predict_payload(model))
        return payloads[model]

    cells = []
    for scenario in args.scenarios:
        for protocol in args.protocols:
            for c in concurrency:
                present = [k for k in contenders
                           if k in topo.targets[scenario] and protocol in topo.targets[scenario][k].protocols]
                cell: dict[str, Any] = {"backend": topo.kind, "scenario": scenario, "protocol": protocol,
                                        "concurrency": c, "rounds": {k: [] for k in present}}
                for _ in range(args.rounds):
                    for who in present:
                        t = topo.targets[scenario][who]
                        if protocol == "rest":
                            r = rest_measure(t.predict_url, lua, c, args.seconds, t.groups)
                        else:
                            r = grpcload(t.grpc_target, payload_file(t.model), c, args.seconds, t.groups)
                        cell["rounds"][who].append(r)
                summarise(cell)
                log(cell_line(cell))
                cells.append(cell)
    return cells


def cell_line(cell: dict[str, Any]) -> str:
    med = cell["median"]
    parts = [f"{cell['backend']} {cell['scenario']} {cell['protocol']} c={cell['concurrency']}:"]
    for who, m in med.items():
        cpu = m["node_cpu_us_per_req"]
        parts.append(f"{who} {m['rps']:.0f}/s p50 {m['p50_ms']:.2f} ms"
                     + (f" cpu {cpu:.0f} us" if cpu is not None else ""))
    return " | ".join(parts)


def cold_cell(topo: Topology, args: argparse.Namespace, who: str) -> dict[str, Any]:
    """Warm gRPC calls alone, then beside ``cold_models`` concurrent calls for cold models."""
    t = topo.cold_targets[who]
    payload = os.path.join(topo.work, "cold-warm.pb")
    with open(payload, "wb") as f:
        f.write(predict_payload(t.model))
    c, window = args.cold_warm_concurrency, args.cold_window
    # a warm call stuck behind cold ones fails after this (an error), rather than holding the run
    warm_timeout = ["-timeout", f"{window + 5:g}s"]
    alone = grpcload(t.grpc_target, payload, c, window, t.groups, extra=warm_timeout)
    path = binary("grpcload")
    assert path is not None
    # each cold caller names its own model: slow-cold-<t|o>-<i>, which the backend loads slowly
    cold_timeout = args.cold_timeout  # the same deadline for every contender; it bounds the cell's time
    cold_argv = [path, "-target", t.grpc_target, "-payload", payload, "-once", "-concurrency", str(args.cold_models),
                 "-rename-prefix", f"slow-cold-{who[0]}-", "-timeout", f"{cold_timeout}s"]
    cold_started: list[float] = []
    cold_proc: subprocess.Popen[str] | None = None

    def launch_cold() -> None:  # when the warm calls' window opens
        nonlocal cold_proc
        cold_started.append(time.monotonic())
        cold_proc = subprocess.Popen(cold_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    beside = grpcload(t.grpc_target, payload, c, window, t.groups, extra=warm_timeout, on_start=launch_cold)
    window_end = time.monotonic()
    assert cold_proc is not None
    out, err = cold_proc.communicate(timeout=cold_timeout + 60)
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{") and "event" not in x]
    if cold_proc.returncode != 0 or not lines:
        raise RuntimeError(f"cold grpcload exited with {cold_proc.returncode}: {err.strip()}")
    cold = lines[-1]
    cold_seconds = cold["seconds"]
    return {
        "contender": who, "cold_models": args.cold_models, "slow_load_seconds": args.slow_load_seconds,
        "warm_concurrency": c, "window_seconds": window,
        "warm_alone": alone, "warm_beside_cold": beside,
        "cold": {"answered": cold["requests"], "errors": sum(cold["errors"].values()),
                 "error_codes": cold["errors"], "p50_ms": cold["p50_ms"],
                 "max_ms": cold["max_ms"], "seconds": cold_seconds},
        # how much of the warm window had cold calls in flight
        "window_overlap": min(1.0, cold_seconds / max(window_end - cold_started[0], 1e-9)),
        "p50_ratio": ratio(beside["p50_ms"], alone["p50_ms"]),
        "p99_ratio": ratio(beside["p99_ms"], alone["p99_ms"]),
        "rps_ratio": ratio(beside["rps"], alone["rps"]),
    }


# -- the benchmark --------------------------------------------------------------------------

def settle_defaults(args: argparse.Namespace) -> None:
    q = args.quick
    args.seconds = args.seconds or (0.5 if q else 2.0)
    args.rounds = args.rounds or (1 if q else 3)
    args.concurrency = args.concurrency or ([1, 16] if q else [1, 64, 256])
    args.devserver_concurrency = args.devserver_concurrency or ([1] if q else [1, 64])
    args.backends = args.backends or (["fast"] if q else ["fast", "devserver"])
    if args.cold_models is None:
        args.cold_models = 50 if q else 500
    args.slow_load_seconds = args.slow_load_seconds or (1.0 if q else 5.0)
    args.cold_window = args.cold_window or (2 * args.slow_load_seconds + 1)
    args.cold_timeout = args.cold_timeout or (10.0 if q else 30.0)


def run(args: argparse.Namespace, netns_reason: str | None) -> dict[str, Any]:
    started = time.monotonic()
    missing = [n for n in ("fastbackend", "grpcload") if binary(n) is None]
    if missing:
        reason = (f"{', '.join(missing)} not built in {BIN}: run bench/build_go_bench.sh "
                  "(scripts/setup --go-servers does)")
        return {"skipped": reason}
    if shutil.which("wrk") is None and "rest" in args.protocols:
        return {"skipped": "wrk is not installed (Debian package wrk; scripts/setup installs it as root)"}
    original_reason = None
    if args.no_original:
        original_reason = "--no-original"
    elif netns_reason:
        original_reason = netns_reason
    elif binary("tfservingcache") is None:
        original_reason = (f"the original TFServingCache is not built in {BIN} (bench/build_go_bench.sh "
                           "needs its source in /work/shared/peers/TFServingCache)")
    with_original = original_reason is None
    contenders = [c for c in CONTENDERS if (with_original or c != "original") and (args.before or c != "before")]
    if original_reason:
        print(f"data_plane: the original is not measured: {original_reason}", flush=True)

    def log(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {line}", flush=True)

    cells: list[dict[str, Any]] = []
    cold: list[dict[str, Any]] = []
    checks: dict[str, Any] = {}
    setup: dict[str, float] = {}
    with Processes() as procs:
        for kind in args.backends:
            with Topology(kind, args, procs, with_original) as topo:
                topo.start()
                setup[kind] = round(topo.setup_seconds, 1)
                log(f"{kind}: set up in {topo.setup_seconds:.1f}s")
                conc = args.concurrency if kind == "fast" else args.devserver_concurrency
                cells += run_cells(topo, args, conc, contenders, log)
                if kind == "fast" and args.cold_models > 0:
                    for who in ("tfscache", "original") if with_original else ("tfscache",):
                        cold.append(cold_cell(topo, args, who))
                        alone, beside = cold[-1]["warm_alone"], cold[-1]["warm_beside_cold"]
                        log(f"cold ({who}): warm p50 {alone['p50_ms']:.2f} -> {beside['p50_ms']:.2f} ms, "
                            f"p99 {alone['p99_ms']:.2f} -> {beside['p99_ms']:.2f} ms; "
                            f"{cold[-1]['cold']['answered']}/{args.cold_models} cold answered")
                checks[kind] = topo.checks
    for kind, c in checks.items():
        for who in ("tfscache", "before") if args.before else ("tfscache",):
            if not c.get(f"{who}_router_owner_backend_has_model") or c.get(f"{who}_router_non_owner_backend_has_model"):
                raise RuntimeError(f"{kind}: {who}'s routed model was not forwarded to its owner: {c}")
    return {
        "settings": {
            "seconds_per_measurement": args.seconds, "rounds": args.rounds, "concurrency_fast": args.concurrency,
            "concurrency_devserver": args.devserver_concurrency, "backends": args.backends,
            "protocols": args.protocols, "scenarios": args.scenarios, "quick": args.quick,
            "cold_models": args.cold_models, "slow_load_seconds": args.slow_load_seconds,
            "cold_window_seconds": args.cold_window, "cold_warm_concurrency": args.cold_warm_concurrency,
            "cold_timeout_seconds": args.cold_timeout,
            "wrk_threads": "min(concurrency, 2)", "grpc_channels": "ceil(concurrency / 64)", "warmup_s": 0.3,
            "private_network_namespace": bool(os.environ.get(NETNS_ENV)),
            "tfscache_config": "bench.data_plane.tfscache_config",
            "original_config": "bench.data_plane.original_config",
        },
        "contenders": contenders,
        "original": {"measured": with_original, "reason": original_reason,
                     "compared": "one node: the original's cache layer (cache ports) vs a tfscache node; router: "
                                 "the original's proxy on A -> cache on B (etcd discovery) vs tfscache node-0 -> "
                                 "node-1 (static cluster)"},
        "note": (f"{os.cpu_count()} CPUs shared by load generator, nodes and backends: absolute figures are for "
                 "this machine; compare within a cell (same run, interleaved rounds)"),
        "setup_seconds": setup,
        "cells": cells,
        "cold": cold,
        "checks": checks,
        "total_seconds": round(time.monotonic() - started, 1),
    }


def fmt(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}"


def show(report: dict[str, Any]) -> None:
    if "skipped" in report:
        print(f"data_plane: skipped: {report['skipped']}")
        return
    who = report["contenders"]
    label = "/".join(w[0] for w in who)  # d/o/t
    rows = []
    for cell in report["cells"]:
        med, rat = cell["median"], cell["ratios"]
        t_o = rat.get("tfscache_vs_original", {})
        rows.append([
            f"{cell['backend']} {cell['scenario']} {cell['protocol']} c={cell['concurrency']}",
            " / ".join(fmt(med.get(w, {}).get("rps")) for w in who),
            " / ".join(fmt(med.get(w, {}).get("p50_ms"), 2) for w in who),
            " / ".join(fmt(med.get(w, {}).get("p99_ms"), 2) for w in who),
            " / ".join(fmt(med.get(w, {}).get("node_cpu_us_per_req")) for w in who if w != "direct"),
            fmt(rat.get("tfscache_vs_direct", {}).get("rps"), 2),
            fmt(t_o.get("rps"), 2), fmt(t_o.get("p50_ms"), 2), fmt(t_o.get("node_cpu_us_per_req"), 2),
            fmt(rat.get("tfscache_vs_floor", {}).get("node_cpu_us_per_req"), 2),
            sum(cell["errors"].values()),
        ])
    s = report["settings"]
    print_table(
        f"Data plane ({s['seconds_per_measurement']:g} s per measurement, median of {s['rounds']} interleaved "
        f"rounds; {label} = {' / '.join(who)}; latency ms; node CPU us per request; t/o = tfscache / "
        "original, t/d = tfscache / direct, t/f = tfscache / the grpc.aio floor (gRPC cells only)",
        ["cell", f"req/s {label}", f"p50 {label}", f"p99 {label}", "node CPU " + "/".join(w[0] for w in who[1:]),
         "rps t/d", "rps t/o", "p50 t/o", "CPU t/o", "CPU t/f", "errors"], rows)
    if report["cold"]:
        rows = []
        for c in report["cold"]:
            a, b = c["warm_alone"], c["warm_beside_cold"]
            rows.append([c["contender"], f"{a['p50_ms']:.2f} / {b['p50_ms']:.2f}",
                         f"{a['p99_ms']:.2f} / {b['p99_ms']:.2f}",
                         fmt(c["p50_ratio"], 2), fmt(c["p99_ratio"], 2), f"{a['rps']:.0f} / {b['rps']:.0f}",
                         f"{c['cold']['answered']}/{c['cold_models']}", f"{c['cold']['max_ms'] / 1e3:.1f} s",
                         f"{a['errors']} / {b['errors']}"])
        print_table(
            f"Cold calls beside warm ones (fast backend, {s['cold_models']} concurrent gRPC calls for distinct models "
            f"that take {s['slow_load_seconds']:g} s to load, deadline {s['cold_timeout_seconds']:g} s; warm model "
            f"at c={s['cold_warm_concurrency']} for {s['cold_window_seconds']:g} s, deadline +5 s; alone / beside)",
            ["node", "warm p50 ms", "warm p99 ms", "p50 x", "p99 x", "warm req/s", "cold answered", "last cold answer",
             "warm errors"], rows)
    if not report["original"]["measured"]:
        print(f"original not measured: {report['original']['reason']}")
    print(f"note: {report['note']}")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(__doc__ or "", extra_args, argv)
    settle_defaults(args)
    reason = None if args.no_original else enter_private_network(argv)
    report = run(args, reason)
    show(report)
    print(f"wrote {write_report(args.name, report, args.out)} (total {report.get('total_seconds', 0)}s)")


if __name__ == "__main__":
    main()
