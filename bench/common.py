"""Scaffolding shared by the benchmarks: arguments, reports, tables, percentiles, and the real
processes (DevServer, tfscache nodes) they measure.

Benchmarks are plain synchronous scripts: the test harness's process fixtures block until a
process is ready (a probe with a deadline), so no reactor is needed here.

    with Processes() as procs:
        backend = procs.devserver()
        node = procs.node(models_dir, backend)
        ...   # everything is stopped on exit, also on an exception
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python bench/x.py` as well as `python -m bench.x`
    sys.path.insert(0, ROOT)

from tests.harness.devserver import DevServer  # noqa: E402
from tests.harness.node import NodeProcess, node_config  # noqa: E402
from tests.harness.process import listen_port  # noqa: E402

DEFAULT_OUT = os.path.join("bench", "results")

__all__ = [
    "DevServer", "NodeProcess", "Processes", "ROOT", "fetch_json", "listen_port", "machine", "metric",
    "node_config", "owner_index", "parse_args", "percentiles", "post_json", "print_table", "scrape", "wait_until",
    "write_models", "write_report",
]


# -- arguments, reports ---------------------------------------------------------------------

def parse_args(
    description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: Sequence[str] | None = None,
) -> argparse.Namespace:
    """``--quick`` (tiny, fast settings) and ``--out DIR``; ``extra(parser)`` adds more."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny, fast settings (a smoke run)")
    ap.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"results directory (default {DEFAULT_OUT})")
    if extra is not None:
        extra(ap)
    return ap.parse_args(argv)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def write_report(name: str, report: dict[str, Any], out_dir: str) -> str:
    """Write ``<out_dir>/<name>.json`` with the machine's description added; return the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    data = dict(report)
    data.setdefault("benchmark", name)
    data["machine"] = machine()
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
    return path


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return "-" if v is None else str(v)


def print_table(title: str, headers: list[str], rows: list[list[Any]]) -> None:
    """Plain aligned text: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    print(f"\n{title}")
    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for r in cells[1:]:
        print(line(r))
    sys.stdout.flush()


