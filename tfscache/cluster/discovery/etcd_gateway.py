"""A non-blocking client of etcd's v3 JSON gateway: the few calls the etcd discovery makes.

Not etcd3gw: its calls block (``requests``), so they needed threads of their own, and the
watch a daemon thread.  Not txaioetcd: it calls ``/v3alpha``, gone since etcd 3.4.  The
gateway is a handful of POSTs of JSON with base64 keys and values (``/v3/kv/put``,
``/v3/kv/range``, ``/v3/lease/grant``, ``/v3/lease/keepalive``, ``/v3/lease/revoke``, and
``/v3/watch``: a streaming POST, one JSON message per line), made here with treq.

Fails over between the endpoints on a connection failure; with a username, authenticates at
``/v3/auth/authenticate`` and sends the token in the ``Authorization`` header, renewed when
etcd says it is invalid.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from typing import Any

import treq
from twisted.internet import defer, protocol
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss  # twisted.web.client re-exports this one
from twisted.web.iweb import IResponse

from tfscache.cluster.discovery import endpoint_bases
from tfscache.cluster.discovery.http import JsonBody, TLSPolicy, http_client

# a failure to reach this endpoint: the next one is tried
_UNREACHABLE = (ConnectError, ConnectingCancelledError, DNSLookupError, ResponseNeverReceived, ResponseFailed,
                defer.TimeoutError)


class EtcdError(Exception):
    """etcd answered with an error (its message, e.g. ``etcdserver: requested lease not found``)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"HTTP {code}: {message.strip()[:300]}")
        self.code, self.message = code, message


class LeaseGone(Exception):
    """etcd does not know the lease (it expired)."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text or "")


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with ``prefix``."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _is_auth_error(e: EtcdError) -> bool:
    text = e.message.lower()
    return "auth token" in text or "user name is empty" in text


def _is_lease_gone(e: EtcdError) -> bool:
    return "lease not found" in e.message.lower()


class EtcdGateway:
    """etcd's v3 JSON gateway over treq: every call returns when etcd answers (Deferreds)."""

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
        *,
        reactor: Any,
    ) -> None:
        self.endpoints = endpoint_bases(endpoints, "etcd", "etcd", ca_cert, client_cert, client_key, default_port=2379)
        self.timeout = timeout
        self.username, self.password = username, password
        self.http, self.pool = http_client(reactor, TLSPolicy(ca_cert, client_cert, client_key), timeout,
                                           keepalive_idle, per_host=4)
        self.current = 0
        self.tokens: dict[int, str] = {}   # endpoint index -> auth token

    @property
    def endpoint(self) -> str:
        return self.endpoints[self.current]

    # -- requests ------------------------------------------------------------------------------
    def _headers(self, index: int) -> dict[bytes | str, list[bytes | str]]:
        headers: dict[bytes | str, list[bytes | str]] = {b"content-type": [b"application/json"]}
        token = self.tokens.get(index)
        if token:
            headers[b"authorization"] = [token.encode()]
        return headers

    async def _post(self, index: int, path: str, body: dict[str, Any], stream: bool = False) -> Any:
        """POST ``body`` to ``path`` of endpoint ``index``: its JSON answer (or, with ``stream``,
        the response, its body not read)."""
        resp: IResponse = await self.http.post(self.endpoints[index] + "/v3" + path, data=JsonBody(body),
                                               headers=self._headers(index), timeout=self.timeout,
                                               unbuffered=stream)
        if stream and resp.code == 200:
            return resp
        content = await treq.content(resp)
        try:
            answer = json.loads(content) if content else {}
        except ValueError:
            answer = None
        if resp.code != 200 or not isinstance(answer, dict) or "error" in answer:
            message = (answer.get("message") or answer.get("error")) if isinstance(answer, dict) else None
            raise EtcdError(resp.code, str(message or content.decode("utf-8", "replace")))
        return answer

    async def call(self, path: str, body: dict[str, Any], stream: bool = False) -> Any:
        """``_post`` on the current endpoint, failing over to the next ones when it cannot be
        reached; authenticating first (and again when the token expired) with a username."""
        last: BaseException | None = None
        for _ in range(len(self.endpoints)):
            index = self.current
            try:
                if self.username and index not in self.tokens:
                    await self._authenticate(index)
                try:
                    return await self._post(index, path, body, stream)
                except EtcdError as e:
                    if not (self.username and _is_auth_error(e)):
                        raise
                    await self._authenticate(index)  # the token expired: once more
                    return await self._post(index, path, body, stream)
            except _UNREACHABLE as e:
                last = e
                self.current = (index + 1) % len(self.endpoints)
        assert last is not None
        raise last

    async def _authenticate(self, index: int) -> None:
        self.tokens.pop(index, None)
        answer = await self._post(index, "/auth/authenticate", {"name": self.username,
                                                                "password": self.password or ""})
        self.tokens[index] = str(answer["token"])

    # -- operations ----------------------------------------------------------------------------
    async def range_prefix(self, prefix: str) -> tuple[int, dict[str, bytes]]:
        """The keys under ``prefix`` and the store revision they were read at."""
        key = prefix.encode()
        answer = await self.call("/kv/range", {"key": b64(key), "range_end": b64(prefix_end(key))})
        revision = int(answer.get("header", {}).get("revision", 0))
        kvs = {unb64(kv["key"]).decode("utf-8", "replace"): unb64(kv.get("value", ""))
               for kv in answer.get("kvs", [])}
        return revision, kvs

    async def grant(self, ttl: int) -> int:
        answer = await self.call("/lease/grant", {"TTL": ttl, "ID": 0})
        return int(answer["ID"])

    async def keepalive(self, lease_id: int) -> int:
        """The lease's new TTL; -1 when etcd no longer knows it."""
        try:
            answer = await self.call("/lease/keepalive", {"ID": lease_id})
        except EtcdError as e:
            if _is_lease_gone(e):
                return -1
            raise
        ttl = int((answer.get("result") or {}).get("TTL", 0))
        return ttl if ttl > 0 else -1  # an unknown lease comes back without a TTL

    async def put(self, key: str, value: str, lease_id: int) -> None:
        try:
            await self.call("/kv/put", {"key": b64(key.encode()), "value": b64(value.encode()), "lease": lease_id})
        except EtcdError as e:
            if _is_lease_gone(e):
                raise LeaseGone(lease_id)
            raise

    async def revoke(self, lease_id: int) -> None:
        try:
            await self.call("/lease/revoke", {"ID": lease_id})
        except EtcdError as e:
            if not _is_lease_gone(e):
                raise

    async def delete(self, key: str) -> None:
        await self.call("/kv/deleterange", {"key": b64(key.encode())})

    async def open_watch(self, prefix: str, start_revision: int) -> IResponse:
        """A streaming watch response on ``prefix`` from ``start_revision``, with progress
        notifications; its body is one JSON message per line."""
        key = prefix.encode()
        create = {"key": b64(key), "range_end": b64(prefix_end(key)), "start_revision": start_revision,
                  "progress_notify": True}
        resp: IResponse = await self.call("/watch", {"create_request": create}, stream=True)
        return resp

    def close(self) -> defer.Deferred[None]:
        closed: defer.Deferred[None] = self.pool.closeCachedConnections()
        return closed


