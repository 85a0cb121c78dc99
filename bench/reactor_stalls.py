"""Reactor stalls: how often a node stops answering for tens of milliseconds under steady load.

One tfscache node in front of the fast backend (bench/fastbackend); sequential REST predicts on
one kept-alive connection (http.client), to the backend directly and through the node (and
through a node running ``--before DIR``'s code), in interleaved blocks of 500 so that a noisy
neighbour slows all alike.  A single client at a time sees every pause of the node's reactor
thread whole: a full garbage collection of the daemon's start-up objects took 40-63 ms every
~3 s under load before the daemon froze them (bench/README §6e).  Reported per contender:
p50, p99, p99.9 and max latency, and the replies slower than ``--stall-ms``.

    python -m bench.reactor_stalls                   # 30,000 requests per contender
    python -m bench.reactor_stalls --before DIR      # and a node of DIR's code beside it
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from bench.common import parse_args, percentiles, print_table, write_report
from bench.data_plane import BIN, FastBackend, tfscache_config, write_fake_models
from bench.large_payloads import RestClient, timed
from bench.warm_overhead import INSTANCES
from tests.harness.node import NodeProcess

MODEL = "stalls"
BLOCK = 500


def extra_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--requests", type=int, help="per contender (default 30000; --quick 2000)")
    ap.add_argument("--stall-ms", type=float, default=20.0, help="a reply slower than this is a stall (default 20)")
    ap.add_argument("--before", metavar="DIR", help="also a node running the tfscache code checked out in DIR")


def run(args: argparse.Namespace) -> dict[str, Any]:
    path = os.path.join(BIN, "fastbackend")
    if not os.access(path, os.X_OK):
        return {"skipped": f"{path} is missing: run bench/build_go_bench.sh (scripts/setup --go-servers)"}
    requests = args.requests or (2000 if args.quick else 30000)
    work = tempfile.mkdtemp(prefix="tfscache-stalls-")
    models = os.path.join(work, "models")
    write_fake_models(models, [MODEL])
    # a backend per node: each node sends its backend the whole model list
    backends = [FastBackend(path).start() for _ in range(2 if args.before else 1)]
    nodes = {"tfscache": NodeProcess(tfscache_config("stalls", models, os.path.join(work, "cache"), backends[0], 4),
                                     "tfscache-stalls")}
    if args.before:
        before = NodeProcess(tfscache_config("stalls-before", models, os.path.join(work, "cache-before"),
                                             backends[1], 4), "tfscache-stalls-before")
        before.process.env["PYTHONPATH"] = os.path.abspath(args.before)
        nodes["before"] = before
    try:
        for node in nodes.values():
            node.start()
        body = json.dumps({"instances": INSTANCES}).encode()
        clients = {who: RestClient(n.rest_port, MODEL) for who, n in nodes.items()}
        for client in clients.values():  # the first request loads the model, into the backend too
            client(body)
        clients = {"direct": RestClient(backends[0].rest_port, MODEL), **clients}
        started = time.perf_counter()
        samples: dict[str, list[tuple[float, float]]] = {who: [] for who in clients}
        while any(len(s) < requests for s in samples.values()):
            for who, client in clients.items():
                for _ in range(min(BLOCK, requests - len(samples[who]))):
                    at = time.perf_counter() - started
                    samples[who].append((at, timed(client, body)))
        contenders = {}
        for who, s in samples.items():
            lat = percentiles((x * 1e3 for _, x in s), points=(50, 99, 99.9))
            stalls = [(round(at, 2), round(x * 1e3, 1)) for at, x in s if x * 1e3 > args.stall_ms]
            contenders[who] = {"requests": len(s), "p50_ms": lat["p50"], "p99_ms": lat["p99"],
                               "p999_ms": lat["p99.9"], "max_ms": lat["max"], "stalls": len(stalls),
                               "stalls_at_s_ms": stalls[:50]}
        for client in clients.values():
            client.close()
    finally:
        for node in nodes.values():
            node.stop()
        for backend in backends:
            backend.stop()
    return {"settings": {"requests": requests, "block": BLOCK, "stall_ms": args.stall_ms, "concurrency": 1,
                         "backend": "bench/fastbackend", "before": args.before},
            "contenders": contenders}


def show(report: dict[str, Any]) -> None:
    if "skipped" in report:
        print(f"reactor_stalls skipped: {report['skipped']}")
        return
    s = report["settings"]
    rows = [[who, c["requests"], f"{c['p50_ms']:.2f}", f"{c['p99_ms']:.2f}", f"{c['p999_ms']:.2f}",
             f"{c['max_ms']:.1f}", c["stalls"]] for who, c in report["contenders"].items()]
    print_table(f"Reactor stalls (sequential REST predicts, one connection, blocks of {s['block']} interleaved; "
                f"a stall: a reply slower than {s['stall_ms']:g} ms)",
                ["contender", "requests", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "stalls"], rows)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(__doc__ or "", extra_args, argv)
    report = run(args)
    show(report)
    print(f"wrote {write_report('reactor_stalls', report, args.out)}")


if __name__ == "__main__":
    main()
