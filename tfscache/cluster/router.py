"""Router: sends each request to an owner of its model, here or on another node.

The owners of a model name are the first R members by rendezvous hashing (``ring.py``) over
the live members that discovery reports.  A request goes to the first owner that is not known
to be down; when the owner is this node, the local node serves it with no network hop.

Spreading: a hot model gets more copies.  When this router already has
``spread_threshold`` requests in flight to the first owner for a model name, the next request
goes to the next owner (which loads its own copy), and so on down the R owners; when all are
that busy, to the least busy.  A quiet model stays on one node.

Failover: a forward that cannot connect (refused, reset, not connected within
``connect_timeout``, REST and gRPC alike) or that the owner answers with UNAVAILABLE (gRPC) /
HTTP 503 (REST) is retried on the next owner: at most R tries, all within the request's
deadline (the gRPC call's own deadline, else ``forward_timeout``). Predict, classify, regress,
metadata and status have no side effects, so a retry is safe. A member that failed in a way
that concerns the whole node (no connection, draining, its TF Serving unreachable or itself
answering 503/UNAVAILABLE) is remembered as down for ``down_seconds``: the following requests,
for every model, try it last.  An UNAVAILABLE about one model only (its copy failed: disk full,
model source unreachable), which the owner marks ``x-tfscache-node-unavailable: 0`` (REST
header, gRPC trailing metadata; ``ServingError.node_wide`` here), fails over without that: a
node is not demoted for all its models by one.  A deadline that runs out is DEADLINE_EXCEEDED,
never a hang. Any other answer of an owner (NOT_FOUND,
INVALID_ARGUMENT, ...) goes back unchanged.

Spill-over (``spill_over``): an owner that has no room for the model in time answers
RESOURCE_EXHAUSTED (HTTP 429) marked ``x-tfscache-no-room: 1`` (``ServingError.no_room``);
the request then goes to the next owner, like a failover within the same deadline but without
marking the owner down (it serves its other models), and is counted in
``tfscache_router_spill_overs``.  When no owner has room, the client gets the last 429 /
RESOURCE_EXHAUSTED.  A RESOURCE_EXHAUSTED without the marker (a message too large, TF
Serving's own) goes back unchanged.

Forwards carry the marker (REST header / gRPC metadata ``x-tfscache-forwarded``), so the
receiving node serves the request itself instead of routing it again; its value is the
cluster's token (``forward_auth``), which the receiving front end verifies.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tfscache.cluster.forward_auth import ForwardMarker, process_marker
from tfscache.cluster.members import Member
from tfscache.cluster.ring import Ring
from tfscache.errors import NO_ROOM_KEY, Code, ServingError, deadline, unavailable
from tfscache.interfaces import IDiscovery, IRequestHandler
from tfscache.metrics import Metrics
from tfscache.modelspec import ModelRef, RestCall
from tfscache.transport.grpc_client import CONNECT_TIMEOUT, GrpcChannel
from tfscache.transport.http_client import ConnectFailed, ExchangeFailed, HttpClientPool
from tfscache.util.timers import Timers
from tfscache.wire import (
    FORWARDED_HEADER,
    FORWARDED_KEY,
    NODE_UNAVAILABLE_HEADER,
    HttpReply,
    HttpRequest,
    Metadata,
    forwardable_headers,
    reply_headers,
)

DOWN_SECONDS = 3.0        # how long a member that failed node-wide is tried last
_NO_ROOM_HEADER = NO_ROOM_KEY.encode()

ChannelFactory = Callable[[str], GrpcChannel]
Attempt = Callable[[Member | None, float], defer.Deferred[Any]]


class _Failover(Exception):
    """A forward failed in a way that makes the next owner worth trying."""

    def __init__(self, error: ServingError, mark_down: bool, reply: HttpReply | None = None,
                 spill: bool = False) -> None:
        super().__init__(error.message)
        self.error, self.mark_down, self.reply = error, mark_down, reply
        self.spill = spill  # the owner had no room (RESOURCE_EXHAUSTED): spill-over, not a fault


@implementer(IRequestHandler)
class Router:
    log = Logger()

    def __init__(
        self,
        local: IRequestHandler,
        discovery: IDiscovery,
        self_id: str,
        replicas: int,
        forward_timeout: float,
        spread_threshold: int,
        metrics: Metrics,
        clock: IReactorTime,
        http: HttpClientPool | None = None,
        grpc_channel_factory: ChannelFactory | None = None,
        down_seconds: float = DOWN_SECONDS,
        connect_timeout: float = CONNECT_TIMEOUT,
        tls_ca: bytes | None = None,
        tls: bool = False,
        spill_over: bool = True,
        forward_marker: ForwardMarker | None = None,
    ) -> None:
        self.local, self.discovery, self.self_id = local, discovery, self_id
        self.replicas = max(1, replicas)
        self.forward_timeout = forward_timeout
        self.spread_threshold = spread_threshold
        self.metrics = metrics
        self.clock = clock
        self.timers = Timers(clock)
        self.down_seconds = down_seconds
        self.spill_over = spill_over
        marker = forward_marker or process_marker()
        self._forwarded_header = (FORWARDED_HEADER, marker.header)
        self._forwarded_metadata: tuple[tuple[str, str], ...] = ((FORWARDED_KEY, marker.value),)
        # logging.level debug: a line per route decision (off, the hot path pays one test)
        self.trace = False
        # TLS between nodes when the cluster serves TLS: peers are verified against tls_ca (or
        # the system's roots)
        self.scheme = b"https" if tls else b"http"
        context = None
        if tls:
            context = ssl.create_default_context(cadata=tls_ca.decode("ascii") if tls_ca else None)
        self.http = http or HttpClientPool(connect_timeout, max_idle_per_host=256, tls=context)
        if grpc_channel_factory is None:
            credentials = grpc.ssl_channel_credentials(root_certificates=tls_ca) if tls else None
            grpc_channel_factory = lambda target: GrpcChannel(target, credentials, connect_timeout)  # noqa: E731
        self._channel_factory = grpc_channel_factory
        self._channels: dict[str, GrpcChannel] = {}
        self._down_until: dict[str, float] = {}
        self._inflight: dict[tuple[str, str], int] = {}
        self._version = 0
        self._ring = Ring((), self.replicas)
        self._members_changed(list(discovery.members()))
        discovery.subscribe(self._members_changed)

    # -- membership ----------------------------------------------------------------------------
    def _members_changed(self, members: Sequence[Member]) -> None:
        self._version += 1
        self._ring = Ring(members, self.replicas, self._version)
        self.metrics.members.set(len(self._ring))
        live = {m.id: m for m in self._ring.members}
        for mid, channel in list(self._channels.items()):
            m = live.get(mid)
            if m is None or m.grpc_target != channel.target:
                del self._channels[mid]
                # calls in flight to a member that left (a rolling restart drains it) finish:
                # they are cancelled only past the forward deadline
                channel.close(grace=self.forward_timeout)
        for mid in [mid for mid in self._down_until if mid not in live]:
            del self._down_until[mid]

    def members(self) -> list[Member]:
        return list(self._ring.members)

    def owners_for(self, name: str) -> list[Member]:
        """The owners of a model name, most preferred first (the rendezvous order)."""
        return list(self._ring.owners(name))

    def is_down(self, member_id: str) -> bool:
        return self._down_until.get(member_id, 0.0) > self.clock.seconds()

    def inflight(self, name: str, member_id: str) -> int:
        return self._inflight.get((name, member_id), 0)

    def candidates(self, name: str) -> list[Member | None]:
        """The order in which this request will try the owners (None: this node, when no
        member is known at all)."""
        owners = self._ring.owners(name)
        if not owners:
            return [None]
        now = self.clock.seconds()
        up: list[Member | None] = []
        down: list[Member | None] = []
        for m in owners:
            (down if self._down_until.get(m.id, 0.0) > now else up).append(m)
        if len(up) > 1:
            threshold, inflight = self.spread_threshold, self._inflight
            loads = [inflight.get((name, m.id), 0) for m in up]  # type: ignore[union-attr]
            pick = next((i for i, n in enumerate(loads) if n < threshold), None)
            if pick is None:
                pick = loads.index(min(loads))
            if pick:
                up.insert(0, up.pop(pick))
        return up + down

    # -- IRequestHandler ------------------------------------------------------------------------
    def rest(self, call: RestCall, request: HttpRequest) -> defer.Deferred[HttpReply]:
        def attempt(m: Member | None, remaining: float) -> defer.Deferred[HttpReply]:
            if self.trace:
                self._trace(call.ref, m)
            if m is None or m.id == self.self_id:
                return self._rest_local(call, request)
            return defer.ensureDeferred(self._rest_remote(m, request, remaining))

        return _Route(self, call.ref.name, self.forward_timeout, attempt).result

    def grpc(self, method: str, ref: ModelRef, payload: bytes, timeout: float | None,
             metadata: Metadata = ()) -> defer.Deferred[bytes]:
        def attempt(m: Member | None, remaining: float) -> defer.Deferred[bytes]:
            if self.trace:
                self._trace(ref, m)
            if m is None or m.id == self.self_id:
                return self._grpc_local(method, ref, payload, remaining, metadata)
            return self._grpc_remote(m, method, payload, remaining, metadata)

        return _Route(self, ref.name, self.forward_timeout if timeout is None else timeout, attempt).result

    def _trace(self, ref: ModelRef, member: Member | None) -> None:
        local = member is None or member.id == self.self_id
        self.log.debug("route model={model} version={version}: {where}", model=ref.name,
                       version=ref.version if ref.version is not None else (ref.label or "latest"),
                       where="served here" if local else f"forwarded to {member.id if member else ''}")

    def close(self) -> defer.Deferred[None]:
        """Close the gRPC channels and the pooled HTTP connections (at shutdown)."""
        channels, self._channels = list(self._channels.values()), {}
        closing = [channel.close() for channel in channels]
        return defer.gatherResults([*closing, self.http.close()]).addCallback(lambda _: None)

    def _spill_or_pass(self, result: Any, member_id: str) -> Any:
        """An owner's 429 marked no-room: a spill-over (a _Failover returned) when spilling is
        on.  The marker is the router's business, not the client's: it is dropped either way."""
        if not isinstance(result, HttpReply) or result.code != 429 or result.header(_NO_ROOM_HEADER) is None:
            return result
        reply = HttpReply(result.code, result.parts, [(k, v) for k, v in result.headers
                                                      if k.lower() != _NO_ROOM_HEADER], result.stream)
        if not self.spill_over:
            return reply
        return self._spill(ServingError(Code.RESOURCE_EXHAUSTED, f"{member_id} has no room for the model",
                                        no_room=True), member_id, reply)

    def _spill(self, error: ServingError, member_id: str, reply: HttpReply | None = None) -> _Failover:
        self.metrics.spill_overs.inc()
        self.log.debug("{member} has no room: trying the next owner ({error})", member=member_id,
                       error=error.message)
        return _Failover(error, mark_down=False, reply=reply, spill=True)

    def _mark_down(self, member_id: str, why: str) -> None:
        now = self.clock.seconds()
        if self._down_until.get(member_id, 0.0) <= now:
            self.log.info("member {member} is down for {seconds:g}s: {why}",
                          member=member_id, seconds=self.down_seconds, why=why)
        self._down_until[member_id] = now + self.down_seconds

    # -- REST -----------------------------------------------------------------------------------
    def _rest_local(self, call: RestCall, request: HttpRequest) -> defer.Deferred[HttpReply]:
        return self.local.rest(call, request).addCallbacks(self._local_reply, self._local_failed)

    @staticmethod
    def _local_reply(reply: HttpReply) -> HttpReply:
        if reply.code == 503:  # TF Serving's own 503: it is in trouble
            raise _Failover(unavailable("this node answered 503"), mark_down=True, reply=reply)
        return reply

    @staticmethod
    def _local_failed(failure: Failure) -> Failure:
        e = failure.value
        if isinstance(e, ServingError) and e.code == Code.UNAVAILABLE:
            raise _Failover(e, mark_down=e.node_wide)
        return failure

    async def _rest_remote(self, member: Member, request: HttpRequest, remaining: float) -> HttpReply:
        headers = forwardable_headers(request.headers)
        headers.append(self._forwarded_header)
        try:
            reply: HttpReply = await self.http.request(self.scheme, member.host, member.rest_port, request.method,
                                                       request.path, headers, request.parts, request.length)
        except ConnectFailed as e:
            raise _Failover(unavailable(f"{member.id} refused the connection or did not accept it in time ({e})"),
                            mark_down=True)
        except ExchangeFailed as e:
            # reached the owner, which may have served it, but says nothing about its health
            # (a stale pooled connection, for instance)
            raise _Failover(unavailable(f"the connection to {member.id} failed ({e})"), mark_down=False)
        if reply.code == 503:
            # down unless the owner said the 503 is about this model only (without the marker:
            # its TF Serving's own 503, or not a tfscache node at all)
            model_only = reply.header(NODE_UNAVAILABLE_HEADER) == b"0"
            reply.headers = reply_headers(reply.headers)
            raise _Failover(unavailable(f"{member.id} answered 503"), mark_down=not model_only, reply=reply)
        reply.headers = reply_headers(reply.headers)
        return reply

    # -- gRPC -----------------------------------------------------------------------------------
    def _grpc_local(self, method: str, ref: ModelRef, payload: bytes, remaining: float,
                    metadata: Metadata) -> defer.Deferred[bytes]:
        return self.local.grpc(method, ref, payload, remaining, metadata).addErrback(self._local_failed)

    def _grpc_remote(self, member: Member, method: str, payload: bytes, remaining: float,
                     metadata: Metadata) -> defer.Deferred[bytes]:
        # callbacks, not a coroutine: this runs for every routed call
        channel = self._channels.get(member.id)
        if channel is None or channel.target != member.grpc_target:
            if channel is not None:
                channel.close(grace=self.forward_timeout)
            channel = self._channels[member.id] = self._channel_factory(member.grpc_target)
        d = channel.call(method, payload, remaining, self._forwarded_metadata + tuple(metadata))
        return d.addErrback(self._remote_failed, member.id)

    @staticmethod
    def _remote_failed(failure: Failure, member_id: str) -> Failure:
        e = failure.value
        if isinstance(e, ServingError) and e.code == Code.UNAVAILABLE:
            # node_wide unless the owner's trailing metadata said "this model only"; a failed
            # connection has no such metadata (grpc_client.rpc_error_to_serving_error)
            raise _Failover(ServingError(e.code, f"{member_id}: {e.message}"), mark_down=e.node_wide)
        return failure


class _Route:
    """One request's way through its owners: one attempt at a time, in ``candidates`` order,
    each within what is left of the deadline; cancelling ``result`` (the client went away)
    cancels the attempt in progress and tries no other owner.  Callbacks, not a coroutine:
    this runs for every request (bench/data_plane.py)."""

    __slots__ = ("router", "name", "budget", "attempt", "end", "order", "tries", "last", "current",
                 "cancelled", "result")

    def __init__(self, router: Router, name: str, budget: float, attempt: Attempt) -> None:
        self.router, self.name, self.budget, self.attempt = router, name, budget, attempt
        self.end = router.clock.seconds() + budget
        self.order = router.candidates(name)
        self.tries = 0
        self.last: _Failover | None = None
        self.current: defer.Deferred[Any] | None = None
        self.cancelled = False
        self.result: defer.Deferred[Any] = defer.Deferred(self._cancel)
        self._next()

    def _cancel(self, _d: defer.Deferred[Any]) -> None:
        self.cancelled = True
        if self.current is not None:
            self.current.cancel()

    def _deliver(self, result: Any) -> None:
        # an attempt cancelled with the route may end later (a gRPC call's task is cancelled
        # on the loop's next turn), after the cancel has failed ``result`` already
        if self.result.called:
            return
        if isinstance(result, Failure):
            self.result.errback(result)
        else:
            self.result.callback(result)

    def _next(self) -> None:
        router = self.router
        if self.cancelled:
            self._deliver(Failure(defer.CancelledError()))
            return
        remaining = self.end - router.clock.seconds()
        if self.tries >= len(self.order) or remaining <= 0:
            self._deliver(Failure(self._exhausted()) if self.last is None or self.last.reply is None
                          else self.last.reply)  # the owner's own 503 / 429, unchanged
            return
        member = self.order[self.tries]
        if self.tries:
            router.metrics.retries.inc()
        self.tries += 1
        local = member is None or member.id == router.self_id
        mid = router.self_id if member is None else member.id
        key = (self.name, mid)
        inflight = router._inflight
        inflight[key] = inflight.get(key, 0) + 1
        try:
            d = self.current = self.attempt(member, remaining)
        except Exception:
            d = self.current = defer.fail()
        timer = router.timers.call_later(remaining, d.cancel)
        d.addBoth(self._settled, key, local, mid, timer)

    def _exhausted(self) -> ServingError:
        if self.last is None:
            return deadline(f"Deadline exceeded after {self.budget:g}s before {self.name} could be served")
        if self.last.spill:
            return self.last.error  # no owner had room: its RESOURCE_EXHAUSTED
        return unavailable(f"No owner of model {self.name} could serve the request: {self.last.error.message}")

    def _settled(self, result: Any, key: tuple[str, str], local: bool, mid: str, timer: Any) -> None:
        router = self.router
        self.current = None
        expired = not timer.active()  # the deadline cancelled it, whatever it raised then
        if not expired:
            timer.cancel()
        n = router._inflight[key] - 1
        if n:
            router._inflight[key] = n
        else:
            del router._inflight[key]
        target = "local" if local else mid
        if not isinstance(result, Failure):
            result = router._spill_or_pass(result, mid)
            if not isinstance(result, _Failover):
                router.metrics.forward_done(target, "ok")
                self._deliver(result)
                return
            result = Failure(result)
        if self.cancelled:
            router.metrics.forward_done(target, "cancelled")
            self._deliver(Failure(defer.CancelledError()))
            return
        if expired:
            router.metrics.forward_done(target, "timeout")
            where = "this node" if local else mid
            self._deliver(Failure(deadline(
                f"Deadline exceeded after {self.budget:g}s waiting for {where} to serve {self.name}")))
            return
        e = result.value
        if isinstance(e, ServingError) and e.no_room and router.spill_over:
            e = router._spill(e, mid)
        if isinstance(e, _Failover):
            router.metrics.forward_done(target, "spill" if e.spill else "failover")
            self.last = e
            if e.mark_down:
                router._mark_down(mid, e.error.message)
            self._next()
            return
        timed_out = isinstance(e, ServingError) and e.code == Code.DEADLINE_EXCEEDED
        router.metrics.forward_done(target, "timeout" if timed_out else "error")
        self._deliver(result)
