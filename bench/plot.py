"""PNG plots of the benchmark reports in bench/results/ (matplotlib, no display needed).

  latency_vs_concurrency.png   from warm_overhead.json: warm request latency (p50, p99) against
                               requests in flight, straight to TF Serving vs through tfscache
  hit_ratio_vs_capacity.png    from zipf_workload.json: LRU vs Belady's MIN hit ratio against
                               capacity, one panel per Zipf skew, with every replay through the real daemon

A report that is missing is skipped with a note; the others are still drawn.

    python -m bench.plot [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server or in CI
import matplotlib.pyplot as plt  # noqa: E402

DEFAULT_DIR = os.path.join("bench", "results")


def load(results: str, name: str) -> dict[str, Any] | None:
    path = os.path.join(results, f"{name}.json")
    try:
        with open(path) as f:
            data: dict[str, Any] = json.load(f)
    except FileNotFoundError:
        print(f"plot: {path} not found, skipping its plot")
        return None
    except ValueError as e:
        print(f"plot: {path} is not valid JSON ({e}), skipping its plot")
        return None
    return data


def _machine_note(report: dict[str, Any]) -> str:
    m = report.get("machine") or {}
    return f"{m.get('cpus', '?')} CPUs, {m.get('cpu_model', '?')}, {m.get('date_utc', '')}"


def plot_latency(report: dict[str, Any], out: str) -> str:
    """One panel per (scenario, protocol): p50 and p99 against concurrency, direct vs tfscache."""
    cells = [c for c in report["cells"] if c.get("requests")]  # no answer, no latency
    panels = sorted({(c["scenario"], c["protocol"]) for c in cells})
    cols = len({p for _, p in panels}) or 1
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.6 * rows), squeeze=False)
    for ax, (scenario, protocol) in zip(axes.flat, panels, strict=False):
        for target, color, name in (("direct", "C0", "direct to TF Serving"), ("via", "C3", "through tfscache")):
            mine = sorted((c for c in cells if (c["scenario"], c["protocol"], c["target"])
                           == (scenario, protocol, target)), key=lambda c: c["concurrency"])
            conc = [c["concurrency"] for c in mine]
            ax.plot(conc, [c["p50_ms"] for c in mine], "o-", color=color, label=f"{name} p50")
            ax.plot(conc, [c["p99_ms"] for c in mine], "^--", color=color, label=f"{name} p99")
        concs = sorted({c["concurrency"] for c in cells})
        ax.set_xscale("log")
        ax.set_xticks(concs, [str(c) for c in concs])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{scenario}, {protocol}")
        ax.set_xlabel("requests in flight")
        ax.set_ylabel("latency (ms)")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Warm predict latency vs concurrency ({_machine_note(report)})", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out, "latency_vs_concurrency.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_hit_ratio(report: dict[str, Any], out: str) -> str:
    rows = report["simulation"]["rows"]
    skews = sorted({r["skew"] for r in rows})
    fig, axes = plt.subplots(1, len(skews), figsize=(4.2 * len(skews), 4.0), sharey=True, squeeze=False)
    # every replay through the daemon (older reports have one "replay"), on its skew's panel
    replays = report.get("replays") or ([report["replay"]] if report.get("replay") else [])
    for r in replays:
        if r["skew"] not in skews:
            print(f"plot: replay at skew {r['skew']:g} has no simulated panel, not drawn")
    for ax, skew in zip(axes[0], skews, strict=True):
        mine = sorted((r for r in rows if r["skew"] == skew), key=lambda r: r["capacity"])
        caps = [r["capacity"] for r in mine]
        ax.plot(caps, [r["min"]["hit_ratio"] for r in mine], "o-", label="Belady's MIN (optimum)")
        ax.plot(caps, [r["lru"]["hit_ratio"] for r in mine], "s-", label="LRU (tfscache's policy)")
        for replay in (r for r in replays if r["skew"] == skew):
            cap = replay["capacity"]
            n = replay["requests"]
            daemon_ratio = 1 - replay["daemon"]["loads"] / n  # a miss is a load, as the simulators count
            ax.plot([cap], [daemon_ratio], "k*", markersize=12,
                    label=f"daemon replay, 1 - loads/requests ({n} req.)")
            ax.plot([cap], [replay["lru"]["hit_ratio"]], "x", color="C1", markersize=9,
                    label=f"LRU on the replay trace ({n} req.)")
        ax.set_xscale("log")
        ax.set_xticks(caps, [str(c) for c in caps])
        ax.minorticks_off()
        ax.set_ylim(0, 1)
        ax.grid(True, alpha=0.3)
        ax.set_title(f"Zipf skew {skew:g}")
        ax.set_xlabel("capacity (models loaded at once)")
    axes[0][0].set_ylabel("hit ratio")
    # the legend where the replay's markers are, if any
    replayed = {r["skew"] for r in replays}
    legend_ax = next((ax for ax, skew in zip(axes[0], skews, strict=True) if skew in replayed), axes[0][0])
    legend_ax.legend(loc="lower right", fontsize=7)
    sim = report["simulation"]
    fig.suptitle(f"Hit ratio vs capacity: {sim['models']} models, {sim['requests']} requests per trace "
                 f"({_machine_note(report)})", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out, "hit_ratio_vs_capacity.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_DIR, help=f"results directory, read and written (default {DEFAULT_DIR})")
    ap.add_argument("--quick", action="store_true", help="accepted for bench/run; plotting is quick anyway")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    written = []
    for name, draw in (("warm_overhead", plot_latency), ("zipf_workload", plot_hit_ratio)):
        report = load(args.out, name)
        if report is None:
            continue
        try:
            written.append(draw(report, args.out))
        except (KeyError, TypeError, ValueError) as e:  # a report of another shape: say so, draw the rest
            print(f"plot: cannot plot {name}.json ({type(e).__name__}: {e})", file=sys.stderr)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
