"""S3ModelProvider against a real S3-compatible server (MinIO, or moto_server when MinIO is not
built) started by the test process: listings, copies, failures, cancellation, logging."""

from __future__ import annotations

import filecmp
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from tests.harness import shared
from tests.harness.files import tree
from tests.harness.process import unused_port
from tests.harness.servers import S3Server
from tests.objectstore_cases import ObjectStoreCases
from tfscache.errors import Code, ServingError
from tfscache.providers.s3 import S3ModelProvider, normalize_prefix, safe_parts

MIB = 1024 * 1024
SECRET_KEY_ID = "TFSCACHEWRONGKEYID0001"
SECRET_KEY = "wrong-secret-Zq8vT3kLp0sXw7yR2mN5cB1"


def s3_server() -> S3Server:
    """One MinIO (or moto_server) for this test module; restarted, never replaced, by tests."""
    return shared.shared("s3-provider-server", lambda: S3Server().start(), lambda s: s.stop())


def half_plus_two_dir() -> str:
    """A real SavedModel (saved_model.pb, variables/...) plus an assets/ file, on disk once."""

    def write(path: str) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        from tfscache.devserver.models import write_half_plus_two

        vdir = os.path.join(path, "hp2", "1")
        write_half_plus_two(path, "hp2", 1, 0.5, 2.0)
        os.makedirs(os.path.join(vdir, "assets", "vocab"), exist_ok=True)
        with open(os.path.join(vdir, "assets", "vocab", "tokens.txt"), "w") as f:
            f.write("\n".join(f"token{i}" for i in range(1000)))

    return os.path.join(shared.model_dir("s3-hp2", write), "hp2", "1")


def executor_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("ThreadPoolExecutor"))


