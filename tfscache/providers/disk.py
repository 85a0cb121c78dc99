"""Models from a local or mounted directory laid out as TF Serving expects."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tfscache.errors import Code, ServingError, not_found, unavailable
from tfscache.interfaces import IModelProvider, IVersionLabels
from tfscache.modelspec import LABELS_FILE, parse_labels, validate_name, version_dirs
from tfscache.providers.base import (
    CopyControl,
    CopyStopped,
    ListingCache,
    copy_error,
    staged_copy,
    stale_copy_warning,
)
from tfscache.util.threads import OwnThreadPool


def tree_size(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            total += os.lstat(os.path.join(root, f)).st_size
    return total


def version_directories(path: str) -> dict[int, str]:
    """Version -> directory name under ``path``, by TF Serving's rule: a directory named by an
    int64, leading zeros allowed (``00000123`` is version 123); anything else is ignored."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return {}
    return {v: n for v, n in version_dirs(names).items() if os.path.isdir(os.path.join(path, n))}


def numeric_children(path: str) -> list[int]:
    """The versions under ``path``, ascending (see ``version_directories``)."""
    return sorted(version_directories(path))


@implementer(IModelProvider, IVersionLabels)
class DiskModelProvider:
    """Copies run in the provider's own pool of ``copy_threads`` threads; listings and sizes
    (short calls that warm requests may wait for) stay in the reactor's pool."""

    kind = "disk"
    log = Logger()

    def __init__(
        self, base_path: str, listing_ttl: float = 5.0, *, copy_threads: int = 4,
        reactor: Any,
    ) -> None:
        self.base_path = os.path.abspath(base_path)
        self.listings = ListingCache(listing_ttl)
        self.label_listings = ListingCache(listing_ttl, normalise=dict)
        self._reactor = reactor
        self._threads = OwnThreadPool(reactor, copy_threads, "tfscache-disk-copy", stop_at_shutdown=True,
                                      stop_work=self._stop_all)
        self._jobs: dict[int, CopyControl] = {}
        self._workers: set[defer.Deferred[Any]] = set()
        self._closed = False
        # one file at a time; a seam for tests that need a copy slowed down or held
        self.copy_file: Callable[[str, str], object] = shutil.copy2

    def _model_dir(self, name: str) -> str:
        return os.path.join(self.base_path, validate_name(name))

    def list_versions(self, name: str) -> defer.Deferred[list[int]]:
        path = self._model_dir(name)
        return self.listings.get(name, lambda _n: threads.deferToThread(numeric_children, path))

    def list_labels(self, name: str) -> defer.Deferred[dict[str, int]]:
        """The model's version labels (``<name>/labels.json``; none without the file), cached
        like the version listing: a change in the source takes effect within the TTL."""
        path = os.path.join(self._model_dir(name), LABELS_FILE)

        def read(_name: str) -> dict[str, int]:
            try:
                with open(path, "rb") as f:
                    return parse_labels(name, f.read())
            except FileNotFoundError:
                return {}

        return self.label_listings.get(name, lambda n: threads.deferToThread(read, n))

    def _version_dir(self, name: str, version: int) -> str:
        """The source directory of one version: ``<name>/123`` or a zero-padded
        ``<name>/00000123`` (blocking: call from a thread)."""
        model_dir = self._model_dir(name)
        plain = os.path.join(model_dir, str(int(version)))
        if os.path.isdir(plain):
            return plain
        dirname = version_directories(model_dir).get(int(version))
        return plain if dirname is None else os.path.join(model_dir, dirname)

    def version_size(self, name: str, version: int) -> defer.Deferred[int]:
        self._model_dir(name)  # a bad name fails here, not in a thread

        def size() -> int:
            src = self._version_dir(name, version)
            if not os.path.isdir(src):
                raise not_found(f"Servable not found for request: Specific({name}, {version})")
            return tree_size(src)

        return threads.deferToThread(size)

    def fetch(self, name: str, version: int, destination: str) -> defer.Deferred[int]:
        self._model_dir(name)
        if self._closed:
            return defer.fail(ServingError(Code.UNAVAILABLE, "The disk model source is shut down"))
        control = CopyControl()

        def fill(tmp: str) -> int:
            src = self._version_dir(name, version)
            if not os.path.isdir(src):
                raise not_found(f"Servable not found for request: Specific({name}, {version})")
            # file by file rather than copytree, which would gather a full disk's OSError into a
            # shutil.Error without its errno; links are followed, as TF Serving reads through them
            for root, _dirs, files in os.walk(src, followlinks=True):
                target = os.path.join(tmp, os.path.relpath(root, src))
                os.makedirs(target, exist_ok=True)
                for f in files:
                    control.check()  # a cancelled copy stops at the next file
                    self.copy_file(os.path.join(root, f), os.path.join(target, f))
            return tree_size(tmp)

        def copy() -> int:
            try:
                return staged_copy(destination, fill, control,
                                   stale_copy_warning(self._reactor, self.log, name, version, destination))
            except CopyStopped:
                raise
            except Exception as e:
                raise copy_error(name, version, e)

        def cancel(d: defer.Deferred[int]) -> None:
            if not control.cancel():  # too late to stop: the model is in place, say so
                d.callback(control.copied)
                return
            self.log.info("disk copy cancelled model={model} version={version}",
                          model=name, version=version)

        outer: defer.Deferred[int] = defer.Deferred(cancel)
        worker = self._threads.run(copy)
        self._jobs[id(control)] = control
        self._workers.add(worker)

        def settle(result: Any) -> None:
            self._jobs.pop(id(control), None)
            self._workers.discard(worker)
            if outer.called:  # cancelled: the thread has cleaned up after itself
                if isinstance(result, Failure) and not result.check(CopyStopped):
                    self.log.debug("copy of model={model} version={version} ended after cancel: "
                                   "{error}", model=name, version=version, error=result.value)
            elif isinstance(result, Failure):
                if result.check(CopyStopped):  # stopped by close(), not by a cancel
                    result = Failure(ServingError(
                        Code.UNAVAILABLE,
                        f"Copy of model {name} version {version} stopped: shutting down"))
                outer.errback(result)
            else:
                outer.callback(result)
            return None

        worker.addBoth(settle)
        return outer

    def check(self) -> defer.Deferred[None]:
        def probe() -> None:
            if not os.path.isdir(self.base_path):
                raise unavailable(f"Model source {self.base_path} is not a readable directory")

        return threads.deferToThread(probe)

    # -- lifecycle ---------------------------------------------------------------------------
    def wait_idle(self) -> defer.Deferred[None]:
        """Fire once no copy thread runs any more (after cancels, too)."""
        workers = list(self._workers)
        d = defer.DeferredList(workers, consumeErrors=True) if workers else defer.succeed(None)
        return d.addCallback(lambda _: None)

    def _stop_all(self) -> None:
        for control in list(self._jobs.values()):
            control.cancel()  # each stops at its next file

    def close(self) -> defer.Deferred[None]:
        """Stop running copies, wait for their threads, stop the copy threads."""
        self._closed = True
        self._stop_all()

        def stop(_: Any) -> defer.Deferred[None]:
            return self._threads.stop()

        return self.wait_idle().addCallback(stop)
