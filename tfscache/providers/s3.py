"""Models from an S3 bucket (AWS S3, MinIO, Ceph, R2...) laid out as TF Serving expects:
``s3://bucket/prefix/<name>/<version>/saved_model.pb``, ``.../variables/...``, ``.../assets/...``.

boto3 is blocking: every call runs in a thread, never on the reactor thread.  Listings, sizes
and probes are short and run in Twisted's thread pool; copies run in the provider's own pool
of ``copy_threads`` threads, so a burst of cold copies cannot hold the threads that the rest
of the daemon (etcd calls, DNS lookups) needs.  A copy lists the version's objects, downloads
them in parallel with one s3transfer ``TransferManager`` (at most ``max_concurrency`` requests
at once, ranged GETs for objects above ``multipart_threshold``) into a staging directory,
checks every file's size and, where the ETag is a plain MD5, its MD5 (in a small pool, beside
the downloads still running), then renames the directory into place.

A cancelled copy (the CacheManager's fetch timeout, shutdown) sets a stop flag that the
download progress callback checks, cancels the outstanding transfers, and removes the staging
directory; ``wait_idle()`` fires once every worker has finished.

Credentials: boto3's standard chain unless ``access_key_id``/``secret_access_key`` are given.
They are never logged and are scrubbed from every error message.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, threads
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tfscache.errors import Code, ServingError, not_found
from tfscache.interfaces import IModelProvider
from tfscache.modelspec import validate_name
from tfscache.providers.base import ListingCache, copy_error, staged_copy, stale_copy_warning
from tfscache.util.threads import OwnThreadPool

MIB = 1024 * 1024
_VERSION_RE = re.compile(r"[0-9]{1,19}")
_MD5_RE = re.compile(r"[0-9a-f]{32}")
MAX_VERSION = 2**63 - 1

# S3 error codes that mean "you may not", whatever the HTTP status says
_DENIED_CODES = {
    "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "AccountProblem",
    "InvalidSecurity", "RequestTimeTooSkewed", "403", "Forbidden", "AuthorizationHeaderMalformed",
    "XMinioAccessKeyDisabled", "XAmzContentSHA256Mismatch",
}
_TRANSIENT_CODES = {
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "503", "500",
    "XMinioServerNotInitialized", "XMinioStorageFull", "OperationAborted", "Throttling",
}


class _Stopped(Exception):
    """Raised inside the download threads when a copy has been asked to stop."""


@dataclass
class _Job:
    """One running copy: progress counters and the stop flag shared with its threads."""

    name: str
    version: int
    destination: str
    started: float = field(default_factory=time.monotonic)
    total: int = 0
    objects: int = 0
    done: int = 0
    committed: bool = False
    copied: int = 0
    stop_reason: ServingError | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    wake: queue.Queue[Any] = field(default_factory=queue.Queue)
    # held by the worker from "last stop check" to "renamed into place", and by the canceller
    # while it decides: a copy is either committed or stopped, never both
    commit_lock: threading.Lock = field(default_factory=threading.Lock)
    holding: bool = False
    _count_lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, n: int) -> None:
        with self._count_lock:
            self.done += n

    def request_stop(self, reason: ServingError) -> None:
        if not self.stop.is_set():
            self.stop_reason = reason
            self.stop.set()
        self.wake.put(None)


def _subscriber(job: _Job) -> Any:
    from s3transfer.subscribers import BaseSubscriber

    class Progress(BaseSubscriber):  # type: ignore[misc]
        def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
            job.add(bytes_transferred)
            if job.stop.is_set():
                raise _Stopped()  # fails this transfer at the next chunk

        def on_done(self, future: Any, **kwargs: Any) -> None:
            job.wake.put(future)

    return Progress()


def normalize_prefix(prefix: str | None) -> str:
    """'' or 'a/b/' from '', '/', 'a/b', '/a/b/'."""
    p = (prefix or "").strip("/")
    return p + "/" if p else ""


def safe_parts(relative: str) -> list[str]:
    """The path components of an object key below the version prefix, or ValueError when the
    key could escape the staging directory (``..``, ``.``, empty components, absolute)."""
    parts = relative.split("/")
    for p in parts:
        if p in ("", ".", "..") or "\x00" in p:
            raise ValueError(relative)
    return parts


@implementer(IModelProvider)
class S3ModelProvider:
    kind = "s3"
    log = Logger()

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        listing_ttl: float = 5.0,
        fetch_timeout: float = 600.0,
        max_concurrency: int = 8,
        multipart_threshold: int = 8 * MIB,
        progress_interval: float = 5.0,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_attempts: int = 3,
        download_attempts: int = 3,
        verify_md5: bool = True,
        reactor: Any = None,
        own_shutdown: bool = True,
        copy_threads: int = 4,
    ) -> None:
        if not bucket:
            raise ValueError("an S3 bucket is required")
        if (access_key_id is None) != (secret_access_key is None):
            raise ValueError("access_key_id and secret_access_key go together")
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.bucket = bucket
        self.prefix = normalize_prefix(prefix)
        self.region = region
        self.endpoint_url = endpoint_url
        self.fetch_timeout = fetch_timeout
        self.max_concurrency = max_concurrency
        self.multipart_threshold = multipart_threshold
        self.progress_interval = progress_interval
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_attempts = max_attempts
        self.download_attempts = download_attempts
        self.verify_md5 = verify_md5  # model_provider.s3.verify_md5; bench/ measures what it costs
        self.listings = ListingCache(listing_ttl)
        self._reactor = reactor
        self._keys = (access_key_id, secret_access_key)
        self._secrets: set[str] = {s for s in self._keys if s}
        self._client_lock = threading.Lock()
        self._s3: Any = None
        self._jobs: dict[int, _Job] = {}
        self._workers: set[defer.Deferred[Any]] = set()
        self._closed = False
        # each copy holds one of these, plus max_concurrency TransferManager threads of its own
        self._copies = OwnThreadPool(reactor, copy_threads, "tfscache-s3-copy", stop_at_shutdown=True,
                                     stop_work=self.stop_all)
        # a copy must not hold up the reactor's shutdown (its thread pool joins its threads);
        # a node that drains first closes its provider itself (own_shutdown=False)
        self._trigger: Any = (reactor.addSystemEventTrigger("before", "shutdown", self._on_shutdown)
                              if own_shutdown else None)

    @classmethod
    def from_config(cls, p: Any, reactor: Any = None, own_shutdown: bool = True) -> S3ModelProvider:
        """From the ``model_provider`` config namespace."""
        s3 = p.s3
        return cls(
            s3.bucket,
            s3.prefix or "",
            region=s3.region,
            endpoint_url=s3.endpoint_url,
            access_key_id=s3.access_key_id,
            secret_access_key=s3.secret_access_key,
            listing_ttl=p.listing_ttl_seconds,
            fetch_timeout=p.fetch_timeout_seconds,
            max_concurrency=s3.max_concurrency,
            multipart_threshold=s3.multipart_threshold_bytes,
            progress_interval=s3.progress_interval_seconds,
            copy_threads=p.copy_threads,
            verify_md5=s3.verify_md5,
            # a read that stalls longer than a whole copy may take is not worth waiting for: a
            # source that accepts and never answers frees the pool thread that soon
            read_timeout=min(30.0, p.fetch_timeout_seconds),
            reactor=reactor,
            own_shutdown=own_shutdown,
        )

    def __repr__(self) -> str:  # never the credentials
        return f"S3ModelProvider(bucket={self.bucket!r}, prefix={self.prefix!r}, endpoint={self.endpoint_url!r})"

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    # -- the client (built lazily, in a thread: the credential chain may touch files/IMDS) --
    def _client(self) -> Any:
        with self._client_lock:
            if self._s3 is None:
                import boto3
                from botocore.config import Config

                access, secret = self._keys
                session = boto3.session.Session(
                    aws_access_key_id=access, aws_secret_access_key=secret,
                    region_name=self.region,
                )
                config = Config(
                    connect_timeout=self.connect_timeout,
                    read_timeout=self.read_timeout,
                    retries={"max_attempts": self.max_attempts, "mode": "standard"},
                    max_pool_connections=max(10, 2 * self.max_concurrency),
                    s3={"addressing_style": "path"} if self.endpoint_url else None,
                    user_agent_extra="tfscache",
                )
                client = session.client("s3", endpoint_url=self.endpoint_url, config=config)
                creds = session.get_credentials()
                if creds is not None:
                    frozen = creds.get_frozen_credentials()
                    self._secrets |= {s for s in (frozen.access_key, frozen.secret_key, frozen.token) if s}
                self._s3 = client
                self.log.info(
                    "S3 model source {location} endpoint={endpoint} credentials={source}",
                    location=self.location, endpoint=self.endpoint_url or "aws",
                    source="config" if access else (getattr(creds, "method", None) or "none found"),
                )
            return self._s3

    def _key_prefix(self, name: str, version: int | None = None) -> str:
        key = self.prefix + validate_name(name) + "/"
        if version is not None:
            key += f"{int(version)}/"
        return key

    # -- errors ------------------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        for s in self._secrets:
            if len(s) >= 6:  # real keys are 16+ characters; never mangle ordinary words
                text = text.replace(s, "***")
        return text

    def _error(self, e: BaseException, name: str | None, version: int | None, doing: str) -> ServingError:
        """A boto3/botocore/OS failure as a ServingError naming the model (never a secret)."""
        if isinstance(e, ServingError):
            return ServingError(e.code, self._scrub(e.message))
        from botocore import exceptions as bx

        what = "models" if name is None else (
            f"model {name}" + (f" version {version}" if version is not None else ""))
        where = f"S3 bucket '{self.bucket}'"
        cause: BaseException | None = e
        # s3transfer wraps the last retried error
        if type(e).__name__ == "RetriesExceededError" and getattr(e, "last_exception", None):
            cause = e.last_exception  # type: ignore[attr-defined]
        if isinstance(cause, bx.ClientError):
            err = cause.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            detail = self._scrub(f"{code}: {err.get('Message') or status}")
            if code in ("NoSuchBucket",) or (code in ("404", "NotFound") and version is None):
                return ServingError(
                    Code.UNAVAILABLE, f"{where} does not exist ({doing} {what}; {detail})")
            if code in ("NoSuchKey", "404", "NotFound") and name is not None:
                return not_found(f"Servable not found for request: Specific({name}, {version})")
            if code in _DENIED_CODES or status == 403:
                return ServingError(
                    Code.PERMISSION_DENIED,
                    f"Access to {where} was denied while {doing} {what} ({detail}); check the "
                    "credentials and the bucket policy",
                )
            if code in _TRANSIENT_CODES or (status or 0) >= 500:
                return ServingError(
                    Code.UNAVAILABLE, f"{where} is unavailable while {doing} {what} ({detail})")
            return ServingError(Code.INTERNAL, f"S3 error while {doing} {what} from {where}: {detail}")
        if isinstance(cause, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            return ServingError(
                Code.UNAUTHENTICATED,
                f"No usable S3 credentials while {doing} {what}: set model_provider.s3."
                "access_key_id/secret_access_key or the standard AWS credential chain",
            )
        unreachable = (
            bx.EndpointConnectionError, bx.ConnectionError, bx.HTTPClientError,
            bx.ResponseStreamingError, bx.IncompleteReadError, ConnectionError, TimeoutError,
        )
        if isinstance(cause, unreachable) or type(e).__name__ == "RetriesExceededError":
            return ServingError(
                Code.UNAVAILABLE,
                f"Could not reach {where} at {self.endpoint_url or 'AWS'} while {doing} {what}: "
                f"the connection failed ({type(cause).__name__})",
            )
        if isinstance(cause, OSError) and cause.errno is not None and name is not None:
            return copy_error(name, version if version is not None else 0, cause)
        message = self._scrub(str(cause))
        return ServingError(
            Code.INTERNAL,
            f"Unexpected error while {doing} {what} from {where}: {type(cause).__name__}"
            + (f": {message}" if message else ""),
        )

    def _in_thread(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        if self._closed:
            return defer.fail(ServingError(Code.UNAVAILABLE, "The S3 model source is shut down"))
        return self._in_thread_always(f, *args)

    def _in_thread_always(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)

    # -- IModelProvider ------------------------------------------------------------------------
    def list_versions(self, name: str) -> defer.Deferred[list[int]]:
        try:
            key_prefix = self._key_prefix(name)
        except ServingError as e:
            return defer.fail(e)
        return self.listings.get(name, lambda _n: self._in_thread(self._list_versions, name, key_prefix))

    def _list_versions(self, name: str, key_prefix: str) -> list[int]:
        try:
            pages = self._client().get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=key_prefix, Delimiter="/")
            versions = set()
            for page in pages:
                for cp in page.get("CommonPrefixes") or ():
                    child = cp["Prefix"][len(key_prefix):].rstrip("/")
                    if _VERSION_RE.fullmatch(child) and int(child) <= MAX_VERSION:
                        versions.add(int(child))
            return sorted(versions)
        except Exception as e:
            raise self._error(e, name, None, "listing the versions of") from None

    def version_size(self, name: str, version: int) -> defer.Deferred[int]:
        try:
            key_prefix = self._key_prefix(name, version)
        except ServingError as e:
            return defer.fail(e)

        def size() -> int:
            try:
                objects = self._list_objects(key_prefix)
            except Exception as e:
                raise self._error(e, name, version, "sizing") from None
            if not objects:
                raise not_found(f"Servable not found for request: Specific({name}, {version})")
            return sum(o["Size"] for o in objects)

        return self._in_thread(size)

    def _list_objects(self, key_prefix: str) -> list[dict[str, Any]]:
        """Every object below a prefix, directory markers (keys ending in '/') left out."""
        out = []
        pages = self._client().get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=key_prefix)
        for page in pages:
            for o in page.get("Contents") or ():
                if not o["Key"].endswith("/"):
                    out.append(o)
        return out

    def check(self) -> defer.Deferred[None]:
        def probe() -> None:
            try:
                self._client().list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
            except Exception as e:
                raise self._error(e, None, None, "probing for") from None

        return self._in_thread(probe)

    def fetch(self, name: str, version: int, destination: str) -> defer.Deferred[int]:
        try:
            version = int(version)
            key_prefix = self._key_prefix(name, version)
        except ServingError as e:
            return defer.fail(e)
        if self._closed:
            return defer.fail(ServingError(Code.UNAVAILABLE, "The S3 model source is shut down"))
        job = _Job(name, version, destination)

        def cancel(d: defer.Deferred[int]) -> None:
            with job.commit_lock:
                if job.committed:  # too late to stop: the model is in place, say so
                    d.callback(job.copied)
                    return
                job.request_stop(ServingError(
                    Code.CANCELLED, f"Copy of model {name} version {version} was cancelled"))
            self.log.info("S3 copy cancelled model={model} version={version}",
                          model=name, version=version)

        outer: defer.Deferred[int] = defer.Deferred(cancel)
        worker = self._copies.run(self._copy, job, key_prefix)
        self._jobs[id(job)] = job
        self._workers.add(worker)
        progress = LoopingCall(self._log_progress, job)
        progress.clock = self._reactor
        progress.start(self.progress_interval, now=False)

        def settle(result: Any) -> None:
            progress.stop()
            self._jobs.pop(id(job), None)
            self._workers.discard(worker)
            if isinstance(result, Failure):
                if not result.check(_Stopped, ServingError):
                    result = Failure(self._error(result.value, name, version, "copying"))
                if not outer.called:
                    outer.errback(result)
                else:
                    self.log.debug("copy of model={model} version={version} ended after cancel: "
                                   "{error}", model=name, version=version, error=result.value)
                return None
            seconds = time.monotonic() - job.started
            self.log.info(
                "S3 copy done model={model} version={version} bytes={bytes} objects={objects} "
                "seconds={seconds:.2f} mb_per_s={rate:.1f}",
                model=name, version=version, bytes=result, objects=job.objects,
                seconds=seconds, rate=result / 1e6 / max(seconds, 1e-6),
            )
            if not outer.called:
                outer.callback(result)
            return None

        worker.addBoth(settle)
        return outer

    def _log_progress(self, job: _Job) -> None:
        if not job.total:
            return
        seconds = time.monotonic() - job.started
        self.log.info(
            "S3 copy progress model={model} version={version} bytes={done}/{total} ({pct:.0f}%) "
            "mb_per_s={rate:.1f}",
            model=job.name, version=job.version, done=job.done, total=job.total,
            pct=100.0 * job.done / job.total, rate=job.done / 1e6 / max(seconds, 1e-6),
        )

    # -- the copy (runs in a pool thread) --------------------------------------------------------
    def _copy(self, job: _Job, key_prefix: str) -> int:
        try:
            if job.stop.is_set():  # cancelled while it waited for a copy thread
                raise _Stopped()
            copied = staged_copy(job.destination, lambda tmp: self._fill(job, key_prefix, tmp),
                                 on_replaced=stale_copy_warning(self._reactor, self.log, job.name,
                                                                job.version, job.destination))
            job.committed, job.copied = True, copied
            return copied
        except _Stopped:
            raise job.stop_reason or ServingError(Code.CANCELLED, "copy stopped") from None
        except Exception as e:
            if job.stop.is_set() and job.stop_reason is not None:
                raise job.stop_reason from None
            raise self._error(e, job.name, job.version, "copying") from None
        finally:
            if job.holding:
                job.holding = False
                job.commit_lock.release()

    def _fill(self, job: _Job, key_prefix: str, tmp: str) -> int:
        name, version = job.name, job.version
        deadline = job.started + self.fetch_timeout
        s3 = self._client()
        objects = self._list_objects(key_prefix)
        if not objects:
            raise not_found(f"Servable not found for request: Specific({name}, {version})")
        root = os.path.realpath(tmp)
        plan: list[tuple[dict[str, Any], str]] = []
        for o in objects:
            relative = o["Key"][len(key_prefix):]
            try:
                path = os.path.join(root, *safe_parts(relative))
            except ValueError:
                path = ""
            if not path or os.path.commonpath([root, os.path.realpath(path)]) != root:
                raise ServingError(
                    Code.FAILED_PRECONDITION,
                    f"Model {name} version {version} in S3 bucket '{self.bucket}' has an object key "
                    f"that is not a safe relative path: {relative!r}",
                )
            plan.append((o, path))
        job.objects, job.total = len(plan), sum(o["Size"] for o, _ in plan)
        self._reactor.callFromThread(
            self.log.info,
            "S3 copy started model={model} version={version} objects={objects} bytes={total} "
            "from {location}",
            model=name, version=version, objects=job.objects, total=job.total,
            location=f"s3://{self.bucket}/{key_prefix}",
        )
        for _o, path in plan:
            os.makedirs(os.path.dirname(path), exist_ok=True)

        from boto3.s3.transfer import TransferConfig, create_transfer_manager

        config = TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_threshold,
            max_concurrency=self.max_concurrency,
            num_download_attempts=self.download_attempts,
            preferred_transfer_client="classic",
        )
        manager = create_transfer_manager(s3, config)
        # checks run beside the downloads (hashlib releases the GIL): a copy ends soon after
        # its last byte arrives instead of hashing every file afterwards
        checks = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, min(self.max_concurrency, os.cpu_count() or 2)),
            thread_name_prefix="tfscache-s3-verify")
        subscriber = _subscriber(job)
        clean = False
        futures: list[Any] = []
        try:
            expected = {}
            for o, path in plan:
                future = manager.download(self.bucket, o["Key"], path, subscribers=[subscriber])
                futures.append(future)
                expected[id(future)] = (o, path)
            unverified = len(plan)
            while unverified:
                if job.stop.is_set():
                    raise _Stopped()
                left = deadline - time.monotonic()
                if left <= 0:
                    job.request_stop(ServingError(
                        Code.DEADLINE_EXCEEDED,
                        f"Copy of model {name} version {version} timed out after "
                        f"{self.fetch_timeout:g}s"))
                    raise _Stopped()
                try:
                    done = job.wake.get(timeout=left)
                except queue.Empty:
                    continue
                if done is None:
                    continue
                if isinstance(done, concurrent.futures.Future):  # a check finished
                    done.result()
                    unverified -= 1
                    continue
                done.result()  # a download finished: raises its failure
                o, path = expected[id(done)]
                check = checks.submit(self._verify, s3, job, o, path)
                check.add_done_callback(job.wake.put)
            clean = True
        finally:
            # on failure: cancel what is still running, then wait for its threads to stop.
            # (TransferManager.shutdown(cancel=True) passes its message where s3transfer
            # 0.19 expects the exception type: cancel each future instead.)
            if not clean:
                job.stop.set()  # running checks give up at their next chunk
                for future in futures:
                    future.cancel()
            manager.shutdown()
            checks.shutdown(wait=True, cancel_futures=True)
        job.commit_lock.acquire()
        job.holding = True
        if job.stop.is_set():
            raise _Stopped()
        return job.total

    def _verify(self, s3: Any, job: _Job, o: dict[str, Any], path: str) -> None:
        size = os.path.getsize(path)
        where = f"Model {job.name} version {job.version}: S3 object {o['Key']!r}"
        if size != o["Size"]:
            raise ServingError(
                Code.DATA_LOSS, f"{where} has {size} bytes on disk, S3 lists {o['Size']}")
        etag = (o.get("ETag") or "").strip('"').lower()
        if not self.verify_md5 or not _MD5_RE.fullmatch(etag):  # multipart: 'md5-of-md5s-N'
            return
        md5 = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as f:
            while True:
                if job.stop.is_set():
                    raise _Stopped()
                chunk = f.read(4 * MIB)
                if not chunk:
                    break
                md5.update(chunk)
        if md5.hexdigest() == etag:
            return
        # SSE-KMS and SSE-C objects have ETags that are not the MD5 of the content
        head = s3.head_object(Bucket=self.bucket, Key=o["Key"])
        if head.get("ServerSideEncryption") == "aws:kms" or head.get("SSECustomerAlgorithm"):
            return
        raise ServingError(Code.DATA_LOSS, f"{where} does not match its MD5 (ETag {etag})")

    # -- lifecycle ---------------------------------------------------------------------------
    def stop_all(self) -> None:
        """Ask every running copy to stop (they clean up in their threads)."""
        for job in list(self._jobs.values()):
            with job.commit_lock:
                if not job.committed:
                    job.request_stop(ServingError(
                        Code.UNAVAILABLE,
                        f"Copy of model {job.name} version {job.version} stopped: shutting down"))

    def wait_idle(self) -> defer.Deferred[None]:
        """Fire once no copy worker thread runs any more (after cancels, too)."""
        workers = list(self._workers)
        d = defer.DeferredList(workers, consumeErrors=True) if workers else defer.succeed(None)
        return d.addCallback(lambda _: None)

    def _on_shutdown(self) -> defer.Deferred[None]:
        self._trigger = None  # firing now: nothing to remove
        return self.close()

    def close(self) -> defer.Deferred[None]:
        """Stop running copies, wait for their threads, stop the copy threads, release the HTTP
        connections."""
        if self._trigger is not None:
            self._reactor.removeSystemEventTrigger(self._trigger)
            self._trigger = None
        self._closed = True
        self.stop_all()

        def release(_: Any) -> defer.Deferred[None] | None:
            s3, self._s3 = self._s3, None
            if s3 is not None and hasattr(s3, "close"):
                return self._in_thread_always(s3.close)
            return None

        # no copy runs by now: the join is quick
        d = self.wait_idle().addCallback(lambda _: self._copies.stop())
        return d.addCallback(release).addCallback(lambda _: None)
