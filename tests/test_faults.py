"""Faults injected for real, and what tfscache does about them: graceful degradation.

Every fault here is real: TF Serving (the DevServer) is SIGKILLed and started again on the same
ports; corrupt models sit in the model source; a node runs as a twistd process whose file size
limit (RLIMIT_FSIZE) makes the disk "full" part way through a copy; a node's disk cache is a
small tmpfs that fills up, or is remounted read-only (where the sandbox lets root mount); the
S3 source is a closed port, a socket that accepts and never answers, or MinIO behind a relay
that slows its answers down; gRPC clients give up (deadline) or cancel; more cold models are
asked for at once than TF Serving may hold.  Hostile input is in test_hostile.py; single-fault basics (backend down at
start, one load timeout, one broken model, S3 dying mid-copy) in test_node.py and
test_s3_provider.py; the timing rules on a fake clock in test_manager_timing.py.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor, task, threads, utils
from twisted.trial import unittest

from tests.clients import GrpcClient, Reply, http, rest_predict
from tests.harness import shared
from tests.harness.devserver import DevServer
from tests.harness.node import InProcessNode, NodeProcess, node_config
from tests.harness.process import unused_port
from tests.harness.servers import S3Server
from tfscache.devserver.models import set_load_delay, write_corrupt_model, write_half_plus_two
from tfscache.errors import Code, ServingError
from tfscache.modelspec import ModelId
from tfscache.node.manager import State
from tfscache.providers.base import STAGING_PREFIX

MIB = 1024 * 1024
BIG_PADDING = 2 * MIB       # f-big carries this much more than the others (about 10 KB)
FSIZE_LIMIT = 1 * MIB       # the "disk" of the disk-full test: f-big does not fit, the rest does
TMPFS_SIZE = "1m"           # the real small disk of MountedDiskTests: f-big does not fit, the rest does
ROOMY_TMPFS_SIZE = "8m"     # ... grown, f-big fits
SLOW_LOAD = 2.0             # seconds the DevServer takes to load the f-slow* models
CROWD_LOAD = 8.0            # f-crowd's: long enough for 200 calls to line up on a busy machine
OVERLOAD_LOAD = 0.5         # ... and the f-o* models


def copy_version(src_version_dir: str, base: str, name: str, version: int = 1) -> str:
    dst = os.path.join(base, name, str(version))
    shutil.copytree(src_version_dir, dst)
    return dst


def write_models(base: str) -> None:
    """Two real SavedModels, the rest copies of them (writing each with TensorFlow is slow)."""
    warm = write_half_plus_two(base, "f-warm", 1, 2.0, 1.0)     # y = 2x + 1
    cold = write_half_plus_two(base, "f-cold", 1, 3.0, 1.0)     # y = 3x + 1
    copy_version(cold, base, "f-small")
    for name in ("f-slow", "f-deadline", "f-cancel"):
        set_load_delay(copy_version(cold, base, name), SLOW_LOAD)
    set_load_delay(copy_version(cold, base, "f-crowd"), CROWD_LOAD)
    for i in range(6):
        set_load_delay(copy_version(warm, base, f"f-o{i}"), OVERLOAD_LOAD)
    big = copy_version(cold, base, "f-big")
    os.makedirs(os.path.join(big, "assets.extra"), exist_ok=True)  # TF Serving ignores assets.extra
    with open(os.path.join(big, "assets.extra", "padding.bin"), "wb") as f:
        f.write(os.urandom(BIG_PADDING))
    # corrupt models, each broken in its own way
    write_corrupt_model(base, "f-badpb", 1)                          # saved_model.pb is garbage
    shutil.rmtree(os.path.join(copy_version(cold, base, "f-novars"), "variables"))
    os.remove(os.path.join(copy_version(cold, base, "f-nopb"), "saved_model.pb"))
    shutil.copytree(cold, os.path.join(base, "f-flat"))              # no version directory


def model_source() -> str:
    return shared.model_dir("faults", write_models)


def sample(node: InProcessNode, name: str, **labels: str) -> float:
    return node.service.metrics.registry.get_sample_value(name, labels) or 0.0


@defer.inlineCallbacks
def until(predicate: Callable[[], Any], what: str, timeout: float = 15.0):  # type: ignore[no-untyped-def]
    """Poll a real process's state (no event tells it) until ``predicate`` holds, bounded."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if isinstance(value, defer.Deferred):
            value = yield value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        yield task.deferLater(reactor, 0.02, lambda: None)


@defer.inlineCallbacks
def devserver_loads(backend: DevServer):  # type: ignore[no-untyped-def]
    reply = yield http("GET", backend.rest_url + "/devserver/loads", timeout=10)
    return reply.json()["loads"]


def leftovers(root: str, name: str) -> list[str]:
    """Every file or staging directory of ``name`` in a disk cache: a half model, if any."""
    found = []
    for dirpath, dirs, files in os.walk(os.path.join(root, name)):
        found += [os.path.join(dirpath, d) for d in dirs if d.startswith(STAGING_PREFIX)]
        found += [os.path.join(dirpath, f) for f in files]
    return found


def elapsed_since(started: float) -> float:
    return time.monotonic() - started


