"""The models on local disk: ``<root>/<name>/<version>/``, a byte budget, rebuilt at start-up.

The directory layout is TF Serving's, so ``<root>/<name>`` is directly the ``base_path`` that
the backend loads from (at ``serving_root`` when TF Serving mounts the directory elsewhere).
This object only keeps the books (sizes and recency) and deletes whole version directories;
which models may not be deleted is decided by its owner (the CacheManager protects anything
being loaded or served), which of the others goes first by an eviction policy (``eviction.py``;
LRU unless told otherwise: a deleted model costs a copy later).
"""

from __future__ import annotations

import os
import posixpath
import shutil
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable

from twisted.internet import defer, threads
from twisted.logger import Logger

from tfscache.errors import no_room
from tfscache.modelspec import ModelId
from tfscache.node.eviction import IEvictionPolicy, LRUPolicy
from tfscache.providers.base import STAGING_PREFIX
from tfscache.providers.disk import numeric_children, tree_size


def _scan(root: str) -> list[tuple[ModelId, int, float]]:
    """Blocking: find complete version directories, drop staging leftovers of a crash."""
    found = []
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):
        model_dir = os.path.join(root, name)
        if name.startswith(".") or not os.path.isdir(model_dir):
            continue
        for child in os.listdir(model_dir):
            if child.startswith(STAGING_PREFIX):
                shutil.rmtree(os.path.join(model_dir, child), ignore_errors=True)
        for version in numeric_children(model_dir):
            path = os.path.join(model_dir, str(version))
            found.append((ModelId(name, version), tree_size(path), os.stat(path).st_mtime))
    found.sort(key=lambda t: t[2])  # oldest first: LRU order survives a restart via mtime
    return found


def _retire(path: str) -> str | None:
    """Rename a version directory out of the way (atomic, fast) so a new copy of the same
    model can be renamed into place while the old tree is still being deleted."""
    graveyard = os.path.join(
        os.path.dirname(path), f"{STAGING_PREFIX}evict-{os.path.basename(path)}-{uuid.uuid4().hex}"
    )
    try:
        os.rename(path, graveyard)
    except FileNotFoundError:
        return None
    return graveyard


def _remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    parent = os.path.dirname(path)
    try:
        os.rmdir(parent)  # the model's directory, once its last version is gone
    except OSError:
        pass


