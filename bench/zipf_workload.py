"""Hit ratio and loads under a Zipf workload: offline LRU and Belady's MIN, then the real daemon.

A trace draws model k (0 = most popular) with probability proportional to 1/(k+1)**skew, from a
seeded RNG, so every run sees the same trace.

(a) Simulation (``bench/cachesim.py``): for every skew and every capacity, the hit ratio and the
    loads per 1,000 requests of LRU (tfscache's eviction) and of Belady's MIN (the offline
    optimum of any demand cache: the bound on what a cleverer eviction policy could gain).
    Both start empty, so the first request of every model is a miss in both.

(b) Replay, for every skew in ``--replay-skews`` (fresh processes each): the same kind of trace
    sent to a real tfscache node (``twistd tfscache``, a DevServer
    behind it, ``serving.max_models`` = capacity, ``churn_guard_seconds`` = 0 so that eviction
    is plain LRU) with a bounded number of requests in flight (REST predict, keep-alive
    connections, one per client thread).  The hit ratio and loads come from the node's
    /metrics (tfscache_cache_hits/misses, tfscache_loads, tfscache_unloads) and are compared with
    LRU and MIN on the same trace.  Differences from LRU come from concurrency: a request for a
    model whose load is under way counts as a miss in the daemon (it waits for that load) but
    as a hit in the simulator, and a model with a request in flight is never the victim.

    python -m bench.zipf_workload            # 500 models; replays: skew 0.8, 1.0, 1.2, capacity 50, 2,000 requests
    python -m bench.zipf_workload --quick    # 40 models; replay: capacity 5, 200 requests
    python -m bench.zipf_workload --no-replay   # simulation only (seconds)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.cachesim import belady_min, lru, zipf_trace
from bench.common import Processes, metric, parse_args, percentiles, print_table, scrape, write_models, write_report


def _extra(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--models", type=int, help="distinct models (default 500, quick 40)")
    ap.add_argument("--skews", type=float, nargs="+", default=[0.8, 1.0, 1.2], help="Zipf skews simulated")
    ap.add_argument("--capacities", type=int, nargs="+",
                    help="capacities simulated (default 10 25 50 100 200, quick 2 5 10 20)")
    ap.add_argument("--sim-requests", type=int, help="requests per simulated trace (default 20000, quick 2000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--capacity", type=int, help="replay: serving.max_models (default 50, quick 5)")
    ap.add_argument("--requests", type=int, help="replay: requests (default 2000, quick 200)")
    ap.add_argument("--replay-skews", "--skew", dest="replay_skews", type=float, nargs="+", default=[0.8, 1.0, 1.2],
                    help="replay: Zipf skews, one replay each (fresh processes)")
    ap.add_argument("--concurrency", type=int, default=8, help="replay: requests in flight")
    ap.add_argument("--no-replay", action="store_true", help="simulation only")


def model_name(k: int) -> str:
    return f"zipf-{k:04d}"


def simulate(n_models: int, n_requests: int, skews: list[float], capacities: list[int], seed: int) -> dict[str, Any]:
    rows = []
    for skew in skews:
        trace = zipf_trace(n_models, n_requests, skew, seed)
        distinct = len(set(trace))
        for cap in capacities:
            rows.append({"skew": skew, "capacity": cap, "distinct_models": distinct,
                         "lru": lru(trace, cap).to_dict(), "min": belady_min(trace, cap).to_dict()})
    return {"models": n_models, "requests": n_requests, "seed": seed, "rows": rows}


class _Client:
    """REST predict over one keep-alive connection per thread."""

    def __init__(self, host: str, port: int, timeout: float = 120.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return conn

    def predict(self, name: str) -> tuple[float, int, Any]:
        """(seconds, HTTP status, parsed body)."""
        body = json.dumps({"instances": [1.0]}).encode()
        path = f"/v1/models/{name}/versions/1:predict"
        started = time.perf_counter()
        for attempt in (0, 1):
            conn = self._conn()
            try:
                conn.request("POST", path, body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                raw = resp.read()
                break
            except (ConnectionError, http.client.HTTPException):
                # the server closed an idle keep-alive connection: reconnect once
                conn.close()
                self.local.conn = None
                if attempt:
                    raise
        elapsed = time.perf_counter() - started
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = raw.decode(errors="replace")
        return elapsed, resp.status, parsed


def _counters(url: str) -> dict[str, float]:
    s = scrape(url + "/metrics")
    return {
        "hits": metric(s, "tfscache_cache_hits_total"),
        "misses": metric(s, "tfscache_cache_misses_total"),
        "loads": metric(s, "tfscache_loads_total", outcome="ok"),
        "load_errors": metric(s, "tfscache_loads_total", outcome="error"),
        "unloads": metric(s, "tfscache_unloads_total"),
        "fetches": metric(s, "tfscache_fetches_total", outcome="ok"),
        "rejected": metric(s, "tfscache_capacity_rejections_total"),
    }


def replay(n_models: int, capacity: int, n_requests: int, skew: float, concurrency: int, seed: int) -> dict[str, Any]:
    trace = zipf_trace(n_models, n_requests, skew, seed)
    setup: dict[str, float] = {}
    with Processes() as procs:
        models = os.path.join(procs.tmp, "models")
        t0 = time.monotonic()
        write_models(models, [model_name(k) for k in range(n_models)])  # one SavedModel, copied
        setup["write_models_seconds"] = round(time.monotonic() - t0, 3)
        t0 = time.monotonic()
        backend = procs.devserver()
        node = procs.node(models, backend, serving={
            "max_models": capacity, "churn_guard_seconds": 0, "capacity_wait_seconds": 60,
            "load_timeout_seconds": 120})
        setup["start_processes_seconds"] = round(time.monotonic() - t0, 3)
        client = _Client("127.0.0.1", node.rest_port)
        before = _counters(node.rest_url)
        errors: list[str] = []

        def one(k: int) -> float:
            elapsed, status, body = client.predict(model_name(k))
            if status != 200 or body != {"predictions": [2.5]}:
                errors.append(f"{model_name(k)}: HTTP {status} {str(body)[:200]}")
            return elapsed

        t0 = time.monotonic()
        with ThreadPoolExecutor(concurrency) as pool:  # map() starts the requests in trace order
            latencies = list(pool.map(one, trace))
        wall = time.monotonic() - t0
        after = _counters(node.rest_url)
    delta = {k: after[k] - before[k] for k in after}
    looked_up = delta["hits"] + delta["misses"]
    daemon = {
        **{k: int(v) for k, v in delta.items()},
        # hits / lookups as the node counts them: a request that waits for a load already under
        # way (started by an earlier request) is a miss here, though no extra load happens
        "hit_ratio": round(delta["hits"] / looked_up, 6) if looked_up else 0.0,
        # the simulators' definition (a miss is a load): comparable with LRU and MIN
        "request_hit_ratio": round(1 - delta["loads"] / n_requests, 6),
        "loads_per_1000": round(1000 * delta["loads"] / n_requests, 3),
    }
    lat = percentiles(1000 * x for x in latencies)
    return {
        "models": n_models, "capacity": capacity, "requests": n_requests, "skew": skew,
        "concurrency": concurrency, "seed": seed, "distinct_models": len(set(trace)),
        "errors": len(errors), "error_samples": errors[:5],
        "wall_seconds": round(wall, 3), "requests_per_second": round(n_requests / wall, 1),
        "latency_ms": {k: round(v, 3) if isinstance(v, float) else v for k, v in lat.items()},
        "daemon": daemon, "lru": lru(trace, capacity).to_dict(), "min": belady_min(trace, capacity).to_dict(),
        "setup": setup,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__ or "", _extra, argv)
    q = args.quick
    n_models = args.models or (40 if q else 500)
    capacities = args.capacities or ([2, 5, 10, 20] if q else [10, 25, 50, 100, 200])
    sim_requests = args.sim_requests or (2000 if q else 20_000)
    capacity = args.capacity or (5 if q else 50)
    n_requests = args.requests or (200 if q else 2000)
    settings = {"models": n_models, "skews": args.skews, "capacities": capacities, "sim_requests": sim_requests,
                "seed": args.seed, "quick": q, "replay_skews": [] if args.no_replay else args.replay_skews,
                "replay_capacity": capacity, "replay_requests": n_requests, "replay_concurrency": args.concurrency}

    t0 = time.monotonic()
    sim = simulate(n_models, sim_requests, args.skews, capacities, args.seed)
    sim["seconds"] = round(time.monotonic() - t0, 3)
    print_table(
        f"Simulated hit ratio, {n_models} models, {sim_requests} requests per trace (LRU / Belady's MIN)",
        ["skew", "capacity", "LRU hit", "MIN hit", "LRU loads/1k", "MIN loads/1k"],
        [[r["skew"], r["capacity"], r["lru"]["hit_ratio"], r["min"]["hit_ratio"], r["lru"]["loads_per_1000"],
          r["min"]["loads_per_1000"]] for r in sim["rows"]],
    )
    report: dict[str, Any] = {"settings": settings, "simulation": sim, "replays": []}

    if not args.no_replay:
        report["replays"] = [replay_one(args, n_models, capacity, n_requests, skew) for skew in args.replay_skews]
        if len(report["replays"]) > 1:
            print_table(
                f"Replays through a tfscache node, capacity {capacity}: loads per 1,000 requests",
                ["skew", "daemon", "LRU", "MIN", "daemon / LRU", "MIN / LRU", "p50 ms", "p99 ms", "errors"],
                [[r["skew"], r["daemon"]["loads_per_1000"], r["lru"]["loads_per_1000"], r["min"]["loads_per_1000"],
                  round(r["daemon"]["loads"] / r["lru"]["loads"], 3) if r["lru"]["loads"] else "-",
                  round(r["min"]["loads"] / r["lru"]["loads"], 3) if r["lru"]["loads"] else "-",
                  r["latency_ms"]["p50"], r["latency_ms"]["p99"], r["errors"]] for r in report["replays"]],
            )

    path = write_report("zipf_workload", report, args.out)
    print(f"\nwrote {path}")
    return 1 if any(r["errors"] for r in report["replays"]) else 0


def replay_one(args: argparse.Namespace, n_models: int, capacity: int, n_requests: int, skew: float) -> dict[str, Any]:
    print(f"\nreplay: {n_requests} requests over {n_models} models (skew {skew}), capacity {capacity}, "
          f"{args.concurrency} in flight ...", flush=True)
    r = replay(n_models, capacity, n_requests, skew, args.concurrency, args.seed)
    d = r["daemon"]
    print_table(
        f"Replay through a tfscache node: {r['requests']} requests, skew {skew}, {r['distinct_models']} distinct "
        f"models, capacity {capacity}",
        ["", "1 - loads/req", "hits/lookups", "loads/1k", "loads", "unloads"],
        [["daemon (/metrics)", d["request_hit_ratio"], d["hit_ratio"], d["loads_per_1000"], d["loads"],
          d["unloads"]],
         ["LRU (same trace)", r["lru"]["hit_ratio"], r["lru"]["hit_ratio"], r["lru"]["loads_per_1000"],
          r["lru"]["loads"], r["lru"]["evictions"]],
         ["MIN (same trace)", r["min"]["hit_ratio"], r["min"]["hit_ratio"], r["min"]["loads_per_1000"],
          r["min"]["loads"], r["min"]["evictions"]]],
    )
    lat = r["latency_ms"]
    print(f"latency ms: p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}  p99 {lat['p99']:.2f}  mean {lat['mean']:.2f}; "
          f"{r['requests_per_second']} req/s over {r['wall_seconds']} s; errors {r['errors']}")
    for e in r["error_samples"]:
        print("  error:", e)
    return r


if __name__ == "__main__":
    raise SystemExit(main())
