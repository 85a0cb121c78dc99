"""gRPC load generator for the benchmarks, run as its own process (so it is not the server's
bottleneck in the same interpreter): N threads, each sending one raw request (bytes, no
protobuf work here) after the other on one shared channel, for a fixed time; per-request
latency measured around each blocking call.

    python -m bench.grpc_load CELLS.json     # prints one JSON line per cell

Before each cell's result it prints ``{"event": "start"}`` and ``{"event": "end"}`` when the
measured window opens and closes (after the warm-up).

CELLS.json: ``{"payload_file": F, "method": "/pkg.Service/Method", "cells": [{"target": "h:p",
"concurrency": N, "seconds": S, "warmup": W, "label": ...}, ...]}``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

import grpc


def run_cell(target: str, method: str, payload: bytes, concurrency: int, seconds: float,
             warmup: float) -> dict[str, Any]:
    channel = grpc.insecure_channel(target)
    call = channel.unary_unary(method)  # no serializers: bytes in, bytes out
    grpc.channel_ready_future(channel).result(timeout=10)
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[dict[str, int]] = [{} for _ in range(concurrency)]
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + seconds
    barrier = threading.Barrier(concurrency)

    def worker(i: int) -> None:
        lat, err = latencies[i], errors[i]
        barrier.wait()
        clock = time.perf_counter
        while True:
            t0 = clock()
            if t0 >= stop_at:
                return
            try:
                call(payload, timeout=30)
                ok = True
            except grpc.RpcError as e:
                ok = False
                code = e.code().name if hasattr(e, "code") else "UNKNOWN"
                if t0 >= measure_from:
                    err[code] = err.get(code, 0) + 1
            t1 = clock()
            if ok and t0 >= measure_from and t1 <= stop_at:
                lat.append(t1 - t0)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    # markers for the parent, which samples the servers' CPU time over the measured window
    time.sleep(max(0.0, measure_from - time.perf_counter()))
    print(json.dumps({"event": "start"}), flush=True)
    time.sleep(max(0.0, stop_at - time.perf_counter()))
    print(json.dumps({"event": "end"}), flush=True)
    for t in threads:
        t.join()
    channel.close()
    all_lat = sorted(x for lat in latencies for x in lat)
    errs: dict[str, int] = {}
    for e in errors:
        for k, v in e.items():
            errs[k] = errs.get(k, 0) + v
    n = len(all_lat)

    def pct(p: float) -> float:
        return all_lat[min(n - 1, max(0, -(-n * p // 100) - 1))] if n else float("nan")

    return {
        "requests": n, "errors": errs, "seconds": seconds, "rps": n / seconds,
        "p50_ms": pct(50) * 1e3, "p90_ms": pct(90) * 1e3, "p99_ms": pct(99) * 1e3,
        "mean_ms": (sum(all_lat) / n * 1e3) if n else float("nan"),
    }


def main(argv: list[str]) -> int:
    with open(argv[0]) as f:
        spec = json.load(f)
    with open(spec["payload_file"], "rb") as f:
        payload = f.read()
    for cell in spec["cells"]:
        result = run_cell(cell["target"], spec["method"], payload, int(cell["concurrency"]),
                          float(cell["seconds"]), float(cell.get("warmup", 0.2)))
        print(json.dumps({"label": cell.get("label"), **result}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