class DiskCache:
    log = Logger()

    def __init__(self, root: str, capacity_bytes: int, clock: Callable[[], float] = time.time,
                 policy: IEvictionPolicy | None = None, serving_root: str | None = None) -> None:
        self.root = os.path.abspath(root)
        self.policy: IEvictionPolicy = policy or LRUPolicy()
        # the same directory as TF Serving sees it (``serving.model_path``): its container may
        # mount the shared volume elsewhere; a path in TF Serving's file system, not ours
        self.serving_root = serving_root.rstrip("/") if serving_root else self.root
        self.capacity_bytes = capacity_bytes
        self._clock = clock
        self._used_at: dict[ModelId, float] = {}
        self._mtime_at: dict[ModelId, float] = {}
        self._entries: OrderedDict[ModelId, int] = OrderedDict()  # LRU first
        self.used_bytes = 0
        # room promised to copies under way (make_room -> add or release): copies running at
        # once must not each count the same free bytes
        self._reserved: dict[ModelId, int] = {}
        self.reserved_bytes = 0
        self.evictions = 0
        self.on_evict: Callable[[ModelId, int], None] = lambda mid, size: None

    @property
    def capacity_bytes(self) -> int:
        return self._capacity_bytes

    @capacity_bytes.setter
    def capacity_bytes(self, value: int) -> None:  # SIGHUP may change it
        self._capacity_bytes = value
        self.policy.capacity = float(value)

    # -- books -----------------------------------------------------------------------------
    def start(self) -> defer.Deferred[int]:
        """Rebuild the books from disk; fire with the number of models found."""

        def loaded(found: list[tuple[ModelId, int, float]]) -> int:
            for mid, size, _mtime in found:
                self._entries[mid] = size
                self.used_bytes += size
                self.policy.admitted(mid, size, 0.0)  # its copy's time is not known
            self.log.info(
                "disk cache {root}: {count} models, {bytes} bytes", root=self.root,
                count=len(found), bytes=self.used_bytes,
            )
            return len(found)

        return threads.deferToThread(_scan, self.root).addCallback(loaded)

    def __contains__(self, mid: ModelId) -> bool:
        return mid in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def size_of(self, mid: ModelId) -> int | None:
        return self._entries.get(mid)

    def model_ids(self) -> list[ModelId]:
        return list(self._entries)

    def base_path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def serving_base_path(self, name: str) -> str:
        """The model's ``base_path`` for TF Serving (under ``serving_root``)."""
        return posixpath.join(self.serving_root, name)

    def path(self, mid: ModelId) -> str:
        return os.path.join(self.root, mid.name, str(mid.version))

    # a lease marks its model used: the LRU order in memory at once, the directory's mtime (the
    # order after a restart) at most this often, and all of them at a clean stop (save_order)
    MTIME_EVERY = 10.0

    def requested(self, mid: ModelId) -> None:
        """A request for ``mid`` arrived, on disk or not (the policy counts it)."""
        self.policy.requested(mid)

    def touch(self, mid: ModelId) -> None:
        """Mark used: most recently used end of the LRU (and, now and then, its mtime)."""
        if mid in self._entries:
            self._entries.move_to_end(mid)
            now = self._clock()
            self._used_at[mid] = now
            if now - self._mtime_at.get(mid, 0.0) >= self.MTIME_EVERY:
                self._mtime_at[mid] = now
                self._set_mtime(mid, now)

    def _set_mtime(self, mid: ModelId, when: float) -> None:
        try:
            os.utime(self.path(mid), (when, when))
        except OSError:
            pass

    def save_order(self) -> None:
        """Write every model's last use as its mtime, so the next start rebuilds this LRU
        order (at a clean stop; between two, mtimes lag by at most MTIME_EVERY)."""
        for mid in self._entries:
            when = self._used_at.get(mid)
            if when is not None and when != self._mtime_at.get(mid):
                self._mtime_at[mid] = when
                self._set_mtime(mid, when)

    def add(self, mid: ModelId, size: int, cost: float = 0.0) -> None:
        """A copy is in place (it took ``cost`` seconds): its reservation becomes its real size."""
        self.release(mid)
        old = self._entries.pop(mid, None)
        if old is not None:
            self.used_bytes -= old
        self._entries[mid] = size
        self.used_bytes += size
        self.policy.admitted(mid, size, cost)

    def release(self, mid: ModelId) -> None:
        """Give back the room reserved for a copy that did not complete."""
        self.reserved_bytes -= self._reserved.pop(mid, 0)

    # -- capacity --------------------------------------------------------------------------
    def make_room(self, mid: ModelId, size: int, protected: Iterable[ModelId]) -> defer.Deferred[None]:
        """Delete directories (the policy's choice, in turn) until ``size`` more bytes fit, and
        reserve them for ``mid`` until ``add`` (the copy is in place) or ``release`` (it failed).

        ``protected`` models (being loaded or served) are never deleted.  Fails with
        RESOURCE_EXHAUSTED when even deleting every unprotected model would not do."""
        self.release(mid)  # a new attempt replaces an old reservation
        if size > self.capacity_bytes:
            return defer.fail(no_room(
                f"Model {mid.name} version {mid.version} ({size} bytes) is larger than the disk "
                f"cache ({self.capacity_bytes} bytes)",
            ))
        keep = set(protected)
        victims: list[tuple[ModelId, int]] = []
        free = self.capacity_bytes - self.used_bytes - self.reserved_bytes
        if free < size:
            # least recently used first, as the policy expects them
            candidates = [c for c in self._entries if c not in keep and c != mid]
            if free + sum(self._entries[c] for c in candidates) >= size:
                while free < size:
                    chosen = self.policy.victim(candidates)
                    cand = next((c for c in candidates if c == chosen), None)
                    if cand is None:
                        break
                    candidates.remove(cand)
                    victims.append((cand, self._entries[cand]))
                    free += self._entries[cand]
        if free < size:
            return defer.fail(no_room(
                f"No room in the disk cache for model {mid.name} version {mid.version} ({size} "
                "bytes): the models on disk are all in use or being copied",
            ))
        self._reserved[mid] = size
        self.reserved_bytes += size
        return self._delete(victims, "capacity")

    def evict(self, mid: ModelId, reason: str = "admin") -> defer.Deferred[None]:
        size = self._entries.get(mid)
        if size is None:
            return defer.succeed(None)
        return self._delete([(mid, size)], reason)

    def _delete(self, victims: list[tuple[ModelId, int]], reason: str) -> defer.Deferred[None]:
        # forget them at once (the bytes are as good as free for the next reservation), then
        # delete in a thread; each line is logged once its directory is gone, with the time
        # that took
        retired: list[tuple[ModelId, int, str | None, float]] = []
        for mid, size in victims:
            self._entries.pop(mid, None)
            self._used_at.pop(mid, None)
            self._mtime_at.pop(mid, None)
            self.used_bytes -= size
            self.policy.removed(mid)
            self.evictions += 1
            started = time.monotonic()
            path = _retire(self.path(mid))
            retired.append((mid, size, path, time.monotonic() - started))
            self.on_evict(mid, size)

        def remove_all() -> list[float]:
            durations = []
            for _mid, _size, path, seconds in retired:
                started = time.monotonic()
                if path is not None:
                    _remove(path)
                durations.append(seconds + time.monotonic() - started)
            return durations

        def logged(durations: list[float]) -> None:
            for (mid, size, _path, _s), seconds in zip(retired, durations, strict=True):
                self.log.info(
                    "disk evict model={model} version={version} bytes={bytes} "
                    "seconds={seconds:.3f} reason={reason}",
                    model=mid.name, version=mid.version, bytes=size, seconds=seconds, reason=reason,
                )

        if all(path is None for _m, _s, path, _t in retired):
            logged([seconds for _m, _s, _p, seconds in retired])
            return defer.succeed(None)
        return threads.deferToThread(remove_all).addCallback(logged)
