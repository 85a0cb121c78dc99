"""The demo: a small cluster on loopback -- N TF Serving backends, each with its tfscache node
beside it, every node with room for fewer models than the traffic asks for -- REST and gRPC
traffic sent to ANY node over all the models, and a summary of what the cache did.

    scripts/demo [--nodes 2] [--models 12] [--max-models 4] [--requests 400] [--concurrency 8]

With ``--nodes 1`` it is a single node in front of a single backend.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# TensorFlow's and absl's start-up lines (oneDNN, CPU features, "All log messages before
# absl::InitializeLog() ...") are not the demo's output, here nor in the DevServers started
# below (they inherit the environment).  TF 2.21 logs its oneDNN notice before it reads
# TF_CPP_MIN_LOG_LEVEL, so oneDNN's custom ops are turned off as well (the example models'
# results are the same with or without them).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import logging  # noqa: E402

from absl import logging as absl_logging  # noqa: E402

absl_logging.set_verbosity(absl_logging.ERROR)
logging.getLogger("tensorflow").setLevel(logging.ERROR)  # its deprecation notices

import grpc  # noqa: E402
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: E402

from tests.harness.devserver import DevServer  # noqa: E402
from tests.harness.node import NodeProcess, node_config  # noqa: E402
from tests.harness.process import listen_port, retry_on_collision  # noqa: E402
from tfscache.devserver.models import write_half_plus_two  # noqa: E402


def coefficients(i: int, version: int) -> tuple[float, float]:
    return 0.5 + i, 2.0 + version


def rest_predict(base: str, name: str, x: float) -> float:
    body = json.dumps({"instances": [x]}).encode()
    req = urllib.request.Request(f"{base}/v1/models/{name}:predict", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return float(json.load(resp)["predictions"][0])


def grpc_predict(stub: prediction_service_pb2_grpc.PredictionServiceStub, name: str, x: float) -> float:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = name
    req.inputs["x"].dtype = 1  # DT_FLOAT
    req.inputs["x"].tensor_shape.dim.add().size = 1
    req.inputs["x"].float_val.append(x)
    resp = stub.Predict(req, timeout=120)
    return float(resp.outputs["y"].float_val[0])


def scrape(base: str) -> dict[str, float]:
    with urllib.request.urlopen(base + "/monitoring/prometheus/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, _, value = line.rpartition(" ")
        out[key] = out.get(key, 0.0) + float(value)
    return out


def total(metrics: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in metrics.items() if k.startswith(prefix) and not k.endswith("_created")
               and "_created{" not in k)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def node_figures(m: dict[str, float]) -> dict[str, float]:
    return {
        "hits": total(m, "tfscache_cache_hits_total"),
        "misses": total(m, "tfscache_cache_misses_total"),
        "copies": total(m, "tfscache_fetches_total"),
        "loads": total(m, "tfscache_loads_total"),
        "unloads": total(m, "tfscache_unloads_total"),
        "loaded": total(m, "tfscache_models_loaded"),
        # requests this node's router sent on to another node (the model's owner)
        "forwards": sum(v for k, v in m.items()
                        if k.startswith("tfscache_router_forwards_total{") and 'target="local"' not in k),
        "load_seconds_sum": total(m, "tfscache_load_seconds_sum"),
        "load_seconds_count": total(m, "tfscache_load_seconds_count"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=2, help="cache nodes, each with its own backend")
    ap.add_argument("--models", type=int, default=12)
    ap.add_argument("--max-models", type=int, default=4, help="models loaded at once, per node")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    if args.nodes < 1:
        ap.error("--nodes must be at least 1")
    rng = random.Random(args.seed)

    work = tempfile.mkdtemp(prefix="tfscache-demo-")
    models = os.path.join(work, "models")
    print(f"demo: writing {args.models} example models (2 versions each) into {models}")
    for i in range(args.models):
        for version in (1, 2):
            a, b = coefficients(i, version)
            write_half_plus_two(models, f"tenant-{i:02d}", version, a=a, b=b)

    # Every node knows every other one from a static member list, so their ports are chosen
    # before they start (below the ephemeral range); a port taken meanwhile: new ports for all
    ids = [f"node-{n + 1}" for n in range(args.nodes)]
    backends = [DevServer() for _ in ids]
    secret = secrets.token_hex(16)  # the nodes authenticate their forwards with it (cluster.secret)
    nodes: list[NodeProcess] = []

    def start_nodes() -> list[NodeProcess]:
        ports = [(listen_port(), listen_port()) for _ in ids]
        members = [{"id": i, "host": "127.0.0.1", "rest_port": r, "grpc_port": g}
                   for i, (r, g) in zip(ids, ports, strict=True)]
        for node in nodes:  # the previous attempt's
            node.stop()
        nodes.clear()
        for n, (node_id, (rest_port, grpc_port)) in enumerate(zip(ids, ports, strict=True)):
            cfg = node_config(models, backends[n], os.path.join(work, f"cache-{node_id}"), node_id=node_id,
                              listen={"rest_port": rest_port, "grpc_port": grpc_port},
                              serving={"max_models": args.max_models, "churn_guard_seconds": 0.2},
                              cluster={"replicas_per_model": min(2, args.nodes), "secret": secret,
                                       "discovery": {"type": "static", "members": members}})
            nodes.append(NodeProcess(cfg, name=node_id))
        for node in nodes:
            node.start()
        return nodes

    print(f"demo: starting {args.nodes} TF Serving backend(s) (DevServer) ...")
    try:
        for backend in backends:
            backend.start()
        print(f"demo: starting {args.nodes} tfscache node(s) (max_models={args.max_models} each) ...")
        retry_on_collision(start_nodes)
        stubs = [prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(node.grpc_target))
                 for node in nodes]
        # a skewed workload: a few tenants are hot, most are cold; each request goes to any node
        weights = [1.0 / (i + 1) ** 1.1 for i in range(args.models)]
        plan = [(rng.choices(range(args.models), weights)[0], rng.random() < 0.5, rng.uniform(-5, 5),
                 rng.randrange(args.nodes)) for _ in range(args.requests)]
        latencies: dict[str, list[float]] = {"rest": [], "grpc": []}
        wrong = []

        def one(item: tuple[int, bool, float, int]) -> None:
            i, use_grpc, x, n = item
            name = f"tenant-{i:02d}"
            started = time.monotonic()
            y = grpc_predict(stubs[n], name, x) if use_grpc else rest_predict(nodes[n].rest_url, name, x)
            latencies["grpc" if use_grpc else "rest"].append(time.monotonic() - started)
            a, b = coefficients(i, 2)  # no version asked: the latest, 2
            if abs(y - (a * x + b)) > 1e-3 * max(1.0, abs(a * x + b)):
                wrong.append((name, x, y))

        print(f"demo: sending {args.requests} predictions over {args.models} models to any of the "
              f"{args.nodes} node(s), REST and gRPC, {args.concurrency} at a time ...")
        started = time.monotonic()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, plan))
        elapsed = time.monotonic() - started
        per_node = [node_figures(scrape(node.rest_url)) for node in nodes]
    finally:
        for node in nodes:
            node.stop()
        for backend in backends:
            backend.stop()
        shutil.rmtree(work, ignore_errors=True)  # the example models and the disk caches

    def summed(key: str) -> float:
        return sum(f[key] for f in per_node)

    all_lat = latencies["rest"] + latencies["grpc"]
    rows = [
        ("requests", f"{args.requests} in {elapsed:.1f}s ({args.requests / elapsed:.0f}/s)"),
        ("wrong predictions", str(len(wrong))),
        ("cache hits", f"{summed('hits'):.0f}"),
        ("cache misses", f"{summed('misses'):.0f}"),
        ("copies from source", f"{summed('copies'):.0f}"),
        ("loads into TF Serving", f"{summed('loads'):.0f}"),
        ("unloads (LRU)", f"{summed('unloads'):.0f}"),
        ("forwarded to the owner", f"{summed('forwards'):.0f}"),
        ("models loaded at the end", f"{summed('loaded'):.0f} (max {args.max_models} per node)"),
        ("mean load time", "%.0f ms" % (1000 * summed("load_seconds_sum") / max(1.0, summed("load_seconds_count")))),
        ("latency REST p50 / p99", f"{pct(latencies['rest'], .5):.1f} / {pct(latencies['rest'], .99):.1f} ms"),
        ("latency gRPC p50 / p99", f"{pct(latencies['grpc'], .5):.1f} / {pct(latencies['grpc'], .99):.1f} ms"),
        ("latency all median", f"{statistics.median(all_lat) * 1000:.1f} ms"),
    ]
    print("\n== tfscache demo summary")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    if args.nodes > 1:
        print("\n  per node     hits  misses  copies  loads  unloads  forwarded  loaded")
        for node_id, f in zip(ids, per_node, strict=True):
            print(f"  {node_id:<10} {f['hits']:5.0f} {f['misses']:7.0f} {f['copies']:7.0f} {f['loads']:6.0f} "
                  f"{f['unloads']:8.0f} {f['forwards']:10.0f} {f['loaded']:7.0f}")
    if wrong:
        print(f"demo: {len(wrong)} predictions were wrong, e.g. {wrong[:3]}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
