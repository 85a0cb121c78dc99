"""Copy throughput of each object-store provider's fetch against its plain SDK transfer of the
same files, each against its local emulator started through the test harness:

  s3     S3ModelProvider.fetch        vs  boto3's TransferManager over all objects (what
         (MinIO, or moto_server)          ``aws s3 cp --recursive`` does: 10 requests at once)
  azure  AzureBlobModelProvider.fetch vs  azure-storage-blob's ``download_blob(max_concurrency=8)
         (Azurite)                        .readinto(file)`` per blob, one blob after the other
  gcs    GCSModelProvider.fetch       vs  google-cloud-storage's ``transfer_manager.
         (fake-gcs-server)                download_many_to_path`` (8 threads, its own MD5 check)

The provider copies list, download in parallel ranges with the one-pass checksum (GCS's CRC32C,
S3's and Azure's MD5), stage and rename; ``provider_nocheck`` is the same with the checksum off
(sizes only), so the difference is what the check costs. The plain transfers do no checks of
their own except GCS's. Every object is uploaded in one request, so the stores list its MD5.

One model version of ``--files`` objects totalling ``--total-mb`` MB (saved_model.pb,
variables/variables.index, variables/variables.data-NNNNN-of-NNNNN), copied ``--repeat`` times
per method, the methods interleaved so a noisy neighbour slows both alike.

    python -m bench.object_copy                      # 200 MB in 20 files, 3 copies each
    python -m bench.object_copy --quick              # 20 MB
    python -m bench.object_copy --providers azure gcs

Writes ``<out>/object_copy.json``; a provider whose emulator is not installed is reported as
skipped with the reason.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench.common import parse_args, print_table, write_report
from bench.s3_copy import model_files

MB = 1_000_000
MIB = 1024 * 1024
CONTAINER = "tfscache-bench"
PREFIX = "bench/models"
NAME, VERSION = "big", 1
KEY_PREFIX = f"{PREFIX}/{NAME}/{VERSION}/"


def tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _d, fs in os.walk(path) for f in fs)


class Store:
    """One emulator, the files uploaded to it, a provider and the plain SDK transfer."""

    name = ""
    plain = ""
    server: Any

    def start(self) -> None: ...
    def upload(self, files: dict[str, bytes]) -> None: ...
    def provider(self, args: argparse.Namespace, verify: bool) -> Any: ...
    def plain_copy(self, dest: str) -> int: ...

    def stop(self) -> None:
        self.server.stop()


class S3Store(Store):
    name, plain = "s3", "boto3 TransferManager, 10 at once (aws s3 cp --recursive)"

    def start(self) -> None:
        from tests.harness.servers import S3Server

        self.server = S3Server().start()
        self.client = self.server.boto3_client()
        self.kind = self.server.kind

    def upload(self, files: dict[str, bytes]) -> None:
        self.client.create_bucket(Bucket=CONTAINER)
        for rel, body in files.items():
            self.client.put_object(Bucket=CONTAINER, Key=KEY_PREFIX + rel, Body=body)

    def provider(self, args: argparse.Namespace, verify: bool) -> Any:
        from twisted.internet import reactor

        from tfscache.providers.s3 import S3ModelProvider

        s = self.server
        return S3ModelProvider(CONTAINER, PREFIX, endpoint_url=s.endpoint_url, region="us-east-1",
                               access_key_id=s.access_key, secret_access_key=s.secret_key,
                               max_concurrency=args.concurrency, multipart_threshold=args.chunk_mib * MIB,
                               progress_interval=3600, fetch_timeout=600, verify_md5=verify, reactor=reactor)

    def plain_copy(self, dest: str) -> int:
        return _s3_cli_like(self.client, dest)


def _s3_cli_like(client: Any, dest: str) -> int:
    from boto3.s3.transfer import TransferConfig, create_transfer_manager

    config = TransferConfig(max_concurrency=10, preferred_transfer_client="classic")
    total, futures = 0, []
    with create_transfer_manager(client, config) as manager:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=CONTAINER, Prefix=KEY_PREFIX):
            for o in page.get("Contents", []):
                path = os.path.join(dest, *o["Key"][len(KEY_PREFIX):].split("/"))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                futures.append(manager.download(CONTAINER, o["Key"], path))
                total += o["Size"]
        for f in futures:
            f.result()
    return total


class AzureStore(Store):
    name, plain = "azure", "download_blob(max_concurrency=8).readinto() per blob"

    def start(self) -> None:
        from tests.harness.servers import AzuriteServer, azurite_path

        azurite_path()  # RuntimeError with the reason when it is not installed
        self.server = AzuriteServer().start()
        self.kind = "azurite"
        self.container = self.server.service_client().get_container_client(CONTAINER)

    def upload(self, files: dict[str, bytes]) -> None:
        self.container.create_container()
        for rel, body in files.items():
            self.container.upload_blob(KEY_PREFIX + rel, body)  # one Put Blob up to 64 MiB: Content-MD5 set

    def provider(self, args: argparse.Namespace, verify: bool) -> Any:
        from twisted.internet import reactor

        from tfscache.providers.azure import AzureBlobModelProvider

        return AzureBlobModelProvider(CONTAINER, PREFIX, account_url=self.server.account_url,
                                      account_key=self.server.account_key, max_concurrency=args.concurrency,
                                      chunk_size=args.chunk_mib * MIB, progress_interval=3600,
                                      fetch_timeout=600, verify_md5=verify, reactor=reactor)

    def plain_copy(self, dest: str) -> int:
        total = 0
        for b in self.container.list_blobs(name_starts_with=KEY_PREFIX):
            path = os.path.join(dest, *b.name[len(KEY_PREFIX):].split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                total += self.container.download_blob(b.name, max_concurrency=8).readinto(f)
        return total


class GCSStore(Store):
    name, plain = "gcs", "transfer_manager.download_many_to_path, 8 threads (checks MD5)"

    def start(self) -> None:
        from tests.harness.servers import FakeGCSServer

        self.server = FakeGCSServer().start()
        self.kind = "fake-gcs-server"
        self.client = self.server.client()

    def upload(self, files: dict[str, bytes]) -> None:
        bucket = self.client.create_bucket(CONTAINER)
        for rel, body in files.items():
            bucket.blob(KEY_PREFIX + rel).upload_from_string(body)

    def provider(self, args: argparse.Namespace, verify: bool) -> Any:
        from twisted.internet import reactor

        from tfscache.providers.gcs import GCSModelProvider

        return GCSModelProvider(CONTAINER, PREFIX, endpoint_url=self.server.endpoint_url, anonymous=True,
                                max_concurrency=args.concurrency, chunk_size=args.chunk_mib * MIB,
                                progress_interval=3600, fetch_timeout=600, verify_checksums=verify,
                                reactor=reactor)

    def plain_copy(self, dest: str) -> int:
        from google.cloud.storage import transfer_manager

        bucket = self.client.bucket(CONTAINER)
        blobs = list(self.client.list_blobs(CONTAINER, prefix=KEY_PREFIX))
        names = [b.name[len(KEY_PREFIX):] for b in blobs]
        results = transfer_manager.download_many_to_path(
            bucket, names, destination_directory=dest, blob_name_prefix=KEY_PREFIX,
            max_workers=8, worker_type=transfer_manager.THREAD, raise_exception=True)
        for r in results:
            if isinstance(r, Exception):
                raise r
        return sum(int(b.size) for b in blobs)


STORES: dict[str, Callable[[], Store]] = {"s3": S3Store, "azure": AzureStore, "gcs": GCSStore}


async def measure(store: Store, args: argparse.Namespace, files: dict[str, bytes], work: str) -> dict[str, Any]:
    from twisted.internet import threads

    total = sum(len(b) for b in files.values())
    started = time.monotonic()
    await threads.deferToThread(store.start)
    await threads.deferToThread(store.upload, files)
    print(f"{store.name}: server={store.kind} uploaded {len(files)} objects, {total / MB:.0f} MB in "
          f"{time.monotonic() - started:.1f}s", flush=True)
    providers = {verify: store.provider(args, verify) for verify in (True, False)}

    async def provider_copy(dest: str, verify: bool = True) -> int:
        return int(await providers[verify].fetch(NAME, VERSION, dest))

    async def plain_copy(dest: str) -> int:
        return int(await threads.deferToThread(store.plain_copy, dest))

    methods: dict[str, Callable[[str], Any]] = {
        "provider": provider_copy, "provider_nocheck": lambda d: provider_copy(d, verify=False),
        "plain_sdk": plain_copy}
    runs: dict[str, list[float]] = {m: [] for m in methods}
    for m, copy in methods.items():  # client set-up, connections
        await copy(os.path.join(work, store.name, f"warm-{m}", "1"))
    for i in range(args.repeat):
        for m, copy in methods.items():
            dest = os.path.join(work, store.name, m, str(i))
            t0 = time.monotonic()
            copied = await copy(dest)
            seconds = time.monotonic() - t0
            if copied != total or tree_bytes(dest) != total:
                raise SystemExit(f"{store.name} {m}: copied {copied} bytes, expected {total}")
            runs[m].append(seconds)
            shutil.rmtree(dest)
    for p in providers.values():
        await p.close()
    per_round = [b / p for p, b in zip(runs["provider"], runs["plain_sdk"], strict=True)]
    nocheck = [b / p for p, b in zip(runs["provider_nocheck"], runs["plain_sdk"], strict=True)]
    check = [p / n for p, n in zip(runs["provider"], runs["provider_nocheck"], strict=True)]
    return {
        "server": store.kind,
        "plain_sdk": store.plain,
        "methods": {m: {"seconds": [round(t, 4) for t in times],
                        "median_mb_per_s": round(total / MB / statistics.median(times), 1),
                        "best_mb_per_s": round(total / MB / min(times), 1)} for m, times in runs.items()},
        # provider throughput / the plain transfer's: > 1 means the provider is faster
        "provider_vs_plain": {"median_of_rounds": round(statistics.median(per_round), 3),
                              "rounds": [round(r, 3) for r in per_round]},
        "provider_nocheck_vs_plain": {"median_of_rounds": round(statistics.median(nocheck), 3)},
        # copy time with the checksum / without: what the one-pass check costs
        "check_time_factor": {"median_of_rounds": round(statistics.median(check), 3)},
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    total = int(args.total_mb * MB)
    files = {rel: os.urandom(size) for rel, size in model_files(total, args.files).items()}
    results: dict[str, Any] = {}
    work = tempfile.mkdtemp(prefix="tfscache-bench-objects-")
    try:
        for name in args.providers:
            store = STORES[name]()
            try:
                results[name] = await measure(store, args, files, work)
            except RuntimeError as e:  # an emulator that is not installed
                results[name] = {"skipped": str(e).splitlines()[0]}
                print(f"{name}: skipped: {results[name]['skipped']}", flush=True)
            finally:
                if getattr(store, "server", None) is not None:
                    store.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "benchmark": "object_copy",
        "total_bytes": total,
        "objects": len(files),
        "largest_object_bytes": max(len(b) for b in files.values()),
        "provider_max_concurrency": args.concurrency,
        "provider_chunk_bytes": args.chunk_mib * MIB,
        "repeat": args.repeat,
        "providers": results,
    }


def _extra(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--total-mb", type=float, help="model size in MB (default 200, quick 20)")
    ap.add_argument("--files", type=int, default=20, help="objects in the model version")
    ap.add_argument("--repeat", type=int, help="copies per method, interleaved (default 3, quick 2)")
    ap.add_argument("--concurrency", type=int, default=8, help="provider max_concurrency")
    ap.add_argument("--chunk-mib", type=int, default=8, help="provider range size (multipart threshold)")
    ap.add_argument("--providers", nargs="+", choices=sorted(STORES), default=["s3", "azure", "gcs"])


def print_report(report: dict[str, Any]) -> None:
    rows = []
    for name, r in report["providers"].items():
        if "skipped" in r:
            rows.append([name, "skipped", "", "", "", "", "", r["skipped"][:60]])
            continue
        m = r["methods"]
        rows.append([name, r["server"], m["provider"]["median_mb_per_s"], m["provider_nocheck"]["median_mb_per_s"],
                     m["plain_sdk"]["median_mb_per_s"], r["provider_vs_plain"]["median_of_rounds"],
                     r["provider_nocheck_vs_plain"]["median_of_rounds"], r["check_time_factor"]["median_of_rounds"]])
    print_table(
        f"object-store copy of {report['objects']} objects, {report['total_bytes'] / MB:.0f} MB, "
        f"{report['repeat']} runs each (interleaved); ratios are medians of per-round ratios, "
        "> 1: the provider is faster",
        ["provider", "server", "provider MB/s", "no check MB/s", "plain SDK MB/s", "provider/plain",
         "no check/plain", "check time x"], rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__ or "", _extra, argv)
    if args.total_mb is None:
        args.total_mb = 20.0 if args.quick else 200.0
    if args.repeat is None:
        args.repeat = 2 if args.quick else 3

    from twisted.internet import defer, task

    async def go(_reactor: Any) -> None:
        report = await run(args)
        print_report(report)
        path = write_report("object_copy", report, args.out)
        print(f"\nwrote {path}")

    task.react(lambda r: defer.ensureDeferred(go(r)))
    return 0  # task.react exits the process with the run's status


if __name__ == "__main__":
    raise SystemExit(main())
