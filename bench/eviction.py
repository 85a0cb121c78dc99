"""Eviction policies against LRU and Belady's MIN: loads and reload seconds, simulated and
replayed through the daemon; and spill-over's effect on a cluster's 429s.

(a) Simulation: every trace below through a demand cache (every miss loads) that asks the
    daemon's own policy objects (``tfscache/node/eviction.py``) for its victims, and through
    Belady's MIN (the offline optimum in loads: the bound).

    zipf-0.8 / zipf-1.0 / zipf-1.2   stationary Zipf over --models models
    shifting      Zipf 1.0 over ranks whose models change: every 200 requests half of the
                  ranks get their models reshuffled (tenants go quiet, others become active)
    bursty        two halves of the models with diurnal (sine) shares, and bursts: 1 % of the
                  requests start 30 requests for a random model over the next 100
    mixed-size    zipf-1.0's popularity, sizes log-normal from 10 MB to 2 GB (median 150 MB),
                  load time proportional to size (100 MB/s), a byte budget of 10 % of all bytes

    The count traces hold --capacity models and a load costs 1 s.

(b) Replays through a real node (``twistd tfscache`` before a DevServer, serving.max_models =
    --capacity, churn_guard_seconds 0 as the simulation has none) of the first
    --replay-requests requests of each --replay-traces trace, once per policy, with
    --concurrency requests in flight.  Loads and reload seconds (copy + load, measured) come
    from the node's /metrics; the simulation of the same requests is recorded beside them.

(c) Cluster: 3 nodes (own DevServers), 2 owners per model, 6 slots each, default churn guard
    (2 s), capacity_wait_seconds 2; --cluster-clients clients send Zipf(1.0) requests for 30
    models through the three nodes with a random think time (a steady load, no fault), with
    cluster.spill_over off and then on.  The 429s of each run.

``bench/results/eviction.json`` is the list of records ``{"trace", "policy", "requests",
"loads", "reload_seconds", "replayed"}``; ``eviction_summary.json`` has the ratios, the
replays' agreement, the cluster runs and the default the benchmark rule picks.

    python -m bench.eviction                 # everything (a few minutes on 2 cores)
    python -m bench.eviction --quick         # tiny settings
    python -m bench.eviction --no-replay --no-cluster   # simulation only (about a minute)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.cachesim import (
    belady_min_sized,
    bursty_trace,
    lognormal_sizes,
    shifting_trace,
    simulate,
    zipf_trace,
)
from bench.common import Processes, metric, parse_args, print_table, scrape, write_models, write_report
from tfscache.node.eviction import POLICIES, make_policy

TRACES = ("zipf-0.8", "zipf-1.0", "zipf-1.2", "shifting", "bursty", "mixed-size")
LOAD_BYTES_PER_SECOND = 100e6   # mixed-size: load time proportional to size
BYTE_BUDGET_SHARE = 0.10        # mixed-size: the budget, as a share of all models' bytes
SHIFT_PERIOD = 200
# the benchmark rule for the default: the new policy if it is never worse than LRU by more
# than this in loads on any trace, else lru
DEFAULT_RULE_MARGIN = 0.02


def _extra(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--models", type=int, help="distinct models (default 500, quick 40)")
    ap.add_argument("--requests", type=int, help="requests per simulated trace (default 20000, quick 2000)")
    ap.add_argument("--capacity", type=int, help="models held (count traces; default 50, quick 5)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--replay-traces", nargs="+", default=["zipf-1.0", "shifting"], choices=TRACES)
    ap.add_argument("--replay-requests", type=int, help="replay: requests (default 2000, quick 150)")
    ap.add_argument("--concurrency", type=int, default=4, help="replay: requests in flight")
    ap.add_argument("--cluster-requests", type=int, help="cluster: requests per run (default 2400, quick 200)")
    ap.add_argument("--cluster-clients", type=int, default=20)
    ap.add_argument("--no-replay", action="store_true", help="no daemon replays")
    ap.add_argument("--no-cluster", action="store_true", help="no cluster runs")


class Trace:
    def __init__(self, name: str, items: list[int], capacity: float, sizes: list[float] | None,
                 load_seconds: list[float] | None) -> None:
        self.name, self.items, self.capacity, self.sizes, self.load_seconds = (
            name, items, capacity, sizes, load_seconds)


def make_trace(name: str, n_models: int, n_requests: int, capacity: int, seed: int) -> Trace:
    if name.startswith("zipf-"):
        return Trace(name, zipf_trace(n_models, n_requests, float(name[5:]), seed), capacity, None, None)
    if name == "shifting":
        return Trace(name, shifting_trace(n_models, n_requests, 1.0, SHIFT_PERIOD, seed), capacity, None, None)
    if name == "bursty":
        return Trace(name, bursty_trace(n_models, n_requests, 1.0, seed), capacity, None, None)
    if name == "mixed-size":
        sizes = lognormal_sizes(n_models, seed)
        return Trace(name, zipf_trace(n_models, n_requests, 1.0, seed), BYTE_BUDGET_SHARE * sum(sizes),
                     sizes, [s / LOAD_BYTES_PER_SECOND for s in sizes])
    raise ValueError(name)


def record(trace: str, policy: str, requests: int, loads: int, reload_seconds: float,
           replayed: bool) -> dict[str, Any]:
    return {"trace": trace, "policy": policy, "requests": requests, "loads": loads,
            "reload_seconds": round(reload_seconds, 3), "replayed": replayed}


def simulate_trace(t: Trace, items: list[int] | None = None) -> list[dict[str, Any]]:
    items = t.items if items is None else items
    out = []
    for policy in POLICIES:
        r = simulate(make_policy(policy, t.capacity), items, t.capacity, t.sizes, t.load_seconds)
        out.append(record(t.name, policy, r.requests, r.loads, r.reload_seconds, False))
    m = belady_min_sized(items, t.capacity, t.sizes, t.load_seconds)
    out.append(record(t.name, "min", m.requests, m.loads, m.reload_seconds, False))
    return out


# -- replays ----------------------------------------------------------------------------------

def model_name(k: int) -> str:
    return f"ev-{k:04d}"


class _Client:
    """REST predict over one keep-alive connection per thread."""

    def __init__(self, port: int, timeout: float = 120.0) -> None:
        self.port, self.timeout = port, timeout
        self.local = threading.local()

    def predict(self, name: str) -> tuple[int, str]:
        body = json.dumps({"instances": [1.0]}).encode()
        for attempt in (0, 1):
            conn = getattr(self.local, "conn", None)
            if conn is None:
                conn = self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                conn.request("POST", f"/v1/models/{name}/versions/1:predict", body,
                             {"Content-Type": "application/json"})
                resp = conn.getresponse()
                return resp.status, resp.read().decode(errors="replace")
            except (ConnectionError, http.client.HTTPException):
                conn.close()  # an idle keep-alive connection the server closed: once more
                self.local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


def _counters(url: str) -> dict[str, float]:
    s = scrape(url + "/metrics")
    return {
        "loads": metric(s, "tfscache_loads_total", outcome="ok"),
        "load_seconds": metric(s, "tfscache_load_seconds_sum"),
        "fetch_seconds": metric(s, "tfscache_fetch_seconds_sum"),
        "spill_overs": metric(s, "tfscache_router_spill_overs_total"),
        "rejected": metric(s, "tfscache_capacity_rejections_total"),
    }


def replay(procs: Processes, backend: Any, models: str, t: Trace, items: list[int], policy: str,
           concurrency: int) -> dict[str, Any]:
    node = procs.node(models, backend, serving={
        "max_models": int(t.capacity), "churn_guard_seconds": 0, "capacity_wait_seconds": 60,
        "load_timeout_seconds": 120, "eviction": policy},
        disk_cache={"path": os.path.join(procs.tmp, f"cache-{t.name}-{policy}"), "eviction": policy})
    try:
        client = _Client(node.rest_port)
        before = _counters(node.rest_url)
        errors: list[str] = []

        def one(k: int) -> None:
            status, body = client.predict(model_name(k))
            if status != 200:
                errors.append(f"{model_name(k)}: HTTP {status} {body[:200]}")

        started = time.monotonic()
        with ThreadPoolExecutor(concurrency) as pool:  # map() starts the requests in trace order
            list(pool.map(one, items))
        wall = time.monotonic() - started
        after = _counters(node.rest_url)
    finally:
        node.stop()
    delta = {k: after[k] - before[k] for k in after}
    return {"record": record(t.name, policy, len(items), int(delta["loads"]),
                             delta["load_seconds"] + delta["fetch_seconds"], True),
            "errors": len(errors), "error_samples": errors[:5], "wall_seconds": round(wall, 1)}


# -- the cluster ------------------------------------------------------------------------------

CLUSTER_MODELS = 30


def cluster_runs(procs: Processes, models: str, n_requests: int, clients: int, seed: int) -> list[dict[str, Any]]:
    backends = procs.devservers(3)
    runs = []
    for spill in (False, True):
        _b, nodes = procs.cluster(models, size=3, replicas=2, backends=backends, serving={
            "max_models": 6, "churn_guard_seconds": 2, "capacity_wait_seconds": 2},
            cluster={"spill_over": spill})
        try:
            runs.append(_cluster_load(nodes, n_requests, clients, seed, spill))
        finally:
            for n in nodes:
                n.stop()
    return runs


def _cluster_load(nodes: list[Any], n_requests: int, clients: int, seed: int, spill: bool) -> dict[str, Any]:
    names = [model_name(k) for k in range(CLUSTER_MODELS)]
    trace = zipf_trace(CLUSTER_MODELS, n_requests, 1.0, seed)
    warmup = n_requests // 10  # the first loads of every model are not the steady state
    statuses: dict[int, int] = {}
    samples: list[str] = []  # answers other than 200 and 429
    lock = threading.Lock()
    per_node = [_Client(n.rest_port) for n in nodes]
    before = [_counters(n.rest_url) for n in nodes]
    next_index = iter(range(n_requests))

    def client(c: int) -> None:
        rng = random.Random(seed * 1000 + c)
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            status, body = per_node[i % len(nodes)].predict(names[trace[i]])
            if i >= warmup:
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status not in (200, 429) and len(samples) < 5:
                        samples.append(f"{names[trace[i]]} via node-{i % len(nodes)}: HTTP {status} {body[:200]}")
            time.sleep(rng.expovariate(1 / 0.3))  # think time: a steady load, not a flood

    started = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.monotonic() - started
    after = [_counters(n.rest_url) for n in nodes]
    counted = sum(statuses.values())
    return {
        "spill_over": spill, "requests": counted, "warmup_requests": warmup, "statuses": statuses,
        "http_429": statuses.get(429, 0), "share_429": round(statuses.get(429, 0) / counted, 4) if counted else 0.0,
        "other_errors": sum(v for k, v in statuses.items() if k not in (200, 429)), "error_samples": samples,
        "spill_overs": int(sum(a["spill_overs"] - b["spill_overs"] for a, b in zip(after, before, strict=True))),
        "capacity_rejections": int(sum(a["rejected"] - b["rejected"] for a, b in zip(after, before, strict=True))),
        "loads": int(sum(a["loads"] - b["loads"] for a, b in zip(after, before, strict=True))),
        "wall_seconds": round(wall, 1),
    }


# -- the report -------------------------------------------------------------------------------

def ratios(records: list[dict[str, Any]], n_requests: int) -> dict[str, dict[str, dict[str, float]]]:
    """Per trace and policy, simulated on the whole trace: loads and reload seconds over LRU's."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for trace in TRACES:
        rows = {r["policy"]: r for r in records
                if r["trace"] == trace and not r["replayed"] and r["requests"] == n_requests}
        base = rows.get("lru")
        if base:
            out[trace] = {p: {"loads": round(r["loads"] / base["loads"], 4),
                              "reload_seconds": round(r["reload_seconds"] / base["reload_seconds"], 4)}
                          for p, r in rows.items()}
    return out