class FaultTestCase(unittest.TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.backend = shared.backend()
        self.models = model_source()

    @defer.inlineCallbacks
    def node(self, backend: Any = None, models: str | None = None, cache_dir: str | None = None,
             **overrides: Any):  # type: ignore[no-untyped-def]
        node = InProcessNode(node_config(models or self.models, backend or self.backend, cache_dir, **overrides))
        yield node.start()
        self.addCleanup(node.stop)
        return node

    def client(self, target: str) -> GrpcClient:
        client = GrpcClient(target)
        self.addCleanup(client.close)
        return client

    def assertPredicts(self, reply: Reply, expected: list[float]) -> None:
        self.assertEqual(reply.code, 200, reply.body)
        self.assertEqual(reply.json()["predictions"], expected)


class HealthLog:
    """The BackendMonitor's reports (it reports changes only), as Deferreds to wait on."""

    def __init__(self, monitor: Any) -> None:
        self._waiting: list[tuple[bool, defer.Deferred[None]]] = []
        monitor.subscribe(self._report)

    def _report(self, healthy: bool) -> None:
        ready = [d for want, d in self._waiting if want == healthy]
        self._waiting = [(w, d) for w, d in self._waiting if w != healthy]
        for d in ready:
            d.callback(None)

    def next(self, healthy: bool) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((healthy, d))
        return d


# -- 1. TF Serving crashes -------------------------------------------------------------------------
class BackendCrashTests(FaultTestCase):
    @defer.inlineCallbacks
    def test_backend_killed_idle_and_mid_load_then_back_empty(self):  # type: ignore[no-untyped-def]
        """SIGKILL of TF Serving, idle and while it loads a model: requests fail UNAVAILABLE at
        once (no wait for the load timeout); a new TF Serving on the same ports starts EMPTY,
        the node's BackendMonitor notices (a model it believes loaded is NOT_FOUND), forgets
        what was loaded, and the next requests load again from the disk cache (no new copy)
        without restarting tfscache."""
        backend = DevServer()
        yield threads.deferToThread(backend.start)
        self.addCleanup(backend.stop)
        node = yield self.node(backend, serving={"health_interval_seconds": 0.2, "load_timeout_seconds": 30})
        client = self.client(node.grpc_target)
        health = HealthLog(node.service.monitor)
        reply = yield rest_predict(node.rest_url, "f-warm", [1.0])
        self.assertPredicts(reply, [3.0])

        # killed while idle
        down = health.next(False)
        backend.kill()
        # at once: 503 / UNAVAILABLE, not the DEADLINE_EXCEEDED of the 30 s load timeout (nor
        # of the gRPC call's 30 s deadline)
        reply = yield rest_predict(node.rest_url, "f-warm", [1.0])
        self.assertEqual(reply.code, 503, reply.body)
        self.assertIn("f-warm", reply.json()["error"])
        err = yield self.assertFailure(client.predict("f-warm", [1.0], timeout=30), ServingError)
        self.assertEqual(err.code, Code.UNAVAILABLE, err.message)
        reply = yield rest_predict(node.rest_url, "f-cold", [1.0])  # copied, then the load fails
        self.assertEqual(reply.code, 503, reply.body)
        self.assertIn("f-cold", reply.json()["error"])
        yield down  # the node's readiness follows (test_daemon checks /readyz itself)

        up = health.next(True)
        yield threads.deferToThread(backend.start)  # same ports, nothing loaded
        yield up
        self.assertEqual(node.cache.loaded(), [])
        self.assertEqual(node.cache.entries[ModelId("f-warm", 1)].state, State.ON_DISK)
        self.assertEqual(node.service.backend.served(), {})
        for name, expected in (("f-warm", [3.0]), ("f-cold", [4.0])):
            reply = yield rest_predict(node.rest_url, name, [1.0])
            self.assertPredicts(reply, expected)
        self.assertEqual((node.cache.fetches, node.cache.loads), (2, 3))  # reloaded from disk, not copied

        # killed while it loads f-slow
        slow_rest = rest_predict(node.rest_url, "f-slow", [1.0])
        slow_grpc = client.predict("f-slow", [1.0], timeout=30)

        @defer.inlineCallbacks
        def backend_loading():  # type: ignore[no-untyped-def]
            reply = yield http("GET", backend.rest_url + "/v1/models/f-slow", timeout=5)
            return reply.code == 200 and "LOADING" in reply.body.decode()

        yield until(backend_loading, "the DevServer to load f-slow")
        down = health.next(False)
        backend.kill()
        # noticed at once: 503 / UNAVAILABLE, not the DEADLINE_EXCEEDED of the 30 s load timeout
        reply = yield slow_rest
        self.assertEqual(reply.code, 503, reply.body)
        self.assertIn("f-slow", reply.json()["error"])
        err = yield self.assertFailure(slow_grpc, ServingError)
        self.assertEqual(err.code, Code.UNAVAILABLE, err.message)
        reply = yield rest_predict(node.rest_url, "f-warm", [1.0])
        self.assertEqual(reply.code, 503, reply.body)
        self.assertEqual(node.cache.entries[ModelId("f-slow", 1)].state, State.ON_DISK)  # not negatively cached
        yield down

        up = health.next(True)
        yield threads.deferToThread(backend.start)
        yield up
        self.assertEqual(node.cache.loaded(), [])
        resp = yield client.predict("f-slow", [1.0], timeout=30)
        self.assertEqual(list(resp.outputs["y"].float_val), [4.0])
        reply = yield rest_predict(node.rest_url, "f-warm", [1.0])
        self.assertPredicts(reply, [3.0])
        self.assertEqual(node.cache.fetches, 3)
        loads = yield devserver_loads(backend)
        self.assertEqual(loads, {"f-slow/1": 1, "f-warm/1": 1})  # the new backend's own count


    @defer.inlineCallbacks
    def test_not_found_right_after_an_empty_restart_loads_again(self):  # type: ignore[no-untyped-def]
        """TF Serving restarts empty and the next requests come before the backend monitor
        looks (its interval is an hour here): TF Serving answers "Servable not found" for
        models tfscache believes AVAILABLE.  The node verifies (GetModelStatus), forgets what
        TF Serving lost, loads the model again from the disk cache and sends the request once
        more: the client gets its answer, not a 404 / NOT_FOUND."""
        backend = DevServer()
        yield threads.deferToThread(backend.start)
        self.addCleanup(backend.stop)
        node = yield self.node(backend, serving={"health_interval_seconds": 3600})
        client = self.client(node.grpc_target)
        reply = yield rest_predict(node.rest_url, "f-warm", [1.0])
        self.assertPredicts(reply, [3.0])
        resp = yield client.predict("f-cold", [1.0], timeout=30)
        self.assertEqual(list(resp.outputs["y"].float_val), [4.0])

        yield threads.deferToThread(backend.restart)  # same ports, nothing loaded
        self.assertEqual(node.cache.loaded(), [ModelId("f-cold", 1), ModelId("f-warm", 1)])  # not noticed
        reply = yield rest_predict(node.rest_url, "f-warm", [2.0])
        self.assertPredicts(reply, [5.0])
        resp = yield client.predict("f-cold", [2.0], timeout=30)
        self.assertEqual(list(resp.outputs["y"].float_val), [7.0])
        status = yield http("GET", node.rest_url + "/v1/models/f-warm", timeout=10)
        self.assertEqual(status.code, 200, status.body)
        self.assertEqual((node.cache.fetches, node.cache.loads), (2, 4))  # loaded again from disk
        # the first NOT_FOUND told the node that TF Serving restarted: it forgot both models, so
        # f-cold was loaded before its request went to TF Serving
        self.assertEqual(sample(node, "tfscache_reloads_after_not_found_total"), 1)
        loads = yield devserver_loads(backend)
        self.assertEqual(loads, {"f-cold/1": 1, "f-warm/1": 1})  # the new backend's own count


# -- 2. corrupt models in the source ------------------------------------------------------------------
class CorruptModelTests(FaultTestCase):
    """A model that TF Serving cannot load: the client gets an error naming it (REST and gRPC,
    the same code), the failure is negatively cached (no second copy, no second load within
    ``serving.failure_backoff_seconds``), other models keep serving, and the bad copy is deleted
    from the disk cache: "no half model" means nothing of it stays, neither a staging directory
    nor the complete-but-unloadable copy (so the retry after the back-off copies the source
    again, which may have been fixed)."""

    @defer.inlineCallbacks
    def assertBrokenModel(self, name: str, detail: str):  # type: ignore[no-untyped-def]
        node = yield self.node()
        client = self.client(node.grpc_target)
        reply = yield rest_predict(node.rest_url, "f-warm", [1.0])
        self.assertPredicts(reply, [3.0])
        reloads = node.service.backend.reloads_sent
        reply = yield rest_predict(node.rest_url, name, [1.0])
        message = reply.json()["error"]
        self.assertIn(f"Model {name} version 1 failed to load", message)
        self.assertEqual(reply.code, 404)  # TF Serving's code for a servable that did not load
        if self.backend.kind == "devserver":  # the rest of the message is TF Serving's own
            self.assertIn(detail, message)
        self.assertEqual(node.service.backend.reloads_sent, reloads + 1)
        err = yield self.assertFailure(client.predict(name, [1.0]), ServingError)
        self.assertEqual(reply.code, ServingError(err.code, "").http_status)  # one code, two protocols
        self.assertIn(f"Model {name} version 1 failed to load", err.message)
        reply = yield rest_predict(node.rest_url, name, [1.0], version=1)
        self.assertIn(name, reply.json()["error"])
        # negatively cached: one copy, one load attempt, nothing sent to TF Serving again
        self.assertEqual(node.service.backend.reloads_sent, reloads + 1)
        self.assertEqual(node.cache.fetches, 2)
        self.assertEqual(sample(node, "tfscache_loads_total", outcome="error"), 1)
        self.assertEqual(sample(node, "tfscache_load_failures_total"), 1)
        [entry] = [e for e in node.cache.snapshot() if e["name"] == name]
        self.assertEqual(entry["state"], "failed")
        self.assertIn(name, entry["error"])
        # other models: a warm one and a cold one
        reply = yield rest_predict(node.rest_url, "f-warm", [2.0])
        self.assertPredicts(reply, [5.0])
        resp = yield client.predict("f-cold", [2.0])
        self.assertEqual(list(resp.outputs["y"].float_val), [7.0])
        root = node.cache.disk.root
        self.assertEqual(leftovers(root, name), [])
        self.assertFalse(os.path.exists(os.path.join(root, name)))
        self.assertNotIn(ModelId(name, 1), node.cache.disk)
        self.assertEqual(sorted(os.listdir(root)), ["f-cold", "f-warm"])

    def test_saved_model_pb_is_garbage(self) -> defer.Deferred[None]:
        return self.assertBrokenModel("f-badpb", "Cannot parse file")

    def test_variables_missing(self) -> defer.Deferred[None]:
        return self.assertBrokenModel("f-novars", "not a valid checkpoint")

    def test_version_directory_without_saved_model_pb(self) -> defer.Deferred[None]:
        # TF Serving says NOT_FOUND here: still the model's fault, so still negatively cached
        return self.assertBrokenModel("f-nopb", "Could not find SavedModel .pb")

    @defer.inlineCallbacks
    def test_model_files_without_a_version_directory(self):  # type: ignore[no-untyped-def]
        """TF Serving's layout wants <name>/<version>/: files right under <name>/ are no
        version, so there is nothing to copy or load: NOT_FOUND, as TF Serving answers."""
        node = yield self.node()
        reply = yield rest_predict(node.rest_url, "f-flat", [1.0])
        self.assertEqual((reply.code, reply.json()), (404, {"error": "Servable not found for request: Latest(f-flat)"}))
        client = self.client(node.grpc_target)
        err = yield self.assertFailure(client.predict("f-flat", [1.0], version=1), ServingError)
        self.assertEqual((err.code, err.message),
                         (Code.NOT_FOUND, "Servable not found for request: Specific(f-flat, 1)"))
        self.assertEqual((node.cache.fetches, node.service.backend.reloads_sent), (0, 1))  # 1: the reset
        self.assertEqual(os.listdir(node.cache.disk.root), [])
        reply = yield rest_predict(node.rest_url, "f-warm", [1.0])
        self.assertPredicts(reply, [3.0])

    @defer.inlineCallbacks
    def test_fixed_source_is_copied_again_after_the_back_off(self):  # type: ignore[no-untyped-def]
        source = tempfile.mkdtemp(prefix="tfscache-faults-fixme-")
        self.addCleanup(shutil.rmtree, source, True)
        write_corrupt_model(source, "f-fixme", 1)
        node = yield self.node(models=source, serving={"failure_backoff_seconds": 1.0})
        reply = yield rest_predict(node.rest_url, "f-fixme", [1.0])
        self.assertIn("Model f-fixme version 1 failed to load", reply.json()["error"])
        shutil.rmtree(os.path.join(source, "f-fixme", "1"))  # the operator puts a good model in place
        copy_version(os.path.join(self.models, "f-cold", "1"), source, "f-fixme")
        reply = yield rest_predict(node.rest_url, "f-fixme", [1.0])  # within the back-off: no retry
        self.assertIn("failed to load", reply.json()["error"])
        self.assertEqual(node.cache.fetches, 1)
        entry = node.cache.entries[ModelId("f-fixme", 1)]
        yield task.deferLater(reactor, max(entry.retry_after - node.cache.now(), 0) + 0.05, lambda: None)
        reply = yield rest_predict(node.rest_url, "f-fixme", [1.0])
        self.assertPredicts(reply, [4.0])
        self.assertEqual((node.cache.fetches, node.cache.loads), (2, 1))


# -- 3. disk full during a copy -------------------------------------------------------------------------
# the node's process: no file may grow past FSIZE_LIMIT, so writes fail with EFBIG as they fail
# with ENOSPC on a full disk (Python ignores SIGXFSZ, which would kill it instead)
FILE_SIZE_LIMIT = (f"--fsize={FSIZE_LIMIT}:unlimited",)


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


class DiskFullTests(FaultTestCase):
    @defer.inlineCallbacks
    def test_copy_into_a_full_disk_then_room_again(self):  # type: ignore[no-untyped-def]
        """A copy that cannot be written fails with an error naming the model; the staging
        directory goes, the books do not count it, other models (warm and cold) still serve,
        nothing is negatively cached: once there is room, the same model loads.  (Tests run as
        root, so a read-only directory would not stop the writes: the node runs under a file
        size limit instead, which the test lifts with prlimit.)"""
        cache_dir = tempfile.mkdtemp(prefix="tfscache-faults-full-")
        self.addCleanup(shutil.rmtree, cache_dir, True)
        proc = NodeProcess(node_config(self.models, self.backend, cache_dir), limits=FILE_SIZE_LIMIT)
        node = yield threads.deferToThread(proc.start)
        self.addCleanup(node.stop)
        client = self.client(node.grpc_target)
        reply = yield rest_predict(node.rest_url, "f-warm", [1.0])
        self.assertPredicts(reply, [3.0])

        reply = yield rest_predict(node.rest_url, "f-big", [1.0])
        self.assertEqual(reply.code, 503, reply.body)
        message = reply.json()["error"]
        self.assertIn("Could not copy model f-big version 1 into the cache: File too large", message)
        err = yield self.assertFailure(client.predict("f-big", [1.0]), ServingError)
        self.assertEqual(err.code, Code.UNAVAILABLE)
        self.assertIn("Could not copy model f-big version 1", err.message)
        self.assertEqual(leftovers(cache_dir, "f-big"), [])

        reply = yield rest_predict(node.rest_url, "f-warm", [2.0])
        self.assertPredicts(reply, [5.0])
        resp = yield client.predict("f-small", [2.0])
        self.assertEqual(list(resp.outputs["y"].float_val), [7.0])
        reply = yield http("GET", node.rest_url + "/metrics")
        m = parse_metrics(reply.body.decode())
        self.assertEqual(m['tfscache_fetches_total{outcome="error"}'], 2)  # not negatively cached
        self.assertEqual(m["tfscache_models_on_disk"], 2)
        on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache_dir) for f in fs)
        self.assertEqual(m["tfscache_disk_bytes"], on_disk)
        self.assertLess(on_disk, FSIZE_LIMIT)

        unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
        resource.prlimit(node.process.pid, resource.RLIMIT_FSIZE, unlimited)  # room again
        reply = yield rest_predict(node.rest_url, "f-big", [1.0])
        self.assertPredicts(reply, [4.0])
        copied = os.path.join(cache_dir, "f-big", "1", "assets.extra", "padding.bin")
        self.assertEqual(os.path.getsize(copied), BIG_PADDING)


    @defer.inlineCallbacks
    def test_unwritable_model_directory(self):  # type: ignore[no-untyped-def]
        """The cache cannot hold a model's directory (a file where it should go; as root,
        permissions would not stop the write): a clear error naming the model, nothing
        written, nothing negatively cached, other models serve; once the path is free, the
        same model loads."""
        cache_dir = tempfile.mkdtemp(prefix="tfscache-faults-unwritable-")
        self.addCleanup(shutil.rmtree, cache_dir, True)
        node = yield self.node(cache_dir=cache_dir)
        blocker = os.path.join(cache_dir, "f-small")
        with open(blocker, "wb") as f:
            f.write(b"not a directory")
        reply = yield rest_predict(node.rest_url, "f-small", [1.0])
        self.assertEqual(reply.code, 503, reply.body)
        self.assertIn("Could not copy model f-small version 1 into the cache", reply.json()["error"])
        with open(blocker, "rb") as f:
            self.assertEqual(f.read(), b"not a directory")
        self.assertEqual(sorted(os.listdir(cache_dir)), ["f-small"])
        reply = yield rest_predict(node.rest_url, "f-warm", [1.0])
        self.assertPredicts(reply, [3.0])
        os.remove(blocker)
        reply = yield rest_predict(node.rest_url, "f-small", [2.0])
        self.assertPredicts(reply, [7.0])


