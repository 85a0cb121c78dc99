"""CacheManager: makes a model AVAILABLE in the local TF Serving on demand.

Per model id, one state machine::

    ABSENT -> FETCHING -> ON_DISK -> LOADING -> AVAILABLE (-> UNLOADING -> ON_DISK)
                  \\____________________\\_____________-> FAILED (retry after a back-off)

All requests for one cold model share ONE fetch and ONE load (a SharedResult per model); there
is no global lock, so a slow load of one model never holds up another model's requests.  Room
in TF Serving (a count and optionally bytes) is made by unloading an idle model: which one, the
eviction policy decides (``eviction.py``: the least recently used, or the least valuable by
decayed frequency and reload cost); a model with requests in flight (a lease) or pinned is
never unloaded, and a model used within ``churn_guard`` seconds is not unloaded just to make
room (the new load waits, bounded, then gets RESOURCE_EXHAUSTED: no thrashing).  The policy
only chooses among the models these rules leave.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from tfscache.errors import Code, ModelLoadError, ServingError, deadline, invalid, no_room, not_found, unavailable
from tfscache.interfaces import IModelCache, IModelProvider, IServingBackend, IVersionLabels
from tfscache.metrics import Metrics
from tfscache.modelspec import ModelId
from tfscache.node.disk_cache import DiskCache
from tfscache.node.eviction import IEvictionPolicy, LRUPolicy
from tfscache.proto import model_service_pb2
from tfscache.util.deferreds import SharedResult, cancel_when_done, with_timeout


class State(enum.Enum):
    ABSENT = "absent"
    FETCHING = "fetching"
    ON_DISK = "on_disk"
    LOADING = "loading"
    AVAILABLE = "available"
    UNLOADING = "unloading"
    FAILED = "failed"


# States that hold a slot in TF Serving.
_OCCUPYING = (State.LOADING, State.AVAILABLE, State.UNLOADING)


@dataclass
class ModelEntry:
    mid: ModelId
    state: State = State.ABSENT
    size: int = 0
    inflight: int = 0
    last_used: float = 0.0
    hits: int = 0
    loads: int = 0
    pinned: bool = False
    pending: SharedResult | None = None
    failure: ServingError | None = None
    retry_after: float = 0.0
    fetch_seconds: float = 0.0  # the last copy's

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.mid.name, "version": self.mid.version, "state": self.state.value,
            "size_bytes": self.size, "in_flight": self.inflight, "last_used": self.last_used,
            "hits": self.hits, "loads": self.loads, "pinned": self.pinned,
            "error": self.failure.message if self.failure else None,
        }


def _bringing_up(entry: ModelEntry) -> bool:
    """A fetch or load for this entry has started and not handed its result out yet."""
    return entry.pending is not None and not entry.pending.done


class Lease:
    """A model held AVAILABLE for one request; release it when the request is done."""

    def __init__(self, manager: CacheManager, entry: ModelEntry) -> None:
        self._manager, self.entry, self._released = manager, entry, False

    @property
    def model_id(self) -> ModelId:
        return self.entry.mid

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._manager._release(self.entry)


@dataclass
class CacheLimits:
    max_models: int = 10
    max_bytes: int = 0
    memory_factor: float = 1.0
    load_timeout: float = 300.0
    fetch_timeout: float = 600.0
    failure_backoff: float = 30.0
    churn_guard: float = 2.0
    capacity_wait: float = 30.0


@implementer(IModelCache)
class CacheManager:
    log = Logger()

    def __init__(
        self,
        provider: IModelProvider,
        backend: IServingBackend,
        disk: DiskCache,
        limits: CacheLimits,
        metrics: Metrics | None = None,
        *,
        clock: IReactorTime,
        now: Callable[[], float] | None = None,
        policy: IEvictionPolicy | None = None,
    ) -> None:
        self.provider, self.backend, self.disk, self.limits = provider, backend, disk, limits
        # which idle model to unload for room (the rules of who MAY go stay here)
        self.policy: IEvictionPolicy = policy or LRUPolicy()
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.now: Callable[[], float] = now or (lambda: self.clock.seconds())
        self.entries: dict[ModelId, ModelEntry] = {}
        self._room_waiters: list[defer.Deferred[None]] = []
        self._verifying: dict[ModelId, SharedResult] = {}
        # why the model source cannot be read (SourceMonitor), None while it can: a model it
        # does not list is then not known to be absent
        self.source_problem: str | None = None
        self._unlisted: set[str] = set()  # names whose listing said nothing while it could not
        self.fetches = 0
        self.loads = 0
        self.unloads = 0
        disk.on_evict = self._on_disk_evict
        subscribe_stuck = getattr(backend, "subscribe_stuck", None)
        if subscribe_stuck is not None:
            subscribe_stuck(lambda stuck: self.metrics.loads_stuck.set(int(stuck)))

    # -- start-up ----------------------------------------------------------------------------
    def start(self, reset_backend: bool = True) -> defer.Deferred[None]:
        d = self.disk.start()
        d.addCallback(lambda _: self._adopt_disk())
        if reset_backend:
            d.addCallback(lambda _: self.backend.reset())
        return d.addCallback(lambda _: None)

    def _adopt_disk(self) -> None:
        for mid in self.disk.model_ids():
            e = self.entries.setdefault(mid, ModelEntry(mid))
            e.state, e.size = State.ON_DISK, self.disk.size_of(mid) or 0
        self._gauges()

    # -- IModelCache -------------------------------------------------------------------------
    def resolve(self, name: str, version: int | None, label: str | None = None) -> defer.Deferred[ModelId]:
        if label is not None:
            return self._labels(name).addCallback(lambda labels: self._resolve_label(name, label, labels))
        if version is not None:
            mid = ModelId(name, version)
            if mid in self.entries and self.entries[mid].state != State.ABSENT:
                return defer.succeed(mid)

        def pick(versions: list[int]) -> ModelId:
            if self.source_problem is not None and (not versions or (version is not None and version not in versions)):
                # not known to be absent: serve the newest copy here, if any, else say why
                local = sorted(m.version for m, e in self.entries.items() if m.name == name and e.state != State.ABSENT)
                if version is None and local:
                    return ModelId(name, local[-1])
                if len(self._unlisted) < 10_000:
                    self._unlisted.add(name)
                raise unavailable(f"Model {name}: the model source cannot be read: {self.source_problem}")
            if version is None:
                if not versions:
                    raise not_found(f"Servable not found for request: Latest({name})")
                return ModelId(name, versions[-1])
            if version not in versions:
                raise not_found(f"Servable not found for request: Specific({name}, {version})")
            return ModelId(name, version)

        return self._bounded(name, "versions", self.provider.list_versions(name)).addCallback(pick)

    def _bounded(self, name: str, what: str, listing: defer.Deferred[Any]) -> defer.Deferred[Any]:
        if listing.called:
            return listing
        # a source that does not answer must not hold the request forever
        return with_timeout(
            listing, self.limits.fetch_timeout, self.clock,
            lambda: deadline(f"Listing the {what} of model {name} timed out after "
                             f"{self.limits.fetch_timeout:g}s: the model source did not answer"),
        )

    # -- version labels ----------------------------------------------------------------------
    def _labels(self, name: str) -> defer.Deferred[dict[str, int]]:
        """The model's labels from its source (cached there for the listing TTL), handed to
        the backend too, so that TF Serving's own config says what the source says.  Read
        only for requests by label (MultiInference by label included), so traffic by number
        never waits for, nor holds a thread on, the labels file."""
        if not IVersionLabels.providedBy(self.provider):
            return defer.succeed({})

        def tell_backend(labels: dict[str, int]) -> dict[str, int]:
            set_labels = getattr(self.backend, "set_labels", None)
            if set_labels is not None:
                # not waited for: requests by label are pinned to their version; a list that
                # did not go out is sent again with the next change
                set_labels(name, labels).addErrback(
                    lambda f: self.log.warn("version labels of model={model} not sent to TF Serving: "
                                            "{error}", model=name, error=f.getErrorMessage()))
            return labels

        listing = self.provider.list_labels(name)
        return self._bounded(name, "version labels", listing).addCallback(tell_backend)

    def set_source_problem(self, problem: str | None) -> None:
        self.source_problem = problem
        if problem is None:
            # a listing taken while the source could not be read says nothing: list again
            listings = getattr(self.provider, "listings", None)
            for name in self._unlisted:
                if listings is not None:
                    listings.invalidate(name)
            self._unlisted.clear()

    def _resolve_label(self, name: str, label: str, labels: dict[str, int]) -> defer.Deferred[ModelId]:
        if label not in labels and self.source_problem is not None:
            raise unavailable(f"Model {name}: the model source cannot be read: {self.source_problem}")
        if label not in labels:
            # TF Serving's words and code (ServerCore::GetModelVersionForLabel)
            raise invalid(f"Unrecognized servable version label: {label}")
        return self.resolve(name, labels[label])

    def lease_now(self, name: str, version: int | None) -> Lease | None:
        if version is None:
            return None
        mid = ModelId(name, version)
        entry = self.entries.get(mid)
        if entry is None or entry.state != State.AVAILABLE:
            return None
        self._count(mid)
        return self._hit(entry)

    def acquire(self, mid: ModelId, timeout: float | None = None) -> defer.Deferred[Lease]:
        self._count(mid)
        entry = self.entries.get(mid)
        if entry is not None and entry.state == State.AVAILABLE:
            return defer.succeed(self._hit(entry))
        refuses_load = getattr(self.backend, "refuses_load", None)
        if refuses_load is not None and refuses_load(mid.name):
            # TF Serving has not finished a load (serving.py): a cold model goes to its next
            # owner at once (UNAVAILABLE about this model only), not after the load timeout
            return defer.fail(self.backend.stuck_error())  # type: ignore[attr-defined]
        if entry is None:
            entry = self.entries[mid] = ModelEntry(mid)
        if self._backing_off(entry):
            assert entry.failure is not None
            return defer.fail(entry.failure)
        self.metrics.model(self.metrics.misses, mid.name).inc()
        return with_timeout(
            self._join(entry), timeout, self.clock,
            lambda: deadline(
                f"Model {mid.name} version {mid.version} is still loading: the request's deadline "
                "passed (the load goes on and will serve later requests)"
            ),
        )

    def _count(self, mid: ModelId) -> None:
        self.policy.capacity = self._budget()  # max_models / max_bytes may change on SIGHUP
        self.policy.requested(mid)
        self.disk.requested(mid)

    def _hit(self, entry: ModelEntry) -> Lease:
        self.metrics.model(self.metrics.hits, entry.mid.name).inc()
        entry.hits += 1
        return self._lease(entry)

    def _join(self, entry: ModelEntry) -> defer.Deferred[Lease]:
        """Share the entry's bring-up (starting one if none runs) and lease the model after."""
        operation = None
        if entry.pending is None or entry.pending.done:
            operation = defer.ensureDeferred(self._bring_up(entry))
            entry.pending = SharedResult(operation)
        waiter = entry.pending.observe().addCallback(lambda _: self._hand_over(entry))
        if operation is not None:
            # wake loads waiting for room only once every waiter holds its lease (added after
            # observe(), this runs after them even if the bring-up finished synchronously):
            # woken earlier, such a load could unload this model before its requests use it
            operation.addBoth(lambda _: self._wake_room_waiters())
        return waiter

    def _hand_over(self, entry: ModelEntry) -> Lease | defer.Deferred[Lease]:
        if entry.state == State.AVAILABLE:
            return self._lease(entry)
        # no longer loaded by the time this waiter's turn came (TF Serving found empty, say):
        # a lease now would send the request to a model that is not there; bring it up again
        mid = entry.mid
        fresh = self.entries.get(mid)
        if fresh is None:
            fresh = self.entries[mid] = ModelEntry(mid)
        if self._backing_off(fresh):
            assert fresh.failure is not None
            return defer.fail(fresh.failure)
        return self._join(fresh)

    def _backing_off(self, entry: ModelEntry) -> bool:
        return entry.state == State.FAILED and not _bringing_up(entry) and self.now() < entry.retry_after

    def snapshot(self) -> list[dict[str, Any]]:
        return [e.describe() for e in sorted(self.entries.values(), key=lambda e: e.mid)
                if e.state != State.ABSENT or e.failure or e.pinned]

    def pin(self, mid: ModelId, pinned: bool = True) -> None:
        entry = self.entries.get(mid)
        if entry is None:
            if not pinned:
                return  # nothing to unpin: no entry is made for it
            entry = self.entries[mid] = ModelEntry(mid)
        entry.pinned = pinned

    # -- leases ------------------------------------------------------------------------------
    def _lease(self, entry: ModelEntry) -> Lease:
        entry.inflight += 1
        entry.last_used = self.now()
        self.disk.touch(entry.mid)
        return Lease(self, entry)

    def _release(self, entry: ModelEntry) -> None:
        entry.inflight -= 1
        entry.last_used = self.now()
        if entry.inflight == 0:
            self._wake_room_waiters()

    # -- the state machine -------------------------------------------------------------------
    async def _bring_up(self, entry: ModelEntry) -> None:
        mid = entry.mid
        try:
            if entry.state == State.UNLOADING:
                await self._until_not_unloading(entry)
            if entry.state == State.AVAILABLE:
                return
            if mid not in self.disk:
                await self._fetch(entry)
            entry.state = State.ON_DISK
            await self._make_room(entry)
            await self._load(entry)
        except Exception as e:
            err = e if isinstance(e, ServingError) else ServingError(
                Code.INTERNAL, f"Model {mid.name} version {mid.version}: {type(e).__name__}: {e}")
            self._fail(entry, err)
            if entry.state == State.FAILED and mid in self.disk and not entry.pinned:
                # a copy that does not load is bad data: delete it, so the retry after the
                # back-off copies the source again (which may have been fixed meanwhile)
                await self.disk.evict(mid, reason="failed_load")
                self._gauges()
            raise err

    async def _fetch(self, entry: ModelEntry) -> None:
        mid = entry.mid
        entry.state = State.FETCHING
        started = self.now()
        try:
            size = await with_timeout(
                self.provider.version_size(mid.name, mid.version), self.limits.fetch_timeout, self.clock,
                lambda: deadline(f"Sizing model {mid.name} version {mid.version} in the model source "
                                 f"timed out after {self.limits.fetch_timeout:g}s"),
            )
            self.log.debug("fetching model={model} version={version}: {bytes} bytes from the model source",
                           model=mid.name, version=mid.version, bytes=size)
            try:
                await self.disk.make_room(mid, size, self._protected())
            except ServingError as e:
                if e.no_room:
                    self.metrics.rejected.labels(reason="disk").inc()
                raise
            copy = self.provider.fetch(mid.name, mid.version, self.disk.path(mid))
            copied = await with_timeout(
                copy, self.limits.fetch_timeout, self.clock,
                lambda: deadline(f"Copy of model {mid.name} version {mid.version} timed out after "
                                 f"{self.limits.fetch_timeout:g}s"),
            )
        except Exception:
            self.metrics.fetch_done(mid.name, "error")
            self.disk.release(mid)
            entry.state = State.ABSENT
            raise
        elapsed = self.now() - started
        entry.fetch_seconds = elapsed
        self.fetches += 1
        self.metrics.fetch_done(mid.name, "ok")
        self.metrics.fetch_seconds.observe(elapsed)
        self.metrics.fetch_bytes.inc(copied)
        self.disk.add(mid, copied, cost=elapsed)
        entry.size = copied
        self.log.info(
            "fetched model={model} version={version} bytes={bytes} seconds={seconds:.3f}",
            model=mid.name, version=mid.version, bytes=copied, seconds=elapsed,
        )
        self._gauges()

    async def _load(self, entry: ModelEntry) -> None:
        mid = entry.mid
        entry.state = State.LOADING
        entry.size = entry.size or (self.disk.size_of(mid) or 0)
        started = self.now()
        self.log.debug("loading model={model} version={version} into TF Serving", model=mid.name,
                       version=mid.version)
        try:
            await self.backend.load(mid.name, mid.version, self.disk.serving_base_path(mid.name),
                                    self.limits.load_timeout)
        except Exception:
            self.metrics.load_done(mid.name, "error")
            # take it out of the served list again; the next list change sends that
            self.backend.forget(mid.name, mid.version)
            raise
        elapsed = self.now() - started
        entry.state = State.AVAILABLE
        entry.loads += 1
        entry.failure = None
        entry.last_used = self.now()
        self.loads += 1
        # what evicting it would cost: this load again, and the copy if the disk lets it go too
        # (never free: a load measured as 0 s was merely faster than the clock's resolution)
        self.policy.admitted(mid, self._budget_units(entry), max(elapsed + entry.fetch_seconds, 0.001))
        self.metrics.load_done(mid.name, "ok")
        self.metrics.load_seconds.observe(elapsed)
        self.log.info(
            "loaded model={model} version={version} bytes={bytes} seconds={seconds:.3f}",
            model=mid.name, version=mid.version, bytes=entry.size, seconds=elapsed,
        )
        self._gauges()

    def _fail(self, entry: ModelEntry, err: ServingError) -> None:
        mid = entry.mid
        if not isinstance(err, ModelLoadError) and err.code in (
                Code.DEADLINE_EXCEEDED, Code.RESOURCE_EXHAUSTED, Code.UNAVAILABLE, Code.NOT_FOUND,
                Code.INVALID_ARGUMENT, Code.CANCELLED):
            # not the model's fault: no negative caching, the next request tries again
            entry.state = State.ON_DISK if mid in self.disk else State.ABSENT
            if entry.state == State.ABSENT and not entry.pinned and entry.inflight == 0:
                self.entries.pop(mid, None)
        else:
            entry.state = State.FAILED
            entry.failure = err
            entry.retry_after = self.now() + self.limits.failure_backoff
            self.metrics.model(self.metrics.load_failures, mid.name).inc()
        self.log.warn(
            "model={model} version={version} failed: {error}",
            model=mid.name, version=mid.version, error=err.message,
        )

    # -- room in TF Serving -------------------------------------------------------------------
    def _estimate(self, entry: ModelEntry) -> int:
        return int(entry.size * self.limits.memory_factor)

    def _budget(self) -> float:
        """The budget the eviction policy ranks for: bytes when there is a byte budget, else slots."""
        return float(self.limits.max_bytes or self.limits.max_models)

    def _budget_units(self, entry: ModelEntry) -> float:
        return float(self._estimate(entry)) if self.limits.max_bytes else 1.0

    def _fits(self, entry: ModelEntry) -> bool:
        occupying = [e for e in self.entries.values() if e.state in _OCCUPYING and e is not entry]
        if len(occupying) + 1 > self.limits.max_models:
            return False
        if self.limits.max_bytes:
            used = sum(self._estimate(e) for e in occupying)
            return used + self._estimate(entry) <= self.limits.max_bytes or not occupying
        return True

    def _victim(self) -> ModelEntry | None:
        """The policy's choice among the AVAILABLE models that no request holds, nobody pinned
        and nobody used within the churn guard.

        A model whose bring-up has not handed its leases out yet is not idle: its requests
        are about to use it."""
        guard = self.now() - self.limits.churn_guard
        idle = [e for e in self.entries.values()
                if e.state == State.AVAILABLE and e.inflight == 0 and not e.pinned
                and e.last_used <= guard and not _bringing_up(e)]
        if not idle:
            return None
        idle.sort(key=lambda e: e.last_used)  # stable: equals stay in the entries' order
        chosen = self.policy.victim([e.mid for e in idle])
        return next((e for e in idle if e.mid == chosen), None)

    async def _make_room(self, entry: ModelEntry) -> None:
        give_up = self.now() + self.limits.capacity_wait
        while not self._fits(entry):
            victim = self._victim()
            if victim is not None:
                self.log.debug("no room for model={model} version={version}: unloading model={victim} "
                               "version={victim_version}, the eviction policy's choice", model=entry.mid.name,
                               version=entry.mid.version, victim=victim.mid.name, victim_version=victim.mid.version)
                await self.unload(victim.mid, reason="capacity")
                continue
            remaining = give_up - self.now()
            if remaining <= 0:
                self.metrics.rejected.labels(reason="serving").inc()
                raise no_room(
                    f"No room to load model {entry.mid.name} version {entry.mid.version}: all "
                    f"{self.limits.max_models} loaded models are in use",
                )
            self.log.debug("no room for model={model} version={version}: every loaded model is in use; "
                           "waiting up to {seconds:.1f}s", model=entry.mid.name, version=entry.mid.version,
                           seconds=remaining)
            await self._wait_for_room(remaining)
        entry.state = State.LOADING  # takes the slot in the same tick as the check

    def _wait_for_room(self, timeout: float) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred(lambda d: self._room_waiters.remove(d))
        self._room_waiters.append(d)
        # wake up too when the churn guard of the least recently used model runs out
        busy = [e.last_used for e in self.entries.values()
                if e.state == State.AVAILABLE and e.inflight == 0 and not e.pinned]
        wake_in = timeout
        if busy:
            wake_in = min(timeout, max(min(busy) + self.limits.churn_guard - self.now(), 0) + 0.001)
        def wake() -> None:
            if not d.called:
                d.callback(None)

        return cancel_when_done(d, self.clock.callLater(wake_in, wake))

    def _wake_room_waiters(self) -> None:
        waiters, self._room_waiters = self._room_waiters, []
        for d in waiters:
            if not d.called:
                d.callback(None)

    async def _until_not_unloading(self, entry: ModelEntry) -> None:
        while entry.state == State.UNLOADING:  # unload() wakes the waiters when it is done
            await self._wait_for_room(self.limits.load_timeout)

    async def unload(self, mid: ModelId, reason: str = "admin") -> None:
        entry = self.entries.get(mid)
        if entry is None or entry.state != State.AVAILABLE:
            return
        entry.state = State.UNLOADING
        started = self.now()
        try:
            await self.backend.unload(mid.name, mid.version)
            self.log.info(
                "unloaded model={model} version={version} bytes={bytes} seconds={seconds:.3f} reason={reason}",
                model=mid.name, version=mid.version, bytes=entry.size, seconds=self.now() - started,
                reason=reason,
            )
        finally:
            entry.state = State.ON_DISK if mid in self.disk else State.ABSENT
            self.policy.removed(mid)
            self.unloads += 1
            self.metrics.unload_done(mid.name, reason)
            self._gauges()
            self._wake_room_waiters()

    async def backend_lost(self) -> None:
        """TF Serving restarted empty: what we believed AVAILABLE is gone.  Forget it (the next
        request loads again) and send the list of what is still loading."""
        for entry in self.entries.values():
            if entry.state in (State.AVAILABLE, State.UNLOADING):
                entry.state = State.ON_DISK if entry.mid in self.disk else State.ABSENT
                self.policy.removed(entry.mid)
                self.backend.forget(entry.mid.name, entry.mid.version)
        self._gauges()
        self._wake_room_waiters()
        await self.backend.resend()

    def reverify(self, mid: ModelId) -> defer.Deferred[bool]:
        """TF Serving answered NOT_FOUND for ``mid``, which a request held AVAILABLE: ask it
        (GetModelStatus) whether it serves the version.  True when it does not (it restarted
        empty, or dropped the model): the model is forgotten, so the caller's retry loads it
        again; False when it does (the NOT_FOUND is TF Serving's answer to the request).
        Concurrent callers for one model share one check."""
        entry = self.entries.get(mid)
        if entry is None or entry.state != State.AVAILABLE:
            return defer.succeed(True)  # forgotten already (the monitor noticed): load again
        shared = self._verifying.get(mid)
        if shared is None or shared.done:
            shared = self._verifying[mid] = SharedResult(defer.ensureDeferred(self._reverify(entry)))
        return shared.observe()

    async def _reverify(self, entry: ModelEntry) -> bool:
        mid = entry.mid
        try:
            if await self._backend_serves(mid):
                return False
            if entry.state != State.AVAILABLE:
                return True
            # one model gone, or all of them (a restart): a second loaded model tells which
            others = [m for m in self.loaded() if m != mid]
            restarted = not others or not await self._backend_serves(others[0])
        finally:
            self._verifying.pop(mid, None)
        if restarted:
            self.log.warn(
                "TF Serving at {target} answered NOT_FOUND for model={model} version={version}, "
                "loaded here: it restarted empty; forgetting {count} loaded models",
                target=self.backend.grpc_target, model=mid.name, version=mid.version, count=len(self.loaded()),
            )
            await self.backend_lost()
        elif entry.state == State.AVAILABLE:
            self.log.warn(
                "TF Serving at {target} answered NOT_FOUND for model={model} version={version}, "
                "loaded here: it no longer serves it; loading it again",
                target=self.backend.grpc_target, model=mid.name, version=mid.version,
            )
            entry.state = State.ON_DISK if mid in self.disk else State.ABSENT
            self.policy.removed(mid)
            self.backend.forget(mid.name, mid.version)
            self._gauges()
            self._wake_room_waiters()
        return True

    async def _backend_serves(self, mid: ModelId) -> bool:
        try:
            resp = await self.backend.status(mid.name, timeout=2.0)
        except ServingError as e:
            if e.code != Code.NOT_FOUND:
                raise
            return False
        available = model_service_pb2.ModelVersionStatus.AVAILABLE
        return any(s.version == mid.version and s.state == available for s in resp.model_version_status)

    async def evict(self, mid: ModelId) -> None:
        """Admin: unload the model and delete it from disk (refused while it is in use)."""
        entry = self.entries.get(mid)
        if entry is None or (entry.state == State.ABSENT and mid not in self.disk):
            raise not_found(f"Model {mid.name} version {mid.version} is not on this node")
        busy = entry.pinned and "pinned" or entry.inflight and "serving requests" or (
            entry.pending is not None and not entry.pending.done and "being loaded")
        if busy:
            raise ServingError(Code.FAILED_PRECONDITION,
                               f"Model {mid.name} version {mid.version} is {busy}: not evicted")
        if entry.state == State.AVAILABLE:
            await self.unload(mid, reason="admin")
        await self.disk.evict(mid)
        self.entries.pop(mid, None)
        self._gauges()

    # -- disk --------------------------------------------------------------------------------
    def _protected(self) -> set[ModelId]:
        # a copy waiting for a slot in TF Serving is ON_DISK, but about to be loaded: keep it
        return {mid for mid, e in self.entries.items()
                if e.pinned or e.state in (State.FETCHING, *_OCCUPYING) or _bringing_up(e)}

    def _on_disk_evict(self, mid: ModelId, size: int) -> None:
        self.metrics.disk_evictions.inc()
        self.metrics.disk_evicted_bytes.inc(size)
        entry = self.entries.get(mid)
        if entry is not None and entry.state in (State.ON_DISK, State.FAILED) and entry.pending is None:
            self.entries.pop(mid, None)
        elif entry is not None and entry.state == State.ON_DISK:
            entry.state = State.ABSENT

    def _gauges(self) -> None:
        m = self.metrics
        loaded = [e for e in self.entries.values() if e.state == State.AVAILABLE]
        m.models_loaded.set(len(loaded))
        m.bytes_loaded.set(sum(self._estimate(e) for e in loaded))
        m.models_on_disk.set(len(self.disk))
        m.bytes_on_disk.set(self.disk.used_bytes)

    def loaded(self) -> list[ModelId]:
        return sorted(e.mid for e in self.entries.values() if e.state == State.AVAILABLE)
