"""Models from a local or mounted directory laid out as TF Serving expects."""

from __future__ import annotations

import os
import shutil

from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from tfscache.errors import not_found, unavailable
from tfscache.interfaces import IModelProvider
from tfscache.modelspec import validate_name
from tfscache.providers.base import ListingCache, copy_error, staged_copy


def tree_size(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            total += os.lstat(os.path.join(root, f)).st_size
    return total


def numeric_children(path: str) -> list[int]:
    """TF Serving's rule: version directories have int64 names; anything else is ignored."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        if n.isdigit() and os.path.isdir(os.path.join(path, n)):
            out.append(int(n))
    return sorted(out)


@implementer(IModelProvider)
class DiskModelProvider:
    kind = "disk"
    log = Logger()

    def __init__(self, base_path: str, listing_ttl: float = 5.0) -> None:
        self.base_path = os.path.abspath(base_path)
        self.listings = ListingCache(listing_ttl)

    def _model_dir(self, name: str) -> str:
        return os.path.join(self.base_path, validate_name(name))

    def list_versions(self, name: str) -> defer.Deferred[list[int]]:
        path = self._model_dir(name)
        return self.listings.get(name, lambda _n: threads.deferToThread(numeric_children, path))

    def version_size(self, name: str, version: int) -> defer.Deferred[int]:
        src = os.path.join(self._model_dir(name), str(int(version)))

        def size() -> int:
            if not os.path.isdir(src):
                raise not_found(f"Servable not found for request: Specific({name}, {version})")
            return tree_size(src)

        return threads.deferToThread(size)

    def fetch(self, name: str, version: int, destination: str) -> defer.Deferred[int]:
        src = os.path.join(self._model_dir(name), str(int(version)))

        def fill(tmp: str) -> int:
            if not os.path.isdir(src):
                raise not_found(f"Servable not found for request: Specific({name}, {version})")
            # file by file rather than copytree, which would gather a full disk's OSError into a
            # shutil.Error without its errno; links are followed, as TF Serving reads through them
            for root, _dirs, files in os.walk(src, followlinks=True):
                target = os.path.join(tmp, os.path.relpath(root, src))
                os.makedirs(target, exist_ok=True)
                for f in files:
                    shutil.copy2(os.path.join(root, f), os.path.join(target, f))
            return tree_size(tmp)

        def copy() -> int:
            try:
                return staged_copy(destination, fill)
            except Exception as e:
                raise copy_error(name, version, e)

        return threads.deferToThread(copy)

    def check(self) -> defer.Deferred[None]:
        def probe() -> None:
            if not os.path.isdir(self.base_path):
                raise unavailable(f"Model source {self.base_path} is not a readable directory")

        return threads.deferToThread(probe)
