"""Warm overhead: predict latency and throughput through tfscache vs directly against the same
TF Serving backend (the DevServer), REST and gRPC, at several concurrencies, with the model
already AVAILABLE.

Scenarios:
  one_node  a single node; direct = its backend.
  router    two nodes in a static cluster (replicas_per_model 1); the request goes to the node
            that does NOT own the model, which forwards it to the owner; direct = the owner's
            backend.

Load generators run as separate processes: ``wrk`` (C, epoll) for REST, with a Lua script that
POSTs JSON and prints its latency percentiles as one JSON line; ``python -m bench.grpc_load``
(grpcio, one thread per concurrent request, raw request bytes) for gRPC.  Each cell runs the
direct and the tfscache measurement back to back.  The load generator's own CPU is measured too
(``loadgen_cpu_us_per_req``; gRPC: over the measured window, wrk: its whole run from wait4), so
a cell whose generator is saturated (``loadgen_cores`` near 1 for the one-GIL gRPC generator)
shows up as such.

The machine may have few cores: load generator, node(s) and DevServer(s) then compete for the
same CPUs, so the absolute numbers are for this machine only; the ratios are the point.

    python -m bench.warm_overhead             # 5 s per cell, concurrency 1, 8, 64
    python -m bench.warm_overhead --quick     # 1 s per cell, concurrency 1, 8 (under 40 s)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.common import (
    Processes,
    fetch_json,
    listen_port,
    metric,
    owner_index,
    parse_args,
    post_json,
    print_table,
    scrape,
    write_models,
    write_report,
)

INSTANCES = [1.0, 2.0, 5.0]
PREDICT_METHOD = "/tensorflow.serving.PredictionService/Predict"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

WRK_LUA = """
wrk.method = "POST"
wrk.body = '%(body)s'
wrk.headers["Content-Type"] = "application/json"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"status_errors":%%d,"socket_errors":%%d,' ..
    '"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,"mean_us":%%.1f,"max_us":%%d}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""


def extra_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--seconds", type=float, help="per cell (default 5, --quick 1)")
    ap.add_argument("--concurrency", type=int, nargs="+", help="default 1 8 64 (--quick 1 8)")
    ap.add_argument("--protocols", nargs="+", choices=("rest", "grpc"), default=["rest", "grpc"])
    ap.add_argument("--scenarios", nargs="+", choices=("one_node", "router"), default=["one_node", "router"])
    ap.add_argument("--name", default="warm_overhead", help="report name (JSON file stem)")


# -- load generators ------------------------------------------------------------------------

