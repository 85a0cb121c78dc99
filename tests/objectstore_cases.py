"""The tests every object-store provider passes against its emulator (Azurite, fake-gcs-server):
a mixin for a TestCase that says how to reach the store, upload and deny."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import time
import uuid
from typing import Any

from twisted.internet import defer, task, threads
from twisted.logger import formatEvent, globalLogPublisher

from tests.harness.files import tree
from tfscache.errors import Code, ServingError
from tfscache.providers.base import ListingCache
from tfscache.providers.objectstore import MAX_LABELS_BYTES, ObjectStoreProvider

MIB = 1024 * 1024


def half_plus_two_dir() -> str:
    """A real SavedModel (saved_model.pb, variables/...) plus an assets/ file, on disk once."""
    from tests.harness import shared

    def write(path: str) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        from tfscache.devserver.models import write_half_plus_two

        vdir = os.path.join(path, "hp2", "1")
        write_half_plus_two(path, "hp2", 1, 0.5, 2.0)
        os.makedirs(os.path.join(vdir, "assets", "vocab"), exist_ok=True)
        with open(os.path.join(vdir, "assets", "vocab", "tokens.txt"), "w") as f:
            f.write("\n".join(f"token{i}" for i in range(1000)))

    return os.path.join(shared.model_dir("s3-hp2", write), "hp2", "1")


class ObjectStoreCases:
    """Set by the TestCase: ``label`` ("Azure"), ``container`` and ``where`` ("Azure container
    'x'"); methods ``server()``, ``make_provider(**kw)``, ``upload(key, body, blocks=False)``
    (the key below the test's prefix), ``bad_credentials(**kw)`` and ``denied_provider(**kw)``
    (a provider whose credentials may list but not read, or SkipTest), ``secrets()``."""

    timeout = 90
    label: str
    container: str

    # -- provided by the TestCase ----------------------------------------------------------------
    def server(self) -> Any:
        raise NotImplementedError

    def make_provider(self, **kw: Any) -> ObjectStoreProvider:
        raise NotImplementedError

    def upload(self, key: str, body: bytes, blocks: bool = False) -> None:
        raise NotImplementedError

    def bad_credentials(self, **kw: Any) -> ObjectStoreProvider:
        raise NotImplementedError

    def denied_provider(self, **kw: Any) -> ObjectStoreProvider:
        raise NotImplementedError

    def secrets(self) -> list[str]:
        return []

    def server_restarted(self) -> None:
        """After a restart: create the container again if the emulator lost it."""

    # -- shared set-up ---------------------------------------------------------------------------
    def setUp(self) -> None:
        self.prefix = f"t-{uuid.uuid4().hex[:8]}/models"
        self.cache = tempfile.mkdtemp(prefix=f"tfscache-{self.label.lower()}-cache-")
        self.addCleanup(shutil.rmtree, self.cache, True)  # type: ignore[attr-defined]
        self.events: list[Any] = []
        observer: Any = self.events.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)  # type: ignore[attr-defined]

    def provider(self, **kw: Any) -> Any:
        args: dict[str, Any] = dict(chunk_size=5 * MIB, progress_interval=0.2, connect_timeout=2.0,
                                    read_timeout=10.0, download_attempts=2)
        args.update(kw)
        p = self.make_provider(**args)
        self.addCleanup(p.close)  # type: ignore[attr-defined]
        return p

    def put_many(self, name: str, version: int | str, count: int, size: int) -> dict[str, bytes]:
        files = {f"variables/part-{i:03d}": os.urandom(size) for i in range(count)}
        for rel, body in files.items():
            self.upload(f"{name}/{version}/{rel}", body)
        return files

    def assertNothingLeft(self, name: str) -> None:
        parent = os.path.join(self.cache, name)
        left = os.listdir(parent) if os.path.isdir(parent) else []
        self.assertEqual(left, [], f"left behind in {parent}")  # type: ignore[attr-defined]

    def log_text(self) -> str:
        return "\n".join(formatEvent(e) + " " + repr(e) for e in self.events)

    def assertNoSecrets(self, *texts: str) -> None:
        for secret in self.secrets():
            for text in texts + (self.log_text(),):
                self.assertNotIn(secret, text)  # type: ignore[attr-defined]

    def download_threads(self, p: ObjectStoreProvider) -> int:
        return sum(1 for t in threading.enumerate() if t.name.startswith(f"tfscache-{p.kind}-download"))

    # -- the cases -----------------------------------------------------------------------------
    @defer.inlineCallbacks
    def test_latest_version_and_zero_padded_versions(self):  # type: ignore[no-untyped-def]
        for v in ("1", "2", "10", "abc", "10a", "-3", "٣", "7", "007"):
            self.upload(f"m/{v}/saved_model.pb", f"version {v}".encode())
        padded = {"saved_model.pb": b"padded pb", "variables/variables.index": b"index"}
        for rel, body in padded.items():
            self.upload(f"m/00000123/{rel}", body)
        self.upload("m/5", b"a file, not a version directory")
        self.upload("mm/99/saved_model.pb", b"another model sharing the name prefix")
        p = self.provider()
        versions = yield p.list_versions("m")
        self.assertEqual(versions, [1, 2, 7, 10, 123])  # type: ignore[attr-defined]
        self.assertEqual((yield p.list_versions("absent")), [])  # type: ignore[attr-defined]
        # the padded directory is version 123, copied from its own prefix
        self.assertEqual((yield p.version_size("m", 123)), 9 + 5)  # type: ignore[attr-defined]
        dest = os.path.join(self.cache, "m", "123")
        self.assertEqual((yield p.fetch("m", 123, dest)), 14)  # type: ignore[attr-defined]
        self.assertEqual(tree(dest), {os.path.join(*k.split("/")): v  # type: ignore[attr-defined]
                                      for k, v in padded.items()})
        # of '7' and '007', the plain name is version 7
        dest7 = os.path.join(self.cache, "m", "7")
        yield p.fetch("m", 7, dest7)
        self.assertEqual(tree(dest7), {"saved_model.pb": b"version 7"})  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_version_labels_and_their_listing_ttl(self):  # type: ignore[no-untyped-def]
        for v in (1, 2):
            self.upload(f"m/{v}/saved_model.pb", f"version {v}".encode())
        self.upload("m/labels.json", b'{"stable": 1, "canary": "00000002"}')
        self.upload("m/labels.json.bak", b"{not json")  # only the exact key is the labels file
        self.upload("bare/1/saved_model.pb", b"no labels")
        self.upload("bad/labels.json", b"{not json")
        self.upload("huge/labels.json", b" " * (MAX_LABELS_BYTES + 1))
        p = self.provider(listing_ttl=5.0)
        clock = task.Clock()
        p.label_listings = ListingCache(5.0, clock=clock.seconds, normalise=dict)
        self.assertEqual((yield p.list_labels("m")), {"stable": 1, "canary": 2})  # type: ignore[attr-defined]
        self.assertEqual((yield p.list_versions("m")), [1, 2])  # type: ignore[attr-defined]
        self.assertEqual((yield p.list_labels("bare")), {})  # type: ignore[attr-defined]
        self.assertEqual((yield p.list_labels("absent")), {})  # type: ignore[attr-defined]
        # a label change in the source: the cached labels answer until the TTL is over
        self.upload("m/labels.json", b'{"stable": 2}')
        clock.advance(4.9)
        self.assertEqual((yield p.list_labels("m")), {"stable": 1, "canary": 2})  # type: ignore[attr-defined]
        clock.advance(0.1)
        self.assertEqual((yield p.list_labels("m")), {"stable": 2})  # type: ignore[attr-defined]
        for name in ("bad", "huge"):
            err = yield self.assertFailure(p.list_labels(name), ServingError)  # type: ignore[attr-defined]
            self.assertEqual(err.code, Code.FAILED_PRECONDITION, err.message)  # type: ignore[attr-defined]
            self.assertIn(f"model {name} (labels.json)", err.message)  # type: ignore[attr-defined]
        err = yield self.assertFailure(p.list_labels("../x"), ServingError)  # type: ignore[attr-defined]
        self.assertEqual(err.code, Code.INVALID_ARGUMENT)  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_nested_model_copied_byte_identical(self):  # type: ignore[no-untyped-def]
        local = half_plus_two_dir()
        expected = tree(local)
        for rel, body in expected.items():
            self.upload(f"hp2/1/{rel.replace(os.sep, '/')}", body)
        self.upload("hp2/1/", b"")  # a "directory marker" some tools write: not a file
        p = self.provider()
        size = yield p.version_size("hp2", 1)
        self.assertEqual(size, sum(len(b) for b in expected.values()))  # type: ignore[attr-defined]
        dest = os.path.join(self.cache, "hp2", "1")
        copied = yield p.fetch("hp2", 1, dest)
        self.assertEqual(copied, size)  # type: ignore[attr-defined]
        self.assertEqual(tree(dest), expected)  # type: ignore[attr-defined]
        self.assertIn(os.path.join("variables", "variables.index"), expected)  # type: ignore[attr-defined]
        self.assertIn(os.path.join("assets", "vocab", "tokens.txt"), expected)  # type: ignore[attr-defined]
        self.assertEqual(sorted(os.listdir(os.path.join(self.cache, "hp2"))), ["1"])  # type: ignore[attr-defined]
        self.assertIn(f"{self.label} copy done model=hp2 version=1", self.log_text())  # type: ignore[attr-defined]
        self.assertEqual(self.download_threads(p), 0)  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_model_above_the_chunk_threshold(self):  # type: ignore[no-untyped-def]
        big = os.urandom(12 * MIB)
        self.upload("big/1/variables/variables.data-00000-of-00001", big)
        self.upload("big/1/saved_model.pb", big[::-1], blocks=True)  # in blocks/parts
        p = self.provider(chunk_size=5 * MIB)
        reads: list[tuple[str, int, int, bool]] = []
        on_reactor: list[str] = []
        real_read = p._read

        def read(client, obj, start, length, sink, whole):  # type: ignore[no-untyped-def]
            reads.append((obj.key.rsplit("/", 1)[-1], start, length, whole))
            if threading.current_thread() is threading.main_thread():
                on_reactor.append(obj.key)
            return real_read(client, obj, start, length, sink, whole)

        p._read = read  # type: ignore[method-assign]
        dest = os.path.join(self.cache, "big", "1")
        copied = yield p.fetch("big", 1, dest)
        self.assertEqual(copied, 24 * MIB)  # type: ignore[attr-defined]
        with open(os.path.join(dest, "variables", "variables.data-00000-of-00001"), "rb") as f:
            self.assertEqual(hashlib.sha256(f.read()).digest(), hashlib.sha256(big).digest())  # type: ignore[attr-defined]
        with open(os.path.join(dest, "saved_model.pb"), "rb") as f:
            self.assertEqual(f.read(), big[::-1])  # type: ignore[attr-defined]
        # 3 ranges of at most 5 MiB per object, none of them the whole object
        self.assertEqual(sorted((k, s, n) for k, s, n, _w in reads), sorted(  # type: ignore[attr-defined]
            (k, s, n) for k in ("saved_model.pb", "variables.data-00000-of-00001")
            for s, n in ((0, 5 * MIB), (5 * MIB, 5 * MIB), (10 * MIB, 2 * MIB))))
        self.assertFalse(any(w for *_r, w in reads))  # type: ignore[attr-defined]
        self.assertEqual(on_reactor, [])  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_corrupt_object_fails_its_checksum(self):  # type: ignore[no-untyped-def]
        self.upload("bad/1/saved_model.pb", b"A" * 1000)
        p = self.provider()
        real_info = p._object_info

        def tamper(raw):  # type: ignore[no-untyped-def]
            # what the store says the bytes are, of the same size of other content
            o = real_info(raw)
            other = b"B" + b"A" * 999
            if o.crc32c is None:
                return o.__class__(o.key, o.size, md5=hashlib.md5(other).digest(), raw=o.raw)
            import google_crc32c

            return o.__class__(o.key, o.size, md5=o.md5, crc32c=google_crc32c.value(other).to_bytes(4, "big"),
                               raw=o.raw)

        listed = yield threads.deferToThread(lambda: [real_info(r) for r in p._list_objects(p._key_prefix("bad", 1))])
        self.assertTrue(listed[0].md5 or listed[0].crc32c, "the store lists no checksum")  # type: ignore[attr-defined]
        p._object_info = tamper  # type: ignore[method-assign]
        err = yield self.assertFailure(  # type: ignore[attr-defined]
            p.fetch("bad", 1, os.path.join(self.cache, "bad", "1")), ServingError)
        self.assertEqual(err.code, Code.DATA_LOSS)  # type: ignore[attr-defined]
        self.assertIn("bad version 1", err.message)  # type: ignore[attr-defined]
        self.assertRegex(err.message, "MD5|CRC32C")  # type: ignore[attr-defined]
        self.assertNothingLeft("bad")

    @defer.inlineCallbacks
    def test_missing_model_is_not_found(self):  # type: ignore[no-untyped-def]
        self.upload("there/1/saved_model.pb", b"x")
        p = self.provider()
        for d in (p.version_size("nothere", 3), p.fetch("nothere", 3, os.path.join(self.cache, "nothere", "3")),
                  p.fetch("there", 2, os.path.join(self.cache, "there", "2"))):
            err = yield self.assertFailure(d, ServingError)  # type: ignore[attr-defined]
            self.assertEqual(err.code, Code.NOT_FOUND)  # type: ignore[attr-defined]
            self.assertIn("Servable not found for request: Specific(", err.message)  # type: ignore[attr-defined]
        self.assertNothingLeft("nothere")
        self.assertNothingLeft("there")

    @defer.inlineCallbacks
    def test_bad_credentials_fail_clearly_without_leaking_them(self):  # type: ignore[no-untyped-def]
        self.upload("sec/1/saved_model.pb", b"x")
        p = self.bad_credentials()
        self.addCleanup(p.close)  # type: ignore[attr-defined]
        for d in (p.list_versions("sec"), p.version_size("sec", 1), p.list_labels("sec"),
                  p.fetch("sec", 1, os.path.join(self.cache, "sec", "1")), p.check()):
            err = yield self.assertFailure(d, ServingError)  # type: ignore[attr-defined]
            self.assertIn(err.code, (Code.PERMISSION_DENIED, Code.UNAUTHENTICATED), err.message)  # type: ignore[attr-defined]
            self.assertIn(self.container, err.message)  # type: ignore[attr-defined]
            self.assertIn("credentials", err.message)  # type: ignore[attr-defined]
            self.assertNoSecrets(err.message, repr(p))
        err = yield self.assertFailure(p.fetch("sec", 1, os.path.join(self.cache, "sec", "1")), ServingError)  # type: ignore[attr-defined]
        self.assertIn("model sec version 1", err.message)  # type: ignore[attr-defined]
        self.assertNothingLeft("sec")

    @defer.inlineCallbacks
    def test_permission_denied_names_the_model_and_container(self):  # type: ignore[no-untyped-def]
        self.upload("pol/1/saved_model.pb", b"x" * 100)
        self.upload("pol/1/variables/variables.index", b"y" * 100)
        self.upload("pol/labels.json", b'{"stable": 1}')
        p = self.denied_provider()
        self.addCleanup(p.close)  # type: ignore[attr-defined]
        self.assertEqual((yield p.list_versions("pol")), [1])  # type: ignore[attr-defined]
        self.assertEqual((yield p.version_size("pol", 1)), 200)  # type: ignore[attr-defined]
        err = yield self.assertFailure(  # type: ignore[attr-defined]
            p.fetch("pol", 1, os.path.join(self.cache, "pol", "1")), ServingError)
        self.assertEqual(err.code, Code.PERMISSION_DENIED, err.message)  # type: ignore[attr-defined]
        self.assertIn("model pol version 1", err.message)  # type: ignore[attr-defined]
        self.assertIn(self.where, err.message)  # type: ignore[attr-defined]
        self.assertIn("denied", err.message)  # type: ignore[attr-defined]
        self.assertNoSecrets(err.message)
        # listed but not readable: an error, never "no labels"
        err = yield self.assertFailure(p.list_labels("pol"), ServingError)  # type: ignore[attr-defined]
        self.assertEqual(err.code, Code.PERMISSION_DENIED, err.message)  # type: ignore[attr-defined]
        self.assertIn("version labels of model pol", err.message)  # type: ignore[attr-defined]
        yield p.wait_idle()
        self.assertNothingLeft("pol")

    @defer.inlineCallbacks
    def test_emulator_killed_mid_copy_then_the_next_copy_works(self):  # type: ignore[no-untyped-def]
        files = self.put_many("dies", 1, 12, 2 * MIB)
        p = self.provider(max_concurrency=2)
        killed = threading.Event()
        real_verify = p._verify

        def kill_after_first(client, job, raw, path):  # type: ignore[no-untyped-def]
            real_verify(client, job, raw, path)
            if not killed.is_set():
                killed.set()
                self.server().kill()  # from the copy's own thread: deterministic "mid-copy"

        p._verify = kill_after_first  # type: ignore[method-assign]
        dest = os.path.join(self.cache, "dies", "1")
        err = yield self.assertFailure(p.fetch("dies", 1, dest), ServingError)  # type: ignore[attr-defined]
        self.assertTrue(killed.is_set())  # type: ignore[attr-defined]
        self.assertEqual(err.code, Code.UNAVAILABLE, err.message)  # type: ignore[attr-defined]
        self.assertIn("dies version 1", err.message)  # type: ignore[attr-defined]
        self.assertIn(self.container, err.message)  # type: ignore[attr-defined]
        yield p.wait_idle()
        self.assertNothingLeft("dies")
        self.assertEqual(self.download_threads(p), 0)  # type: ignore[attr-defined]
        yield threads.deferToThread(self.server().restart)
        self.server_restarted()
        p._verify = real_verify  # type: ignore[method-assign]
        p.listings.invalidate("dies")
        # an emulator may lose some of what it had not saved when killed (Azurite kept 8 of the
        # 12 objects once): put them all back, the same bytes, before the second copy
        for rel, body in files.items():
            self.upload(f"dies/1/{rel}", body)
        copied = yield p.fetch("dies", 1, dest)
        self.assertEqual(copied, 12 * 2 * MIB)  # type: ignore[attr-defined]
        self.assertEqual(tree(dest), {os.path.join(*k.split("/")): v for k, v in files.items()})  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_fetch_timeout_and_progress_lines(self):  # type: ignore[no-untyped-def]
        self.put_many("slow", 3, 4, 256 * 1024)
        p = self.provider(max_concurrency=1, fetch_timeout=1.0, progress_interval=0.1)
        real_verify = p._verify

        def slow(client, job, raw, path):  # type: ignore[no-untyped-def]
            time.sleep(0.4)  # a slow store: the copy's deadline comes before its last object
            return real_verify(client, job, raw, path)

        p._verify = slow  # type: ignore[method-assign]
        yield p.check()  # the client built and connected: the deadline is the copy's alone
        err = yield self.assertFailure(  # type: ignore[attr-defined]
            p.fetch("slow", 3, os.path.join(self.cache, "slow", "3")), ServingError)
        self.assertEqual(err.code, Code.DEADLINE_EXCEEDED)  # type: ignore[attr-defined]
        self.assertIn("slow version 3", err.message)  # type: ignore[attr-defined]
        yield p.wait_idle()
        self.assertNothingLeft("slow")
        progress = [formatEvent(e) for e in self.events
                    if f"{self.label} copy progress" in (e.get("log_format") or "")]
        self.assertTrue(progress, "no progress lines")  # type: ignore[attr-defined]
        for line in progress:
            self.assertIn("model=slow version=3 bytes=", line)  # type: ignore[attr-defined]
            self.assertIn(f"/{4 * 256 * 1024} ", line)  # type: ignore[attr-defined]

