"""Copy throughput of S3ModelProvider.fetch against plain boto3 transfers, same local S3 server.

Starts its own S3-compatible server through the test harness (MinIO, or moto_server when MinIO
is not built: the JSON says which), uploads one model version of ``--files`` objects totalling
``--total-mb`` MB (nested: saved_model.pb, variables/variables.index, variables/part-NNN), and
copies it to local disk, ``--repeat`` times per method, interleaved:

  provider   S3ModelProvider.fetch(): list, parallel download through one s3transfer
             TransferManager (max_concurrency requests at once over all objects, ranged GETs
             above multipart_threshold), size + MD5 check of every file, staging dir + rename.
  provider_nomd5  the same with the MD5 check switched off (size check only): what the
             check costs.
  per_object boto3 ``client.download_file`` per object, one object after the other, default
             TransferConfig (8 MiB threshold/chunks, 10 threads within one object), no checks:
             the naive script.
  cli_like   what ``aws s3 cp --recursive`` does: one TransferManager over all objects with the
             CLI's defaults (10 concurrent requests, 8 MiB threshold/chunks), no checks.

Every object is uploaded in a single PUT, so its ETag is its MD5 and the provider verifies it.

    python -m bench.s3_copy            # 200 MB in 20 files, 5 copies per method
    python -m bench.s3_copy --quick    # 20 MB, 3 copies per method

Writes ``<out>/s3_copy.json``. The copies are interleaved (provider, provider_nomd5, per_object,
cli_like, then again), so a noisy neighbour slows every method alike: ``ratios`` compares the
provider with each plain transfer by the median of the per-round ratios as well as by the
ratio of the medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

from bench.common import parse_args, print_table, write_report

MB = 1_000_000
MIB = 1024 * 1024
BUCKET = "tfscache-bench"
PREFIX = "bench/models"
NAME, VERSION = "big", 1


def model_files(total: int, count: int) -> dict[str, int]:
    """Relative path -> size: a small graph and index, the rest in equal variable shards."""
    files = {"saved_model.pb": min(MIB, total // 10), "variables/variables.index": 16 * 1024}
    shards = max(1, count - len(files))
    rest = total - sum(files.values())
    for i in range(shards):
        files[f"variables/variables.data-{i:05d}-of-{shards:05d}"] = rest // shards + (
            rest % shards if i == shards - 1 else 0)
    return files


def upload(client: Any, files: dict[str, int]) -> None:
    try:
        client.create_bucket(Bucket=BUCKET)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    for rel, size in files.items():
        client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{NAME}/{VERSION}/{rel}", Body=os.urandom(size))


def per_object(client: Any, dest: str) -> int:
    total = 0
    key_prefix = f"{PREFIX}/{NAME}/{VERSION}/"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=key_prefix):
        for o in page.get("Contents", []):
            path = os.path.join(dest, *o["Key"][len(key_prefix):].split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            client.download_file(BUCKET, o["Key"], path)
            total += o["Size"]
    return total


def cli_like(client: Any, dest: str) -> int:
    from boto3.s3.transfer import TransferConfig, create_transfer_manager

    key_prefix = f"{PREFIX}/{NAME}/{VERSION}/"
    config = TransferConfig(max_concurrency=10, preferred_transfer_client="classic")
    total, futures = 0, []
    with create_transfer_manager(client, config) as manager:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=key_prefix):
            for o in page.get("Contents", []):
                path = os.path.join(dest, *o["Key"][len(key_prefix):].split("/"))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                futures.append(manager.download(BUCKET, o["Key"], path))
                total += o["Size"]
        for f in futures:
            f.result()
    return total


def tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _d, fs in os.walk(path) for f in fs)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from twisted.internet import threads

    from tests.harness.servers import S3Server
    from tfscache.providers.s3 import S3ModelProvider

    total = int(args.total_mb * MB)
    files = model_files(total, args.files)
    server = S3Server().start()
    work = tempfile.mkdtemp(prefix="tfscache-bench-s3-")
    try:
        client = server.boto3_client()
        started = time.monotonic()
        await threads.deferToThread(upload, client, files)
        print(f"server={server.kind} uploaded {len(files)} objects, {total / MB:.0f} MB in "
              f"{time.monotonic() - started:.1f}s", flush=True)
        from twisted.internet import reactor

        providers = {
            verify: S3ModelProvider(
                BUCKET, PREFIX, endpoint_url=server.endpoint_url, region="us-east-1",
                access_key_id=server.access_key, secret_access_key=server.secret_key,
                max_concurrency=args.concurrency, multipart_threshold=args.threshold_mib * MIB,
                progress_interval=3600, fetch_timeout=600, verify_md5=verify, reactor=reactor,
            )
            for verify in (True, False)
        }

        async def provider_copy(dest: str, verify: bool = True) -> int:
            return int(await providers[verify].fetch(NAME, VERSION, dest))

        async def in_thread(f: Any, dest: str) -> int:
            return int(await threads.deferToThread(f, client, dest))

        methods = {
            "provider": provider_copy,
            "provider_nomd5": lambda d: provider_copy(d, verify=False),
            "per_object": lambda d: in_thread(per_object, d),
            "cli_like": lambda d: in_thread(cli_like, d),
        }
        runs: dict[str, list[float]] = {m: [] for m in methods}
        for verify in providers:  # client set-up, connections
            await provider_copy(os.path.join(work, f"warm-{verify}", "1"), verify)
        for i in range(args.repeat):
            for m, copy in methods.items():
                dest = os.path.join(work, m, str(i))
                t0 = time.monotonic()
                copied = await copy(dest)
                seconds = time.monotonic() - t0
                if copied != total or tree_bytes(dest) != total:
                    raise SystemExit(f"{m}: copied {copied} bytes, expected {total}")
                runs[m].append(seconds)
                shutil.rmtree(dest)
        for p in providers.values():
            await p.close()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    results = {}
    for m, times in runs.items():
        results[m] = {
            "seconds": [round(t, 4) for t in times],
            "median_mb_per_s": round(total / MB / statistics.median(times), 1),
            "best_mb_per_s": round(total / MB / min(times), 1),
        }
    # provider throughput / a plain transfer's: > 1 means the provider is faster. Per round
    # (the methods ran back to back, under the same neighbours' load) and of the medians.
    ratios = {}
    for base in ("per_object", "cli_like"):
        per_round = [b / p for p, b in zip(runs["provider"], runs[base], strict=True)]
        ratios[f"provider_vs_{base}"] = {
            "median_of_rounds": round(statistics.median(per_round), 3),
            "of_medians": round(statistics.median(runs[base]) / statistics.median(runs["provider"]), 3),
            "rounds": [round(r, 3) for r in per_round],
        }
    nomd5 = [b / p for p, b in zip(runs["provider_nomd5"], runs["cli_like"], strict=True)]
    ratios["provider_nomd5_vs_cli_like"] = {"median_of_rounds": round(statistics.median(nomd5), 3)}
    md5 = [p / n for p, n in zip(runs["provider"], runs["provider_nomd5"], strict=True)]
    ratios["md5_check_time_factor"] = {"median_of_rounds": round(statistics.median(md5), 3)}
    return {
        "benchmark": "s3_copy",
        "server": server.kind,
        "total_bytes": total,
        "objects": len(files),
        "largest_object_bytes": max(files.values()),
        "provider_max_concurrency": args.concurrency,
        "provider_multipart_threshold_bytes": args.threshold_mib * MIB,
        "repeat": args.repeat,
        "methods": results,
        "ratios": ratios,
        "compared": {
            "provider": "S3ModelProvider.fetch: one TransferManager over all objects, "
                        "max_concurrency requests, size+MD5 check, staging dir + rename",
            "provider_nomd5": "the same, size check only",
            "per_object": "boto3 download_file per object, sequential, default TransferConfig",
            "cli_like": "one TransferManager over all objects, 10 concurrent requests "
                        "(aws s3 cp --recursive defaults), no checks",
        },
    }


def _extra(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--total-mb", type=float, help="model size in MB (default 200, quick 20)")
    ap.add_argument("--files", type=int, default=20, help="objects in the model version")
    ap.add_argument("--repeat", type=int, help="copies per method, interleaved (default 5, quick 3)")
    ap.add_argument("--concurrency", type=int, default=8, help="provider max_concurrency")
    ap.add_argument("--threshold-mib", type=int, default=8, help="provider multipart threshold")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__ or "", _extra, argv)
    if args.total_mb is None:
        args.total_mb = 20.0 if args.quick else 200.0
    if args.repeat is None:
        args.repeat = 3 if args.quick else 5

    from twisted.internet import defer, task

    async def go(_reactor: Any) -> None:
        report = await run(args)
        print_report(report)
        path = write_report("s3_copy", report, args.out)
        print(f"\nwrote {path}")

    task.react(lambda r: defer.ensureDeferred(go(r)))
    return 0  # task.react exits the process with the run's status


def print_report(report: dict[str, Any]) -> None:
    print_table(
        f"S3 copy of {report['objects']} objects, {report['total_bytes'] / MB:.0f} MB, "
        f"server={report['server']}, {report['repeat']} runs each (interleaved)",
        ["method", "median MB/s", "best MB/s", "seconds"],
        [[m, r["median_mb_per_s"], r["best_mb_per_s"], " ".join(f"{t:.2f}" for t in r["seconds"])]
         for m, r in report["methods"].items()],
    )
    print_table(
        "provider MB/s / plain transfer MB/s (> 1: the provider is faster)",
        ["against", "median of rounds", "of medians"],
        [[k.removeprefix("provider_vs_"), r["median_of_rounds"], r["of_medians"]]
         for k, r in report["ratios"].items() if k.startswith("provider_vs_")],
    )
    r = report["ratios"]
    print(f"without the MD5 check, provider / cli_like: {r['provider_nomd5_vs_cli_like']['median_of_rounds']}; "
          f"the check multiplies the copy time by {r['md5_check_time_factor']['median_of_rounds']}")


if __name__ == "__main__":
    raise SystemExit(main())
