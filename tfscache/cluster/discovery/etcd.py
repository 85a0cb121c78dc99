"""etcd discovery: each node keeps ``<prefix>/members/<id>`` alive under a lease; every node
watches the prefix for the member list.

The client is ``EtcdGateway`` (etcd_gateway.py): etcd's v3 JSON gateway over treq, on the
reactor, each call with a timeout; the watch is a streaming POST read as it arrives.  No
thread is involved (an endpoint given as an IP address is not even resolved in the reactor's
thread pool, where a burst of disk or S3 copies could hold up keepalives until the lease
expired).

Publishing: grant a lease of ``ttl`` seconds, put the member record under it, keep the lease
alive every ``ttl/3`` while the health check passes; revoke it (the key goes at once) when the
check fails or on ``withdraw()``.  A lease that expired while etcd was out of reach is granted
again and the record put again.

Following: read the prefix (a range with its revision), then watch from the next revision;
when the watch breaks, read again (with capped exponential backoff while etcd is unreachable).
The last known members are kept meanwhile.  The outage is logged once, and its end once.
A watch can also die silently (a half-open connection: etcd's host vanished, a NAT forgot the
flow): it asks for progress notifications and its socket has TCP keepalive, and a watch that
has said nothing for ``watch_silence`` seconds (3 TTLs; etcd's own progress interval is 10
minutes unless ``--experimental-watch-progress-notify-interval`` says otherwise) is closed and
the prefix read again; so is the watch when the publish loop reaches etcd again after an outage.

Auth: ``username``/``password`` get a token from ``/v3/auth/authenticate``, sent in the
``Authorization`` header and renewed when etcd says it is invalid.  TLS: ``https://``
endpoints (``host:port`` means https when a TLS option is set; ``http://`` is refused then),
``ca_cert`` to verify etcd (default: the system's roots), ``client_cert``/``client_key`` (both)
for etcd's ``--client-cert-auth``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from tfscache.cluster.discovery import MAX_BACKOFF, MIN_BACKOFF, DiscoveryBase, HealthCheck
from tfscache.cluster.discovery.etcd_gateway import EtcdGateway, LeaseGone, WatchStream, unb64
from tfscache.cluster.members import Member, MemberError

WATCH_SILENCE_TTLS = 3.0


class EtcdDiscovery(DiscoveryBase):
    log = Logger()
    backend = "etcd"

    def __init__(
        self,
        endpoints: Sequence[str],
        self_member: Member,
        health_check: HealthCheck | None = None,
        prefix: str = "/tfscache",
        ttl: float = 10.0,
        username: str | None = None,
        password: str | None = None,
        ca_cert: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        clock: IReactorTime | None = None,
        request_timeout: float | None = None,
        min_backoff: float = MIN_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
        connection: EtcdGateway | None = None,
        watch_silence: float | None = None,
        *,
        reactor: Any,
    ) -> None:
        super().__init__(self_member, clock or reactor, health_check, ttl, min_backoff, max_backoff)
        self.lease_ttl = max(1, math.ceil(self.ttl))
        self.prefix = prefix.rstrip("/") + "/members/"
        self.key = self.prefix + self_member.id
        timeout = request_timeout or max(1.0, min(5.0, self.refresh_interval))
        # TCP keepalive on the watch's connection: the kernel ends it when etcd's host vanished
        self.conn = connection or EtcdGateway(
            endpoints, username, password, ca_cert, client_cert, client_key, timeout=timeout,
            keepalive_idle=max(1, math.ceil(self.ttl)), reactor=reactor)
        self.watch_silence = watch_silence or WATCH_SILENCE_TTLS * self.ttl
        self.lease_id: int | None = None
        self._by_key: dict[str, Member] = {}
        self._watch: WatchStream | None = None
        self._watchdog_call: Any = None
        self.watch_restarts = 0     # watches closed for silence or after an outage

    # -- calls ------------------------------------------------------------------------------------
    def _call(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> defer.Deferred[Any]:
        """One call to etcd (a test replaces it to hold a call in flight)."""
        return defer.ensureDeferred(fn(*args))

    async def _etcd(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
        return await self._call(fn, *args)

    # -- publishing -----------------------------------------------------------------------------
    async def _refresh(self) -> None:
        if self.lease_id is not None:
            ttl = await self._etcd(self.conn.keepalive, self.lease_id)
            if ttl <= 0:
                self.log.info("etcd: the lease of this node expired; registering it again")
                self.lease_id, self.published = None, False
        for _ in range(2):
            if self.lease_id is None:
                self.lease_id = await self._etcd(self.conn.grant, self.lease_ttl)
                self.published = False
            if self.published:
                return
            try:
                await self._etcd(self.conn.put, self.key, self.self_member.to_json(), self.lease_id)
            except LeaseGone:
                self.lease_id = None
                continue
            self.published = True
            return

    async def _suspend(self) -> None:
        await self._revoke()

    async def _remove(self) -> None:
        await self._revoke()

    async def _revoke(self) -> None:
        lease_id = self.lease_id
        if lease_id is None:
            return
        await self._etcd(self.conn.revoke, lease_id)  # deletes the key with it
        if self.lease_id == lease_id:
            self.lease_id, self.published = None, False

    # -- following ------------------------------------------------------------------------------
    async def _follow(self) -> None:
        revision, kvs = await self._etcd(self.conn.range_prefix, self.prefix)
        self._reached()
        by_key: dict[str, Member] = {}
        for key, value in kvs.items():
            member = self._parse(key, value)
            if member is not None:
                by_key[key] = member
        self._by_key = by_key
        self._set_members(by_key.values())  # republishes this node if its record vanished
        stream = self._watch = WatchStream(self.conn, self.prefix, revision + 1, self._on_events, self.clock)
        self._watchdog_call = self.clock.callLater(self.watch_silence, self._watchdog)
        try:
            await stream.done
        finally:
            if self._watchdog_call is not None and self._watchdog_call.active():
                self._watchdog_call.cancel()
            self._watchdog_call = None
            stream.stop()
            self._watch = None

    def _watchdog(self) -> None:
        self._watchdog_call = None
        if self._watch is None:
            return
        silent = self.clock.seconds() - self._watch.heard
        if silent >= self.watch_silence:
            self.log.debug("etcd ({node}): the watch said nothing for {seconds:.1f}s; reading the members "
                           "again", node=self.self_member.id, seconds=silent)
            self._restart_watch()
        else:
            self._watchdog_call = self.clock.callLater(self.watch_silence - silent, self._watchdog)

    def _restart_watch(self) -> None:
        if self._watch is not None:
            self.watch_restarts += 1
            self._watch.expire()

    def _recovered(self) -> None:
        self._restart_watch()  # it may sit on a connection that died with the outage

    def _parse(self, key: str, value: bytes) -> Member | None:
        try:
            return Member.from_json(value)
        except MemberError as e:
            self.log.warn("etcd: ignoring the malformed member record {key}: {error}", key=key, error=str(e))
            return None

    def _on_events(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            kv = event.get("kv", {})
            key = unb64(kv.get("key", "")).decode("utf-8", "replace")
            if event.get("type") == "DELETE":
                self._by_key.pop(key, None)
            else:
                member = self._parse(key, unb64(kv.get("value", "")))
                if member is not None:
                    self._by_key[key] = member
        self._set_members(self._by_key.values())

    def _closed(self) -> defer.Deferred[None] | None:
        if self._watch is not None:
            self._watch.stop()
        close = getattr(self.conn, "close", None)  # a test's fake has none
        return close() if close is not None else None
