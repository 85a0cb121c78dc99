"""The core shared by the object-store providers (S3, Azure Blob Storage, GCS): models laid out
as TF Serving expects below a prefix, ``<prefix>/<name>/<version>/saved_model.pb``, ``.../variables/...``.

A provider subclass is only its client calls: list the child "directories" of a prefix, list
the objects below one, read a byte range of an object into a sink, probe, map its SDK's errors.
Everything else is here, once:

- versions: the numeric children of ``<name>/``, zero-padded ones included (``00000123/`` is
  version 123 and is read from its own prefix), listed at most once per ``listing_ttl``;
- size: the sum of the version's objects;
- the copy, in the provider's own pool of ``copy_threads`` threads (never the reactor's or its
  shared pool): the objects are planned into byte ranges (objects above ``multipart_threshold``
  in ranges of that size), read by ``max_concurrency`` download threads straight into their
  files in a staging directory, and hashed in the same pass as the bytes arrive (the CRC32C
  where the store lists one, else the MD5); each file's size and digests are checked
  when its last range is in, and the directory is renamed into place;
- progress lines every ``progress_interval``, ``fetch_timeout``, cancellation (a stop flag
  that every chunk checks), errors that name the model and the container and never a secret.

The SDKs are blocking: every call runs in a thread, never on the reactor thread.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable
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
MAX_VERSION = 2**63 - 1
_VERSION_RE = re.compile(r"[0-9]{1,64}")


def parse_version(child: str) -> int | None:
    """The version a child directory name stands for (TF Serving's rule: an int64, leading zeros
    allowed, so ``00000123`` is 123), or None for anything else."""
    if not _VERSION_RE.fullmatch(child):
        return None
    v = int(child)
    return v if v <= MAX_VERSION else None


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


def b64_digest(value: Any) -> bytes | None:
    """A digest the stores give in base64 (GCS md5Hash/crc32c, Azure's Content-MD5 as text),
    as raw bytes; None when absent or malformed."""
    if not value:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    try:
        return base64.b64decode(str(value), validate=True)
    except ValueError:
        return None


@dataclass(frozen=True)
class StoredObject:
    """One object of a model version, as its store lists it."""

    key: str
    size: int
    md5: bytes | None = None  # raw 16 bytes, when the store has the whole object's MD5
    crc32c: bytes | None = None  # raw 4 bytes, big-endian (GCS)
    raw: Any = None  # the SDK's own listing entry


class CopyStoppedError(Exception):
    """Raised inside the download threads when a copy has been asked to stop."""


@dataclass
class CopyJob:
    """One running copy: progress counters, the stop flag shared with its threads, and the
    budget of bytes its digests may hold in memory."""

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
    files: dict[str, ObjectFile] = field(default_factory=dict)  # path -> its file being written
    hold_budget: int = 0
    _held: int = 0
    _count_lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, n: int) -> None:
        with self._count_lock:
            self.done += n

    def hold(self, n: int) -> bool:
        with self._count_lock:
            if self._held + n > self.hold_budget:
                return False
            self._held += n
            return True

    def release(self, n: int) -> None:
        with self._count_lock:
            self._held -= n

    def request_stop(self, reason: ServingError) -> None:
        if not self.stop.is_set():
            self.stop_reason = reason
            self.stop.set()
        self.wake.put(None)


class OrderedDigest:
    """MD5 and/or CRC32C of a file whose byte ranges are written in parallel, in one pass.

    Bytes at the hashed frontier are hashed as they arrive.  Bytes further on (a later range,
    arriving beside the frontier's) wait in memory within the copy's budget and are hashed
    once the frontier reaches them; past the budget only their extent is kept and they are
    read back from the file then (from the page cache: they were just written)."""

    def __init__(self, job: CopyJob, fd: int, md5: bool, crc32c: bool) -> None:
        self._job = job
        self._fd = fd
        self._md5 = hashlib.md5(usedforsecurity=False) if md5 else None
        self._crc: int | None = 0 if crc32c else None
        self._extend: Callable[[int, bytes], int] | None = None
        if crc32c:
            import google_crc32c  # with google-cloud-storage: only GCS lists CRC32Cs

            self._extend = google_crc32c.extend
        self._lock = threading.Lock()
        self.hashed = 0
        self._ahead: dict[int, bytes | int] = {}  # offset -> bytes held, or a length left on disk

    @property
    def wanted(self) -> bool:
        return self._md5 is not None or self._crc is not None

    def _update(self, data: bytes) -> None:
        if self._md5 is not None:
            self._md5.update(data)
        if self._crc is not None and self._extend is not None:
            self._crc = self._extend(self._crc, data)
        self.hashed += len(data)

    def feed(self, offset: int, data: bytes) -> None:
        if not self.wanted:
            return
        with self._lock:
            if offset != self.hashed:
                if self._job.hold(len(data)):
                    self._ahead[offset] = data
                else:
                    self._ahead[offset] = len(data)
                return
            self._update(data)
            while self.hashed in self._ahead:
                item = self._ahead.pop(self.hashed)
                if isinstance(item, int):
                    item = os.pread(self._fd, item, self.hashed)
                else:
                    self._job.release(len(item))
                self._update(item)

    def drop(self) -> None:
        with self._lock:
            for item in self._ahead.values():
                if not isinstance(item, int):
                    self._job.release(len(item))
            self._ahead.clear()

    def md5(self) -> bytes | None:
        return self._md5.digest() if self._md5 is not None else None

    def crc32c(self) -> bytes | None:
        return self._crc.to_bytes(4, "big") if self._crc is not None else None


@dataclass
class ObjectFile:
    """One object being written into the staging directory by one or more range reads."""

    obj: StoredObject
    path: str
    fd: int
    digest: OrderedDigest
    ranges_left: int
    lock: threading.Lock = field(default_factory=threading.Lock)

    def range_done(self) -> bool:
        """True for the caller that finished the object's last range."""
        with self.lock:
            self.ranges_left -= 1
            return self.ranges_left == 0


class _Sink:
    """Where a range read puts its bytes: written at their offset, hashed, counted, and the stop
    flag checked at every write (so a cancelled copy stops at its next chunk).  Small writes
    (GCS's client writes 8 KiB at a time) are gathered into 1 MiB ones first."""

    GATHER = 1 * MIB

    def __init__(self, job: CopyJob, f: ObjectFile, start: int, end: int) -> None:
        self.job, self.file, self.position, self.end = job, f, start, end
        self._gathered = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.job.stop.is_set():
            raise CopyStoppedError()
        n = len(data)
        if self.position + len(self._gathered) + n > self.end:
            raise ServingError(
                Code.DATA_LOSS,
                f"Model {self.job.name} version {self.job.version}: object {self.file.obj.key!r} "
                f"sent more bytes than its listed size of {self.file.obj.size}")
        if not self._gathered and n >= self.GATHER:
            self._put(data if isinstance(data, bytes) else bytes(data))
        else:
            self._gathered += data
            if len(self._gathered) >= self.GATHER:
                self.flush()
        return n

    def flush(self) -> None:
        if self._gathered:
            data = bytes(self._gathered)
            self._gathered.clear()
            self._put(data)

    def _put(self, data: bytes) -> None:
        n = len(data)
        written = 0
        while written < n:
            written += os.pwrite(self.file.fd, data[written:] if written else data, self.position + written)
        self.file.digest.feed(self.position, data)
        self.position += n
        self.job.add(n)

    @property
    def remaining(self) -> int:
        return self.end - self.position


@implementer(IModelProvider)
class ObjectStoreProvider:
    """The shared core; subclasses set ``kind``/``label`` and implement the client hooks below."""

    kind = "objectstore"
    label = "object store"  # in log lines and errors: "S3", "Azure", "GCS"
    log = Logger()

    def __init__(
        self,
        container: str,
        prefix: str = "",
        *,
        listing_ttl: float = 5.0,
        fetch_timeout: float = 600.0,
        max_concurrency: int = 8,
        multipart_threshold: int = 8 * MIB,
        progress_interval: float = 5.0,
        download_attempts: int = 3,
        verify_checksums: bool = True,
        reactor: Any,
        own_shutdown: bool = True,
        copy_threads: int = 4,
    ) -> None:
        self.prefix = normalize_prefix(prefix)
        self.fetch_timeout = fetch_timeout
        self.max_concurrency = max_concurrency
        self.multipart_threshold = multipart_threshold
        self.progress_interval = progress_interval
        self.download_attempts = download_attempts
        self.verify_checksums = verify_checksums
        self.listings = ListingCache(listing_ttl)
        self._container = container
        self._reactor = reactor
        self._secrets: set[str] = set()
        self._client_lock = threading.Lock()
        self._jobs: dict[int, CopyJob] = {}
        self._workers: set[defer.Deferred[Any]] = set()
        self._closed = False
        # each copy holds one of these, plus max_concurrency download threads of its own
        self._copies = OwnThreadPool(reactor, copy_threads, f"tfscache-{self.kind}-copy",
                                     stop_at_shutdown=True, stop_work=self.stop_all)
        # a copy must not hold up the reactor's shutdown (its thread pool joins its threads);
        # a node that drains first closes its provider itself (own_shutdown=False)
        self._trigger: Any = (reactor.addSystemEventTrigger("before", "shutdown", self._on_shutdown)
                              if own_shutdown else None)

    # -- what a subclass implements (all blocking, called in threads) -------------------------
    @property
    def where(self) -> str:
        """The container in words, for errors: "S3 bucket 'models'"."""
        return f"{self.label} container '{self._container}'"

    @property
    def location(self) -> str:
        return f"{self._container}/{self.prefix}"

    def _client(self) -> Any:
        raise NotImplementedError

    def _list_children(self, prefix: str) -> Iterable[str]:
        """The names of the "directories" right below ``prefix`` (no trailing slash)."""
        raise NotImplementedError

    def _list_objects(self, key_prefix: str) -> list[Any]:
        """The SDK's entries for every object below ``key_prefix`` (any depth)."""
        raise NotImplementedError

    def _object_info(self, raw: Any) -> StoredObject | None:
        """A listing entry as a StoredObject; None for what is not a file (directory markers)."""
        raise NotImplementedError

    def _read(self, client: Any, obj: StoredObject, start: int, length: int, sink: _Sink,
              whole: bool) -> None:
        """Read ``length`` bytes of ``obj`` from ``start`` into ``sink.write`` (``whole``: the
        range is the entire object)."""
        raise NotImplementedError

    def _probe(self) -> None:
        """A cheap call that fails when the container cannot be read."""
        raise NotImplementedError

    def _store_error(self, cause: BaseException, what: str, doing: str, name: str | None,
                     version: int | None) -> ServingError | None:
        """The SDK's failure as a ServingError, or None when it is not the SDK's."""
        return None

    def _retryable(self, error: BaseException) -> bool:
        """Whether a range read that failed this way is worth resuming (the SDK's own retries
        did not cover it: a body cut off mid-stream)."""
        return False

    def _mismatch_explained(self, client: Any, obj: StoredObject) -> bool:
        """True when a listed MD5 that does not match is not the content's (S3's SSE-KMS)."""
        return False

    def _close_client(self) -> None:
        """Release the client's connections (called in a thread)."""

    # -- shared --------------------------------------------------------------------------------
    def _key_prefix(self, name: str, version: int | None = None) -> str:
        key = self.prefix + validate_name(name) + "/"
        if version is not None:
            key += f"{int(version)}/"
        return key

    def _scrub(self, text: str) -> str:
        for s in self._secrets:
            if len(s) >= 6:  # real keys are 16+ characters; never mangle ordinary words
                text = text.replace(s, "***")
        return text

    def _error(self, e: BaseException, name: str | None, version: int | None, doing: str) -> ServingError:
        """A failure as a ServingError naming the model and the container (never a secret)."""
        if isinstance(e, ServingError):
            return ServingError(e.code, self._scrub(e.message))
        what = "models" if name is None else (
            f"model {name}" + (f" version {version}" if version is not None else ""))
        mapped = self._store_error(e, what, doing, name, version)
        if mapped is not None:
            return ServingError(mapped.code, self._scrub(mapped.message))
        if isinstance(e, (ConnectionError, TimeoutError)):
            return ServingError(
                Code.UNAVAILABLE,
                f"Could not reach {self.where} while {doing} {what}: the connection failed "
                f"({type(e).__name__})")
        if isinstance(e, OSError) and e.errno is not None and name is not None:
            return copy_error(name, version if version is not None else 0, e)
        message = self._scrub(str(e))
        return ServingError(
            Code.INTERNAL,
            f"Unexpected error while {doing} {what} from {self.where}: {type(e).__name__}"
            + (f": {message}" if message else ""),
        )

    def _in_thread(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        if self._closed:
            return defer.fail(self._shut_down())
        return self._in_thread_always(f, *args)

    def _in_thread_always(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)

    def _shut_down(self) -> ServingError:
        return ServingError(Code.UNAVAILABLE, f"The {self.label} model source is shut down")

    def _versions(self, model_prefix: str) -> dict[int, str]:
        """Version -> its child name below ``model_prefix``; of two names for one version (``7``
        and ``007``) the plain one wins, then the first in order."""
        found: dict[int, str] = {}
        for child in sorted(self._list_children(model_prefix)):
            v = parse_version(child)
            if v is not None and (v not in found or child == str(v)):
                found[v] = child
        return found

    def _objects(self, key_prefix: str) -> list[StoredObject]:
        out = []
        for raw in self._list_objects(key_prefix):
            o = self._object_info(raw)
            if o is not None:
                out.append(o)
        return out

    def _version_objects(self, name: str, version: int) -> tuple[str, list[StoredObject]]:
        """The key prefix of one version and its objects: ``<name>/<version>/`` first (one
        listing), else a zero-padded name for the version (``<name>/00000123/``)."""
        key_prefix = self._key_prefix(name, version)
        objects = self._objects(key_prefix)
        if objects:
            return key_prefix, objects
        model_prefix = self._key_prefix(name)
        child = self._versions(model_prefix).get(version)
        if child is not None and child != str(version):
            padded = model_prefix + child + "/"
            return padded, self._objects(padded)
        return key_prefix, []

    # -- IModelProvider ------------------------------------------------------------------------
    def list_versions(self, name: str) -> defer.Deferred[list[int]]:
        try:
            key_prefix = self._key_prefix(name)
        except ServingError as e:
            return defer.fail(e)
        return self.listings.get(name, lambda _n: self._in_thread(self._list_versions, name, key_prefix))

    def _list_versions(self, name: str, key_prefix: str) -> list[int]:
        try:
            return sorted(self._versions(key_prefix))
        except Exception as e:
            raise self._error(e, name, None, "listing the versions of") from None

    def version_size(self, name: str, version: int) -> defer.Deferred[int]:
        try:
            version = int(version)
            self._key_prefix(name, version)
        except ServingError as e:
            return defer.fail(e)

        def size() -> int:
            try:
                _prefix, objects = self._version_objects(name, version)
            except Exception as e:
                raise self._error(e, name, version, "sizing") from None
            if not objects:
                raise not_found(f"Servable not found for request: Specific({name}, {version})")
            return sum(o.size for o in objects)

        return self._in_thread(size)

    def check(self) -> defer.Deferred[None]:
        def probe() -> None:
            try:
                self._probe()
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
            return defer.fail(self._shut_down())
        job = CopyJob(name, version, destination)

        def cancel(d: defer.Deferred[int]) -> None:
            with job.commit_lock:
                if job.committed:  # too late to stop: the model is in place, say so
                    d.callback(job.copied)
                    return
                job.request_stop(ServingError(
                    Code.CANCELLED, f"Copy of model {name} version {version} was cancelled"))
            self.log.info(self.label + " copy cancelled model={model} version={version}",
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
                if not result.check(CopyStoppedError, ServingError):
                    result = Failure(self._error(result.value or Exception("copy failed"), name, version, "copying"))
                if not outer.called:
                    outer.errback(result)
                else:
                    self.log.debug("copy of model={model} version={version} ended after cancel: "
                                   "{error}", model=name, version=version, error=result.value)
                return None
            seconds = time.monotonic() - job.started
            self.log.info(
                self.label + " copy done model={model} version={version} bytes={bytes} "
                "objects={objects} seconds={seconds:.2f} mb_per_s={rate:.1f}",
                model=name, version=version, bytes=result, objects=job.objects,
                seconds=seconds, rate=result / 1e6 / max(seconds, 1e-6),
            )
            if not outer.called:
                outer.callback(result)
            return None

        worker.addBoth(settle)
        return outer

    def _log_progress(self, job: CopyJob) -> None:
        if not job.total:
            return
        seconds = time.monotonic() - job.started
        self.log.info(
            self.label + " copy progress model={model} version={version} bytes={done}/{total} "
            "({pct:.0f}%) mb_per_s={rate:.1f}",
            model=job.name, version=job.version, done=job.done, total=job.total,
            pct=100.0 * job.done / job.total, rate=job.done / 1e6 / max(seconds, 1e-6),
        )

    # -- the copy (runs in a copy thread) --------------------------------------------------------
    def _copy(self, job: CopyJob, key_prefix: str) -> int:
        try:
            if job.stop.is_set():  # cancelled while it waited for a copy thread
                raise CopyStoppedError()
            copied = staged_copy(job.destination, lambda tmp: self._fill(job, key_prefix, tmp),
                                 on_replaced=stale_copy_warning(self._reactor, self.log, job.name,
                                                                job.version, job.destination))
            job.committed, job.copied = True, copied
            return copied
        except CopyStoppedError:
            raise job.stop_reason or ServingError(Code.CANCELLED, "copy stopped") from None
        except Exception as e:
            if job.stop.is_set() and job.stop_reason is not None:
                raise job.stop_reason from None
            raise self._error(e, job.name, job.version, "copying") from None
        finally:
            if job.holding:
                job.holding = False
                job.commit_lock.release()

    def _plan(self, job: CopyJob, objects: list[StoredObject], key_prefix: str,
              root: str) -> list[tuple[StoredObject, str]]:
        plan = []
        for o in objects:
            relative = o.key[len(key_prefix):]
            try:
                path = os.path.join(root, *safe_parts(relative))
            except ValueError:
                path = ""
            if not path or os.path.commonpath([root, os.path.realpath(path)]) != root:
                raise ServingError(
                    Code.FAILED_PRECONDITION,
                    f"Model {job.name} version {job.version} in {self.where} has an object key "
                    f"that is not a safe relative path: {relative!r}",
                )
            plan.append((o, path))
        return plan

    def _fill(self, job: CopyJob, key_prefix: str, tmp: str) -> int:
        name, version = job.name, job.version
        deadline = job.started + self.fetch_timeout
        client = self._client()
        key_prefix, objects = self._version_objects(name, version)
        if not objects:
            raise not_found(f"Servable not found for request: Specific({name}, {version})")
        plan = self._plan(job, objects, key_prefix, os.path.realpath(tmp))
        job.objects, job.total = len(plan), sum(o.size for o, _ in plan)
        self._reactor.callFromThread(
            self.log.info,
            self.label + " copy started model={model} version={version} objects={objects} "
            "bytes={total} from {location}",
            model=name, version=version, objects=job.objects, total=job.total,
            location=f"{self.kind}://{self._container}/{key_prefix}",
        )
        chunk = self.multipart_threshold
        job.hold_budget = self.max_concurrency * chunk
        ranges: list[tuple[ObjectFile, int, int]] = []
        try:
            for o, path in plan:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                wanted = self.verify_checksums
                # CRC32C where the store has it (GCS: hardware-accelerated, several times
                # cheaper than MD5 on the same CPUs as the transfer), else MD5
                digest = OrderedDigest(job, fd, md5=wanted and o.crc32c is None and o.md5 is not None,
                                       crc32c=wanted and o.crc32c is not None)
                starts = range(0, o.size, chunk) if o.size > chunk else [0]
                f = ObjectFile(o, path, fd, digest, len(starts))
                job.files[path] = f
                for start in starts:
                    ranges.append((f, start, min(chunk, o.size - start)))
            self._download(job, client, ranges, deadline)
        finally:
            for f in job.files.values():
                f.digest.drop()
                if f.fd >= 0:
                    os.close(f.fd)
                    f.fd = -1
        job.commit_lock.acquire()
        job.holding = True
        if job.stop.is_set():
            raise CopyStoppedError()
        return job.total

    def _download(self, job: CopyJob, client: Any, ranges: list[tuple[ObjectFile, int, int]],
                  deadline: float) -> None:
        pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, min(self.max_concurrency, len(ranges))),
            thread_name_prefix=f"tfscache-{self.kind}-download")
        clean = False
        try:
            for f, start, length in ranges:
                pool.submit(self._read_range, job, client, f, start, length).add_done_callback(job.wake.put)
            left_to_do = len(ranges)
            while left_to_do:
                if job.stop.is_set():
                    raise CopyStoppedError()
                left = deadline - time.monotonic()
                if left <= 0:
                    job.request_stop(ServingError(
                        Code.DEADLINE_EXCEEDED,
                        f"Copy of model {job.name} version {job.version} timed out after "
                        f"{self.fetch_timeout:g}s"))
                    raise CopyStoppedError()
                try:
                    done = job.wake.get(timeout=left)
                except queue.Empty:
                    continue
                if done is None:
                    continue
                done.result()  # a range (and, for an object's last one, its check) failed: raise
                left_to_do -= 1
            clean = True
        finally:
            if not clean:
                job.stop.set()  # running reads give up at their next chunk
            pool.shutdown(wait=True, cancel_futures=True)

    def _read_range(self, job: CopyJob, client: Any, f: ObjectFile, start: int, length: int) -> None:
        if job.stop.is_set():
            raise CopyStoppedError()
        sink = _Sink(job, f, start, start + length)
        attempts = 0
        while sink.remaining > 0:
            attempts += 1
            try:
                at = sink.position
                try:
                    self._read(client, f.obj, at, sink.remaining, sink,
                               whole=at == 0 and sink.remaining == f.obj.size)
                finally:
                    if not job.stop.is_set():
                        sink.flush()  # what arrived before a failure is kept: a retry resumes after it
                if sink.remaining > 0:  # the store ended the body early: resume where it stopped
                    raise ConnectionError("the body ended before its length")
            except (CopyStoppedError, ServingError):
                raise
            except Exception as e:
                if job.stop.is_set():
                    raise CopyStoppedError() from None
                if attempts >= self.download_attempts or not (
                        self._retryable(e) or isinstance(e, ConnectionError)):
                    raise
        if f.range_done():
            self._verify(client, job, f.obj.raw, f.path)

    def _verify(self, client: Any, job: CopyJob, raw: Any, path: str) -> None:
        """Check one file once all its bytes are in: its size, and the digests that the store
        listed for it, computed while the bytes arrived."""
        f = job.files[path]
        o = f.obj
        size = os.fstat(f.fd).st_size if f.fd >= 0 else os.path.getsize(path)
        where = f"Model {job.name} version {job.version}: {self.label} object {o.key!r}"
        if size != o.size:
            raise ServingError(
                Code.DATA_LOSS, f"{where} has {size} bytes on disk, {self.label} lists {o.size}")
        digest = f.digest
        if not digest.wanted:
            return
        if digest.hashed != o.size:
            raise ServingError(Code.DATA_LOSS, f"{where}: only {digest.hashed} of {o.size} bytes hashed")
        md5 = digest.md5()
        if md5 is not None and md5 != o.md5:
            if self._mismatch_explained(client, o):
                return
            raise ServingError(Code.DATA_LOSS, f"{where} does not match its MD5 ({o.md5.hex() if o.md5 else ''})")
        crc = digest.crc32c()
        if crc is not None and crc != o.crc32c:
            raise ServingError(Code.DATA_LOSS, f"{where} does not match its CRC32C")

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

        def release(_: Any) -> defer.Deferred[None]:
            return self._in_thread_always(self._close_client)

        # no copy runs by now: the join is quick
        d = self.wait_idle().addCallback(lambda _: self._copies.stop())
        return d.addCallback(release).addCallback(lambda _: None)
