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

    python bench/s3_copy.py            # 200 MB in 20 files
    python bench/s3_copy.py --quick    # 20 MB
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

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
        providers = {
            verify: S3ModelProvider(
                BUCKET, PREFIX, endpoint_url=server.endpoint_url, region="us-east-1",
                access_key_id=server.access_key, secret_access_key=server.secret_key,
                max_concurrency=args.concurrency, multipart_threshold=args.threshold_mib * MIB,
                progress_interval=3600, fetch_timeout=600, verify_md5=verify,
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
    return {
        "benchmark": "s3_copy",
        "server": server.kind,
        "total_bytes": total,
        "objects": len(files),
        "largest_object_bytes": max(files.values()),
        "provider_max_concurrency": args.concurrency,
        "provider_multipart_threshold_bytes": args.threshold_mib * MIB,
        "repeat": args.repeat,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "methods": results,
        "compared": {
            "provider": "S3ModelProvider.fetch: one TransferManager over all objects, "
                        "max_concurrency requests, size+MD5 check, staging dir + rename",
            "provider_nomd5": "the same, size check only",
            "per_object": "boto3 download_file per object, sequential, default TransferConfig",
            "cli_like": "one TransferManager over all objects, 10 concurrent requests "
                        "(aws s3 cp --recursive defaults), no checks",
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--total-mb", type=float, default=200.0)
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="20 MB, 3 repeats")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=8, help="provider max_concurrency")
    ap.add_argument("--threshold-mib", type=int, default=8, help="provider multipart threshold")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "s3_copy.json"))
    args = ap.parse_args()
    if args.quick:
        args.total_mb, args.repeat = 20.0, 3

    from twisted.internet import defer, task

    async def go(_reactor: Any) -> None:
        report = await run(args)
        print_table(report)
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        print(f"wrote {os.path.relpath(args.out)}")

    task.react(lambda r: defer.ensureDeferred(go(r)))


def print_table(report: dict[str, Any]) -> None:
    print(f"\nS3 copy of {report['objects']} objects, {report['total_bytes'] / MB:.0f} MB, "
          f"server={report['server']}, {report['repeat']} runs each")
    print(f"{'method':<15} {'median MB/s':>12} {'best MB/s':>10}  seconds")
    for m, r in report["methods"].items():
        secs = " ".join(f"{t:.2f}" for t in r["seconds"])
        print(f"{m:<15} {r['median_mb_per_s']:>12.1f} {r['best_mb_per_s']:>10.1f}  {secs}")


if __name__ == "__main__":
    main()
