"""The demo: a TF Serving backend, a tfscache node with room for fewer models than it is asked
for, REST and gRPC traffic over all of them, and a summary of what the cache did.

    scripts/demo [--models 12] [--max-models 4] [--requests 400] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc  # noqa: E402
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: E402

from tests.harness.devserver import DevServer  # noqa: E402
from tests.harness.node import NodeProcess, node_config  # noqa: E402
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=12)
    ap.add_argument("--max-models", type=int, default=4)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)

    work = tempfile.mkdtemp(prefix="tfscache-demo-")
    models = os.path.join(work, "models")
    print(f"demo: writing {args.models} example models (2 versions each) into {models}")
    for i in range(args.models):
        for version in (1, 2):
            a, b = coefficients(i, version)
            write_half_plus_two(models, f"tenant-{i:02d}", version, a=a, b=b)

    backend = DevServer()
    print("demo: starting the TF Serving backend (DevServer) ...")
    backend.start()
    node = NodeProcess(node_config(models, backend, os.path.join(work, "cache"), serving={
        "max_models": args.max_models, "churn_guard_seconds": 0.2}))
    print(f"demo: starting tfscache (max_models={args.max_models}) ...")
    try:
        node.start()
        channel = grpc.insecure_channel(node.grpc_target)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        # a skewed workload: a few tenants are hot, most are cold
        weights = [1.0 / (i + 1) ** 1.1 for i in range(args.models)]
        plan = [(rng.choices(range(args.models), weights)[0], rng.random() < 0.5, rng.uniform(-5, 5))
                for _ in range(args.requests)]
        latencies: dict[str, list[float]] = {"rest": [], "grpc": []}
        wrong = []

        def one(item: tuple[int, bool, float]) -> None:
            i, use_grpc, x = item
            name = f"tenant-{i:02d}"
            started = time.monotonic()
            y = grpc_predict(stub, name, x) if use_grpc else rest_predict(node.rest_url, name, x)
            latencies["grpc" if use_grpc else "rest"].append(time.monotonic() - started)
            a, b = coefficients(i, 2)  # no version asked: the latest, 2
            if abs(y - (a * x + b)) > 1e-3 * max(1.0, abs(a * x + b)):
                wrong.append((name, x, y))

        print(f"demo: sending {args.requests} predictions over {args.models} models, "
              f"REST and gRPC, {args.concurrency} at a time ...")
        started = time.monotonic()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, plan))
        elapsed = time.monotonic() - started
        m = scrape(node.rest_url)
    finally:
        node.stop()
        backend.stop()

    all_lat = latencies["rest"] + latencies["grpc"]
    rows = [
        ("requests", f"{args.requests} in {elapsed:.1f}s ({args.requests / elapsed:.0f}/s)"),
        ("wrong predictions", str(len(wrong))),
        ("cache hits", f"{total(m, 'tfscache_cache_hits_total'):.0f}"),
        ("cache misses", f"{total(m, 'tfscache_cache_misses_total'):.0f}"),
        ("copies from source", f"{total(m, 'tfscache_fetches_total'):.0f}"),
        ("loads into TF Serving", f"{total(m, 'tfscache_loads_total'):.0f}"),
        ("unloads (LRU)", f"{total(m, 'tfscache_unloads_total'):.0f}"),
        ("models loaded at the end", f"{total(m, 'tfscache_models_loaded'):.0f} (max {args.max_models})"),
        ("mean load time", "%.0f ms" % (1000 * total(m, "tfscache_load_seconds_sum")
                                        / max(1.0, total(m, "tfscache_load_seconds_count")))),
        ("latency REST p50 / p99", f"{pct(latencies['rest'], .5):.1f} / {pct(latencies['rest'], .99):.1f} ms"),
        ("latency gRPC p50 / p99", f"{pct(latencies['grpc'], .5):.1f} / {pct(latencies['grpc'], .99):.1f} ms"),
        ("latency all median", f"{statistics.median(all_lat) * 1000:.1f} ms"),
    ]
    print("\n== tfscache demo summary")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    if wrong:
        print(f"demo: {len(wrong)} predictions were wrong, e.g. {wrong[:3]}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