class S3ProviderTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.server = s3_server()
        self.s3 = self.server.boto3_client()
        self.bucket = "models-under-test"
        self.ensure_bucket()
        self.prefix = f"t-{uuid.uuid4().hex[:8]}/models"
        self.cache = tempfile.mkdtemp(prefix="tfscache-s3-cache-")
        self.addCleanup(shutil.rmtree, self.cache, True)
        self.events: list[Any] = []
        observer: Any = self.events.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def ensure_bucket(self) -> None:
        try:
            self.s3.head_bucket(Bucket=self.bucket)
        except Exception:
            self.s3.create_bucket(Bucket=self.bucket)

    def provider(self, **kw: Any) -> S3ModelProvider:
        args: dict[str, Any] = dict(
            endpoint_url=self.server.endpoint_url, region="us-east-1",
            access_key_id=self.server.access_key, secret_access_key=self.server.secret_key,
            multipart_threshold=5 * MIB, progress_interval=0.2, connect_timeout=2.0,
            read_timeout=10.0, max_attempts=2, download_attempts=2, reactor=reactor,
        )
        args.update(kw)
        cls = args.pop("cls", S3ModelProvider)
        p = cls(args.pop("bucket", self.bucket), args.pop("prefix", self.prefix), **args)
        self.addCleanup(p.close)
        return p

    def put(self, key: str, body: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}", Body=body)

    def upload_dir(self, local: str, name: str, version: int) -> None:
        for rel in tree(local):
            self.s3.upload_file(os.path.join(local, rel), self.bucket,
                                f"{self.prefix}/{name}/{version}/{rel}")

    def put_many(self, name: str, version: int, count: int, size: int) -> dict[str, bytes]:
        files = {f"variables/part-{i:03d}": os.urandom(size) for i in range(count)}
        for rel, body in files.items():
            self.put(f"{name}/{version}/{rel}", body)
        return files

    def assertNothingLeft(self, name: str) -> None:
        parent = os.path.join(self.cache, name)
        left = os.listdir(parent) if os.path.isdir(parent) else []
        self.assertEqual(left, [], f"left behind in {parent}")

    def log_text(self) -> str:
        return "\n".join(formatEvent(e) + " " + repr(e) for e in self.events)

    # -- listings --------------------------------------------------------------------------
    @defer.inlineCallbacks
    def test_latest_version_and_non_numeric_prefixes(self):  # type: ignore[no-untyped-def]
        for v in ("1", "2", "10", "abc", "10a", "_tmp", "-3", "٣"):
            self.put(f"m/{v}/saved_model.pb", b"pb")
        self.put("m/7", b"a file, not a version directory")
        self.put("mm/99/saved_model.pb", b"another model sharing the name prefix")
        p = self.provider()
        versions = yield p.list_versions("m")
        self.assertEqual(versions, [1, 2, 10])
        self.assertEqual(max(versions), 10)
        self.assertEqual((yield p.list_versions("absent")), [])

    @defer.inlineCallbacks
    def test_prefix_forms(self):  # type: ignore[no-untyped-def]
        self.assertEqual(normalize_prefix(""), "")
        self.assertEqual(normalize_prefix("/"), "")
        self.assertEqual(normalize_prefix("a/b"), "a/b/")
        self.assertEqual(normalize_prefix("/a/b/"), "a/b/")
        self.put("pm/3/saved_model.pb", b"x")
        for prefix in (self.prefix, self.prefix + "/", "/" + self.prefix + "/"):
            p = self.provider(prefix=prefix)
            self.assertEqual((yield p.list_versions("pm")), [3])
        # an empty prefix: models at the bucket's root
        other = "models-at-root"
        self.s3.create_bucket(Bucket=other)
        self.s3.put_object(Bucket=other, Key="rm/4/saved_model.pb", Body=b"x")
        p = self.provider(bucket=other, prefix="")
        self.assertEqual((yield p.list_versions("rm")), [4])
        self.assertEqual((yield p.version_size("rm", 4)), 1)

    @defer.inlineCallbacks
    def test_listing_cache_within_ttl(self):  # type: ignore[no-untyped-def]
        for v in (1, 2):
            self.put(f"lc/{v}/saved_model.pb", b"x")
        p = self.provider(listing_ttl=30.0)
        calls: list[str] = []
        yield p.check()  # builds the client
        p._client().meta.events.register(
            "before-call.s3.ListObjectsV2", lambda **kw: calls.append("list"))
        self.assertEqual((yield p.list_versions("lc")), [1, 2])
        self.s3.delete_object(Bucket=self.bucket, Key=f"{self.prefix}/lc/2/saved_model.pb")
        self.assertEqual((yield p.list_versions("lc")), [1, 2])  # cached: S3 not asked again
        self.assertEqual(calls, ["list"])
        p.listings.invalidate("lc")
        self.assertEqual((yield p.list_versions("lc")), [1])
        self.assertEqual(calls, ["list", "list"])
        fresh = self.provider(listing_ttl=0.0)
        self.assertEqual((yield fresh.list_versions("lc")), [1])

    # -- copies ----------------------------------------------------------------------------
    @defer.inlineCallbacks
    def test_nested_model_copied_byte_identical(self):  # type: ignore[no-untyped-def]
        local = half_plus_two_dir()
        self.upload_dir(local, "hp2", 1)
        self.put("hp2/1/", b"")  # a "directory marker" some tools write: not a file
        p = self.provider()
        expected = tree(local)
        size = yield p.version_size("hp2", 1)
        self.assertEqual(size, sum(len(b) for b in expected.values()))
        dest = os.path.join(self.cache, "hp2", "1")
        copied = yield p.fetch("hp2", 1, dest)
        self.assertEqual(copied, size)
        self.assertEqual(tree(dest), expected)
        self.assertIn(os.path.join("variables", "variables.index"), expected)
        self.assertIn(os.path.join("assets", "vocab", "tokens.txt"), expected)
        cmp = filecmp.dircmp(local, dest)
        self.assertEqual((cmp.left_only, cmp.right_only), ([], []))
        self.assertEqual(sorted(os.listdir(os.path.join(self.cache, "hp2"))), ["1"])
        text = self.log_text()
        self.assertIn("S3 copy done model=hp2 version=1", text)

    @defer.inlineCallbacks
    def test_model_above_multipart_threshold(self):  # type: ignore[no-untyped-def]
        big = os.urandom(12 * MIB)
        self.put("big/1/variables/variables.data-00000-of-00001", big)  # plain MD5 ETag
        # uploaded in parts: its ETag is 'md5-of-md5s-N', so only the size can be checked
        from boto3.s3.transfer import TransferConfig

        with tempfile.NamedTemporaryFile() as f:
            f.write(big[::-1])
            f.flush()
            self.s3.upload_file(f.name, self.bucket, f"{self.prefix}/big/1/saved_model.pb",
                                Config=TransferConfig(multipart_threshold=5 * MIB,
                                                      multipart_chunksize=5 * MIB))
        head = self.s3.head_object(Bucket=self.bucket, Key=f"{self.prefix}/big/1/saved_model.pb")
        self.assertIn("-", head["ETag"])
        p = self.provider(multipart_threshold=5 * MIB)
        yield p.check()
        ranges: list[str] = []
        on_reactor: list[str] = []
        p._client().meta.events.register(
            "before-parameter-build.s3.GetObject",
            lambda params, **kw: ranges.append(params.get("Range", "")))
        p._client().meta.events.register(  # boto3 never runs on the reactor thread
            "before-send.s3",
            lambda request, **kw: on_reactor.append(request.url)
            if threading.current_thread() is threading.main_thread() else None)
        dest = os.path.join(self.cache, "big", "1")
        copied = yield p.fetch("big", 1, dest)
        self.assertEqual(copied, 24 * MIB)
        with open(os.path.join(dest, "variables", "variables.data-00000-of-00001"), "rb") as f:
            self.assertEqual(hashlib.sha256(f.read()).digest(), hashlib.sha256(big).digest())
        with open(os.path.join(dest, "saved_model.pb"), "rb") as f:
            self.assertEqual(f.read(), big[::-1])
        self.assertEqual(len(ranges), 6, ranges)  # 3 ranged GETs of 5 MiB per object
        self.assertTrue(all(r.startswith("bytes=") for r in ranges), ranges)
        yield p.list_versions("big")
        yield p.version_size("big", 1)
        self.assertEqual(on_reactor, [])

    @defer.inlineCallbacks
    def test_corrupt_object_fails_md5(self):  # type: ignore[no-untyped-def]
        self.put("bad/1/saved_model.pb", b"A" * 1000)
        p = self.provider()
        real_list = p._list_objects

        def tamper(key_prefix):  # type: ignore[no-untyped-def]
            # the bytes are hashed as they arrive, so what differs is what S3 says they are:
            # the ETag of the same size of other content
            listing = real_list(key_prefix)
            for o in listing:
                o["ETag"] = f'"{hashlib.md5(b"B" + b"A" * 999).hexdigest()}"'
            return listing

        p._list_objects = tamper  # type: ignore[method-assign]
        err = yield self.assertFailure(
            p.fetch("bad", 1, os.path.join(self.cache, "bad", "1")), ServingError)
        self.assertEqual(err.code, Code.DATA_LOSS)
        self.assertIn("MD5", err.message)
        self.assertIn("bad version 1", err.message)
        self.assertNothingLeft("bad")

    # -- failures --------------------------------------------------------------------------
    @defer.inlineCallbacks
    def test_missing_model_is_not_found(self):  # type: ignore[no-untyped-def]
        self.put("there/1/saved_model.pb", b"x")
        p = self.provider()
        for d in (p.version_size("nothere", 3), p.fetch("nothere", 3, os.path.join(self.cache, "nothere", "3")),
                  p.fetch("there", 2, os.path.join(self.cache, "there", "2"))):
            err = yield self.assertFailure(d, ServingError)
            self.assertEqual(err.code, Code.NOT_FOUND)
            self.assertIn("Servable not found for request: Specific(", err.message)
        self.assertNothingLeft("nothere")
        self.assertNothingLeft("there")

    @defer.inlineCallbacks
    def test_invalid_names_and_unsafe_keys(self):  # type: ignore[no-untyped-def]
        p = self.provider()
        for bad in ("../etc", "a/b", ".hidden", ""):
            for d in (p.list_versions(bad), p.fetch(bad, 1, os.path.join(self.cache, "x", "1"))):
                err = yield self.assertFailure(d, ServingError)
                self.assertEqual(err.code, Code.INVALID_ARGUMENT)
        for ok in ("saved_model.pb", "variables/variables.index", "assets/a/b.txt"):
            safe_parts(ok)
        for unsafe in ("../x", "a/../../x", "/abs", "a//b", "./a", "a/.", "a/"):
            self.assertRaises(ValueError, safe_parts, unsafe)
        # end to end: AWS S3 stores keys such as 'x/../../y' (MinIO refuses them), so the
        # listing is given such keys here; the copy must refuse them before writing anything
        self.put("evil/1/saved_model.pb", b"x")
        real_list = p._list_objects
        for unsafe in ("../../escape", "variables//x", "/abs", "./x"):

            def listing(key_prefix: str, unsafe: str = unsafe) -> list[dict[str, Any]]:
                return real_list(key_prefix) + [{"Key": key_prefix + unsafe, "Size": 1, "ETag": '"x"'}]

            p._list_objects = listing  # type: ignore[method-assign]
            err = yield self.assertFailure(
                p.fetch("evil", 1, os.path.join(self.cache, "evil", "1")), ServingError)
            self.assertEqual(err.code, Code.FAILED_PRECONDITION)
            self.assertIn("not a safe relative path", err.message)
            self.assertNothingLeft("evil")
            self.assertFalse(os.path.exists(os.path.join(self.cache, "escape")))

    @defer.inlineCallbacks
    def test_wrong_credentials_denied_without_leaking_them(self):  # type: ignore[no-untyped-def]
        self.put("sec/1/saved_model.pb", b"x")
        p = self.provider(access_key_id=SECRET_KEY_ID, secret_access_key=SECRET_KEY)
        try:
            yield p.list_versions("sec")
        except ServingError:
            pass
        else:
            raise unittest.SkipTest(f"the {self.server.kind} server does not check credentials")
        for d in (p.list_versions("sec"), p.version_size("sec", 1),
                  p.fetch("sec", 1, os.path.join(self.cache, "sec", "1")), p.check()):
            err = yield self.assertFailure(d, ServingError)
            self.assertEqual(err.code, Code.PERMISSION_DENIED, err.message)
            self.assertIn(self.bucket, err.message)
            self.assertIn("denied", err.message)
            for secret in (SECRET_KEY, SECRET_KEY_ID):
                self.assertNotIn(secret, err.message)
        self.assertNothingLeft("sec")
        self.assertNotIn(SECRET_KEY, self.log_text())
        self.assertNotIn(SECRET_KEY_ID, self.log_text())
        self.assertNotIn(SECRET_KEY, repr(p))

    @defer.inlineCallbacks
    def test_bucket_policy_denies_a_valid_user(self):  # type: ignore[no-untyped-def]
        # valid credentials that may list the bucket but not read the model: temporary ones from
        # MinIO's STS with a session policy (AssumeRole with the root user's keys)
        if self.server.kind != "minio":
            raise unittest.SkipTest("needs MinIO's STS AssumeRole")
        import boto3

        self.put("pol/1/saved_model.pb", b"x" * 100)
        self.put("pol/1/variables/variables.index", b"y" * 100)
        policy = {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": [f"arn:aws:s3:::{self.bucket}"]},
            {"Effect": "Deny", "Action": ["s3:GetObject"],
             "Resource": [f"arn:aws:s3:::{self.bucket}/{self.prefix}/pol/*"]},
        ]}
        sts = boto3.client("sts", endpoint_url=self.server.endpoint_url, region_name="us-east-1",
                           aws_access_key_id=self.server.access_key,
                           aws_secret_access_key=self.server.secret_key)
        creds = (yield threads.deferToThread(
            sts.assume_role, RoleArn="arn:minio:iam:::role/tfscache-test",
            RoleSessionName="tfscache-test", Policy=json.dumps(policy), DurationSeconds=900,
        ))["Credentials"]
        # a session token goes through boto3's standard chain (the environment, here)
        self.patch(os, "environ", {
            **os.environ, "AWS_ACCESS_KEY_ID": creds["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": creds["SecretAccessKey"], "AWS_SESSION_TOKEN": creds["SessionToken"],
        })
        p = self.provider(access_key_id=None, secret_access_key=None)
        self.assertEqual((yield p.list_versions("pol")), [1])  # the user is valid: it may list
        self.assertEqual((yield p.version_size("pol", 1)), 200)
        err = yield self.assertFailure(
            p.fetch("pol", 1, os.path.join(self.cache, "pol", "1")), ServingError)
        self.assertEqual(err.code, Code.PERMISSION_DENIED, err.message)
        self.assertIn("model pol version 1", err.message)
        self.assertIn(f"S3 bucket '{self.bucket}'", err.message)
        self.assertIn("denied", err.message)  # (403: Forbidden): s3transfer's HEAD has no error body
        self.assertIn("bucket policy", err.message)
        for secret in (creds["SecretAccessKey"], creds["SessionToken"]):
            self.assertNotIn(secret, err.message)
            self.assertNotIn(secret, self.log_text())
        yield p.wait_idle()
        self.assertNothingLeft("pol")

    @defer.inlineCallbacks
    def test_credentials_never_logged(self):  # type: ignore[no-untyped-def]
        files = self.put_many("logm", 1, 3, 1000)
        p = self.provider()
        yield p.check()
        yield p.list_versions("logm")
        yield p.fetch("logm", 1, os.path.join(self.cache, "logm", "1"))
        yield self.assertFailure(p.fetch("logm", 9, os.path.join(self.cache, "logm", "9")),
                                 ServingError)
        text = self.log_text()
        self.assertIn("S3 model source", text)
        self.assertIn("credentials=config", text)
        self.assertEqual(len(files), 3)
        for secret in (self.server.secret_key, self.server.access_key):
            self.assertNotIn(secret, text)
            self.assertNotIn(secret, repr(p))

    @defer.inlineCallbacks
    def test_check(self):  # type: ignore[no-untyped-def]
        yield self.provider().check()
        absent = self.provider(bucket="no-such-bucket-here")
        for d in (absent.check(), absent.list_labels("m")):  # not "no labels": no bucket
            err = yield self.assertFailure(d, ServingError)
            self.assertEqual(err.code, Code.UNAVAILABLE)
            self.assertIn("does not exist", err.message)
        dead = self.provider(endpoint_url=f"http://127.0.0.1:{unused_port()}", max_attempts=1)
        err = yield self.assertFailure(dead.check(), ServingError)
        self.assertEqual(err.code, Code.UNAVAILABLE)
        self.assertIn("Could not reach", err.message)

    @defer.inlineCallbacks
    def test_server_dies_mid_copy_then_recovers(self):  # type: ignore[no-untyped-def]
        files = self.put_many("dies", 1, 16, 2 * MIB)
        p = self.provider(max_concurrency=2)
        killed = threading.Event()
        real_verify = p._verify

        def kill_after_first(s3, job, o, path):  # type: ignore[no-untyped-def]
            real_verify(s3, job, o, path)
            if not killed.is_set():
                killed.set()
                self.server.kill()  # from the copy's own thread: deterministic "mid-copy"

        p._verify = kill_after_first  # type: ignore[method-assign]
        dest = os.path.join(self.cache, "dies", "1")
        err = yield self.assertFailure(p.fetch("dies", 1, dest), ServingError)
        self.assertTrue(killed.is_set())
        # an answer (UNAVAILABLE after its bounded retries), not the 600 s fetch timeout's
        # DEADLINE_EXCEEDED
        self.assertEqual(err.code, Code.UNAVAILABLE, err.message)
        self.assertIn("dies version 1", err.message)
        self.assertIn(self.bucket, err.message)
        yield p.wait_idle()
        self.assertNothingLeft("dies")
        # restart the server; the next copy succeeds
        yield threads.deferToThread(self.server.restart)
        self.s3 = self.server.boto3_client()
        self.ensure_bucket()
        if (yield p.list_versions("dies")) != [1] or self.server.kind == "moto":
            for rel, body in files.items():  # moto keeps everything in memory
                self.put(f"dies/1/{rel}", body)
        p._verify = real_verify  # type: ignore[method-assign]
        copied = yield p.fetch("dies", 1, dest)
        self.assertEqual(copied, 16 * 2 * MIB)
        self.assertEqual(tree(dest), {os.path.join(*k.split("/")): v for k, v in files.items()})

    @defer.inlineCallbacks
    def test_cancel_stops_workers_and_cleans_up(self):  # type: ignore[no-untyped-def]
        count, size = 12, 2 * MIB
        self.put_many("cx", 1, count, size)
        p = self.provider(max_concurrency=2)
        baseline = executor_threads()
        yield p.check()  # builds the client
        # every GET after the first waits until the cancel has landed, so however fast the
        # downloads are, the cancel comes while most of the copy is still to do
        landed = threading.Event()
        self.addCleanup(landed.set)
        gets = itertools.count()

        def gate(params, **kw):  # type: ignore[no-untyped-def]
            if next(gets) > 0:
                landed.wait(30)  # only if the test is broken: never longer than this

        p._client().meta.events.register("before-parameter-build.s3.GetObject", gate)
        real_verify = p._verify
        state: dict[str, Any] = {}

        def cancel_after_first(s3, job, o, path):  # type: ignore[no-untyped-def]
            real_verify(s3, job, o, path)
            if "job" not in state:
                state["job"] = job
                # returns once the canceller has run on the reactor: the stop flag is set
                threads.blockingCallFromThread(reactor, state["d"].cancel)
                state["at_cancel"] = job.done
                landed.set()

        p._verify = cancel_after_first  # type: ignore[method-assign]
        dest = os.path.join(self.cache, "cx", "1")
        state["d"] = p.fetch("cx", 1, dest)
        yield self.assertFailure(state["d"], defer.CancelledError)
        yield p.wait_idle()
        self.assertEqual(state["at_cancel"], size)  # one object in, the others held
        # every byte the copy received, counted once its threads are idle: a copy that went on
        # after the cancel (and only dropped the result at the end) reaches count * size; one
        # that stops may still take a chunk from each download that had started
        done = state["job"].done
        self.assertLess(done, 2 * size, f"{done} bytes downloaded after the cancel")
        self.assertFalse(os.path.exists(dest))
        self.assertNothingLeft("cx")
        self.assertEqual(executor_threads(), baseline)
        self.assertIn("S3 copy cancelled model=cx version=1", self.log_text())

    @defer.inlineCallbacks
    def test_copies_run_in_the_providers_own_threads(self):  # type: ignore[no-untyped-def]
        # not in the reactor's shared pool, which etcd calls and DNS lookups need too; at most
        # copy_threads copies at once, each with its own max_concurrency downloads
        files = {n: self.put_many(n, 1, 3, 1000) for n in ("own1", "own2")}
        p = self.provider(copy_threads=1)
        real_copy, real_verify = p._copy, p._verify
        copy_threads: list[str] = []
        release = threading.Event()
        held: defer.DeferredQueue[str] = defer.DeferredQueue()

        def copy(job, key_prefix):  # type: ignore[no-untyped-def]
            copy_threads.append(threading.current_thread().name)
            return real_copy(job, key_prefix)

        def hold_first(s3, job, o, path):  # type: ignore[no-untyped-def]
            if job.name == "own1" and not release.is_set():
                reactor.callFromThread(held.put, o["Key"])
                release.wait(30)  # only if the test is broken: never longer than this
            return real_verify(s3, job, o, path)

        p._copy, p._verify = copy, hold_first  # type: ignore[method-assign]
        self.addCleanup(release.set)
        first = p.fetch("own1", 1, os.path.join(self.cache, "own1", "1"))
        yield held.get()
        second = p.fetch("own2", 1, os.path.join(self.cache, "own2", "1"))
        shared_thread = yield threads.deferToThread(lambda: threading.current_thread().name)
        self.assertEqual(len(copy_threads), 1, "a second copy ran beside the first")
        release.set()
        yield defer.gatherResults([first, second], consumeErrors=True)
        self.assertEqual(len(copy_threads), 2)
        for thread in copy_threads:
            self.assertTrue(thread.startswith("PoolThread-tfscache-s3-copy-"), thread)
        self.assertNotIn(shared_thread, copy_threads)
        for n in ("own1", "own2"):
            self.assertEqual(tree(os.path.join(self.cache, n, "1")),
                             {os.path.join(*k.split("/")): v for k, v in files[n].items()})
        yield p.close()
        self.assertFalse(p._copies.started)

    @defer.inlineCallbacks
    def test_fetch_timeout_and_progress_lines(self):  # type: ignore[no-untyped-def]
        self.put_many("slow", 3, 4, 256 * 1024)
        p = self.provider(max_concurrency=1, fetch_timeout=1.0, progress_interval=0.1)
        real_verify = p._verify

        def slow(s3, job, o, path):  # type: ignore[no-untyped-def]
            time.sleep(0.4)
            return real_verify(s3, job, o, path)

        p._verify = slow  # type: ignore[method-assign]
        # the client built and connected first (boto3 takes a while on a busy machine): the
        # 1 s deadline is the copy's alone, so it has time for its progress lines
        yield p.check()
        err = yield self.assertFailure(
            p.fetch("slow", 3, os.path.join(self.cache, "slow", "3")), ServingError)
        self.assertEqual(err.code, Code.DEADLINE_EXCEEDED)
        self.assertIn("slow version 3", err.message)
        yield p.wait_idle()
        self.assertNothingLeft("slow")
        progress = [formatEvent(e) for e in self.events
                    if "S3 copy progress" in (e.get("log_format") or "")]
        self.assertTrue(progress, "no progress lines")
        for line in progress:
            self.assertIn("model=slow version=3 bytes=", line)
            self.assertIn(f"/{4 * 256 * 1024} ", line)

    @defer.inlineCallbacks
    def test_from_config(self):  # type: ignore[no-untyped-def]
        from tfscache.config import load_config

        cfg = load_config({
            "disk_cache": {"path": self.cache},
            "model_provider": {
                "type": "s3", "listing_ttl_seconds": 1.5, "fetch_timeout_seconds": 33,
                "s3": {"bucket": self.bucket, "prefix": self.prefix,
                       "endpoint_url": self.server.endpoint_url, "region": "us-east-1",
                       "max_concurrency": 3, "multipart_threshold_bytes": "6MiB",
                       "access_key_id": self.server.access_key,
                       "secret_access_key": self.server.secret_key},
            },
        }, environ={})
        p = S3ModelProvider.from_config(cfg.model_provider, reactor)
        self.addCleanup(p.close)
        self.assertEqual((p.bucket, p.prefix, p.max_concurrency, p.multipart_threshold),
                         (self.bucket, self.prefix + "/", 3, 6 * MIB))
        self.assertEqual((p.listings.ttl, p.fetch_timeout), (1.5, 33))
        self.put("cfg/5/saved_model.pb", b"x")
        self.assertEqual((yield p.list_versions("cfg")), [5])


class S3ObjectStoreTests(ObjectStoreCases, unittest.TestCase):
    """The cases every object-store provider passes (zero-padded versions among them), for S3."""

    label = "S3"
    container = "models-under-test"
    where = f"S3 bucket '{container}'"

    def setUp(self) -> None:
        self.s3server = s3_server()
        self.server_restarted()
        super().setUp()

    def server_restarted(self) -> None:
        self.s3 = self.s3server.boto3_client()
        try:
            self.s3.head_bucket(Bucket=self.container)
        except Exception:
            self.s3.create_bucket(Bucket=self.container)

    def server(self) -> S3Server:
        return self.s3server

    def make_provider(self, **kw: Any) -> Any:
        args: dict[str, Any] = dict(
            endpoint_url=self.s3server.endpoint_url, region="us-east-1",
            access_key_id=self.s3server.access_key, secret_access_key=self.s3server.secret_key,
            max_attempts=2)
        args["reactor"] = reactor
        args.update(kw)
        args["multipart_threshold"] = args.pop("chunk_size", 8 * MIB)
        return S3ModelProvider(args.pop("bucket", self.container), args.pop("prefix", self.prefix), **args)

    def upload(self, key: str, body: bytes, blocks: bool = False) -> None:
        if not blocks:
            self.s3.put_object(Bucket=self.container, Key=f"{self.prefix}/{key}", Body=body)
            return
        from boto3.s3.transfer import TransferConfig

        with tempfile.NamedTemporaryFile() as f:
            f.write(body)
            f.flush()
            self.s3.upload_file(f.name, self.container, f"{self.prefix}/{key}",
                                Config=TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB))

    def secrets(self) -> list[str]:
        return [SECRET_KEY, SECRET_KEY_ID, self.s3server.secret_key]

    def bad_credentials(self, **kw: Any) -> Any:
        if self.s3server.kind != "minio":
            raise unittest.SkipTest(f"the {self.s3server.kind} server does not check credentials")
        return self.make_provider(access_key_id=SECRET_KEY_ID, secret_access_key=SECRET_KEY, **kw)

    def denied_provider(self, **kw: Any) -> Any:
        raise unittest.SkipTest("S3ProviderTests.test_bucket_policy_denies_a_valid_user (MinIO's STS)")
