"""Where a node spends its CPU on the warm path: one node in front of a DevServer, the model
AVAILABLE, load from ``wrk`` (REST) or ``bench.grpc_load`` (gRPC) while ``py-spy`` samples the
node process (all threads, idle ones left out).  Prints the top functions by own samples and
by inclusive samples (tfscache and library frames), per protocol.

    pip install py-spy
    python -m bench.profile_warm [--seconds 8] [--concurrency 8] [--protocols rest grpc]
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import tempfile
import threading
from typing import Any

from bench.common import Processes, parse_args, print_table, write_models, write_report
from bench.warm_overhead import INSTANCES, WRK_LUA, grpc_cells, predict_payload, warm, wrk_cell


def extra_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--protocols", nargs="+", choices=("rest", "grpc"), default=["rest", "grpc"])
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--name", default="profile_warm")
    ap.add_argument("--gil", action="store_true", help="sample only the thread holding the GIL (Python CPU)")


def frame_key(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (pkg/file.py)``: lines merged, paths shortened."""
    func, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{func} ({path})"


def summarise(collapsed: str, top: int) -> dict[str, Any]:
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [frame_key(f) for f in stack.split(";")[1:]]  # first: the thread
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    return {
        "samples": total,
        "own": [(f, n, n / total) for f, n in own.most_common(top)],
        "inclusive": [(f, n, n / total) for f, n in incl.most_common(top * 2)
                      if not f.startswith(("<module>", "run (", "_bootstrap", "main ("))][:top],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    out: dict[str, Any] = {"settings": {"seconds": args.seconds, "concurrency": args.concurrency, "gil": args.gil}}
    with Processes() as procs:
        models = tempfile.mkdtemp(prefix="models-", dir=procs.tmp)
        write_models(models, ["warm"])
        backend = procs.devserver()
        node = procs.node(models, backend, listen={"grpc_threads": 32})
        warm(node.rest_url, "warm")
        pid = node.process.pid
        for protocol in args.protocols:
            os.makedirs(args.out, exist_ok=True)
            raw = os.path.join(args.out, f"{args.name}-{protocol}.collapsed.txt")  # for flamegraph tools
            spy = subprocess.Popen([pyspy, "record", "--pid", str(pid), "--duration", str(int(args.seconds - 1)),
                                    "--rate", "200", "--format", "raw", "--output", raw, "--nonblocking",
                                    *(["--gil"] if args.gil else [])],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            load: dict[str, Any] = {}

            def drive(protocol: str = protocol, load: dict[str, Any] = load) -> None:
                if protocol == "rest":
                    lua = os.path.join(procs.tmp, "p.lua")
                    with open(lua, "w") as f:
                        import json

                        f.write(WRK_LUA % {"body": json.dumps({"instances": INSTANCES})})
                    load.update(wrk_cell(f"{node.rest_url}/v1/models/warm:predict", lua, args.concurrency,
                                         args.seconds))
                else:
                    payload = os.path.join(procs.tmp, "warm.pb")
                    with open(payload, "wb") as f:
                        f.write(predict_payload("warm"))
                    load.update(grpc_cells([{"target": node.grpc_target, "concurrency": args.concurrency,
                                             "seconds": args.seconds, "warmup": 0.2}], payload, procs.tmp)[0])

            t = threading.Thread(target=drive)
            t.start()
            t.join()
            _, err = spy.communicate(timeout=60)
            if not os.path.exists(raw):
                raise RuntimeError(f"py-spy wrote nothing: {err.decode(errors='replace')}")
            with open(raw) as f:
                summary = summarise(f.read(), args.top)
            summary["load"] = load
            out[protocol] = summary
    return out


def show(report: dict[str, Any]) -> None:
    for protocol in ("rest", "grpc"):
        s = report.get(protocol)
        if not s:
            continue
        load = s["load"]
        title = (f"{protocol}: {load['rps']:.0f} req/s, p50 {load['p50_ms']:.2f} ms; {s['samples']} samples of the "
                 "node's busy threads")
        print_table(title + " - own time", ["function", "samples", "share"],
                    [[f, n, f"{p:.1%}"] for f, n, p in s["own"]])
        print_table(title + " - inclusive", ["function", "samples", "share"],
                    [[f, n, f"{p:.1%}"] for f, n, p in s["inclusive"]])


def main() -> None:
    args = parse_args(__doc__ or "", extra_args)
    report = run(args)
    show(report)
    print(f"wrote {write_report(args.name, report, args.out)}")


if __name__ == "__main__":
    main()
