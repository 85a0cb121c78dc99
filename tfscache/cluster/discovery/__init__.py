"""Cluster membership: static list, etcd (lease + watch), Consul (TTL check + blocking queries)
or Kubernetes (a Service's ready endpoints, watched).

``make_discovery(cfg, self_member, reactor, health_check, clock)`` builds the one the configuration
asks for.  Every implementation is an ``IDiscovery`` and a Twisted ``Service``:

- ``startService`` starts following the member list; ``members()`` never blocks and keeps the
  last known list when the backend is lost.
- ``publish()`` announces this node, and keeps announcing it every ``ttl/3`` while
  ``health_check()`` passes (it stops refreshing, and withdraws, while the check fails).
- ``withdraw()`` removes this node promptly; ``stopService`` withdraws if it was published.

The shared machinery lives here (``DiscoveryBase``): the publishing loop gated on health, the
watch loop with capped exponential backoff, and reachability logged once per outage rather
than once per retry.  The life cycle (published or not, a list without this node trusted or
not, the backend reachable or not) is two state machines (lifecycle.py).  All timing goes
through an injectable ``clock`` (IReactorTime).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tfscache.cluster.discovery.lifecycle import publication, reachability
from tfscache.cluster.members import Member
from tfscache.config import Config, endpoint_bases
from tfscache.interfaces import IDiscovery
from tfscache.util.deferreds import SharedResult, with_timeout

if TYPE_CHECKING:
    from tfscache.cluster.discovery.static import StaticDiscovery

HealthCheck = Callable[[], defer.Deferred[Any]]
MIN_BACKOFF = 0.25
MAX_BACKOFF = 10.0


def _always_healthy() -> defer.Deferred[Any]:
    return defer.succeed(None)


class _HealthTimeout(Exception):
    pass


TLS_FAILURE = "TLS handshake failed"
_SSL_REASON = re.compile(r"\[SSL(?:: [A-Z0-9_]+)?\] ([^'\"()]+)")


def describe_error(error: BaseException | Failure) -> str:
    """One line saying why a call to the backend failed, for the logs: the TLS reason of a
    handshake failure rather than the wrappers around it (twisted.web's)."""
    if isinstance(error, Failure):
        if error.value is None:  # pragma: no cover - a Failure always wraps an exception
            return "unknown error"
        error = error.value
    reasons = getattr(error, "reasons", None)  # twisted.web's ResponseNeverReceived and co.
    if isinstance(reasons, list) and reasons:
        return "; ".join(dict.fromkeys(describe_error(r) for r in reasons))
    try:
        from OpenSSL import SSL
    except ImportError:  # pragma: no cover - Twisted's TLS needs it
        SSL = None  # type: ignore[assignment]
    if SSL is not None and isinstance(error, SSL.Error) and error.args and isinstance(error.args[0], list):
        why = [str(r[-1]) for r in error.args[0] if isinstance(r, tuple) and r and r[-1]]
        return f"{TLS_FAILURE}: " + (", ".join(why) or str(error))
    text = str(error)
    match = _SSL_REASON.search(text)
    if match:
        return f"{TLS_FAILURE}: " + match.group(1).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


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
    # the backend holds a record this node writes (etcd, Consul): a list without it while
    # published means the record was lost, and it is put back.  False where the list is the
    # truth about this node (Kubernetes: its pod's readiness)
    keeps_records = True

    def __init__(
        self,
        self_member: Member,
        clock: IReactorTime,
        health_check: HealthCheck | None = None,
        ttl: float = 10.0,
        min_backoff: float = MIN_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
    ) -> None:
        self.self_member = self_member
        self.health_check = health_check or _always_healthy
        self.ttl = float(ttl)
        self.refresh_interval = self.ttl / 3.0
        self.clock = clock
        self.min_backoff, self.max_backoff = min_backoff, max_backoff
        self._members: tuple[Member, ...] = ()
        self._subscribers: list[Callable[[list[Member]], None]] = []
        self._events = 0               # orders attempts and successes: see _stale()
        self._reached_by = {"publish": 0, "follow": 0}
        self.healthy: bool | None = None
        self.published = False         # our record is live in the backend, as far as we know
        self.publication_state = ""    # the machines' states: see lifecycle.py
        self.reachability_state = ""
        self._publication = publication(self)
        self._reachability = reachability(self)
        self._publish_call: Any = None
        self._publishing: SharedResult | None = None
        self._publish_backoff = 0.0
        self._follow_loop: defer.Deferred[None] | None = None

    @property
    def publishing(self) -> bool:
        """``publish()`` was called and ``withdraw()`` not since."""
        return self.publication_state != "idle"

    @property
    def reachable(self) -> bool:
        return self.reachability_state == "reachable"

    # -- IDiscovery ---------------------------------------------------------------------------
    def members(self) -> list[Member]:
        return list(self._members)

    def subscribe(self, callback: Callable[[list[Member]], None]) -> None:
        self._subscribers.append(callback)

    def publish(self) -> defer.Deferred[None]:
        """Start announcing this node (health permitting); fires after the first attempt."""
        self._publication.publish()
        return self._publish_now()

    def withdraw(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._withdraw())

    # -- Service --------------------------------------------------------------------------------
    def startService(self) -> None:
        service.Service.startService(self)
        self._follow_loop = defer.ensureDeferred(self._follow_forever())
        self._follow_loop.addErrback(lambda f: None if f.check(defer.CancelledError) else f)
        self._follow_loop.addErrback(lambda f: self.log.failure(
            "{backend}: member list no longer followed", failure=f, backend=self.backend))

    def stopService(self) -> defer.Deferred[None]:
        service.Service.stopService(self)
        d = self.withdraw() if self.publishing else defer.succeed(None)

        def stop_following(_: Any) -> defer.Deferred[None] | None:
            if self._follow_loop is not None:
                self._follow_loop.cancel()
                self._follow_loop = None
            return self._closed()

        return d.addCallback(stop_following)

    # -- members ---------------------------------------------------------------------------------
    def _set_members(self, members: Iterable[Member]) -> None:
        new = tuple(sorted({m.id: m for m in members}.values(), key=lambda m: m.id))
        me = self.self_member.id
        if any(m.id == me for m in new):
            self._publication.seen()
        elif self.keeps_records and self.published:
            self._publication.lost(len(new))  # lost, or not seen yet: the state says
        else:
            self._publication.missed(len(new))
        if self.publication_state == "lost" and any(m.id == me for m in self._members):
            # the backend lost this node's record while it believes it is published (a Consul
            # -dev agent restarted, etcd wiped or its keys deleted): the others are most likely
            # alive and republishing too, so a list that is empty or lacks this node would move
            # models for nothing.  Keep routing with the last list until the record is back.
            return
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

    # -- publication outputs (lifecycle.PUBLICATION) ----------------------------------------
    def record_lost(self, count: int) -> None:
        keep = any(m.id == self.self_member.id for m in self._members)
        self.log.warn("{backend} ({node}): the member list came back without this node "
                      "({count} members); publishing it again at once{keeping}",
                      backend=self.backend, node=self.self_member.id, count=count,
                      keeping=f", keeping the last {len(self._members)}" if keep else "")
        self.republish_lost(count)

    def republish_lost(self, count: int) -> None:
        self.published = False
        self._republish()

    def became_unhealthy(self) -> None:
        self.log.warn("{backend}: the TF Serving of {node} fails its health check: "
                      "not publishing {node} until it passes", backend=self.backend, node=self.self_member.id)

    def became_healthy(self) -> None:
        self.log.info("{backend}: {node} is healthy again: publishing it", backend=self.backend,
                      node=self.self_member.id)

    # -- reachability, logged once per outage (lifecycle.REACHABILITY) -------------------------
    def _unreachable(self, doing: str, error: BaseException | Any) -> None:
        why = describe_error(error)
        if why.startswith(TLS_FAILURE):
            self._reachability.failed_tls(doing, why)
        else:
            self._reachability.failed(doing, why)

    def outage_began(self, doing: str, why: str) -> None:
        self.log.warn(
            "{backend} unreachable from {node} ({doing}: {why}); keeping the last {count} known "
            "members and retrying with backoff", backend=self.backend, node=self.self_member.id,
            doing=doing, why=why, count=len(self._members))

    def outage_is_tls(self, doing: str, why: str) -> None:
        # an outage that began otherwise (the server restarting) and goes on as a TLS failure
        # (it came back with a certificate this node does not trust): retrying will not fix
        # that, so say it once
        self.log.warn("{backend} from {node}: the outage goes on as a TLS failure ({doing}: {why}); "
                      "check cluster.discovery.ca_cert / client_cert / client_key", backend=self.backend,
                      node=self.self_member.id, doing=doing, why=why)

    def outage_ended(self, loop: str) -> None:
        self.log.info("{backend} reachable again from {node}", backend=self.backend, node=self.self_member.id)
        if loop == "publish":
            self._recovered()

    def _tick(self) -> int:
        self._events += 1
        return self._events

    def _stale(self, started: int, loop: str) -> bool:
        """Whether a failure of ``loop``'s attempt begun at ``started`` is older news than the
        other loop's last success: the attempt began in an outage that is already over (a
        refused connection can surface late: Twisted's HostnameEndpoint reports it after its
        0.3 s attempt delay).  Such a failure starts no new outage: it is retried, not logged."""
        other = "follow" if loop == "publish" else "publish"
        return self._reached_by[other] > started > self._reached_by[loop]

    def _reached(self, loop: str = "follow") -> None:
        self._reached_by[loop] = self._tick()
        self._reachability.reached(loop)

    def _recovered(self) -> None:
        """The publish loop reached the backend after an outage: a subclass may restart a
        watch that saw nothing of it (one left on a half-open connection)."""

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

    def _republish(self) -> None:
        """A publish round now, or right after the one in flight (it may have read the
        backend's state before the record was lost)."""
        if self._publishing is not None and not self._publishing.done:
            self._publishing.observe().addBoth(lambda _: self._publish_now() if self.publishing else None)
        else:
            self._publish_now()

    def _publish_timer(self) -> None:
        self._publish_call = None
        self._publish_now()

    async def _publish_step(self) -> None:
        """One round: check health, then refresh (or suspend) this node's record.  Never
        fails: a backend error is logged once and the next round comes after a backoff."""
        delay = self.refresh_interval
        started = self._events
        try:
            healthy = await self._check_health()
            if not self.publishing:
                return
            self.healthy = healthy
            if healthy:
                self._publication.healthy()
            else:
                self._publication.unhealthy()  # not published: a list without this node is the truth
            started = self._tick()
            if healthy:
                await self._refresh()
            else:
                await self._suspend()
        except Exception as e:
            if self._stale(started, "publish"):
                self._publish_backoff, delay = 0.0, self.min_backoff
            else:
                self._unreachable("publishing this node", e)
                self._publish_backoff = self._next_backoff(self._publish_backoff)
                delay = min(self._publish_backoff, self.refresh_interval)
        else:
            if self.publishing:
                self._reached("publish")
            self._publish_backoff = 0.0
        finally:
            if self.publishing and self._publish_call is None:
                self._publish_call = self.clock.callLater(delay, self._publish_timer)

    async def _check_health(self) -> bool:
        try:
            await with_timeout(defer.maybeDeferred(self.health_check), self.refresh_interval, self.clock,
                               lambda: _HealthTimeout("health check timed out"))
        except Exception:
            return False
        return True

    async def _withdraw(self) -> None:
        self._publication.withdraw()
        if self._publish_call is not None and self._publish_call.active():
            self._publish_call.cancel()
        self._publish_call = None
        if self._publishing is not None and not self._publishing.done:
            await self._publishing.observe()  # never race a refresh still in flight
        try:
            await self._remove()
        except Exception as e:
            self.log.warn("{backend}: could not withdraw {node} ({error}); its record will expire",
                          backend=self.backend, node=self.self_member.id, error=describe_error(e))
        self.published = False

    # -- the follow loop ---------------------------------------------------------------------------
    async def _follow_forever(self) -> None:
        backoff = 0.0
        while self.running:
            started = self._tick()
            try:
                await self._follow()
                backoff = 0.0
                delay = self.min_backoff / 4  # a watch that ended cleanly: resync soon
            except defer.CancelledError:
                raise
            except Exception as e:
                if not self.running:
                    return  # stopping: the error is the cancelled request
                if self._stale(started, "follow"):
                    backoff, delay = 0.0, self.min_backoff
                else:
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


def make_discovery(
    cfg: Config,
    self_member: Member,
    reactor: Any,
    health_check: HealthCheck | None = None,
    clock: IReactorTime | None = None,
) -> DiscoveryBase | StaticDiscovery:
    """The discovery ``cfg.cluster.discovery`` asks for (an ``IDiscovery`` and a ``Service``),
    on ``reactor``; its timing on ``clock`` (default: the reactor)."""
    d = cfg.cluster.discovery
    if d.type == "static":
        from tfscache.cluster.discovery.static import StaticDiscovery

        listed = [Member(m.id or f"{m.host}:{m.rest_port}", m.host, m.rest_port, m.grpc_port) for m in d.members]
        return StaticDiscovery(listed, self_member)
    if d.type == "etcd":
        from tfscache.cluster.discovery.etcd import EtcdDiscovery

        return EtcdDiscovery(
            d.endpoints, self_member, health_check, prefix=d.prefix, ttl=d.ttl_seconds,
            username=d.username, password=d.password, ca_cert=d.ca_cert,
            client_cert=d.client_cert, client_key=d.client_key, clock=clock, reactor=reactor,
        )
    if d.type == "consul":
        from tfscache.cluster.discovery.consul import ConsulDiscovery

        return ConsulDiscovery(
            d.endpoints, self_member, health_check, service=d.service,
            prefix=d.prefix, ttl=d.ttl_seconds, token=d.token, ca_cert=d.ca_cert,
            client_cert=d.client_cert, client_key=d.client_key, clock=clock, reactor=reactor,
        )
    from tfscache.cluster.discovery.kubernetes import KubernetesDiscovery

    return KubernetesDiscovery(
        self_member, health_check, service=d.service or "tfscache",
        namespace=d.namespace, kubeconfig=d.kubeconfig, rest_port_name=d.rest_port_name,
        grpc_port_name=d.grpc_port_name, ttl=d.ttl_seconds, clock=clock, reactor=reactor,
    )


__all__ = ["DiscoveryBase", "HealthCheck", "describe_error", "endpoint_bases", "make_discovery"]