class MountedDiskTests(FaultTestCase):
    """The disk cache on a real file system that fails: a small tmpfs that fills up part way
    through a copy (ENOSPC, where DiskFullTests has a file size limit), and a cache directory
    remounted read-only (EROFS: as root, permissions would not stop a write, a read-only mount
    does).  The same promises: an error naming the model, nothing half-written left, other
    models serve, nothing negatively cached, so the same model loads once the disk is fixed.
    Mounting needs root and a sandbox that allows it; skipped otherwise."""

    @defer.inlineCallbacks
    def mount(self, *args: str):  # type: ignore[no-untyped-def]
        if os.geteuid() != 0:
            raise unittest.SkipTest("mounting a file system needs root")
        mount = shutil.which("mount")
        if mount is None:
            raise unittest.SkipTest("no mount(8) on this system")
        _out, err, code = yield utils.getProcessOutputAndValue(mount, args, env=os.environ)
        if code != 0:
            raise unittest.SkipTest(f"mount {' '.join(args)} refused: {err.decode().strip()}")

    @defer.inlineCallbacks
    def unmount(self, path: str):  # type: ignore[no-untyped-def]
        umount = shutil.which("umount") or "umount"
        _out, err, code = yield utils.getProcessOutputAndValue(umount, (path,), env=os.environ)
        if code != 0:  # still busy (a file open in it): detach it anyway, so no mount outlives the test
            _out, lazy_err, code = yield utils.getProcessOutputAndValue(umount, ("-l", path), env=os.environ)
            if code != 0:
                raise AssertionError(f"could not unmount {path}: {err.decode()} {lazy_err.decode()}")

    @defer.inlineCallbacks
    def mounted_cache_dir(self, kind: str, args: Callable[[str], tuple[str, ...]]):  # type: ignore[no-untyped-def]
        """A fresh directory with a file system mounted on it (``mount *args(dir)``),
        unmounted and removed in the cleanup (after the node stops: cleanups run last first)."""
        path = tempfile.mkdtemp(prefix=f"tfscache-faults-{kind}-")
        self.addCleanup(shutil.rmtree, path, True)
        yield self.mount(*args(path))
        self.addCleanup(self.unmount, path)
        return path

    @defer.inlineCallbacks
    def assert_copy_fails(self, node, client, name, os_error):  # type: ignore[no-untyped-def]
        """REST and gRPC both answer UNAVAILABLE with the copy's OS error, naming the model."""
        expected = f"Could not copy model {name} version 1 into the cache: {os_error}"
        reply = yield rest_predict(node.rest_url, name, [1.0])
        self.assertEqual(reply.code, 503, reply.body)
        self.assertIn(expected, reply.json()["error"])  # after the router's "No owner of model ..."
        err = yield self.assertFailure(client.predict(name, [1.0]), ServingError)
        self.assertEqual(err.code, Code.UNAVAILABLE, err.message)
        self.assertIn(expected, err.message)

    @defer.inlineCallbacks
    def test_copy_into_a_full_tmpfs_then_room_again(self):  # type: ignore[no-untyped-def]
        cache_dir = yield self.mounted_cache_dir(
            "tmpfs", lambda path: ("-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", path))
        node = yield self.node(cache_dir=cache_dir)  # capacity_bytes (10 GiB) is not what stops it
        client = self.client(node.grpc_target)
        reply = yield rest_predict(node.rest_url, "f-warm", [1.0])
        self.assertPredicts(reply, [3.0])

        yield self.assert_copy_fails(node, client, "f-big", "No space left on device (errno 28)")
        # no file and no staging directory; an empty f-big/ stays (no bytes, and a restart's scan
        # skips a model directory without versions)
        self.assertEqual(leftovers(cache_dir, "f-big"), [])
        disk = node.cache.disk
        self.assertNotIn(ModelId("f-big", 1), disk)
        self.assertEqual(disk.reserved_bytes, 0)  # the failed copies' reservations were given back

        reply = yield rest_predict(node.rest_url, "f-warm", [2.0])
        self.assertPredicts(reply, [5.0])
        resp = yield client.predict("f-small", [2.0])  # a cold model still fits in what is left
        self.assertEqual(list(resp.outputs["y"].float_val), [7.0])
        self.assertEqual(sample(node, "tfscache_fetches_total", outcome="error"), 2)  # not negatively cached
        on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache_dir) for f in fs)
        self.assertEqual(disk.used_bytes, on_disk)
        self.assertEqual(sorted(os.path.relpath(disk.path(m), cache_dir) for m in disk.model_ids()),
                         ["f-small/1", "f-warm/1"])

        yield self.mount("-o", f"remount,size={ROOMY_TMPFS_SIZE}", cache_dir)  # room again
        reply = yield rest_predict(node.rest_url, "f-big", [1.0])
        self.assertPredicts(reply, [4.0])
        copied = os.path.join(cache_dir, "f-big", "1", "assets.extra", "padding.bin")
        self.assertEqual(os.path.getsize(copied), BIG_PADDING)
        self.assertEqual([p for p in leftovers(cache_dir, "f-big") if STAGING_PREFIX in p], [])

    @defer.inlineCallbacks
    def test_cache_directory_remounted_read_only_then_writable(self):  # type: ignore[no-untyped-def]
        # bound onto itself: a mount of its own, to remount read-only without touching /tmp
        cache_dir = yield self.mounted_cache_dir("ro", lambda path: ("--bind", path, path))
        node = yield self.node(cache_dir=cache_dir)
        client = self.client(node.grpc_target)
        reply = yield rest_predict(node.rest_url, "f-warm", [1.0])
        self.assertPredicts(reply, [3.0])

        yield self.mount("-o", "remount,ro,bind", cache_dir)
        with self.assertRaises(OSError) as raised:  # really read-only, even to root
            open(os.path.join(cache_dir, "probe"), "w").close()
        self.assertEqual(raised.exception.errno, errno.EROFS)
        yield self.assert_copy_fails(node, client, "f-small", "Read-only file system (errno 30)")
        self.assertEqual(sorted(os.listdir(cache_dir)), ["f-warm"])  # nothing of f-small, not even its directory
        self.assertNotIn(ModelId("f-small", 1), node.cache.disk)
        self.assertEqual(node.cache.disk.reserved_bytes, 0)
        reply = yield rest_predict(node.rest_url, "f-warm", [2.0])  # its touch() cannot write: no matter
        self.assertPredicts(reply, [5.0])
        self.assertEqual(sample(node, "tfscache_fetches_total", outcome="error"), 2)  # not negatively cached

        yield self.mount("-o", "remount,rw,bind", cache_dir)
        reply = yield rest_predict(node.rest_url, "f-small", [2.0])
        self.assertPredicts(reply, [7.0])
        self.assertEqual(sorted(os.listdir(cache_dir)), ["f-small", "f-warm"])