def percentiles(values: Iterable[float], points: Sequence[float] = (50, 90, 99)) -> dict[str, float]:
    """The ``points`` percentiles (nearest rank; keys ``p50``, ``p99.9``...), max, mean and n
    of ``values``."""
    xs = sorted(values)
    n = len(xs)
    keys = [f"p{p:g}" for p in points]
    if not n:
        return {**{k: float("nan") for k in keys}, "max": float("nan"), "mean": float("nan"), "n": 0}

    def rank(p: float) -> float:
        return xs[min(n - 1, max(0, int(-(-p * n // 100)) - 1))]

    return {**{k: rank(p) for k, p in zip(keys, points, strict=True)}, "max": xs[-1],
            "mean": statistics.fmean(xs), "n": n}


# -- HTTP, metrics --------------------------------------------------------------------------

def fetch_json(url: str, timeout: float = 30, headers: dict[str, str] | None = None) -> Any:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.load(resp)


def post_json(url: str, body: Any, timeout: float = 120) -> tuple[int, Any]:
    """POST JSON; (status, parsed body) also for an HTTP error status."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode(errors="replace")


def scrape(url: str, timeout: float = 10) -> dict[str, float]:
    """A Prometheus text page as ``{'name{label="v",...}': value}`` (labels sorted)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def wait_until(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll a real process's state (no event to wait on) until ``check()`` holds."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)


# -- models ---------------------------------------------------------------------------------

def write_models(base: str, names: Iterable[str], version: int = 1, padding_bytes: int = 0,
                 distinct: bool = False) -> list[str]:
    """half_plus_two under each name in ``base``; returns the version directories.

    ``padding_bytes`` adds an unused variable of that size (copied and restored like real
    weights). Unless ``distinct``, the first model is written once (TensorFlow is slow to
    build graphs) and copied under the other names."""
    from tfscache.devserver.models import write_half_plus_two

    names = list(names)
    dirs: list[str] = []
    for i, name in enumerate(names):
        if i and not distinct:
            dest = os.path.join(base, name, str(version))
            if os.path.exists(dest):
                shutil.rmtree(dest)
            shutil.copytree(dirs[0], dest)
            dirs.append(dest)
        else:
            dirs.append(write_half_plus_two(base, name, version, padding_bytes=padding_bytes))
    return dirs


# -- processes ------------------------------------------------------------------------------

class Processes(contextlib.AbstractContextManager["Processes"]):
    """Starts DevServers and tfscache nodes (real processes, free loopback ports) and stops them
    all when the ``with`` block ends, also after an exception: the nodes first, then the
    backends, each group in parallel (a DevServer takes seconds to stop)."""

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="tfscache-bench-")
        self._nodes: list[NodeProcess] = []
        self._backends: list[DevServer] = []

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        for group in (self._nodes, self._backends):
            if group:
                with ThreadPoolExecutor(len(group)) as pool:
                    list(pool.map(lambda p: p.stop(), group))
            group.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def devserver(self, extra_args: tuple[str, ...] = ()) -> DevServer:
        backend = DevServer(extra_args)
        self._backends.append(backend)  # before start: a failed start leaves nothing running
        return backend.start()

    def devservers(self, count: int) -> list[DevServer]:
        """``count`` DevServers started in parallel (TensorFlow takes seconds to import)."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(count) as pool:
            return list(pool.map(lambda _: self.devserver(), range(count)))

    def node(self, models: str, backend: DevServer, name: str = "tfscache", **overrides: Any) -> NodeProcess:
        """A ``twistd tfscache`` process in front of ``backend``; ``overrides`` go to node_config."""
        return self.nodes([(models, backend, name, overrides)])[0]

    def nodes(self, specs: Sequence[tuple[str, DevServer, str, dict[str, Any]]]) -> list[NodeProcess]:
        """Several nodes started in parallel: ``(models, backend, name, overrides)`` each."""
        from concurrent.futures import ThreadPoolExecutor

        procs = []
        for models, backend, name, overrides in specs:
            overrides = dict(overrides)
            overrides.setdefault("disk_cache", {"path": tempfile.mkdtemp(prefix="cache-", dir=self.tmp)})
            overrides.setdefault("logging", {"level": "warn"})
            node = NodeProcess(node_config(models, backend, **overrides), name=name)
            self._nodes.append(node)
            procs.append(node)
        with ThreadPoolExecutor(len(procs)) as pool:
            list(pool.map(lambda n: n.start(), procs))
        return procs

    def cluster(self, models: str, size: int = 2, replicas: int = 1, backends: Sequence[DevServer] | None = None,
                **overrides: Any) -> tuple[list[DevServer], list[NodeProcess]]:
        """``size`` nodes ``node-0``.. in one static cluster, each with its own DevServer
        (started here unless ``backends`` are given)."""
        backends = list(backends) if backends is not None else self.devservers(size)
        ports = [(listen_port(), listen_port()) for _ in range(size)]
        members = [{"id": f"node-{i}", "host": "127.0.0.1", "rest_port": r, "grpc_port": g}
                   for i, (r, g) in enumerate(ports)]
        extra_cluster = overrides.pop("cluster", {})
        listen = overrides.pop("listen", {})
        specs = []
        for i, (r, g) in enumerate(ports):
            cluster = {"replicas_per_model": replicas, **extra_cluster,
                       "discovery": {"type": "static", "members": members}}
            specs.append((models, backends[i], f"node-{i}", {
                "node_id": f"node-{i}", "listen": {**listen, "rest_port": r, "grpc_port": g},
                "cluster": cluster, **overrides}))
        return backends, self.nodes(specs)


def owner_index(name: str, size: int) -> int:
    """The index of the first owner of model ``name`` in a cluster from ``Processes.cluster``
    (rendezvous hashing depends on the member ids only, so this works before it starts)."""
    from tfscache.cluster.members import Member
    from tfscache.cluster.ring import owners

    members = [Member(f"node-{i}", "127.0.0.1", 0, 0) for i in range(size)]
    return int(owners(name, members, 1)[0].id.split("-")[1])
