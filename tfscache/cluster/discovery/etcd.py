"""etcd discovery: each node keeps ``<prefix>/members/<id>`` alive under a lease; every node
watches the prefix for the member list.

The client is ``etcd3gw`` (etcd's JSON gateway; txaioetcd is broken against etcd >= 3.4, it
calls ``/v3alpha``).  Its calls block, so they run in a small thread pool of their own
(``tfscache-etcd``, short calls, each with a timeout): not the reactor's shared pool, where a
burst of disk or S3 copies and DNS lookups could hold up lease keepalives until the lease
expired.  The long-lived watch stream runs in a daemon thread of its own (a pool thread
blocked on a stream would hold up shutdown); events come back to the reactor with
``callFromThread``.

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

import contextlib
import json
import math
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import requests
from etcd3gw import exceptions as etcd_errors
from etcd3gw.client import Etcd3Client
from etcd3gw.lease import Lease
from etcd3gw.utils import _decode, _encode, _increment_last_byte
from requests.adapters import HTTPAdapter
from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from urllib3.connection import HTTPConnection

from tfscache.cluster.discovery import MAX_BACKOFF, MIN_BACKOFF, DiscoveryBase, HealthCheck, endpoint_url, tls_requested
from tfscache.cluster.members import Member, MemberError
from tfscache.util.threads import OwnThreadPool

T = TypeVar("T")
ETCD_THREADS = 2   # EtcdConnection serialises its calls: one for the publish loop, one queued
WATCH_SILENCE_TTLS = 3.0
_UNREACHABLE = (etcd_errors.ConnectionFailedError, etcd_errors.ConnectionTimeoutError,
                etcd_errors.ApiVersionDiscoveryFailedError)


class LeaseGone(Exception):
    """etcd does not know the lease (it expired)."""


def _text(e: BaseException) -> str:
    return str(getattr(e, "detail_text", None) or e or type(e).__name__)


def _is_auth_error(e: BaseException) -> bool:
    text = _text(e).lower()
    return "invalid auth token" in text or "user name is empty" in text or "auth token" in text


def _is_lease_gone(e: BaseException) -> bool:
    return "lease not found" in _text(e).lower()


def parse_endpoint(endpoint: str, tls: bool) -> tuple[str, str, int]:
    """``http://host:2379`` -> (protocol, host, port)."""
    parts = endpoint_url(endpoint, "etcd", tls)
    assert parts.hostname is not None
    return parts.scheme, parts.hostname, parts.port or 2379


class _Session(requests.Session):
    """A session whose ``verify`` (our ``ca_cert``) wins over the environment: plain requests
    lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE replace a session's CA for every request that does
    not pass ``verify`` itself (psf/requests#3829), and etcd3gw never does."""

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any,
                                   cert: Any) -> dict[str, Any]:
        if verify is None and self.verify is not True:
            verify = self.verify
        settings: dict[str, Any] = super().merge_environment_settings(url, proxies, stream, verify, cert)
        return settings


def _keepalive_options(idle: int) -> list[tuple[int, int, int]]:
    """TCP keepalive after ``idle`` seconds of silence, then 3 probes ``idle/3`` apart: the
    kernel ends a watch whose peer is gone without a FIN or RST."""
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", max(1, idle // 3)), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):  # Linux; macOS has only some of them
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    return options


class _KeepaliveAdapter(HTTPAdapter):
    def __init__(self, idle: int) -> None:
        self._socket_options = HTTPConnection.default_socket_options + _keepalive_options(idle)
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["socket_options"] = self._socket_options
        super().init_poolmanager(*args, **kwargs)