def wrk_cell(url: str, lua: str, concurrency: int, seconds: float) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed (Debian package wrk; scripts/setup installs it)")
    threads = min(concurrency, 2)
    argv = [wrk, f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
            "--latency", "-s", lua, url]
    with tempfile.TemporaryFile("w+") as stdout:
        proc = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.DEVNULL, text=True)
        # wait4: the exit status and wrk's own CPU time (the whole run, a few ms of set-up in it)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        out = stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited with {proc.returncode}:\n{out}")
    line = next((x for x in out.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"no result line from wrk:\n{out}")
    r = json.loads(line[len("WRKJSON "):])
    secs = r["duration_us"] / 1e6
    loadgen_cpu = usage.ru_utime + usage.ru_stime
    return {
        "requests": r["requests"], "errors": r["status_errors"] + r["socket_errors"], "seconds": secs,
        "rps": r["requests"] / secs, "p50_ms": r["p50_us"] / 1e3, "p90_ms": r["p90_us"] / 1e3,
        "p99_ms": r["p99_us"] / 1e3, "mean_ms": r["mean_us"] / 1e3,
        "loadgen_cpu_s": loadgen_cpu,
        "loadgen_cpu_us_per_req": loadgen_cpu / r["requests"] * 1e6 if r["requests"] else float("nan"),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class CpuMeter:
    """CPU time of the servers in a cell: on a shared machine, the cost per request is a steadier
    measure of overhead than the throughput, which depends on what else runs."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self._start: dict[str, float] = {}

    def start(self) -> None:
        self._start = {g: sum(cpu_seconds(p) for p in pids) for g, pids in self.groups.items()}

    def stop(self, requests: int) -> dict[str, float]:
        out = {}
        for g, pids in self.groups.items():
            used = sum(cpu_seconds(p) for p in pids) - self._start[g]
            out[f"{g}_cpu_s"] = used
            out[f"{g}_cpu_us_per_req"] = used / requests * 1e6 if requests else float("nan")
        return out


def grpc_cells(cells: list[dict[str, Any]], payload_file: str, work: str,
               meters: list[CpuMeter] | None = None) -> list[dict[str, Any]]:
    """All gRPC cells in one load-generator process (one interpreter start-up); ``meters[i]``
    measures the servers' CPU over cell i's window."""
    spec = os.path.join(work, "grpc_cells.json")
    with open(spec, "w") as f:
        json.dump({"payload_file": payload_file, "method": PREDICT_METHOD, "cells": cells}, f)
    proc = subprocess.Popen([sys.executable, "-m", "bench.grpc_load", spec], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=dict(os.environ, GRPC_VERBOSITY="ERROR"))
    assert proc.stdout is not None
    # the load generator's own CPU over each window too: it is one Python process (one GIL), so
    # it must be shown not to be the bottleneck
    loadgen = [CpuMeter({**m.groups, "loadgen": [proc.pid]}) for m in meters] if meters else None
    results: list[dict[str, Any]] = []
    for line in proc.stdout:
        if not line.startswith("{"):
            continue
        msg = json.loads(line)
        meter = loadgen[len(results)] if loadgen else None
        if msg.get("event") == "start":
            if meter:
                meter.start()
        elif msg.get("event") == "end":
            cpu = meter.stop(1) if meter else {}
        else:
            msg["errors"] = sum(msg["errors"].values())
            if meter:  # per request now that the count is known
                for k in [k for k in cpu if k.endswith("_cpu_s")]:
                    msg[k] = cpu[k]
                    msg[k.replace("_cpu_s", "_cpu_us_per_req")] = cpu[k] / msg["requests"] * 1e6 \
                        if msg["requests"] else float("nan")
            results.append(msg)
    if proc.wait() != 0 or len(results) != len(cells):
        raise RuntimeError(f"bench.grpc_load exited with {proc.returncode} after {len(results)} cells")
    return results


def predict_payload(name: str) -> bytes:
    from tests.clients import predict_request

    return bytes(predict_request(name, INSTANCES).SerializeToString())


# -- the benchmark --------------------------------------------------------------------------

def choose_routed_name(size: int, owner: int) -> str:
    for i in range(1000):
        name = f"routed-{i}"
        if owner_index(name, size) == owner:
            return name
    raise RuntimeError("no model name owned by the chosen node")


def warm(base_rest: str, name: str, times: int = 5) -> None:
    for _ in range(times):
        status, body = post_json(f"{base_rest}/v1/models/{name}:predict", {"instances": INSTANCES})
        if status != 200:
            raise RuntimeError(f"warm-up predict of {name} at {base_rest}: {status} {body}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    seconds = args.seconds or (1.0 if args.quick else 5.0)
    concurrency = args.concurrency or ([1, 8] if args.quick else [1, 8, 64])
    routed = choose_routed_name(2, owner=1)
    names = ["warm", routed]
    started = time.monotonic()

    with Processes() as procs:
        models = tempfile.mkdtemp(prefix="models-", dir=procs.tmp)
        # models are written while the DevServers import TensorFlow
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            backends_f = pool.submit(procs.devservers, 3)
            write_models(models, names)
            payloads = {n: predict_payload(n) for n in names}
            backends = backends_f.result()
        single_b, b0, b1 = backends
        # one node alone; two nodes in a static cluster; all with the config's defaults
        specs = [(models, single_b, "single", {"listen": {"grpc_threads": 32}})]
        for i, (b, spec) in enumerate(zip((b0, b1), cluster_specs(2), strict=True)):
            specs.append((models, b, f"node-{i}", spec))
        single, node0, _node1 = procs.nodes(specs)
        setup_seconds = time.monotonic() - started
        print(f"set-up {setup_seconds:.1f}s (3 DevServers, 3 nodes); routed model {routed!r} is owned by "
              f"node-1, sent to node-0", flush=True)

        pid = {n: n.process.pid for n in (single, node0, _node1, single_b, b0, b1)}
        scenarios: dict[str, dict[str, Any]] = {
            "one_node": {"model": "warm", "direct": single_b, "via": single,
                         "meters": {"direct": CpuMeter({"backend": [pid[single_b]]}),
                                    "via": CpuMeter({"node": [pid[single]], "backend": [pid[single_b]]})}},
            "router": {"model": routed, "direct": b1, "via": node0,
                       "meters": {"direct": CpuMeter({"backend": [pid[b1]]}),
                                  "via": CpuMeter({"node": [pid[node0], pid[_node1]], "backend": [pid[b1]]})}},
        }
        scenarios = {k: v for k, v in scenarios.items() if k in args.scenarios}
        for sc in scenarios.values():
            warm(sc["via"].rest_url, sc["model"])
            warm(sc["direct"].rest_url, sc["model"])
        forwards_before = metric(scrape(node0.rest_url + "/metrics"), "tfscache_router_forwards_total")

        work = procs.tmp
        cells: list[dict[str, Any]] = []
        if "rest" in args.protocols:
            for sc_name, sc in scenarios.items():
                lua = os.path.join(work, f"{sc_name}.lua")
                with open(lua, "w") as f:
                    f.write(WRK_LUA % {"body": json.dumps({"instances": INSTANCES})})
                for c in concurrency:
                    for target in ("direct", "via"):
                        base = sc[target].rest_url
                        meter = sc["meters"][target]
                        meter.start()
                        r = wrk_cell(f"{base}/v1/models/{sc['model']}:predict", lua, c, seconds)
                        r.update(meter.stop(r["requests"]))
                        cells.append({"scenario": sc_name, "protocol": "rest", "concurrency": c,
                                      "target": target, **r})
        if "grpc" in args.protocols:
            specs = []
            for sc_name, sc in scenarios.items():
                payload_file = os.path.join(work, f"{sc['model']}.pb")
                with open(payload_file, "wb") as f:
                    f.write(payloads[sc["model"]])
                for c in concurrency:
                    for target in ("direct", "via"):
                        specs.append(({"scenario": sc_name, "protocol": "grpc", "concurrency": c,
                                       "target": target},
                                      {"target": sc[target].grpc_target, "concurrency": c, "seconds": seconds,
                                       "warmup": 0.2}, payload_file, sc["meters"][target]))
            # one load-generator process per payload (model); cells keep their order
            for payload_file in dict.fromkeys(s[2] for s in specs):
                group = [(meta, cell, meter) for meta, cell, p, meter in specs if p == payload_file]
                results = grpc_cells([cell for _, cell, _ in group], payload_file, work,
                                     [meter for _, _, meter in group])
                cells += [{**meta, **r} for (meta, _, _), r in zip(group, results, strict=True)]

        checks: dict[str, Any] = {}
        if "router" in scenarios:
            forwards = metric(scrape(node0.rest_url + "/metrics"), "tfscache_router_forwards_total") - forwards_before
            routed_reqs = sum(c["requests"] for c in cells if c["scenario"] == "router" and c["target"] == "via")
            loads_b0 = fetch_json(b0.rest_url + "/devserver/loads")["loads"]
            checks = {
                "router_forwards_counted_by_node0": forwards,
                "router_requests_measured": routed_reqs,
                "non_owner_backend_loaded_routed_model": any(k.startswith(routed + "/") for k in loads_b0),
            }
            if forwards < routed_reqs:
                raise RuntimeError(f"node-0 forwarded {forwards} requests, fewer than the {routed_reqs} measured")
            if checks["non_owner_backend_loaded_routed_model"]:
                raise RuntimeError("the non-owner's backend loaded the routed model: it was not forwarded")

    return {
        "settings": {"seconds_per_cell": seconds, "concurrency": concurrency, "protocols": args.protocols,
                     "scenarios": list(scenarios), "quick": args.quick, "instances": INSTANCES,
                     "wrk_threads": "min(concurrency, 2)", "grpc_load": "bench.grpc_load: one thread per "
                     "concurrent request, one channel, 0.2 s warm-up excluded",
                     "node_config": "defaults (grpc_threads 32, metrics without per-model labels)"},
        "note": (f"{os.cpu_count()} CPUs shared by the load generator, the node(s) and the DevServer(s): "
                 "absolute figures are for this machine; compare the ratios tfscache/direct per cell"),
        "setup_seconds": round(setup_seconds, 1),
        "cells": cells,
        "ratios": ratios(cells),
        "checks": checks,
        "total_seconds": round(time.monotonic() - started, 1),
    }


def cluster_specs(size: int) -> list[dict[str, Any]]:
    """node_config overrides of ``size`` nodes in one static cluster, replicas_per_model 1 (all
    three nodes of this benchmark start in parallel, so not through ``Processes.cluster``)."""
    ports = [(listen_port(), listen_port()) for _ in range(size)]
    members = [{"id": f"node-{i}", "host": "127.0.0.1", "rest_port": r, "grpc_port": g}
               for i, (r, g) in enumerate(ports)]
    return [{"node_id": f"node-{i}", "listen": {"rest_port": r, "grpc_port": g, "grpc_threads": 32},
             "cluster": {"replicas_per_model": 1, "discovery": {"type": "static", "members": members}}}
            for i, (r, g) in enumerate(ports)]


def ratios(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for via in (c for c in cells if c["target"] == "via"):
        key = (via["scenario"], via["protocol"], via["concurrency"])
        direct = next(c for c in cells if c["target"] == "direct"
                      and (c["scenario"], c["protocol"], c["concurrency"]) == key)
        out.append({
            "scenario": key[0], "protocol": key[1], "concurrency": key[2],
            "p50_ratio": via["p50_ms"] / direct["p50_ms"], "p99_ratio": via["p99_ms"] / direct["p99_ms"],
            "rps_ratio": via["rps"] / direct["rps"] if direct["rps"] else float("nan"),
            "added_p50_ms": via["p50_ms"] - direct["p50_ms"],
            "node_cpu_us_per_req": via.get("node_cpu_us_per_req"),
            "backend_cpu_us_per_req_direct": direct.get("backend_cpu_us_per_req"),
            "backend_cpu_us_per_req_via": via.get("backend_cpu_us_per_req"),
            "loadgen_cpu_us_per_req_direct": direct.get("loadgen_cpu_us_per_req"),
            "loadgen_cpu_us_per_req_via": via.get("loadgen_cpu_us_per_req"),
            # CPU seconds per second of the cell: 1.0 is one core, all a Python generator can use
            "loadgen_cores_via": via["loadgen_cpu_s"] / via["seconds"] if "loadgen_cpu_s" in via else None,
        })
    return out


def show(report: dict[str, Any]) -> None:
    rows = []
    cells = report["cells"]
    for r in report["ratios"]:
        key = (r["scenario"], r["protocol"], r["concurrency"])
        d, v = (next(c for c in cells if (c["scenario"], c["protocol"], c["concurrency"]) == key
                     and c["target"] == t) for t in ("direct", "via"))
        rows.append([f"{key[0]} {key[1]} c={key[2]}", d["p50_ms"], v["p50_ms"], d["p99_ms"], v["p99_ms"],
                     round(d["rps"]), round(v["rps"]), f"{r['p50_ratio']:.2f}", f"{r['rps_ratio']:.2f}",
                     round(r["node_cpu_us_per_req"] or 0), round(r["backend_cpu_us_per_req_direct"] or 0),
                     round(r["loadgen_cpu_us_per_req_via"] or 0),
                     "-" if r["loadgen_cores_via"] is None else f"{r['loadgen_cores_via']:.2f}",
                     d["errors"] + v["errors"]])
    print_table(
        f"Warm overhead ({report['settings']['seconds_per_cell']:g} s per cell; latency in ms; direct = the "
        "DevServer, tfs = through tfscache; x = tfs/direct; CPU = process CPU time per request; loadgen = wrk or "
        "bench.grpc_load, through tfscache, CPU per request and cores busy)",
        ["cell", "p50 direct", "p50 tfs", "p99 direct", "p99 tfs", "rps direct", "rps tfs", "p50 x", "rps x",
         "node CPU us", "backend CPU us", "loadgen CPU us", "loadgen cores", "errors"], rows)
    print(f"note: {report['note']}")
    if report["checks"]:
        print(f"checks: {report['checks']}")


def main() -> None:
    args = parse_args(__doc__ or "", extra_args)
    report = run(args)
    show(report)
    print(f"wrote {write_report(args.name, report, args.out)} (total {report['total_seconds']}s)")

if __name__ == "__main__":
    main()