class WatchStream:
    """One etcd watch stream, read on the reactor.

    ``done`` fires (None) when etcd ends the watch (it was cancelled, e.g. compacted) or
    ``expire()`` closes it, fails when the stream breaks; cancelling it closes the stream.
    ``heard`` is when (on ``clock``) etcd last said something on it: events, a progress
    notification, or the stream opening."""

    def __init__(self, gateway: EtcdGateway, prefix: str, start_revision: int,
                 on_events: Callable[[list[dict[str, Any]]], None], clock: IReactorTime) -> None:
        self.clock = clock
        self.heard = clock.seconds()
        self.messages = 0
        self.on_events = on_events
        self.done: defer.Deferred[None] = defer.Deferred(lambda _d: self.stop())
        self._body: _Lines | None = None
        self._stopped = False
        opening = defer.ensureDeferred(gateway.open_watch(prefix, start_revision))
        self._opening: defer.Deferred[IResponse] | None = opening
        opening.addCallbacks(self._opened, self._finish)

    def _opened(self, resp: IResponse) -> None:
        self._opening = None
        self._body = _Lines(self._message, self._finish)
        resp.deliverBody(self._body)
        if self._stopped:
            self._body.abort()
        else:
            self._heard()

    def stop(self) -> None:
        self._stopped = True
        if self._opening is not None and not self._opening.called:
            self._opening.cancel()
        if self._body is not None:
            self._body.abort()

    def expire(self) -> None:
        """Close the stream and end ``done`` cleanly: the follower reads the prefix again."""
        self.stop()
        if not self.done.called:
            self.done.callback(None)

    def _message(self, message: dict[str, Any]) -> None:
        if "error" in message:
            raise EtcdError(200, f"etcd watch error: {message['error']}")
        result = message.get("result", {})
        if result.get("canceled"):
            self._finish(None)  # etcd cancelled the watch: read the prefix again
            return
        self._heard()
        events = result.get("events")
        if events and not self._stopped:
            self.on_events(events)  # else: a progress notification (or the created message)

    def _heard(self) -> None:
        self.heard = self.clock.seconds()
        self.messages += 1

    def _finish(self, error: Failure | BaseException | None) -> None:
        if self.done.called or self._stopped:
            return  # stopped: done is being cancelled, or expire() ends it
        if error is None:
            self.done.callback(None)
        else:
            self.done.errback(error)
        if self._body is not None:
            self._body.abort()


class _Lines(protocol.Protocol):
    """A streamed body of JSON lines: each handed to ``on_message``; ``on_end(None)`` when the
    body ends, ``on_end(failure)`` when it breaks or a line is not JSON."""

    def __init__(self, on_message: Callable[[dict[str, Any]], None],
                 on_end: Callable[[Failure | BaseException | None], None]) -> None:
        self.on_message, self.on_end = on_message, on_end
        self._buffer = b""
        self._ended = False

    def abort(self) -> None:
        self._ended = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if self._ended or not line.strip():
                continue
            try:
                self.on_message(json.loads(line))
            except Exception:
                self._end(Failure())
                return

    def _end(self, error: Failure | BaseException | None) -> None:
        if not self._ended:
            self._ended = True
            self.on_end(error)
        self.abort()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self._ended:
            return
        self._ended = True
        if reason.check(ResponseDone, PotentialDataLoss):
            self.on_end(ConnectionError("etcd closed the watch stream"))
        else:
            self.on_end(reason)