# -- 4. the model source is slow or unreachable -----------------------------------------------------------
class BlackHole:
    """A TCP port that accepts connections (the kernel does, from the backlog) and never
    answers a byte."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()  # the waiting connections are reset: their readers stop at once


class SlowRelay:
    """A TCP relay to ``upstream`` that passes the upstream's answers on at ``rate`` bytes per
    second: a slow network between the node and its model source (the source itself is real)."""

    def __init__(self, upstream: int, rate: int) -> None:
        self.upstream, self.rate = upstream, rate
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sockets: list[socket.socket] = [self.sock]
        threading.Thread(target=self._accept, name="slow-relay", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
                upstream = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                return
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, 0), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, self.rate), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, rate: int) -> None:
        try:
            while data := src.recv(4096 if rate else 65536):
                dst.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)  # pacing the bandwidth, not synchronisation
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def s3_server() -> S3Server:
    def start() -> S3Server:
        server = S3Server().start()
        client = server.boto3_client()
        client.create_bucket(Bucket="faults")
        big = os.path.join(model_source(), "f-big", "1")
        for dirpath, _dirs, files in os.walk(big):
            for f in files:
                path = os.path.join(dirpath, f)
                client.upload_file(path, "faults", "m/f-big/1/" + os.path.relpath(path, big))
        return server

    return shared.shared("faults-s3", start, lambda s: s.stop())


class ProviderFaultTests(FaultTestCase):
    """The S3 source fails: a closed port (refused at once), a port that accepts and never
    answers, a source that answers slowly.  The client gets an error naming the model within
    ``model_provider.fetch_timeout_seconds``, nothing half-copied stays, and a model already in
    the disk cache keeps serving with low latency all the while."""

    @defer.inlineCallbacks
    def s3_node(self, endpoint: str, fetch_timeout: float):  # type: ignore[no-untyped-def]
        cache_dir = tempfile.mkdtemp(prefix="tfscache-faults-s3-")
        self.addCleanup(shutil.rmtree, cache_dir, True)
        copy_version(os.path.join(self.models, "f-warm", "1"), cache_dir, "f-warm")  # warm on disk
        node = yield self.node(cache_dir=cache_dir, model_provider={
            "type": "s3", "fetch_timeout_seconds": fetch_timeout,
            "s3": {"bucket": "faults", "prefix": "m/", "region": "us-east-1", "endpoint_url": endpoint,
                   "access_key_id": S3Server.access_key, "secret_access_key": S3Server.secret_key}})
        reply = yield rest_predict(node.rest_url, "f-warm", [1.0], version=1)
        self.assertPredicts(reply, [3.0])
        return node

    @defer.inlineCallbacks
    def cold_while_warm_serves(self, node: InProcessNode, name: str):  # type: ignore[no-untyped-def]
        """Ask for a cold model; while it is stuck, the warm one answers fast.  Returns the
        cold reply, the seconds it took, and the warm latencies."""
        started = time.monotonic()
        cold = rest_predict(node.rest_url, name, [1.0], version=1)
        latencies = []
        while not cold.called and len(latencies) < 20:
            t = time.monotonic()
            reply = yield rest_predict(node.rest_url, "f-warm", [2.0], version=1)
            latencies.append(time.monotonic() - t)
            self.assertPredicts(reply, [5.0])
        reply = yield cold
        return reply, elapsed_since(started), latencies

    @defer.inlineCallbacks
    def test_closed_port(self):  # type: ignore[no-untyped-def]
        node = yield self.s3_node(f"http://127.0.0.1:{unused_port()}", fetch_timeout=10)
        reply, seconds, latencies = yield self.cold_while_warm_serves(node, "f-cold")
        self.assertEqual(reply.code, 503, reply.body)
        self.assertIn("Could not reach S3 bucket 'faults'", reply.json()["error"])
        self.assertIn("model f-cold", reply.json()["error"])
        # before its fetch timeout (a 504 "timed out after 10s"): a refused connection is an answer
        self.assertNotIn("timed out", reply.json()["error"])

    @defer.inlineCallbacks
    def test_source_accepts_and_never_answers(self):  # type: ignore[no-untyped-def]
        hole = BlackHole()
        node = yield self.s3_node(f"http://127.0.0.1:{hole.port}", fetch_timeout=1.5)
        self.addCleanup(hole.close)  # runs before the node stops: its stuck reads end
        reply, seconds, latencies = yield self.cold_while_warm_serves(node, "f-cold")
        self.assertEqual(reply.code, 504, reply.body)
        self.assertEqual(reply.json()["error"], "Listing the versions of model f-cold timed out after 1.5s: "
                                                "the model source did not answer")
        self.assertGreater(seconds, 1.4)  # it waited for its timeout (no upper bound: a busy machine)
        self.assertGreater(len(latencies), 1)  # it answered while the cold request was stuck

    @defer.inlineCallbacks
    def test_slow_copy_times_out(self):  # type: ignore[no-untyped-def]
        server = yield threads.deferToThread(s3_server)
        relay = SlowRelay(server.port, rate=256 * 1024)  # f-big needs 8 s at this rate
        self.addCleanup(relay.close)
        # 4 s: the listing through the relay must fit in it on a busy machine, the copy (8 s) not
        node = yield self.s3_node(f"http://127.0.0.1:{relay.port}", fetch_timeout=4)
        reply, seconds, latencies = yield self.cold_while_warm_serves(node, "f-big")
        self.assertEqual(reply.code, 504, reply.body)
        self.assertIn("Copy of model f-big version 1 timed out after 4s", reply.json()["error"])
        self.assertGreater(seconds, 3.9)
        self.assertGreater(len(latencies), 1)  # it answered while the copy was stuck
        yield node.cache.provider.wait_idle()  # the copy's threads clean up after the error
        self.assertEqual(leftovers(node.cache.disk.root, "f-big"), [])
        self.assertEqual(sample(node, "tfscache_fetches_total", outcome="error"), 1)
        self.assertNotIn(ModelId("f-big", 1), node.cache.disk)


# -- 5. request deadlines and cancelled requests ---------------------------------------------------------
class DeadlineTests(FaultTestCase):
    @defer.inlineCallbacks
    def test_client_deadline_shorter_than_the_load(self):  # type: ignore[no-untyped-def]
        """The gRPC client's own deadline (1 s) is shorter than the load (2 s): the client gets
        DEADLINE_EXCEEDED at its deadline, the node's handler gives up then too (it read the
        deadline from the call), the load goes on, and the next request is served by it."""
        node = yield self.node()
        client = self.client(node.grpc_target)
        before = yield devserver_loads(self.backend)
        started = time.monotonic()
        err = yield self.assertFailure(client.predict("f-deadline", [1.0], timeout=1.0), ServingError)
        seconds = elapsed_since(started)
        self.assertEqual(err.code, Code.DEADLINE_EXCEEDED)
        self.assertGreater(seconds, 0.9)  # not before its deadline (no upper bound: a busy machine)
        counted = {"protocol": "grpc", "api": "Predict", "code": "DEADLINE_EXCEEDED"}
        yield until(lambda: sample(node, "tfscache_requests_total", **counted) == 1, "the handler to give up")
        self.assertEqual(sample(node, "tfscache_requests_in_flight"), 0)
        # the handler gave up while the load still runs (and the load goes on)
        self.assertEqual(node.cache.entries[ModelId("f-deadline", 1)].state, State.LOADING)
        resp = yield client.predict("f-deadline", [1.0], timeout=30)
        self.assertEqual(list(resp.outputs["y"].float_val), [4.0])
        after = yield devserver_loads(self.backend)
        self.assertEqual(after.get("f-deadline/1", 0) - before.get("f-deadline/1", 0), 1)
        self.assertEqual(node.cache.loads, 1)

    @defer.inlineCallbacks
    def test_cancelled_calls_free_their_threads_and_the_load_goes_on(self):  # type: ignore[no-untyped-def]
        """Two gRPC clients wait for a slow load and cancel.  The node has two gRPC threads:
        unless the cancellation reaches the handlers, both stay blocked until the load ends and
        a third call, for a warm model, waits behind them.  The shared load is not cancelled."""
        node = yield self.node(listen={"grpc_threads": 2})
        client = self.client(node.grpc_target)
        resp = yield client.predict("f-warm", [1.0])
        self.assertEqual(list(resp.outputs["y"].float_val), [3.0])
        calls = [client.predict("f-cancel", [1.0], timeout=60) for _ in range(2)]
        yield until(lambda: sample(node, "tfscache_requests_in_flight") == 2, "both calls to wait for the load")
        for call in calls:
            call.cancel()
        for call in calls:
            yield self.assertFailure(call, defer.CancelledError)
        resp = yield client.predict("f-warm", [2.0], timeout=30)
        self.assertEqual(list(resp.outputs["y"].float_val), [5.0])
        mid = ModelId("f-cancel", 1)
        self.assertEqual(node.cache.entries[mid].state, State.LOADING)  # served before the load ended
        counted = {"protocol": "grpc", "api": "Predict", "code": "CANCELLED"}
        yield until(lambda: sample(node, "tfscache_requests_total", **counted) == 2, "the cancels to be counted")
        self.assertEqual(sample(node, "tfscache_requests_in_flight"), 0)
        resp = yield client.predict("f-cancel", [1.0], timeout=30)  # the same load, finished
        self.assertEqual(list(resp.outputs["y"].float_val), [4.0])
        self.assertEqual(node.cache.entries[mid].loads, 1)

    @defer.inlineCallbacks
    def test_hundreds_of_calls_waiting_for_a_load_do_not_hold_up_a_warm_one(self):  # type: ignore[no-untyped-def]
        """No thread per call: 200 gRPC calls waiting for one slow load (many times what
        listen.grpc_threads once allowed) and a warm model's call is answered while that load
        is still running; then all 200 get their answers from the one load."""
        node = yield self.node(listen={"grpc_threads": 2})
        client = self.client(node.grpc_target)
        resp = yield client.predict("f-warm", [1.0])
        self.assertEqual(list(resp.outputs["y"].float_val), [3.0])
        calls = [client.predict("f-crowd", [1.0], timeout=60) for _ in range(200)]
        yield until(lambda: sample(node, "tfscache_requests_in_flight") == 200, "the calls to wait for the load")
        resp = yield client.predict("f-warm", [2.0], timeout=30)
        self.assertEqual(list(resp.outputs["y"].float_val), [5.0])
        mid = ModelId("f-crowd", 1)
        self.assertEqual(node.cache.entries[mid].state, State.LOADING)  # answered before the load ended
        replies = yield defer.gatherResults(calls)
        self.assertEqual({tuple(r.outputs["y"].float_val) for r in replies}, {(4.0,)})
        self.assertEqual(node.cache.entries[mid].loads, 1)


# -- 6. more cold models than TF Serving may hold ----------------------------------------------------
class OverloadTests(FaultTestCase):
    @defer.inlineCallbacks
    def test_more_cold_models_than_slots(self):  # type: ignore[no-untyped-def]
        """Six cold models, three requests each (REST and gRPC), all at once, into two slots.

        The policy (tfscache/node/manager.py): all requests for one model share one copy and
        one load.  A load needs a slot; a slot is made by unloading the least recently used
        AVAILABLE model that has no request in flight, is not pinned, and was not used within
        ``serving.churn_guard_seconds`` (1 s here).  A load that finds no such model waits up to
        ``serving.capacity_wait_seconds`` (1.5 s here), woken whenever a slot may have become
        free, then fails with RESOURCE_EXHAUSTED (HTTP 429).  So: no deadlock (every request
        ends), no thrashing (a model is loaded at most once for the burst and no model is
        unloaded within its churn guard), and the requests of one model share one outcome."""
        node = yield self.node(serving={"max_models": 2, "churn_guard_seconds": 1.0,
                                        "capacity_wait_seconds": 1.5})
        client = self.client(node.grpc_target)
        names = [f"f-o{i}" for i in range(6)]
        before = yield devserver_loads(self.backend)
        calls, who = [], []
        for name in names:
            calls += [rest_predict(node.rest_url, name, [1.0]), rest_predict(node.rest_url, name, [2.0]),
                      client.predict(name, [3.0], timeout=30)]
            who += [(name, "rest"), (name, "rest"), (name, "grpc")]
        results = yield defer.DeferredList(calls, consumeErrors=True)  # every request ends
        outcomes: dict[str, set[str]] = {}
        for (name, protocol), (ok, result) in zip(who, results, strict=True):
            if protocol == "rest":
                outcome = {200: "OK", 429: "RESOURCE_EXHAUSTED"}.get(result.code, f"HTTP {result.code} {result.body!r}")
            elif ok:
                outcome = "OK"
            else:
                outcome = result.value.code.name if isinstance(result.value, ServingError) else repr(result.value)
            outcomes.setdefault(name, set()).add(outcome)
        for name, seen in outcomes.items():
            self.assertIn(seen, ({"OK"}, {"RESOURCE_EXHAUSTED"}), name)
        served = sorted(n for n, seen in outcomes.items() if seen == {"OK"})
        rejected = sorted(set(names) - set(served))
        self.assertGreaterEqual(len(served), 2)
        self.assertEqual(node.cache.loads, len(served))  # one load per served model, none twice
        self.assertEqual(node.cache.unloads, len(served) - len(node.cache.loaded()))
        self.assertLessEqual(len(node.cache.loaded()), 2)
        self.assertEqual(sample(node, "tfscache_capacity_rejections_total", reason="serving"), len(rejected))
        after = yield devserver_loads(self.backend)
        self.assertEqual({n: after.get(f"{n}/1", 0) - before.get(f"{n}/1", 0) for n in names},
                         {n: int(n in served) for n in names})
        if rejected:  # not refused for good: once a churn guard runs out, there is room
            reply = yield rest_predict(node.rest_url, rejected[0], [1.0])
            self.assertPredicts(reply, [3.0])
            self.assertEqual(node.cache.loads, len(served) + 1)

    @defer.inlineCallbacks
    def test_no_room_in_the_disk_cache_is_counted(self):  # type: ignore[no-untyped-def]
        """A disk cache that cannot take a model answers 429 / RESOURCE_EXHAUSTED, and
        /metrics counts it in tfscache_capacity_rejections_total{reason="disk"} (it counted
        only TF Serving's slots before): a model larger than the whole disk cache, and one that
        would fit but finds the disk full of a model in use."""
        node = yield self.node(disk_cache={"capacity_bytes": 600 * 1024})
        client = self.client(node.grpc_target)
        reply = yield rest_predict(node.rest_url, "f-big", [1.0])  # 2 MiB of padding
        self.assertEqual(reply.code, 429, reply.body)
        self.assertIn("larger than the disk cache", reply.json()["error"])
        mid = yield node.cache.resolve("f-warm", None)
        lease = yield node.cache.acquire(mid)  # on disk and in use: not deleted for room
        self.addCleanup(lease.release)
        # as large as the space left: f-cold's copy needs the room f-warm holds
        node.service.disk.capacity_bytes = node.service.disk.used_bytes + 1
        err = yield self.assertFailure(client.predict("f-cold", [1.0], timeout=30), ServingError)
        self.assertEqual(err.code, Code.RESOURCE_EXHAUSTED, err.message)
        self.assertIn("No room in the disk cache", err.message)
        page = yield http("GET", node.rest_url + "/metrics", timeout=10)
        self.assertIn('tfscache_capacity_rejections_total{reason="disk"} 2.0', page.body.decode())
        self.assertNotIn('tfscache_capacity_rejections_total{reason="serving"}', page.body.decode())


# -- 7. a load that never finishes ------------------------------------------------------------------
HANG_LOAD = 3600.0  # seconds the DevServer takes to load the hanging model: it never finishes here


class StuckLoadTests(FaultTestCase):
    @defer.inlineCallbacks
    def test_a_hung_load_does_not_freeze_the_node(self):  # type: ignore[no-untyped-def]
        """Node A's TF Serving never finishes one load (the DevServer sleeps in it, as TF
        Serving can on a huge or broken model or a slow file system).  TF Serving's reload call
        waits for that load, and config writes are serialised, so before this every other
        cold model of A waited for ``load_timeout_seconds``.  Now the write is bounded by
        ``serving.config_write_timeout_seconds`` (1 s here); past it A's loads are stuck: the
        models A has loaded keep answering there (REST and gRPC), a cold model whose first owner
        is A is served by its next owner B at once, /readyz stays ready and says why, and
        tfscache_loads_stuck is 1."""
        own = DevServer()
        yield threads.deferToThread(own.start)
        self.addCleanup(own.stop)
        models = tempfile.mkdtemp(prefix="tfscache-stuck-")
        b = yield self.node(self.backend, models, node_id="stuck-b")
        members = [{"id": "stuck-b", "host": "127.0.0.1", "rest_port": b.service.rest_port,
                    "grpc_port": b.service.grpc.bound_port}]
        a = yield self.node(own, models, node_id="stuck-a",
                            serving={"config_write_timeout_seconds": 1.0, "load_timeout_seconds": 60},
                            listen={"drain_timeout_seconds": 1},
                            cluster={"replicas_per_model": 2, "discovery": {"type": "static", "members": members}})
        # three models whose first owner is A: one warm, one that hangs, one cold
        names = [f"s-{i}" for i in range(64)]
        warm, hang, cold = [n for n in names if a.service.router.owners_for(n)[0].id == "stuck-a"][:3]
        source = os.path.join(self.models, "f-warm", "1")  # y = 2x + 1
        for name in (warm, hang, cold):
            copy_version(source, models, name)
        set_load_delay(os.path.join(models, hang, "1"), HANG_LOAD)
        client = self.client(a.grpc_target)

        reply = yield rest_predict(a.rest_url, warm, [1.0])
        self.assertPredicts(reply, [3.0])
        hung = rest_predict(a.rest_url, hang, [1.0])
        hung.addErrback(lambda _f: None)  # answered (or cut) only when A stops
        yield until(lambda: a.service.backend.loads_stuck, "node A's loads to be stuck")

        for x in (1.0, 2.0, 3.0):
            reply = yield rest_predict(a.rest_url, warm, [x])
            self.assertPredicts(reply, [2 * x + 1])
            resp = yield client.predict(warm, [x], timeout=30)
            self.assertEqual(list(resp.outputs["y"].float_val), [2 * x + 1])
        reply = yield rest_predict(a.rest_url, cold, [1.0])
        self.assertPredicts(reply, [3.0])
        self.assertIn(ModelId(cold, 1), b.cache.loaded())
        self.assertNotIn(cold, a.service.backend.served())
        self.assertFalse(hung.called, "the hanging load answered")
        self.assertEqual(sample(a, "tfscache_router_forwards_total", target="local", outcome="failover"), 1)
        self.assertEqual(sample(a, "tfscache_loads_stuck"), 1)
        ready = yield http("GET", a.rest_url + "/readyz", timeout=10)
        self.assertEqual(ready.code, 200, ready.body)
        self.assertIn(hang, ready.json()["loads"])
        # the hanging request is the test's to end: its client goes away, and the node's wait
        # for the load (its timers, its connection) ends with it before the clean-up stops A
        hung.cancel()
        yield until(lambda: sample(a, "tfscache_requests_in_flight") == 0, "node A's request to end")

    @defer.inlineCallbacks
    def test_loads_go_on_once_the_slow_load_ends(self):  # type: ignore[no-untyped-def]
        """One node alone, a load slower than the write bound: while it runs, a cold model
        gets UNAVAILABLE at once, marked "this model only" (no other owner here); once the
        slow load is AVAILABLE (GetModelStatus, polled on the node's clock) the loads are no
        longer stuck, the slow request gets its answer, and the cold model loads here."""
        node = yield self.node(serving={"config_write_timeout_seconds": 0.5})
        slow = rest_predict(node.rest_url, "f-slow", [1.0])
        yield until(lambda: node.service.backend.loads_stuck, "the node's loads to be stuck")
        reply = yield rest_predict(node.rest_url, "f-small", [1.0])
        if not slow.called:  # on a very busy machine the slow load may be over already
            self.assertEqual(reply.code, 503, reply.body)
            self.assertIn("f-slow", reply.json()["error"])
            self.assertEqual(reply.headers.getRawHeaders(b"x-tfscache-node-unavailable"), [b"0"])
        reply = yield slow
        self.assertPredicts(reply, [4.0])
        yield until(lambda: not node.service.backend.loads_stuck, "the loads to go on")
        reply = yield rest_predict(node.rest_url, "f-small", [1.0])
        self.assertPredicts(reply, [4.0])
        self.assertEqual(sample(node, "tfscache_loads_stuck"), 0)