class EtcdConnection:
    """Blocking etcd calls through etcd3gw (run them in threads).  Fails over between the
    endpoints; authenticates when a username is given."""

    def __init__(
        self,
        endpoints: Sequence[str],
        username: str | None = None,
        password: str | None = None,
        ca_cert: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        timeout: float = 5.0,
        keepalive_idle: int = 10,
    ) -> None:
        if not endpoints:
            raise ValueError("cluster.discovery.endpoints: a value is required for type etcd")
        tls = tls_requested(ca_cert, client_cert, client_key)
        self.timeout = timeout
        self.keepalive_idle = keepalive_idle
        self.username, self.password = username, password
        self.verify: Any = ca_cert if ca_cert else True  # True: the system's roots, never unverified
        self.cert = (client_cert, client_key) if client_cert and client_key else None
        self.clients: list[Etcd3Client] = []
        for endpoint in endpoints:
            protocol, host, port = parse_endpoint(endpoint, tls)
            self.clients.append(Etcd3Client(host=host, port=port, protocol=protocol, timeout=timeout,
                                            session=self._session()))
        self.current = 0
        self._tokens: dict[int, str] = {}
        self._lock = threading.Lock()

    def _session(self) -> requests.Session:
        session = _Session()
        session.verify = self.verify
        if self.cert is not None:
            session.cert = self.cert
        return session

    @property
    def endpoint(self) -> str:
        return self.clients[self.current].base_url

    def call(self, op: Callable[[Etcd3Client], T]) -> T:
        with self._lock:
            last: BaseException | None = None
            for _ in range(len(self.clients)):
                index = self.current
                client = self.clients[index]
                try:
                    if self.username and index not in self._tokens:
                        self._authenticate(index, client)
                    try:
                        return op(client)
                    except etcd_errors.Etcd3Exception as e:
                        if not (self.username and _is_auth_error(e)):
                            raise
                        self._authenticate(index, client)  # the token expired: once more
                        return op(client)
                except _UNREACHABLE as e:
                    last = e
                    self.current = (index + 1) % len(self.clients)
            assert last is not None
            raise last

    def _authenticate(self, index: int, client: Etcd3Client) -> None:
        client.session.headers.pop("Authorization", None)
        result = client.post(client.get_url("/auth/authenticate"),
                             json={"name": self.username, "password": self.password or ""})
        token = str(result["token"])
        client.session.headers["Authorization"] = token
        self._tokens[index] = token

    # -- operations ---------------------------------------------------------------------------
    def range_prefix(self, prefix: str) -> tuple[int, dict[str, bytes]]:
        """The keys under ``prefix`` and the store revision they were read at."""
        key = prefix.encode()

        def op(client: Etcd3Client) -> dict[str, Any]:
            result: dict[str, Any] = client.post(client.get_url("/kv/range"), json={
                "key": _encode(key), "range_end": _encode(_increment_last_byte(key).encode())})
            return result

        result = self.call(op)
        revision = int(result.get("header", {}).get("revision", 0))
        kvs = {_decode(kv["key"]).decode("utf-8", "replace"): _decode(kv.get("value", ""))
               for kv in result.get("kvs", [])}
        return revision, kvs

    def grant(self, ttl: int) -> int:
        return self.call(lambda c: c.lease(ttl)).id

    def keepalive(self, lease_id: int) -> int:
        """The lease's new TTL; -1 when etcd no longer knows it."""
        try:
            return self.call(lambda c: Lease(lease_id, c).refresh())
        except etcd_errors.Etcd3Exception as e:
            if _is_lease_gone(e):
                return -1
            raise

    def put(self, key: str, value: str, lease_id: int) -> None:
        try:
            self.call(lambda c: c.post(c.get_url("/kv/put"), json={
                "key": _encode(key.encode()), "value": _encode(value.encode()), "lease": lease_id}))
        except etcd_errors.Etcd3Exception as e:
            if _is_lease_gone(e):
                raise LeaseGone(lease_id)
            raise

    def revoke(self, lease_id: int) -> None:
        try:
            self.call(lambda c: Lease(lease_id, c).revoke())
        except etcd_errors.Etcd3Exception as e:
            if not _is_lease_gone(e):
                raise

    def delete(self, key: str) -> None:
        self.call(lambda c: c.post(c.get_url("/kv/deleterange"), json={"key": _encode(key.encode())}))

    def open_watch(self, prefix: str, start_revision: int) -> requests.Response:
        """A streaming watch response on ``prefix`` from ``start_revision`` (blocking)."""
        key = prefix.encode()
        create: dict[str, Any] = {"key": _encode(key), "range_end": _encode(_increment_last_byte(key).encode()),
                                  "start_revision": start_revision, "progress_notify": True}

        def op(client: Etcd3Client) -> requests.Response:
            session = self._session()
            adapter = _KeepaliveAdapter(self.keepalive_idle)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers.update(client.session.headers)
            try:
                resp = session.post(client.get_url("/watch"), json={"create_request": create},
                                    stream=True, timeout=(self.timeout, None))
            except requests.exceptions.ConnectionError as e:
                raise etcd_errors.ConnectionFailedError(str(e))
            except requests.exceptions.Timeout as e:
                raise etcd_errors.ConnectionTimeoutError(str(e))
            if resp.status_code != 200:
                text = resp.text
                resp.close()
                raise etcd_errors.Etcd3Exception(text, resp.reason)
            return resp

        return self.call(op)


