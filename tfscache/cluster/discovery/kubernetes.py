"""Kubernetes discovery: the members are the ready endpoints of one Service, read from its
EndpointSlices (``discovery.k8s.io/v1``, label ``kubernetes.io/service-name``).

Client: treq on the API server's REST API, like the Consul discovery.  Two calls are used (a
list and a watch of endpointslices), on the reactor, with no thread per watch, and all timing
through the injected clock like the other discoveries.  Not the official ``kubernetes``
client: it blocks (a thread held by every watch, and its watch cannot be interrupted from
outside: a stopping node would wait for the stream's timeout).  Not ``kubernetes-asyncio``:
it would run on the asyncio reactor tfscache uses, but it brings aiohttp and a generated
client of the whole API for two calls, asyncio timing that a ``task.Clock`` cannot drive, and
its watch helper leaves the resume and the re-list on 410 to the caller anyway.

Publishing: there is nothing to write.  A node is a member while its pod is ready, and the
pod is ready while ``/readyz`` answers 200, which needs TF Serving healthy (``published``
follows the health check) and the node not draining.  So the RBAC Role needs only ``get``,
``list`` and ``watch`` on ``endpointslices``; ``withdraw()`` is the drain turning ``/readyz``
to 503.  A list without this node is the truth here (the pod is not ready), not a lost
record to put back as with etcd and Consul.  The node's id must be its pod's name (the
endpoints' ``targetRef``): ``node.id`` defaults to ``$POD_NAME``, ``node.advertise_host`` to
``$POD_IP`` (the downward API).

Following: list the Service's slices (their ``resourceVersion``), then watch from it with
bookmarks, for ``watch_seconds`` at a time; a watch that ends or drops is resumed from the
last version seen; a 410 Gone (the version fell out of the API server's history) lists again.
The last known members are kept through an outage (capped exponential backoff, logged once);
a 401/403 says once which permission is missing.  Ports are found by name
(``rest_port_name``, ``grpc_port_name``) among each slice's ports.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import treq
from twisted.internet import defer, protocol, ssl
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss  # twisted.web.client re-exports this one
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from tfscache.cluster.discovery import MAX_BACKOFF, MIN_BACKOFF, DiscoveryBase, HealthCheck
from tfscache.cluster.discovery.http import http_client
from tfscache.cluster.discovery.kubeconfig import ApiAccess, from_kubeconfig, in_cluster
from tfscache.cluster.members import Member, MemberError

SERVICE_LABEL = "kubernetes.io/service-name"
RESOURCE = "endpointslices.discovery.k8s.io"
RBAC_HINT = ("the Role bound to this pod's service account needs verbs get, list, watch on resource "
             "endpointslices in apiGroup discovery.k8s.io")


class KubernetesError(Exception):
    """A non-2xx answer of the API server (its Status message, when it sent one)."""

    def __init__(self, code: int, message: str, reason: str = "") -> None:
        super().__init__(f"HTTP {code}{' ' + reason if reason else ''}: {message.strip()[:300]}")
        self.code, self.message, self.reason = code, message, reason
        self.verb = ""  # the API verb refused: list or watch

    @classmethod
    def from_status(cls, code: int, body: bytes | Mapping[str, Any]) -> KubernetesError:
        status: Any = body
        if isinstance(body, bytes):
            try:
                status = json.loads(body)
            except ValueError:
                return cls(code, body.decode("utf-8", "replace"))
        if not isinstance(status, Mapping):
            return cls(code, str(status))
        return cls(int(status.get("code") or code), str(status.get("message") or ""), str(status.get("reason") or ""))


class _Expired(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


def _pem_blocks(pem: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    return [block + marker for block in pem.split(marker) if b"-----BEGIN CERTIFICATE-----" in block]


@implementer(IPolicyForHTTPS)
class _ApiTLSPolicy:
    """Trust the cluster's CA (a bundle may hold several certificates) and present the client
    certificate, if any."""

    def __init__(self, access: ApiAccess) -> None:
        self.trust: Any = None
        if access.ca_pem:
            certs = [ssl.Certificate.loadPEM(block) for block in _pem_blocks(access.ca_pem)]
            if not certs:
                raise ValueError(f"cluster.discovery: no PEM certificate in the CA of {access.source}")
            self.trust = ssl.trustRootFromCertificates(certs)
        self.client = ssl.PrivateCertificate.loadPEM(access.client_pem) if access.client_pem else None

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return ssl.optionsForClientTLS(hostname.decode("ascii").strip("[]"),
                                       trustRoot=self.trust or ssl.platformTrust(), clientCertificate=self.client)


class _EventStream(protocol.Protocol):
    """A watch response body: one JSON event per line, handed to ``on_event`` as it arrives."""

    def __init__(self, on_event: Callable[[dict[str, Any]], None]) -> None:
        self.on_event = on_event
        self.done: defer.Deferred[None] = defer.Deferred(lambda _d: self.abort())
        self._buffer = b""
        self.events = 0

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if not line.strip() or self.done.called:
                continue
            try:
                event = json.loads(line)
            except ValueError as e:
                self._fail(KubernetesError(200, f"a watch event that is not JSON: {e}"))
                return
            self.events += 1
            try:
                self.on_event(event)
            except Exception:
                self._fail(Failure())
                return

    def _fail(self, error: BaseException | Failure) -> None:
        if not self.done.called:
            self.done.errback(error)
        self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)  # the server ended the watch (its timeoutSeconds)
        else:
            self.done.errback(reason)


class KubernetesDiscovery(DiscoveryBase):
    backend = "kubernetes"
    keeps_records = False

    def __init__(
        self,
        self_member: Member,
        health_check: HealthCheck | None = None,
        service: str = "tfscache",
        namespace: str | None = None,
        kubeconfig: str | None = None,
        rest_port_name: str = "rest",
        grpc_port_name: str = "grpc",
        ttl: float = 10.0,
        clock: IReactorTime | None = None,
        access: ApiAccess | None = None,
        environ: Mapping[str, str] | None = None,
        request_timeout: float = 10.0,
        watch_seconds: int = 300,
        min_backoff: float = MIN_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
        *,
        reactor: Any,
    ) -> None:
        super().__init__(self_member, clock or reactor, health_check, ttl, min_backoff, max_backoff)
        env = os.environ if environ is None else environ
        if access is None:
            access = from_kubeconfig(kubeconfig) if kubeconfig else in_cluster(env)
        self.access = access
        self.service = service
        self.namespace = namespace or env.get("POD_NAMESPACE") or access.namespace or "default"
        self.rest_port_name, self.grpc_port_name = rest_port_name, grpc_port_name
        self.request_timeout = request_timeout
        self.watch_seconds = watch_seconds
        self.path = f"/apis/discovery.k8s.io/v1/namespaces/{quote(self.namespace, safe='')}/endpointslices"
        self.selector = f"{SERVICE_LABEL}={service}"
        self.http, self.pool = http_client(reactor, _ApiTLSPolicy(access), request_timeout, per_host=2)
        self.resource_version: str | None = None   # of the last list or event: the watch resumes from it
        self._slices: dict[str, list[Member]] = {}
        self._portless: set[str] = set()           # slices warned about (no port of the names)
        self._denied_logged = False
        self._stream: _EventStream | None = None
        self.lists = 0                             # counts, for the logs and tests
        self.watches = 0
        self.expiries = 0

    # -- publishing: readiness does it --------------------------------------------------------
    async def _refresh(self) -> None:
        self.published = True  # healthy: /readyz answers 200, so the kubelet marks the pod ready

    async def _suspend(self) -> None:
        self.published = False

    async def _remove(self) -> None:
        self.published = False  # draining: /readyz answers 503 and the endpoint turns not ready

    def _reached(self, loop: str = "follow") -> None:
        # the publish loop never calls the API: only the watch says whether it is reachable
        if loop == "follow":
            self._denied_logged = False
            super()._reached(loop)

    def _unreachable(self, doing: str, error: BaseException | Any) -> None:
        if isinstance(error, KubernetesError) and error.code in (401, 403):
            if not self._denied_logged:
                self._denied_logged = True
                verb = error.verb or "list"
                if error.code == 403:
                    # allowed before: an API server starting up (its RBAC cache not filled yet) or
                    # the Role changed; a warning then, it mostly passes
                    emit = self.log.warn if self.lists else self.log.error
                    emit("kubernetes ({node}): not allowed to {verb} {resource} in namespace {namespace}: "
                         "{hint} (the API server said: {said}){before}; keeping the last {count} members and "
                         "retrying", node=self.self_member.id, verb=verb, resource=RESOURCE, namespace=self.namespace,
                         hint=RBAC_HINT, said=error.message, count=len(self._members),
                         before=" (it was allowed before)" if self.lists else "")
                else:
                    self.log.error(
                        "kubernetes ({node}): the API server refuses this node's credentials ({source}: "
                        "{said}); keeping the last {count} members and retrying", node=self.self_member.id,
                        source=self.access.source, said=error.message or "Unauthorized",
                        count=len(self._members))
            self._reachability.denied()
            return
        super()._unreachable(doing, error)

    # -- HTTP -------------------------------------------------------------------------------------
    def _headers(self) -> dict[bytes | str, list[bytes | str]]:
        headers: dict[bytes | str, list[bytes | str]] = {b"accept": [b"application/json"]}
        authorization = self.access.authorization()  # read again every time: the token rotates
        if authorization:
            headers[b"authorization"] = [authorization]
        return headers

    async def _get(self, params: dict[str, str], verb: str) -> Any:
        # unbuffered: a watch's body is a stream of events, not a reply to keep
        resp = await self.http.get(self.access.server + self.path, params=params, headers=self._headers(),
                                   timeout=self.request_timeout, unbuffered=True)
        if resp.code == 200:
            return resp
        content = await treq.content(resp)
        error = KubernetesError.from_status(resp.code, content)
        if error.code == 410:
            raise _Expired(error.message)
        error.verb = verb
        raise error

    # -- following --------------------------------------------------------------------------------
    async def _follow(self) -> None:
        try:
            if self.resource_version is None:
                await self._list()
            await self._watch()
        except _Expired as e:
            self.expiries += 1
            self.log.info("kubernetes ({node}): the watch of {service}'s endpoints expired ({why}); listing "
                          "them again", node=self.self_member.id, service=self.service, why=str(e) or "410 Gone")
            self.resource_version = None  # the base loop calls us again at once

    async def _list(self) -> None:
        slices: dict[str, list[Member]] = {}
        params = {"labelSelector": self.selector, "limit": "500"}
        while True:
            resp = await self._get(params, "list")
            body = json.loads(await treq.content(resp))
            for item in body.get("items") or []:
                name = (item.get("metadata") or {}).get("name", "")
                slices[name] = self._slice_members(item)
            metadata = body.get("metadata") or {}
            if not metadata.get("continue"):
                break
            params["continue"] = metadata["continue"]
        self.lists += 1
        self._reached()
        self._slices = slices
        self.resource_version = str(metadata.get("resourceVersion") or "") or None
        self._update()

    async def _watch(self) -> None:
        params = {"labelSelector": self.selector, "watch": "true", "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(self.watch_seconds)}
        if self.resource_version:
            params["resourceVersion"] = self.resource_version
        resp = await self._get(params, "watch")
        self.watches += 1
        self._reached()
        stream = _EventStream(self._event)
        self._stream = stream
        resp.deliverBody(stream)
        # a half-open connection says nothing: the server ends each watch after watch_seconds
        guard = self.clock.callLater(self.watch_seconds + self.request_timeout, stream.abort)
        try:
            await stream.done
        finally:
            self._stream = None
            if guard.active():
                guard.cancel()

    def _event(self, event: dict[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            error = KubernetesError.from_status(int(obj.get("code") or 500), obj)
            if error.code == 410:
                raise _Expired(error.message)
            raise error
        metadata = obj.get("metadata") or {}
        version = metadata.get("resourceVersion")
        if kind in ("ADDED", "MODIFIED"):
            self._slices[metadata.get("name", "")] = self._slice_members(obj)
        elif kind == "DELETED":
            self._slices.pop(metadata.get("name", ""), None)
        if version:
            self.resource_version = str(version)
        if kind != "BOOKMARK":
            self._update()

    def _update(self) -> None:
        self._set_members(m for members in self._slices.values() for m in members)

    def _slice_members(self, obj: Mapping[str, Any]) -> list[Member]:
        name = (obj.get("metadata") or {}).get("name", "")
        ports = {p.get("name") or "": p.get("port") for p in obj.get("ports") or [] if isinstance(p, dict)}
        rest, grpc_ = ports.get(self.rest_port_name), ports.get(self.grpc_port_name)
        endpoints = obj.get("endpoints") or []
        if rest is None or grpc_ is None:
            if endpoints and name not in self._portless:
                self._portless.add(name)
                self.log.warn("kubernetes: EndpointSlice {slice} of {service} has no ports named {rest!r} and "
                              "{grpc!r} (it has {names}): its endpoints are ignored; see "
                              "cluster.discovery.rest_port_name / grpc_port_name", slice=name,
                              service=self.service, rest=self.rest_port_name, grpc=self.grpc_port_name,
                              names=", ".join(repr(n) for n in ports) or "none")
            return []
        members = []
        for endpoint in endpoints:
            if not isinstance(endpoint, dict):
                continue
            # a missing ready condition means ready (the API's definition); terminating pods are not
            if (endpoint.get("conditions") or {}).get("ready") is False:
                continue
            addresses = endpoint.get("addresses") or []
            if not addresses:
                continue
            ref = endpoint.get("targetRef") or {}
            ident = (ref.get("name") if ref.get("kind") == "Pod" else None) or endpoint.get("hostname") \
                or addresses[0]
            try:
                members.append(Member.from_dict({"id": ident, "host": addresses[0], "rest_port": rest,
                                                 "grpc_port": grpc_}))
            except MemberError as e:
                self.log.warn("kubernetes: ignoring an endpoint of {slice}: {error}", slice=name, error=str(e))
        return members

    def _closed(self) -> defer.Deferred[None]:
        if self._stream is not None:
            self._stream.abort()
        closed: defer.Deferred[None] = self.pool.closeCachedConnections()
        return closed
