"""Cluster membership: static list, etcd (lease + watch) or Consul (TTL check + blocking queries).

``make_discovery(cfg, self_member, health_check, clock)`` builds the one the configuration
asks for.  Every implementation is an ``IDiscovery`` and a Twisted ``Service``:

- ``startService`` starts following the member list; ``members()`` never blocks and keeps the
  last known list when the backend is lost.
- ``publish()`` announces this node, and keeps announcing it every ``ttl/3`` while
  ``health_check()`` passes (it stops refreshing, and withdraws, while the check fails).
- ``withdraw()`` removes this node promptly; ``stopService`` withdraws if it was published.

The shared machinery lives here (``DiscoveryBase``): the publishing loop gated on health, the
watch loop with capped exponential backoff, and reachability logged once per outage rather
than once per retry.  All timing goes through an injectable ``clock`` (IReactorTime).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from tfscache.cluster.members import Member
from tfscache.interfaces import IDiscovery
from tfscache.util.deferreds import SharedResult, with_timeout

HealthCheck = Callable[[], defer.Deferred[Any]]
MIN_BACKOFF = 0.25
MAX_BACKOFF = 10.0


def _always_healthy() -> defer.Deferred[Any]:
    return defer.succeed(None)


class _HealthTimeout(Exception):
    pass


@implementer(IDiscovery)
class DiscoveryBase(service.Service):
    """Member list, subscribers, and the publish / watch loops of a dynamic discovery.

    Subclasses implement:

    - ``_refresh()``: make sure this node's record is live (create it, or keep it alive);
    - ``_suspend()``: stop advertising this node (it is unhealthy);
    - ``_remove()``: remove this node's record now (graceful withdraw);
    - ``_follow()``: read the member list and keep following it; return to be restarted at
      once, raise to be restarted after a backoff.
    All three may fail while the backend is unreachable; they are retried with backoff.
    """

    log = Logger()
    backend = "discovery"

    def __init__(
        self,
        self_member: Member,
        health_check: HealthCheck | None = None,
        ttl: float = 10.0,
        clock: IReactorTime | None = None,
        min_backoff: float = MIN_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
    ) -> None:
        from twisted.internet import reactor

        self.self_member = self_member
        self.health_check = health_check or _always_healthy
        self.ttl = float(ttl)
        self.refresh_interval = self.ttl / 3.0
        self.clock: IReactorTime = clock or reactor  # type: ignore[assignment]
        self.min_backoff, self.max_backoff = min_backoff, max_backoff
        self._members: tuple[Member, ...] = ()
        self._subscribers: list[Callable[[list[Member]], None]] = []
        self.reachable = True          # logged once per change, not per retry
        self.healthy: bool | None = None
        self.published = False         # our record is live in the backend, as far as we know
        self._want_published = False
        self._publish_call: Any = None
        self._publishing: SharedResult | None = None
        self._publish_backoff = 0.0
        self._follow_loop: defer.Deferred[None] | None = None

    # -- IDiscovery ---------------------------------------------------------------------------
    def members(self) -> list[Member]:
        return list(self._members)

    def subscribe(self, callback: Callable[[list[Member]], None]) -> None:
        self._subscribers.append(callback)

    def publish(self) -> defer.Deferred[None]:
        """Start announcing this node (health permitting); fires after the first attempt."""
        self._want_published = True
        return self._publish_now()

    def withdraw(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._withdraw())

    # -- Service --------------------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        self._follow_loop = defer.ensureDeferred(self._follow_forever())
        self._follow_loop.addErrback(lambda f: None if f.check(defer.CancelledError) else f)
        self._follow_loop.addErrback(lambda f: self.log.failure(
            "{backend}: member list no longer followed", failure=f, backend=self.backend))

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        d = self.withdraw() if self._want_published else defer.succeed(None)

        def stop_following(_: Any) -> defer.Deferred[None] | None:
            if self._follow_loop is not None:
                self._follow_loop.cancel()
                self._follow_loop = None
            return self._closed()

        return d.addCallback(stop_following)

    # -- members ---------------------------------------------------------------------------------
    def _set_members(self, members: Iterable[Member]) -> None:
        new = tuple(sorted({m.id: m for m in members}.values(), key=lambda m: m.id))
        if new == self._members:
            return
        self._members = new
        self.log.info("{backend} ({node}): {count} members: {ids}", backend=self.backend,
                      node=self.self_member.id, count=len(new), ids=", ".join(m.id for m in new) or "none")
        for callback in list(self._subscribers):
            try:
                callback(list(new))
            except Exception:
                self.log.failure("{backend}: member list subscriber failed", backend=self.backend)

    # -- reachability, logged once per outage -------------------------------------------------
    def _unreachable(self, doing: str, error: BaseException | Any) -> None:
        if self.reachable:
            self.reachable = False
            message = getattr(error, "getErrorMessage", None)
            why = message() if message else f"{type(error).__name__}: {error}"
            self.log.warn(
                "{backend} unreachable from {node} ({doing}: {why}); keeping the last {count} known "
                "members and retrying with backoff", backend=self.backend, node=self.self_member.id,
                doing=doing, why=why, count=len(self._members))

    def _reached(self) -> None:
        if not self.reachable:
            self.reachable = True
            self.log.info("{backend} reachable again from {node}", backend=self.backend, node=self.self_member.id)

    def _next_backoff(self, current: float) -> float:
        return min(self.max_backoff, max(self.min_backoff, current * 2))

    # -- the publish loop ------------------------------------------------------------------------
    def _publish_now(self) -> defer.Deferred[None]:
        if self._publish_call is not None and self._publish_call.active():
            self._publish_call.cancel()
        self._publish_call = None
        if self._publishing is None or self._publishing.done:
            self._publishing = SharedResult(defer.ensureDeferred(self._publish_step()))
        return self._publishing.observe()

    def _publish_timer(self) -> None:
        self._publish_call = None
        self._publish_now()

    async def _publish_step(self) -> None:
        """One round: check health, then refresh (or suspend) this node's record.  Never
        fails: a backend error is logged once and the next round comes after a backoff."""
        delay = self.refresh_interval
        try:
            healthy = await self._check_health()
            if not self._want_published:
                return
            if healthy != self.healthy:
                if healthy and self.healthy is not None:
                    self.log.info("{backend}: {node} is healthy again: publishing it", backend=self.backend,
                                  node=self.self_member.id)
                elif not healthy:
                    self.log.warn("{backend}: the TF Serving of {node} fails its health check: "
                                  "not publishing {node} until it passes", backend=self.backend,
                                  node=self.self_member.id)
                self.healthy = healthy
            if healthy:
                await self._refresh()
            else:
                await self._suspend()
        except Exception as e:
            self._unreachable("publishing this node", e)
            self._publish_backoff = self._next_backoff(self._publish_backoff)
            delay = min(self._publish_backoff, self.refresh_interval)
        else:
            if self._want_published:
                self._reached()
            self._publish_backoff = 0.0
        finally:
            if self._want_published and self._publish_call is None:
                self._publish_call = self.clock.callLater(delay, self._publish_timer)

    async def _check_health(self) -> bool:
        try:
            await with_timeout(defer.maybeDeferred(self.health_check), self.refresh_interval, self.clock,
                               lambda: _HealthTimeout("health check timed out"))
        except Exception:
            return False
        return True

    async def _withdraw(self) -> None:
        self._want_published = False
        if self._publish_call is not None and self._publish_call.active():
            self._publish_call.cancel()
        self._publish_call = None
        if self._publishing is not None and not self._publishing.done:
            await self._publishing.observe()  # never race a refresh still in flight
        try:
            await self._remove()
        except Exception as e:
            self.log.warn("{backend}: could not withdraw {node} ({error}); its record will expire",
                          backend=self.backend, node=self.self_member.id, error=str(e) or type(e).__name__)
        self.published = False

    # -- the follow loop ---------------------------------------------------------------------------
    async def _follow_forever(self) -> None:
        backoff = 0.0
        while self.running:
            try:
                await self._follow()
                backoff = 0.0
                delay = self.min_backoff / 4  # a watch that ended cleanly: resync soon
            except defer.CancelledError:
                raise
            except Exception as e:
                if not self.running:
                    return  # stopping: the error is the cancelled request
                self._unreachable("reading the member list", e)
                backoff = self._next_backoff(backoff)
                delay = backoff
            if not self.running:
                return
            await task.deferLater(self.clock, delay)

    # -- subclass hooks ------------------------------------------------------------------------------
    async def _refresh(self) -> None:
        raise NotImplementedError

    async def _suspend(self) -> None:
        raise NotImplementedError

    async def _remove(self) -> None:
        raise NotImplementedError

    async def _follow(self) -> None:
        raise NotImplementedError

    def _closed(self) -> defer.Deferred[None] | None:
        return None


def _discovery_section(cfg: Any) -> SimpleNamespace:
    if hasattr(cfg, "cluster"):
        return cfg.cluster.discovery  # type: ignore[no-any-return]
    if hasattr(cfg, "discovery"):
        return cfg.discovery  # type: ignore[no-any-return]
    return cfg  # type: ignore[no-any-return]


def make_discovery(
    cfg: Any,
    self_member: Member,
    health_check: HealthCheck | None = None,
    clock: IReactorTime | None = None,
) -> DiscoveryBase | Any:
    """The discovery of ``cfg`` (the whole config, its ``cluster`` section or its
    ``cluster.discovery`` section)."""
    d = _discovery_section(cfg)
    if d.type == "static":
        from tfscache.cluster.discovery.static import StaticDiscovery

        return StaticDiscovery.from_config(d.members, self_member)
    if d.type == "etcd":
        from tfscache.cluster.discovery.etcd import EtcdDiscovery

        return EtcdDiscovery(
            d.endpoints, self_member, health_check, prefix=d.prefix, ttl=d.ttl_seconds,
            username=d.username, password=d.password, ca_cert=d.ca_cert,
            client_cert=d.client_cert, client_key=d.client_key, clock=clock,
        )
    if d.type == "consul":
        from tfscache.cluster.discovery.consul import ConsulDiscovery

        return ConsulDiscovery(
            d.endpoints, self_member, health_check, service=getattr(d, "service", None),
            prefix=d.prefix, ttl=d.ttl_seconds, token=d.token, ca_cert=d.ca_cert,
            client_cert=d.client_cert, client_key=d.client_key, clock=clock,
        )
    raise ValueError(f"cluster.discovery.type: unknown type {d.type!r}")


__all__ = ["DiscoveryBase", "HealthCheck", "make_discovery"]
