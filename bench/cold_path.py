"""Cold path: the first request for a model that is only in the source, against what the
work itself costs.

Per model (``--models``, each a half_plus_two with ``--padding-mb`` MB of extra weights, under
its own name so each one is cold):
  copy     ``shutil.copytree`` of its version directory, timed here (the floor of the node's
           copy from a disk source);
  load     a second, fresh DevServer asked to load that copy directly (HandleReloadConfigRequest,
           then GetModelStatus until AVAILABLE), timed here: the backend's own load time;
  cold     POST predict to a node that has never seen the model, until the reply.
The overhead is ``cold - (copy + load)``: listing, bookkeeping, the node's status polling and
the request itself.  The node's own fetch and load histograms are reported alongside.

Then a herd: ``--herd`` concurrent first requests for one more cold model; the time until all
are answered, and the copies and loads they caused (node /metrics, DevServer
/devserver/loads): both must be 1.

Source files are in the page cache (just written): the copy is a memory-to-disk copy, as for a
model that was read recently; a cold page cache would add the source disk's read time to both
``copy`` and ``cold``.

    python -m bench.cold_path            # 5 models of 200 MB, herd of 100
    python -m bench.cold_path --quick    # 2 models of 50 MB, herd of 100
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.common import (
    DevServer,
    Processes,
    fetch_json,
    metric,
    parse_args,
    post_json,
    print_table,
    scrape,
    write_models,
    write_report,
)

MB = 1_000_000


def extra_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--models", type=int, help="cold models measured one by one (default 5, --quick 2)")
    ap.add_argument("--padding-mb", type=float, help="extra weights per model (default 200, --quick 50)")
    ap.add_argument("--herd", type=int, default=100, help="concurrent first requests for one model")


def tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _d, fs in os.walk(path) for f in fs)


class DirectLoader:
    """Loads models into a DevServer the way tfscache does, but blocking and timed: one reload
    call with the whole list, then GetModelStatus until the version is AVAILABLE."""

    def __init__(self, backend: DevServer) -> None:
        import grpc

        from tfscache.proto import model_service_pb2 as pb

        self.pb = pb
        self.channel = grpc.insecure_channel(backend.grpc_target)
        self.reload = self.channel.unary_unary(
            "/tensorflow.serving.ModelService/HandleReloadConfigRequest",
            request_serializer=pb.ReloadConfigRequest.SerializeToString,
            response_deserializer=pb.ReloadConfigResponse.FromString)
        self.status = self.channel.unary_unary(
            "/tensorflow.serving.ModelService/GetModelStatus",
            request_serializer=pb.GetModelStatusRequest.SerializeToString,
            response_deserializer=pb.GetModelStatusResponse.FromString)
        self.models: dict[str, str] = {}

    def load(self, name: str, base_path: str, version: int = 1, timeout: float = 300) -> float:
        """Seconds from the reload call until ``name`` is AVAILABLE."""
        pb = self.pb
        self.models[name] = base_path
        req = pb.ReloadConfigRequest()
        for n, path in sorted(self.models.items()):
            mc = req.config.model_config_list.config.add()
            mc.name, mc.base_path, mc.model_platform = n, path, "tensorflow"
            mc.model_version_policy.specific.versions.append(version)
        started = time.perf_counter()
        resp = self.reload(req, timeout=timeout)
        if resp.status.error_code:
            raise RuntimeError(f"direct load of {name}: {resp.status.error_message}")
        status_req = pb.GetModelStatusRequest()
        status_req.model_spec.name = name
        while True:  # the reload waits for new names; this confirms the state (one call, usually)
            states = {s.version: s.state for s in self.status(status_req, timeout=10).model_version_status}
            if states.get(version) == pb.ModelVersionStatus.AVAILABLE:
                return time.perf_counter() - started
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"{name} not AVAILABLE after {timeout}s: {states}")
            time.sleep(0.002)  # polling a real process's state; no event to wait on

    def close(self) -> None:
        self.channel.close()


def node_counters(node_url: str) -> dict[str, float]:
    s = scrape(node_url + "/metrics")
    return {
        "fetches": metric(s, "tfscache_fetches_total", outcome="ok"),
        "loads": metric(s, "tfscache_loads_total", outcome="ok"),
        "fetch_seconds": metric(s, "tfscache_fetch_seconds_sum"),
        "load_seconds": metric(s, "tfscache_load_seconds_sum"),
        "misses": metric(s, "tfscache_cache_misses_total"),
    }


def cold_request(node_url: str, name: str) -> tuple[int, float]:
    started = time.perf_counter()
    status, body = post_json(f"{node_url}/v1/models/{name}:predict", {"instances": [1.0, 2.0]}, timeout=300)
    seconds = time.perf_counter() - started
    if status != 200:
        raise RuntimeError(f"cold predict of {name}: {status} {body}")
    return status, seconds


def herd(node_url: str, name: str, count: int) -> dict[str, Any]:
    """``count`` threads released together, each sending the first request for ``name``."""
    barrier = threading.Barrier(count + 1)
    results: list[tuple[int, float]] = []
    lock = threading.Lock()

    def one() -> None:
        barrier.wait()
        started = time.perf_counter()
        status, _ = post_json(f"{node_url}/v1/models/{name}:predict", {"instances": [1.0]}, timeout=300)
        with lock:
            results.append((status, time.perf_counter() - started))

    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(one) for _ in range(count)]
        barrier.wait()
        started = time.perf_counter()
        for f in futures:
            f.result()
        all_done = time.perf_counter() - started
    latencies = sorted(s for _, s in results)
    return {
        "requests": count, "ok": sum(1 for st, _ in results if st == 200),
        "seconds_to_all_replies": all_done, "first_reply_seconds": latencies[0],
        "median_reply_seconds": statistics.median(latencies),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    count = args.models or (2 if args.quick else 5)
    padding = int((args.padding_mb if args.padding_mb is not None else (50 if args.quick else 200)) * MB)
    names = [f"cold-{i}" for i in range(count)]
    herd_name = "cold-herd"
    started = time.monotonic()
    with Processes() as procs:
        models = tempfile.mkdtemp(prefix="models-", dir=procs.tmp)
        scratch = tempfile.mkdtemp(prefix="copies-", dir=procs.tmp)
        with ThreadPoolExecutor(1) as pool:  # the models are written while TensorFlow imports
            backends_f = pool.submit(procs.devservers, 2)
            write_models(models, ["warmup"])
            write_models(models, [*names, herd_name], padding_bytes=padding)
            node_backend, reference = backends_f.result()
        node = procs.node(models, node_backend, logging={"level": "warn"})
        loader = DirectLoader(reference)
        size = tree_bytes(os.path.join(models, names[0], "1"))
        print(f"set-up {time.monotonic() - started:.1f}s; {count} models of {size / MB:.1f} MB", flush=True)

        # first loads in a process pay one-off costs (imports, kernels): not part of the measure
        cold_request(node.rest_url, "warmup")
        shutil.copytree(os.path.join(models, "warmup"), os.path.join(scratch, "warmup"))
        loader.load("warmup", os.path.join(scratch, "warmup"))

        rows = []
        for name in names:
            src = os.path.join(models, name)
            t0 = time.perf_counter()
            shutil.copytree(src, os.path.join(scratch, name))
            copy_s = time.perf_counter() - t0
            load_s = loader.load(name, os.path.join(scratch, name))
            before = node_counters(node.rest_url)
            _, cold_s = cold_request(node.rest_url, name)
            after = node_counters(node.rest_url)
            d = {k: after[k] - before[k] for k in after}
            if d["fetches"] != 1 or d["loads"] != 1:
                raise RuntimeError(f"{name}: the node counted {d['fetches']} copies, {d['loads']} loads")
            rows.append({"model": name, "cold_s": cold_s, "copy_s": copy_s, "load_s": load_s,
                         "sum_s": copy_s + load_s, "overhead_s": cold_s - copy_s - load_s,
                         "node_fetch_s": d["fetch_seconds"], "node_load_s": d["load_seconds"]})
            print(f"  {name}: cold {cold_s * 1e3:.0f} ms = copy {copy_s * 1e3:.0f} + load {load_s * 1e3:.0f} "
                  f"+ {(cold_s - copy_s - load_s) * 1e3:.0f} ms", flush=True)
        loader.close()

        before = node_counters(node.rest_url)
        loads_before = fetch_json(node_backend.rest_url + "/devserver/loads")["loads"].get(f"{herd_name}/1", 0)
        h = herd(node.rest_url, herd_name, args.herd)
        after = node_counters(node.rest_url)
        h["node_copies"] = after["fetches"] - before["fetches"]
        h["node_loads"] = after["loads"] - before["loads"]
        h["backend_loads"] = fetch_json(node_backend.rest_url + "/devserver/loads")["loads"].get(
            f"{herd_name}/1", 0) - loads_before
        h["node_misses"] = after["misses"] - before["misses"]
        ok = h["ok"] == args.herd and h["node_copies"] == 1 and h["node_loads"] == 1 and h["backend_loads"] == 1
        h["passed"] = ok

    medians = {k: statistics.median(r[k] for r in rows) for k in
               ("cold_s", "copy_s", "load_s", "sum_s", "overhead_s", "node_fetch_s", "node_load_s")}
    return {
        "settings": {"models": count, "padding_bytes": padding, "model_bytes": size, "herd": args.herd,
                     "quick": args.quick, "source": "disk provider, page cache warm",
                     "node_config": "defaults (status poll from 20 ms, x1.5, up to 500 ms)"},
        "note": f"{os.cpu_count()} CPUs shared by the client, the node and two DevServers",
        "models": rows,
        "medians": medians,
        "herd": h,
        "total_seconds": round(time.monotonic() - started, 1),
    }


def show(report: dict[str, Any]) -> None:
    ms = 1e3
    rows = [[r["model"], r["cold_s"] * ms, r["copy_s"] * ms, r["load_s"] * ms, r["sum_s"] * ms,
             r["overhead_s"] * ms, r["node_fetch_s"] * ms, r["node_load_s"] * ms] for r in report["models"]]
    m = report["medians"]
    rows.append(["median", m["cold_s"] * ms, m["copy_s"] * ms, m["load_s"] * ms, m["sum_s"] * ms,
                 m["overhead_s"] * ms, m["node_fetch_s"] * ms, m["node_load_s"] * ms])
    s = report["settings"]
    print_table(f"Cold path, ms ({s['model_bytes'] / MB:.0f} MB models; copy = shutil.copytree, load = a fresh "
                "DevServer loading directly; node fetch/load = the node's own histograms)",
                ["model", "cold", "copy", "load", "copy+load", "overhead", "node fetch", "node load"], rows)
    h = report["herd"]
    print_table(f"{h['requests']} concurrent first requests for one cold model",
                ["all replies s", "first s", "median s", "200s", "copies", "node loads", "backend loads", "passed"],
                [[h["seconds_to_all_replies"], h["first_reply_seconds"], h["median_reply_seconds"], h["ok"],
                  int(h["node_copies"]), int(h["node_loads"]), int(h["backend_loads"]), h["passed"]]])


def main() -> None:
    args = parse_args(__doc__ or "", extra_args)
    report = run(args)
    show(report)
    print(f"wrote {write_report('cold_path', report, args.out)} (total {report['total_seconds']}s)")
    if not report["herd"]["passed"]:
        raise SystemExit("the herd caused more than one copy or load, or a request failed")


if __name__ == "__main__":
    main()
