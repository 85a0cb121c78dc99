"""Large predict bodies: what forwarding a 4 MB and a 32 MB request adds to its latency.

The fast backend (bench/fastbackend, a fixed small reply; ``rest-echo``: a reply as large as
the request, the backend echoing the body, so that the reply's way back is measured too: the
node streams it) behind one tfscache node; the same
request sent to the backend directly and through the node, one at a time on a kept-alive
connection (REST: http.client; gRPC: a raw-bytes grpcio call), interleaved (direct, tfscache,
repeat) so a noisy neighbour slows both alike.  Reported: median and p90 latency of each, the
median added by the node, and the node's CPU per request and per MB.  The node passes a REST
body on as the chunks it arrived in and a gRPC payload as the bytes grpc.aio handed it: the
CPU per MB shows whether it copies them on the way.

    python -m bench.large_payloads            # 4 and 32 MB, 15 requests each
    python -m bench.large_payloads --quick
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from bench.common import parse_args, print_table, write_report
from bench.data_plane import BIN, FastBackend, _field, predict_payload, tfscache_config, write_fake_models
from bench.warm_overhead import PREDICT_METHOD, cpu_seconds
from tests.harness.node import NodeProcess

MB = 1024 * 1024
MODEL = "big"
ECHO_MODEL = "echo-big"  # the backend runs with -echo-prefix echo-


def extra_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--sizes-mb", type=int, nargs="+", help="body sizes (default 4 32; --quick 1 4)")
    ap.add_argument("--requests", type=int, help="requests per size and contender (default 15; --quick 3)")


def rest_body(size: int) -> bytes:
    head, tail = b'{"instances": [', b"1.0]}"
    n = max(0, (size - len(head) - len(tail)) // 4)
    return head + b"1.0," * n + tail


def grpc_body(size: int) -> bytes:
    # the model spec, then an unknown field of padding: TF Serving's parser skips it as ours does
    base = predict_payload(MODEL)
    return base + _field(15, b"\0" * max(0, size - len(base) - 8))


class RestClient:
    def __init__(self, port: int, model: str = MODEL) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.model = model

    def __call__(self, body: bytes) -> None:
        self.conn.request("POST", f"/v1/models/{self.model}/versions/1:predict", body,
                          {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"REST {resp.status}: {data[:200]!r}")
        if self.model == ECHO_MODEL and len(data) != len(body):
            raise RuntimeError(f"REST echo: {len(data)} bytes back for {len(body)}")

    def close(self) -> None:
        self.conn.close()


class GrpcClient:
    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", -1),
                                                              ("grpc.max_receive_message_length", -1)])
        self.call = self.channel.unary_unary(PREDICT_METHOD)

    def __call__(self, body: bytes) -> None:
        self.call(body, timeout=120)

    def close(self) -> None:
        self.channel.close()


def timed(send: Callable[[bytes], None], body: bytes) -> float:
    started = time.perf_counter()
    send(body)
    return time.perf_counter() - started


def p90(xs: Sequence[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(0.9 * len(s)))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    path = os.path.join(BIN, "fastbackend")
    if not os.access(path, os.X_OK):
        return {"skipped": f"{path} is missing: run bench/build_go_bench.sh (scripts/setup --go-servers)"}
    sizes = args.sizes_mb or ([1, 4] if args.quick else [4, 32])
    requests = args.requests or (3 if args.quick else 15)
    work = tempfile.mkdtemp(prefix="tfscache-large-")
    models = os.path.join(work, "models")
    write_fake_models(models, [MODEL, ECHO_MODEL])
    backend = FastBackend(path, ["-echo-prefix", "echo-"]).start()
    node = NodeProcess(tfscache_config("large", models, os.path.join(work, "cache"), backend, 4), "tfscache-large")
    cells: list[dict[str, Any]] = []
    try:
        node.start()
        pid = node.process.pid
        clients: dict[str, dict[str, Any]] = {
            "rest": {"direct": RestClient(backend.rest_port), "tfscache": RestClient(node.rest_port)},
            "rest-echo": {"direct": RestClient(backend.rest_port, ECHO_MODEL),
                          "tfscache": RestClient(node.rest_port, ECHO_MODEL)},
            "grpc": {"direct": GrpcClient(backend.grpc_target), "tfscache": GrpcClient(node.grpc_target)},
        }
        for protocol, make in (("rest", rest_body), ("rest-echo", rest_body), ("grpc", grpc_body)):
            for mb in sizes:
                body = make(mb * MB)
                for who in ("tfscache", "direct"):  # warm: the node loads the model into the backend
                    clients[protocol][who](body)
                lat: dict[str, list[float]] = {"direct": [], "tfscache": []}
                cpu = 0.0
                for _ in range(requests):
                    lat["direct"].append(timed(clients[protocol]["direct"], body))
                    before = cpu_seconds(pid)
                    lat["tfscache"].append(timed(clients[protocol]["tfscache"], body))
                    cpu += cpu_seconds(pid) - before
                d, t = statistics.median(lat["direct"]), statistics.median(lat["tfscache"])
                cells.append({
                    "protocol": protocol, "mb": mb, "bytes": len(body), "requests": requests,
                    "direct_p50_ms": d * 1e3, "direct_p90_ms": p90(lat["direct"]) * 1e3,
                    "tfscache_p50_ms": t * 1e3, "tfscache_p90_ms": p90(lat["tfscache"]) * 1e3,
                    "added_p50_ms": (t - d) * 1e3,
                    "node_cpu_ms_per_req": cpu / requests * 1e3,
                    "node_cpu_ms_per_mb": cpu / requests * 1e3 / (len(body) / MB),
                })
                print(f"{protocol} {mb} MB: direct {d * 1e3:.1f} ms, tfscache {t * 1e3:.1f} ms, "
                      f"node CPU {cells[-1]['node_cpu_ms_per_req']:.1f} ms/request", flush=True)
        for pair in clients.values():
            for client in pair.values():
                client.close()
    finally:
        node.stop()
        backend.stop()
    return {"settings": {"sizes_mb": sizes, "requests": requests, "concurrency": 1,
                         "backend": "bench/fastbackend", "node": "one tfscache node, configured defaults"},
            "cells": cells}


def show(report: dict[str, Any]) -> None:
    if "skipped" in report:
        print(f"large_payloads skipped: {report['skipped']}")
        return
    rows = [[c["protocol"], c["mb"], f"{c['direct_p50_ms']:.1f}", f"{c['tfscache_p50_ms']:.1f}",
             f"{c['added_p50_ms']:.1f}", f"{c['direct_p90_ms']:.1f}", f"{c['tfscache_p90_ms']:.1f}",
             f"{c['node_cpu_ms_per_req']:.1f}", f"{c['node_cpu_ms_per_mb']:.2f}"] for c in report["cells"]]
    print_table("Large predict bodies (one at a time, fast backend; ms)",
                ["protocol", "MB", "p50 direct", "p50 tfscache", "added p50", "p90 direct", "p90 tfscache",
                 "node CPU ms/req", "node CPU ms/MB"], rows)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(__doc__ or "", extra_args, argv)
    report = run(args)
    show(report)
    path = write_report("large_payloads", report, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
