"""Consul discovery: each node registers a service instance with a TTL check on its agent;
every node follows the passing instances with blocking queries.

Client: plain treq against Consul's HTTP API (discovery/http.py, shared with etcd). Not python-
consul: unmaintained since 2018, its Twisted client lags Consul's API (no ``Meta`` in a
registration, where the gRPC port goes; no request timeouts; the ACL token in the deprecated
``?token=``). Not its maintained fork py-consul either: it dropped the Twisted client (1.3.0),
and its blocking requests would hold a thread per blocking query. The handful of endpoints used
here are simpler to call directly.

Publishing: ``PUT /v1/agent/service/register`` (name = ``service``, or the prefix without its
slashes; id = node id; address and REST port; the gRPC port in ``Meta``) with a TTL check
registered passing, then ``PUT /v1/agent/check/pass/<check>`` every ``ttl/3`` while the
health check passes.  When it fails: ``check/fail`` (the instance leaves the passing list at
once).  ``withdraw()``: ``PUT /v1/agent/service/deregister/<id>``.  A registration the agent
lost (agent restarted, or it deregistered the instance after a long critical spell) is made
again.

Following: ``GET /v1/health/service/<name>?passing=true&index=N&wait=...`` in a loop; the last
known members are kept while the agent is unreachable (capped exponential backoff, the outage
logged once).  TLS: ``https://`` endpoints (``host:port`` means https when a TLS option is set;
``http://`` is refused then), ``ca_cert`` to verify the agent (default: the system's roots),
``client_cert``/``client_key`` (both) for an agent with ``verify_incoming``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import treq
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime

from tfscache.cluster.discovery import MAX_BACKOFF, MIN_BACKOFF, DiscoveryBase, HealthCheck, endpoint_bases
from tfscache.cluster.discovery.http import JsonBody, TLSPolicy, http_client
from tfscache.cluster.members import Member, MemberError

DEREGISTER_CRITICAL_AFTER = "10m"   # the agent drops an instance left critical (a crashed node)


class ConsulError(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"HTTP {code}: {text.strip()[:200]}")
        self.code, self.text = code, text


def service_name(prefix: str, service: str | None = None) -> str:
    """``service`` if given, else the prefix without its slashes (``/tfscache`` -> ``tfscache``)."""
    if service:
        return service
    name = re.sub(r"/+", "-", prefix.strip("/"))
    return name or "tfscache"


class ConsulDiscovery(DiscoveryBase):
    backend = "consul"

    def __init__(
        self,
        endpoints: Sequence[str],
        self_member: Member,
        health_check: HealthCheck | None = None,
        service: str | None = None,
        prefix: str = "/tfscache",
        ttl: float = 10.0,
        token: str | None = None,
        ca_cert: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        clock: IReactorTime | None = None,
        request_timeout: float | None = None,
        wait_seconds: float = 30.0,
        min_backoff: float = MIN_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
            *,
        reactor: Any,
    ) -> None:
        super().__init__(self_member, clock or reactor, health_check, ttl, min_backoff, max_backoff)
        self.endpoints = endpoint_bases(endpoints, "consul", "Consul", ca_cert, client_cert, client_key)
        self.current = 0
        self.service = service_name(prefix, service)
        self.check_id = f"tfscache:{self_member.id}"
        self.token = token
        self.request_timeout = request_timeout or max(1.0, min(5.0, self.refresh_interval))
        self.wait_seconds = wait_seconds
        self.http, self.pool = http_client(reactor, TLSPolicy(ca_cert, client_cert, client_key),
                                           self.request_timeout, keepalive_idle=max(1, math.ceil(self.ttl)))
        self.registered = False
        self._watching: defer.Deferred[Any] | None = None

    # -- HTTP -------------------------------------------------------------------------------------
    def _headers(self) -> dict[bytes | str, list[bytes | str]]:
        headers: dict[bytes | str, list[bytes | str]] = {b"content-type": [b"application/json"]}
        if self.token:
            headers[b"x-consul-token"] = [self.token.encode()]
        return headers

    async def _request(self, method: str, path: str, body: Any = None, params: Any = None,
                       timeout: float | None = None) -> tuple[int, Any, bytes]:
        base = self.endpoints[self.current]
        data = JsonBody(body) if body is not None else None
        try:
            resp = await self.http.request(method, base + path, data=data, params=params,
                                           headers=self._headers(), timeout=timeout or self.request_timeout)
            content: bytes = await treq.content(resp)
        except defer.CancelledError:
            raise
        except Exception:
            self.current = (self.current + 1) % len(self.endpoints)  # try another agent next time
            raise
        return resp.code, resp.headers, content

    async def _put(self, path: str, body: Any = None, ok: Sequence[int] = (200,)) -> int:
        code, _headers, content = await self._request("PUT", path, body)
        if code not in ok:
            raise ConsulError(code, content.decode("utf-8", "replace"))
        return code

    # -- publishing -----------------------------------------------------------------------------
    def _registration(self) -> dict[str, Any]:
        m = self.self_member
        return {
            "ID": m.id, "Name": self.service, "Address": m.host, "Port": m.rest_port,
            "Meta": {"grpc_port": str(m.grpc_port), "rest_port": str(m.rest_port), "tfscache_id": m.id},
            "Check": {"CheckID": self.check_id, "Name": "tfscache TF Serving health", "TTL": f"{self.ttl:g}s",
                      "Status": "passing", "DeregisterCriticalServiceAfter": DEREGISTER_CRITICAL_AFTER},
        }

    async def _register(self) -> None:
        await self._put("/v1/agent/service/register", self._registration())
        self.registered = self.published = True

    async def _refresh(self) -> None:
        if not self.registered:
            await self._register()
            return
        path = f"/v1/agent/check/pass/{quote(self.check_id, safe='')}"
        code, _headers, content = await self._request("PUT", path)
        if code == 200:
            self.published = True
            return
        if code in (404, 500) and b"check" in content.lower():
            # the agent lost the registration (it restarted, or dropped a long-critical instance)
            self.log.info("consul: the agent does not know this node's check; registering it again")
            self.registered = False
            await self._register()
            return
        raise ConsulError(code, content.decode("utf-8", "replace"))

    async def _suspend(self) -> None:
        if not self.registered:
            self.published = False
            return
        path = f"/v1/agent/check/fail/{quote(self.check_id, safe='')}"
        code, _headers, content = await self._request(
            "PUT", path, params={"note": "TF Serving fails its health check"})
        if code != 200 and not (code in (404, 500) and b"check" in content.lower()):
            raise ConsulError(code, content.decode("utf-8", "replace"))
        self.published = False

    async def _remove(self) -> None:
        await self._put(f"/v1/agent/service/deregister/{quote(self.self_member.id, safe='')}", ok=(200, 404))
        self.registered = self.published = False

    # -- following --------------------------------------------------------------------------------
    async def _follow(self) -> None:
        index = 0
        path = f"/v1/health/service/{quote(self.service, safe='')}"
        while self.running:
            params: dict[str, str] = {"passing": "true"}
            timeout = self.request_timeout
            if index:
                params.update(index=str(index), wait=f"{self.wait_seconds:g}s")
                timeout += self.wait_seconds * (1 + 1 / 16)  # Consul adds up to wait/16 of jitter
            started = self.clock.seconds()
            self._watching = defer.ensureDeferred(self._request("GET", path, params=params, timeout=timeout))
            try:
                code, headers, content = await self._watching
            finally:
                self._watching = None
            if code != 200:
                raise ConsulError(code, content.decode("utf-8", "replace"))
            self._reached()
            self._set_members(self._parse(json.loads(content)))
            raw = (headers.getRawHeaders(b"x-consul-index") or [b"0"])[0]
            try:
                new_index = int(raw)
            except ValueError:
                new_index = 0
            if new_index < index:
                index = 0  # the index went backwards (agent restarted): start over
            else:
                if new_index == index and self.clock.seconds() - started < 0.05:
                    await task.deferLater(self.clock, 0.1)  # an early return with no change: slow down
                index = max(new_index, 1)

    def _parse(self, entries: Any) -> list[Member]:
        members = []
        for entry in entries if isinstance(entries, list) else []:
            try:
                service = entry["Service"]
                meta = service.get("Meta") or {}
                members.append(Member.from_dict({
                    "id": service["ID"],
                    "host": service.get("Address") or entry.get("Node", {}).get("Address", ""),
                    "rest_port": service.get("Port"),
                    "grpc_port": meta.get("grpc_port"),
                }))
            except (KeyError, TypeError, AttributeError, MemberError) as e:
                self.log.warn("consul: ignoring a malformed instance of {service}: {error}",
                              service=self.service, error=str(e))
        return members

    def _closed(self) -> defer.Deferred[None]:
        if self._watching is not None:
            self._watching.cancel()
        closed: defer.Deferred[None] = self.pool.closeCachedConnections()
        return closed