def choose_default(rel: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    worst = {p: max(rel[t][p]["loads"] for t in rel) for p in POLICIES if p != "lru" and all(p in rel[t] for t in rel)}
    ok = {p: w for p, w in worst.items() if w <= 1 + DEFAULT_RULE_MARGIN}
    chosen = min(ok, key=lambda p: ok[p]) if ok else "lru"
    return {"rule": f"the new policy if its loads are never more than {DEFAULT_RULE_MARGIN:.0%} above LRU's "
                    "on any trace, else lru", "worst_loads_vs_lru": worst, "default": chosen}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__ or "", _extra, argv)
    q = args.quick
    n_models = args.models or (40 if q else 500)
    n_requests = args.requests or (2000 if q else 20_000)
    capacity = args.capacity or (5 if q else 50)
    replay_requests = args.replay_requests or (150 if q else 2000)
    cluster_requests = args.cluster_requests or (200 if q else 2400)

    started = time.monotonic()
    traces = {name: make_trace(name, n_models, n_requests, capacity, args.seed) for name in TRACES}
    records: list[dict[str, Any]] = []
    for name in TRACES:
        records += simulate_trace(traces[name])
    sim_seconds = round(time.monotonic() - started, 1)
    rel = ratios(records, n_requests)
    print_table(
        f"Simulated: {n_models} models, {n_requests} requests per trace, capacity {capacity} models "
        f"(mixed-size: {BYTE_BUDGET_SHARE:.0%} of the bytes); loads and reload seconds vs LRU",
        ["trace", "policy", "loads", "reload s", "loads / LRU", "reload s / LRU"],
        [[r["trace"], r["policy"], r["loads"], r["reload_seconds"], rel[r["trace"]][r["policy"]]["loads"],
          rel[r["trace"]][r["policy"]]["reload_seconds"]] for r in records],
    )

    replays: list[dict[str, Any]] = []
    if not args.no_replay and args.replay_traces:
        with Processes() as procs:
            models = os.path.join(procs.tmp, "models")
            write_models(models, [model_name(k) for k in range(n_models)], version=1)
            backend = procs.devserver()
            for name in args.replay_traces:
                t = traces[name]
                items = t.items[:replay_requests]
                simulated = {r["policy"]: r for r in simulate_trace(t, items)}
                records += [simulated[p] for p in ("lru", "adaptive", "min") if p in simulated]
                for policy in POLICIES:
                    print(f"\nreplay: {name}, policy {policy}, {len(items)} requests, capacity {int(t.capacity)}, "
                          f"{args.concurrency} in flight ...", flush=True)
                    r = replay(procs, backend, models, t, items, policy, args.concurrency)
                    records.append(r["record"])
                    sim = simulated[policy]
                    r["simulated_loads"] = sim["loads"]
                    r["agreement"] = round(r["record"]["loads"] / sim["loads"] - 1, 4) if sim["loads"] else None
                    replays.append(r)
                    for e in r["error_samples"]:
                        print("  error:", e)
        print_table(
            "Replays through a tfscache node: loads, daemon vs the simulation of the same requests",
            ["trace", "policy", "requests", "daemon loads", "simulated loads", "difference", "reload s (measured)",
             "errors", "wall s"],
            [[r["record"]["trace"], r["record"]["policy"], r["record"]["requests"], r["record"]["loads"],
              r["simulated_loads"], f"{100 * r['agreement']:+.1f} %" if r["agreement"] is not None else "-",
              r["record"]["reload_seconds"], r["errors"], r["wall_seconds"]] for r in replays],
        )

    cluster: list[dict[str, Any]] = []
    if not args.no_cluster:
        with Processes() as procs:
            models = os.path.join(procs.tmp, "models")
            write_models(models, [model_name(k) for k in range(CLUSTER_MODELS)], version=1)
            cluster = cluster_runs(procs, models, cluster_requests, args.cluster_clients, args.seed)
        print_table(
            f"Cluster: 3 nodes, 2 owners per model, 6 slots each, {CLUSTER_MODELS} models (Zipf 1.0), "
            f"{args.cluster_clients} clients",
            ["spill-over", "requests", "429", "429 share", "other errors", "spill-overs", "loads", "wall s"],
            [["on" if c["spill_over"] else "off", c["requests"], c["http_429"], c["share_429"], c["other_errors"],
              c["spill_overs"], c["loads"], c["wall_seconds"]] for c in cluster],
        )
        for c in cluster:
            for e in c["error_samples"]:
                print("  error:", e)

    decision = choose_default(rel)
    print(f"\ndefault by the rule ({decision['rule']}): {decision['default']}; worst loads vs LRU: "
          f"{decision['worst_loads_vs_lru']}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "eviction.json")
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
        f.write("\n")
    summary = write_report("eviction_summary", {
        "settings": {"models": n_models, "requests": n_requests, "capacity": capacity, "seed": args.seed,
                     "quick": q, "replay_traces": [] if args.no_replay else args.replay_traces,
                     "replay_requests": replay_requests, "concurrency": args.concurrency,
                     "cluster_requests": cluster_requests, "cluster_clients": args.cluster_clients,
                     "byte_budget_share": BYTE_BUDGET_SHARE, "shift_period": SHIFT_PERIOD},
        "vs_lru": rel, "default": decision, "replays": replays, "cluster": cluster,
        "simulation_seconds": sim_seconds,
    }, args.out)
    print(f"\nwrote {path}\nwrote {summary}")
    failed = any(r["errors"] for r in replays) or any(c["other_errors"] for c in cluster)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