class WatchStream:
    """One etcd watch stream, read in a daemon thread; events are delivered on the reactor.

    ``done`` fires (None) when etcd ends the watch (it was cancelled, e.g. compacted) or
    ``expire()`` closes it, fails when the stream breaks; cancelling it closes the stream.
    ``heard`` is when (on ``clock``) etcd last said something on it: events, a progress
    notification, or the stream opening."""

    def __init__(self, conn: EtcdConnection, prefix: str, start_revision: int,
                 on_events: Callable[[list[dict[str, Any]]], None], reactor: IReactorFromThreads,
                 clock: IReactorTime) -> None:
        self._reactor = reactor
        self.clock = clock
        self.heard = self.clock.seconds()
        self.messages = 0
        self.conn, self.prefix, self.start_revision = conn, prefix, start_revision
        self.on_events = on_events
        self.done: defer.Deferred[None] = defer.Deferred(lambda _d: self.stop())
        self._lock = threading.Lock()
        self._resp: requests.Response | None = None
        self._stopped = False
        self.thread = threading.Thread(target=self._run, name="tfscache-etcd-watch", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            resp = self._resp
        if resp is not None:
            _shutdown(resp)

    def expire(self) -> None:
        """Close the stream and end ``done`` cleanly: the follower reads the prefix again."""
        self.stop()
        if not self.done.called:
            self.done.callback(None)

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            resp = self.conn.open_watch(self.prefix, self.start_revision)
            with self._lock:
                self._resp = resp
                stopped = self._stopped
            if stopped:
                _shutdown(resp)
                return
            self._reactor.callFromThread(self._heard)
            buffer = b""
            for chunk in resp.iter_content(chunk_size=None):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip() and not self._message(json.loads(line)):
                        return  # etcd cancelled the watch: read the prefix again
            if not self._stopped:
                error = ConnectionError("etcd closed the watch stream")
        except Exception as e:
            error = e
        finally:
            if not self._stopped:
                self._reactor.callFromThread(self._finish, error)

    def _message(self, message: dict[str, Any]) -> bool:
        if "error" in message:
            raise RuntimeError(f"etcd watch error: {message['error']}")
        result = message.get("result", {})
        if result.get("canceled"):
            return False
        events = result.get("events")
        if events:
            self._reactor.callFromThread(self._deliver, events)
        else:  # a progress notification (or the created message)
            self._reactor.callFromThread(self._heard)
        return True

    def _heard(self) -> None:
        self.heard = self.clock.seconds()
        self.messages += 1

    def _deliver(self, events: list[dict[str, Any]]) -> None:
        if not self._stopped:
            self._heard()
            self.on_events(events)

    def _finish(self, error: BaseException | None) -> None:
        if self.done.called:
            return
        if error is None:
            self.done.callback(None)
        else:
            self.done.errback(error)


def _shutdown(resp: requests.Response) -> None:
    """Wake the thread blocked reading ``resp``: shut its socket down."""
    with contextlib.suppress(Exception):
        fd = resp.raw._fp.fileno()
        s = socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.shutdown(socket.SHUT_RDWR)
        finally:
            s.close()
    with contextlib.suppress(Exception):
        resp.close()


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
        connection: EtcdConnection | None = None,
        run_blocking: Callable[..., defer.Deferred[Any]] | None = None,
        watch_silence: float | None = None,
            *,
        reactor: Any,
    ) -> None:
        super().__init__(self_member, clock or reactor, health_check, ttl, min_backoff, max_backoff)
        self.lease_ttl = max(1, math.ceil(self.ttl))
        self.prefix = prefix.rstrip("/") + "/members/"
        self.key = self.prefix + self_member.id
        timeout = request_timeout or max(1.0, min(5.0, self.refresh_interval))
        self.conn = connection or EtcdConnection(
            endpoints, username, password, ca_cert, client_cert, client_key, timeout=timeout,
            keepalive_idle=max(1, math.ceil(self.ttl)))
        self.watch_silence = watch_silence or WATCH_SILENCE_TTLS * self.ttl
        self._run = run_blocking or self._in_pool
        self._reactor = reactor  # the real one: self.clock may be a test's Clock
        self._pool = OwnThreadPool(reactor, ETCD_THREADS, "tfscache-etcd")
        self.lease_id: int | None = None
        self._by_key: dict[str, Member] = {}
        self._watch: WatchStream | None = None
        self._watchdog_call: Any = None
        self.watch_restarts = 0     # watches closed for silence or after an outage

    # -- threads --------------------------------------------------------------------------------
    def startService(self) -> None:
        self._pool.start()
        super().startService()

    def _in_pool(self, fn: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        return self._pool.run(fn, *args)

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        result: T = await self._run(fn, *args)
        return result

    # -- publishing -----------------------------------------------------------------------------
    async def _refresh(self) -> None:
        if self.lease_id is not None:
            ttl = await self._blocking(self.conn.keepalive, self.lease_id)
            if ttl <= 0:
                self.log.info("etcd: the lease of this node expired; registering it again")
                self.lease_id, self.published = None, False
        for _ in range(2):
            if self.lease_id is None:
                self.lease_id = await self._blocking(self.conn.grant, self.lease_ttl)
                self.published = False
            if self.published:
                return
            try:
                await self._blocking(self.conn.put, self.key, self.self_member.to_json(), self.lease_id)
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
        await self._blocking(self.conn.revoke, lease_id)  # deletes the key with it
        if self.lease_id == lease_id:
            self.lease_id, self.published = None, False

    # -- following ------------------------------------------------------------------------------
    async def _follow(self) -> None:
        revision, kvs = await self._blocking(self.conn.range_prefix, self.prefix)
        self._reached()
        by_key: dict[str, Member] = {}
        for key, value in kvs.items():
            member = self._parse(key, value)
            if member is not None:
                by_key[key] = member
        self._by_key = by_key
        self._set_members(by_key.values())  # republishes this node if its record vanished
        stream = self._watch = WatchStream(self.conn, self.prefix, revision + 1, self._on_events,
                                                 self._reactor, self.clock)
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
            key = _decode(kv.get("key", "")).decode("utf-8", "replace")
            if event.get("type") == "DELETE":
                self._by_key.pop(key, None)
            else:
                member = self._parse(key, _decode(kv.get("value", "")))
                if member is not None:
                    self._by_key[key] = member
        self._set_members(self._by_key.values())

    def _closed(self) -> defer.Deferred[None]:
        if self._watch is not None:
            self._watch.stop()
        return self._pool.stop()
