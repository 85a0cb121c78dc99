"""Builds the service tree of one node from its configuration."""

from __future__ import annotations

import gc
import json
import os
import signal
import ssl
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized

from tfscache.access_log import AccessLog
from tfscache.cluster.forward_auth import ForwardMarker, read_secret
from tfscache.cluster.members import Member
from tfscache.config import Config, required
from tfscache.errors import Code, ServingError
from tfscache.frontend.grpc_server import GrpcFrontend, GrpcLimits
from tfscache.frontend.rest import RestFrontend, error_reply, json_reply
from tfscache.interfaces import IModelProvider
from tfscache.logs import DaemonLog
from tfscache.metrics import Metrics
from tfscache.node.disk_cache import DiskCache
from tfscache.node.eviction import make_policy
from tfscache.node.health import BackendMonitor
from tfscache.node.local import LocalNode
from tfscache.node.manager import CacheLimits, CacheManager
from tfscache.node.serving import ServingController
from tfscache.node.source import SourceMonitor
from tfscache.transport import http_server
from tfscache.transport.grpc_client import as_deferred
from tfscache.transport.http_server import HttpLimits
from tfscache.util import fdlimit
from tfscache.wire import HttpReply, HttpRequest

if TYPE_CHECKING:
    from tfscache.cluster.discovery import DiscoveryBase
    from tfscache.cluster.discovery.static import StaticDiscovery
    from tfscache.cluster.router import Router
    from tfscache.frontend.admin import AdminApi


def make_provider(cfg: Config, reactor: Any, own_shutdown: bool = True) -> IModelProvider:
    """The configured provider; ``own_shutdown=False`` when the caller closes it (a node closes
    it after its drain, so copies that in-flight requests wait for are not stopped early)."""
    p = cfg.model_provider
    if p.type == "disk":
        from tfscache.providers.disk import DiskModelProvider

        return DiskModelProvider(required(p.disk.base_path, "model_provider.disk.base_path"),
                                 listing_ttl=p.listing_ttl_seconds, copy_threads=p.copy_threads,
                                 reactor=reactor)
    # each SDK is imported only when its provider type is configured
    if p.type == "azure":
        from tfscache.providers.azure import AzureBlobModelProvider

        return AzureBlobModelProvider.from_config(p, reactor, own_shutdown=own_shutdown)
    if p.type == "gcs":
        from tfscache.providers.gcs import GCSModelProvider

        return GCSModelProvider.from_config(p, reactor, own_shutdown=own_shutdown)
    from tfscache.providers.s3 import S3ModelProvider

    return S3ModelProvider.from_config(p, reactor, own_shutdown=own_shutdown)


SOURCE_FIRST_CHECK = 5.0  # seconds the start-up line waits for the model source's first check


class StartupError(Exception):
    """The node cannot start; the reason has been logged as one line."""


class CacheService(service.Service):
    """The node's cache: the model source, the disk cache, TF Serving (its controller), the
    cache manager and the local request handler on top of them.

    Starting rebuilds the disk cache's books and, with ``serving.reset_on_start``, sends TF
    Serving the (empty) model list; ``started`` fires then, or fails with StartupError (the
    reason logged as one line).  Stopping saves the eviction order and closes the connections
    and the provider: after the front ends have drained, so that copies and loads that
    in-flight requests wait for are not stopped early."""

    log = Logger()

    def __init__(self, cfg: Config, metrics: Metrics, reactor: Any) -> None:
        self.cfg = cfg
        s = cfg.serving
        self.provider = make_provider(cfg, reactor, own_shutdown=False)
        self.backend = ServingController(s.grpc_target, s.rest_url, reactor, s.model_platform)
        # a write is never waited for longer than a load may take
        self.backend.reload_timeout = min(s.config_write_timeout_seconds, s.load_timeout_seconds)
        self.disk = DiskCache(cfg.disk_cache.path, cfg.disk_cache.capacity_bytes,
                              policy=make_policy(cfg.disk_cache.eviction, cfg.disk_cache.capacity_bytes),
                              serving_root=s.model_path)
        self.cache = CacheManager(
            self.provider, self.backend, self.disk,
            CacheLimits(
                max_models=s.max_models, max_bytes=s.max_bytes, memory_factor=s.memory_factor,
                load_timeout=s.load_timeout_seconds,
                fetch_timeout=cfg.model_provider.fetch_timeout_seconds,
                failure_backoff=s.failure_backoff_seconds, churn_guard=s.churn_guard_seconds,
                capacity_wait=s.capacity_wait_seconds,
            ),
            metrics,
            clock=reactor,
            policy=make_policy(s.eviction, s.max_bytes or s.max_models),
        )
        self.local = LocalNode(
            self.cache, s.rest_url, s.grpc_target, metrics,
            request_timeout=s.request_timeout_seconds, load_timeout=s.load_timeout_seconds, clock=reactor,
        )
        self.started: defer.Deferred[None] = defer.Deferred()

    def startService(self) -> None:
        service.Service.startService(self)
        defer.ensureDeferred(self._start()).chainDeferred(self.started)

    async def _start(self) -> None:
        try:
            # rebuild the disk cache's books only: the backend reset has its own handling
            await self.cache.start(reset_backend=False)
        except Exception as e:
            self.log.error("disk cache at {path} (disk_cache.path) cannot be used: {error}; stopping",
                           path=self.cfg.disk_cache.path, error=str(e) or repr(e))
            raise StartupError(str(e))
        if self.cfg.serving.reset_on_start:
            try:
                await self.backend.reset()
            except Exception as e:
                # not fatal: the monitor notices when TF Serving comes up, and the first load
                # sends the whole list anyway
                self.log.warn("TF Serving at {target} did not take the initial model list: {err}",
                              target=self.cfg.serving.grpc_target, err=str(e) or repr(e))

    @defer.inlineCallbacks
    def stopService(self):  # type: ignore[no-untyped-def]
        service.Service.stopService(self)
        self.disk.save_order()
        yield self.local.close()
        self.backend.close()
        close = getattr(self.provider, "close", None)
        if close is not None:
            # after the drain: a copy an in-flight request waited for has had its chance
            yield close()


class RestListener(service.Service):
    """IService: the REST port.  An asyncio server (transport/http_server.py), not a Twisted
    listening port, so Twisted's StreamServerEndpointService does not fit: this is its small
    equivalent.  ``started`` fires once the port is bound (``port`` is the bound one)."""

    def __init__(self, factory: http_server.HttpServerFactory, host: str, port: int,
                 tls: ssl.SSLContext | None = None) -> None:
        self.factory, self.host, self.requested_port, self.tls = factory, host, port, tls
        self.listener: http_server.HttpListener | None = None
        self.started: defer.Deferred[None] = defer.Deferred()

    @property
    def port(self) -> int:
        return self.listener.port if self.listener is not None else self.requested_port

    def startService(self) -> None:
        service.Service.startService(self)
        d = as_deferred(http_server.listen(self.factory, self.host, self.requested_port, self.tls))

        def listening(listener: http_server.HttpListener) -> None:
            self.listener = listener

        d.addCallback(listening).chainDeferred(self.started)

    def stop_accepting(self) -> None:
        """No new connections; idle ones closed; the busy ones finish their replies."""
        if self.listener is not None:
            self.listener.stop()
            self.factory.close_idle()

    def stopService(self) -> None:
        service.Service.stopService(self)
        self.stop_accepting()


class FrontEnds(service.MultiService):
    """The client-facing ports: REST (``RestListener`` serving ``RestFrontend``) and gRPC
    (``GrpcFrontend``, grpc.aio), both handing requests to ``handler`` (the local node, then
    the router once the cluster is joined).  ``started`` fires once both ports are bound, or
    fails with StartupError (logged as one line naming the listen keys)."""

    log = Logger()

    def __init__(self, cfg: Config, metrics: Metrics, local: LocalNode, reactor: Any,
                 extra_routes: dict[str, Any], marker: ForwardMarker, max_connections: int,
                 admin: AdminApi | None = None) -> None:
        service.MultiService.__init__(self)
        lc = cfg.listen
        self.cfg = cfg
        self.rest = RestFrontend(local, metrics, lc.max_request_bytes, extra_routes=extra_routes, local=local,
                                 admin=admin, forward_marker=marker)
        self.rest_factory = self.rest.factory(reactor, HttpLimits(
            max_buffered=lc.max_buffered_bytes, max_connections=max_connections,
            idle_timeout=lc.idle_timeout_seconds, header_timeout=lc.header_timeout_seconds,
            body_timeout=lc.body_timeout_seconds))
        tls = tls_context(lc.tls_cert, required(lc.tls_key, "listen.tls_key")) if lc.tls_cert else None
        self.rest_listener = RestListener(self.rest_factory, lc.host, lc.rest_port, tls)
        self.grpc = GrpcFrontend(
            local, metrics, lc.host, lc.grpc_port, max_message_bytes=lc.max_request_bytes, local=local,
            credentials=grpc_credentials(lc.tls_cert, lc.tls_key), forward_marker=marker,
            limits=GrpcLimits(
                max_connections=max_connections, max_concurrent_streams=lc.grpc_max_concurrent_streams,
                max_buffered=lc.max_buffered_bytes,
                idle_timeout=lc.idle_timeout_seconds, handshake_timeout=lc.header_timeout_seconds),
        )
        # read when scraped: no gauge update (and its lock) on every request
        metrics.inflight.set_function(lambda: self.rest.inflight.count + self.grpc.inflight.count)
        service.MultiService.addService(self, self.rest_listener)
        service.MultiService.addService(self, self.grpc)
        self.started: defer.Deferred[None] = defer.Deferred()

    def set_handler(self, handler: Any) -> None:
        self.rest.handler = self.grpc.handler = handler

    def set_access_log(self, enabled: bool) -> None:
        self.rest.access_log = self.grpc.access_log = AccessLog() if enabled else None

    def startService(self) -> None:
        service.Service.startService(self)
        defer.ensureDeferred(self._start()).chainDeferred(self.started)

    async def _start(self) -> None:
        listen = self.cfg.listen
        try:
            self.rest_listener.startService()
            await self.rest_listener.started
            self.grpc.startService()
            await self.grpc.started
        except Exception as e:
            self.log.error("cannot listen on {host} (listen.rest_port {rest}, listen.grpc_port {grpc}): {error}; "
                           "stopping", host=listen.host, rest=listen.rest_port, grpc=listen.grpc_port,
                           error=str(e) or repr(e))
            raise StartupError(str(e))

    def refuse(self) -> None:
        """New requests are answered UNAVAILABLE (routers fail over); in-flight ones go on."""
        self.rest.draining = True
        self.grpc.accepting = False

    @defer.inlineCallbacks
    def drain(self, deadline: float, clock: IReactorTime):  # type: ignore[no-untyped-def]
        """Stop accepting connections, then wait (until ``deadline``) for the requests in flight."""
        self.rest_listener.stop_accepting()
        left = max(0.0, deadline - clock.seconds())
        rest_idle, grpc_idle = yield defer.gatherResults([
            self.rest.inflight.wait_idle(left, clock), self.grpc.inflight.wait_idle(left, clock)])
        if not (rest_idle and grpc_idle):
            self.log.warn("drain timeout: {rest} REST and {grpc} gRPC requests still in flight",
                          rest=self.rest.inflight.count, grpc=self.grpc.inflight.count)
        # what is left of the drain time is grpcio's grace for replies still being sent
        self.grpc.stop_grace = max(0.0, deadline - clock.seconds())


class ClusterService(service.MultiService):
    """The cluster: discovery (a child service) and the router that sends each request to
    its model's owners.  Made once the ports are bound (the member record carries them)."""

    def __init__(self, cfg: Config, self_member: Member, local: LocalNode, health_check: Any,
                 metrics: Metrics, reactor: Any, marker: ForwardMarker) -> None:
        from tfscache.cluster.discovery import make_discovery
        from tfscache.cluster.router import Router

        service.MultiService.__init__(self)
        c = cfg
        self.discovery: DiscoveryBase | StaticDiscovery = make_discovery(c, self_member, reactor,
                                                                         health_check=health_check)
        self.router: Router = Router(
            local, self.discovery, c.node.id, c.cluster.replicas_per_model,
            c.cluster.forward_timeout_seconds, c.cluster.spread_inflight_threshold, metrics,
            clock=reactor, tls=bool(c.listen.tls_cert), tls_ca=read_file(c.cluster.tls_ca_cert),
            spill_over=c.cluster.spill_over, forward_marker=marker,
        )
        self.router.trace = c.logging.level == "debug"
        service.MultiService.addService(self, self.discovery)

    def withdraw(self) -> defer.Deferred[None]:
        return self.discovery.withdraw()

    @defer.inlineCallbacks
    def stopService(self):  # type: ignore[no-untyped-def]
        yield service.MultiService.stopService(self)
        yield self.router.close()


class NodeService(service.MultiService):
    """One tfscache node, its service tree the architecture::

        NodeService            start-up order, drain, SIGHUP, the daemon's log
        ├── CacheService       model source, disk cache, TF Serving, cache manager, local node
        ├── FrontEnds          REST (RestListener) and gRPC (GrpcFrontend) ports
        ├── BackendMonitor     TF Serving's health
        ├── SourceMonitor      whether the model source can be read
        └── ClusterService     discovery and the router (added once the ports are bound)

    The listeners start once the disk cache is rebuilt and TF Serving's list is reset, so the
    first request sees a consistent node."""

    log = Logger()

    def __init__(self, cfg: Config, reactor: Any, config_path: str | None = None, daemon: bool = False,
                 daemon_log: DaemonLog | None = None) -> None:
        service.MultiService.__init__(self)
        self.reactor = reactor
        self.cfg = cfg
        self.config_path = config_path
        self.daemon = daemon  # under twistd: SIGHUP, SIGTERM, exit status 1 on a start-up error
        self.daemon_log = daemon_log
        self.metrics = Metrics(per_model_labels=cfg.metrics.per_model_labels)
        self.cache_service = CacheService(cfg, self.metrics, reactor)
        self.provider, self.backend = self.cache_service.provider, self.cache_service.backend
        self.disk, self.cache, self.local = self.cache_service.disk, self.cache_service.cache, self.cache_service.local
        self.cluster: ClusterService | None = None
        self.admin: AdminApi | None = None
        if cfg.admin.enabled:
            from tfscache.frontend.admin import AdminApi

            self.admin = AdminApi(self.cache, required(cfg.admin.token, "admin.token"), members=self._members,
                                  owners=self._owners)
        # metrics.enabled: false answers the metrics paths 404 (counting goes on: it is cheap,
        # and the metrics change nothing else)
        metrics_page = self._metrics_page if cfg.metrics.enabled else self._metrics_disabled
        self.forward_marker = forward_marker(cfg)
        # a daemon raises its soft open-files limit to the hard one; no listener may hold more
        # connections than the limit leaves (util/fdlimit.py)
        self.open_files = fdlimit.raise_open_files_limit() if daemon else fdlimit.open_files_limit()
        self.max_connections = min(cfg.listen.max_connections, self.open_files.connection_cap())
        self.frontends = FrontEnds(cfg, self.metrics, self.local, reactor, extra_routes={
            "/monitoring/prometheus/metrics": metrics_page,
            "/metrics": metrics_page,
            "/healthz": self._healthz,
            "/readyz": self._readyz,
        }, marker=self.forward_marker, max_connections=self.max_connections, admin=self.admin)
        self.frontends.set_access_log(cfg.logging.access_log)
        self.rest, self.grpc = self.frontends.rest, self.frontends.grpc
        self.monitor = BackendMonitor(self.cache, self.backend, reactor, interval=cfg.serving.health_interval_seconds)
        self.monitor.subscribe(self._set_health)
        self.source = SourceMonitor(self.provider, cfg.model_provider.check_interval_seconds, reactor,
                                    kind=cfg.model_provider.type)
        self.source.subscribe(self.cache.set_source_problem)
        for child in (self.cache_service, self.frontends, self.monitor, self.source):
            # not running yet: each is started in its turn by _start
            service.MultiService.addService(self, child)
        self.ready = False

    @property
    def discovery(self) -> DiscoveryBase | StaticDiscovery | None:
        return self.cluster.discovery if self.cluster is not None else None

    @property
    def router(self) -> Router | None:
        return self.cluster.router if self.cluster is not None else None

    @property
    def handler(self) -> Router | LocalNode:
        return self.router or self.local

    @property
    def rest_port(self) -> int:
        return self.frontends.rest_listener.port

    def setServiceParent(self, parent: Any) -> None:
        # under twistd, the parent is its application: an ILogObserver component on it is the
        # observer twistd logs to from its first line on (twisted.application.app.AppLogger)
        if self.daemon_log is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.daemon_log.observer)
        service.MultiService.setServiceParent(self, parent)

    def startService(self) -> None:
        service.Service.startService(self)  # the children start in order, in _start
        if self.daemon:
            self._log_open_files()
            self.reactor.callWhenRunning(self._install_signals)
        d = defer.ensureDeferred(self._start())

        def failed(f: Any) -> Any:
            if f.check(StartupError):
                # logged already; under twistd the process is on its way out with status 1
                self._exit_failed()
                return None if self.daemon else f
            self.log.failure("tfscache failed to start", failure=f)
            return None

        self.started = d.addErrback(failed)

    def _log_open_files(self) -> None:
        f = self.open_files
        fields = dict(open_files_soft=f.soft, open_files_hard=f.hard, open_files_before=f.before,
                      max_connections=self.max_connections, configured_max_connections=self.cfg.listen.max_connections)
        if f.error:
            self.log.warn("open files limit {open_files_soft} (hard {open_files_hard}) could not be raised: {error}; "
                          "at most {max_connections} connections per listener", error=f.error, **fields)
        else:
            self.log.info("open files limit {open_files_soft} (was {open_files_before}, hard {open_files_hard}): "
                          "at most {max_connections} connections per listener "
                          "(listen.max_connections {configured_max_connections})", **fields)

    async def _start(self) -> None:
        self.cache_service.startService()
        await self.cache_service.started
        self.frontends.startService()
        await self.frontends.started
        self.monitor.startService()
        self.source.startService()
        listen = self.cfg.listen
        if listen.ports_file:
            try:
                write_ports_file(listen.ports_file, self.rest_port, self.grpc.bound_port)
            except OSError as e:
                self.log.error("cannot write listen.ports_file {path}: {error}; stopping",
                               path=listen.ports_file, error=e.strerror or str(e))
                raise StartupError(str(e))
        self._join_cluster()
        self.ready = True
        if self.daemon:
            self._freeze_startup_objects()
        # the source's first check logs its own line when the source cannot be read (a source
        # that does not answer at all is not waited for long)
        first = self.source.first_check()
        timer = self.reactor.callLater(SOURCE_FIRST_CHECK, first.cancel)
        try:
            await first
        except defer.CancelledError:
            pass
        else:
            timer.cancel()
        self.log.info(
            "tfscache node {node} {state}: REST {rest}, gRPC {grpc}, TF Serving {backend}",
            node=self.cfg.node.id, rest=self.rest_port, grpc=self.grpc.bound_port,
            backend=self.cfg.serving.grpc_target,
            state="ready" if self.source.checked and self.source.problem is None else
            "listening, NOT ready (model source)",
        )
        assert self.discovery is not None  # _join_cluster made it
        await self.discovery.publish()

    def _freeze_startup_objects(self) -> None:
        """Leave what start-up made (modules, config, protos: ~68,000 tracked objects here) out
        of the garbage collector's full collections, which otherwise traverse it all every few
        seconds under load and stop the reactor for 40-55 ms each time (bench/README §6e).
        Under twistd only: an in-process node (the tests) shares its process."""
        gc.collect()
        gc.freeze()
        self.log.info("garbage collector: {count} start-up objects frozen (full collections skip them)",
                      count=gc.get_freeze_count())

    def _exit_failed(self) -> None:
        """Under twistd: stop the reactor, then exit with status 1 (a reactor stop alone exits
        0, which a supervisor reads as a clean stop and does not restart)."""
        if not self.daemon:
            return
        core = cast(IReactorCore, self.reactor)

        def exit_1() -> None:
            for stream in (sys.__stdout__, sys.__stderr__):
                if stream is not None:
                    stream.flush()
            os._exit(1)

        core.addSystemEventTrigger("after", "shutdown", exit_1)
        core.callWhenRunning(core.stop)

    def _install_signals(self) -> None:
        """After the reactor's own handlers: SIGHUP reloads; SIGTERM (and SIGINT) drain and exit 0
        (the reactor's handler would re-raise SIGTERM at exit, which reads as a crash).  Through
        the asyncio loop's own signal handling, which wakes the loop at once (a plain
        ``signal.signal`` handler runs only once the loop wakes for something else)."""
        from tfscache.reactor import event_loop

        core = cast(IReactorCore, self.reactor)

        def terminate() -> None:
            self.log.info("SIGTERM: draining, then exiting")
            core.stop()

        loop = event_loop(self.reactor)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGTERM, terminate)
        loop.add_signal_handler(signal.SIGINT, terminate)

    def _join_cluster(self) -> None:
        from tfscache.cluster.members import Member

        c = self.cfg
        assert self.grpc.bound_port is not None
        self.self_member = Member(c.node.id, c.node.advertise_host, self.rest_port, self.grpc.bound_port)
        self.cluster = ClusterService(c, self.self_member, self.local, self.backend.check, self.metrics,
                                      self.reactor, self.forward_marker)
        self.frontends.set_handler(self.cluster.router)
        service.MultiService.addService(self, self.cluster)  # starts it: discovery follows the member list

    @defer.inlineCallbacks
    def stopService(self):  # type: ignore[no-untyped-def]
        """Drain: refuse new requests (so routers fail over), let in-flight ones finish up to
        ``listen.drain_timeout_seconds``, withdraw from discovery, then stop."""
        self.log.info("tfscache node {node} draining", node=self.cfg.node.id)
        self.ready = False
        self._set_health(False)
        self.frontends.refuse()
        clock = cast(IReactorTime, self.reactor)
        deadline = clock.seconds() + self.cfg.listen.drain_timeout_seconds
        if self.cluster is not None:
            yield self.cluster.withdraw()
        yield self.frontends.drain(deadline, clock)
        service.Service.stopService(self)
        # the front ends, the monitor and the cluster together; the cache last, after the drain
        yield defer.gatherResults([defer.maybeDeferred(child.stopService)
                                   for child in (self.frontends, self.monitor, self.source, self.cluster)
                                   if child is not None and child.running])
        yield self.cache_service.stopService()
        self.log.info("tfscache node {node} stopped", node=self.cfg.node.id)
        if self.daemon_log is not None:
            self.daemon_log.close()  # the counts of warnings still held back

    # -- SIGHUP ------------------------------------------------------------------------------
    # each setter reads its key from the new configuration
    RELOADABLE: dict[str, Callable[[NodeService, Config], None]] = {
        "serving.max_models": lambda self, c: setattr(self.cache.limits, "max_models", c.serving.max_models),
        "serving.max_bytes": lambda self, c: setattr(self.cache.limits, "max_bytes", c.serving.max_bytes),
        "serving.memory_factor": lambda self, c: setattr(self.cache.limits, "memory_factor", c.serving.memory_factor),
        "serving.churn_guard_seconds":
            lambda self, c: setattr(self.cache.limits, "churn_guard", c.serving.churn_guard_seconds),
        "serving.capacity_wait_seconds":
            lambda self, c: setattr(self.cache.limits, "capacity_wait", c.serving.capacity_wait_seconds),
        "serving.failure_backoff_seconds":
            lambda self, c: setattr(self.cache.limits, "failure_backoff", c.serving.failure_backoff_seconds),
        "serving.load_timeout_seconds": lambda self, c: self._set_load_timeout(
            c.serving.load_timeout_seconds, c.serving.config_write_timeout_seconds),
        "serving.config_write_timeout_seconds": lambda self, c: setattr(
            self.backend, "reload_timeout",
            min(c.serving.config_write_timeout_seconds, c.serving.load_timeout_seconds)),
        "serving.request_timeout_seconds":
            lambda self, c: setattr(self.local, "request_timeout", c.serving.request_timeout_seconds),
        "model_provider.fetch_timeout_seconds":
            lambda self, c: self._set_fetch_timeout(c.model_provider.fetch_timeout_seconds),
        "disk_cache.capacity_bytes": lambda self, c: setattr(self.disk, "capacity_bytes", c.disk_cache.capacity_bytes),
        "logging.level": lambda self, c: self._set_log_level(c.logging.level),
        "logging.access_log": lambda self, c: self.frontends.set_access_log(c.logging.access_log),
    }

    def _set_log_level(self, level: str) -> None:
        if self.daemon_log is not None:
            self.daemon_log.set_level(level)
        if self.router is not None:
            self.router.trace = level == "debug"

    def _set_load_timeout(self, seconds: float, config_write_timeout: float) -> None:
        # every holder of the value: the cache's limit, the request's wait for a load, and the
        # bound on a model list write (serving.config_write_timeout_seconds at most)
        self.cache.limits.load_timeout = seconds
        self.local.load_timeout = seconds
        self.backend.reload_timeout = min(seconds, config_write_timeout)

    def _set_fetch_timeout(self, seconds: float) -> None:
        self.cache.limits.fetch_timeout = seconds
        if hasattr(self.provider, "fetch_timeout"):  # S3 bounds its own copy loop by it
            self.provider.fetch_timeout = seconds

    def reload(self) -> tuple[list[str], list[str]]:
        """Apply the settings that can change safely; say which ones need a restart."""
        from tfscache.config import ConfigError, flatten, load_config_file, replace

        if not self.config_path:
            return [], []
        try:
            new = load_config_file(self.config_path)
        except ConfigError as e:
            self.log.error("SIGHUP: configuration not reloaded: {error}", error=str(e))
            return [], []
        old_flat, new_flat = flatten(self.cfg), flatten(new)
        applied: list[str] = []
        refused: list[str] = []
        for key, value in sorted(new_flat.items()):
            if old_flat.get(key) == value or key == "node.id":
                continue
            setter = self.RELOADABLE.get(key)
            if setter is None:
                refused.append(key)
                continue
            setter(self, new)
            applied.append(key)
        # keep the applied values in self.cfg, the refused ones as they run now
        for key in applied:
            self.cfg = replace(self.cfg, key, new_flat[key])
        self.log.info("SIGHUP: applied {applied}; need a restart to change: {refused}",
                      applied=", ".join(applied) or "nothing", refused=", ".join(refused) or "nothing")
        return applied, refused

    def _set_health(self, healthy: bool) -> None:
        grpc_frontend = getattr(self, "grpc", None)
        if grpc_frontend is not None:
            grpc_frontend.set_serving(healthy and not self.rest_draining)

    @property
    def rest_draining(self) -> bool:
        rest = getattr(self, "rest", None)
        return bool(rest and rest.draining)

    # -- cluster views for the admin API ----------------------------------------------------
    def _describe(self, member: Member) -> dict[str, Any]:
        return {"id": member.id, "host": member.host, "rest_port": member.rest_port,
                "grpc_port": member.grpc_port, "self": member.id == self.cfg.node.id,
                "down": self.router is not None and self.router.is_down(member.id)}

    def _members(self) -> list[dict[str, Any]]:
        return [self._describe(m) for m in self.router.members()] if self.router else []

    def _owners(self, name: str) -> list[dict[str, Any]]:
        return [self._describe(m) for m in self.router.owners_for(name)] if self.router else []

    # -- operational pages -------------------------------------------------------------------
    def _metrics_page(self, request: HttpRequest) -> defer.Deferred[HttpReply]:
        """Our metrics, then TF Serving's own when it exposes them (its names start with
        ``:tensorflow:``, so they cannot collide with ours)."""
        headers = [(b"Content-Type", CONTENT_TYPE_LATEST.encode())]
        ours = generate_latest(self.metrics.registry)
        if not self.cfg.metrics.relay_backend:
            return defer.succeed(HttpReply(200, ours, headers))
        local = self.local
        d = local.http.request(local.rest_scheme, local.rest_host, local.rest_port, b"GET",
                               local.rest_prefix + b"/monitoring/prometheus/metrics", [], [])
        timer = self.reactor.callLater(1.0, d.cancel)

        def relayed(reply: HttpReply) -> HttpReply:
            if timer.active():
                timer.cancel()
            if reply.code != 200:
                return HttpReply(200, ours, headers)
            return HttpReply(200, [ours, b"# TF Serving's own metrics, relayed\n", *reply.parts], headers)

        def failed(_f: Any) -> HttpReply:
            if timer.active():
                timer.cancel()
            return HttpReply(200, ours, headers)  # TF Serving down or slow: our own metrics still answer

        return d.addCallbacks(relayed, failed)

    def _source_readable(self) -> defer.Deferred[None]:
        """As the SourceMonitor last found it (checked on its own clock, not per probe)."""
        if not self.source.checked:
            return defer.fail(RuntimeError("model source not checked yet"))
        if self.source.problem is not None:
            return defer.fail(RuntimeError(self.source.problem))
        return defer.succeed(None)

    def _published(self) -> defer.Deferred[None]:
        if self.discovery is not None and getattr(self.discovery, "published", False):
            return defer.succeed(None)
        return defer.fail(RuntimeError("not registered in discovery"))

    def _metrics_disabled(self, request: HttpRequest) -> HttpReply:
        return error_reply(ServingError(Code.NOT_FOUND, "Metrics are disabled on this node (metrics.enabled: false)"))

    def _healthz(self, request: HttpRequest) -> HttpReply:
        return json_reply(b'{"status":"alive"}')

    def _readyz(self, request: HttpRequest) -> defer.Deferred[HttpReply]:
        checks = {"tfserving": self.backend.check(), "provider": self._source_readable(),
                  "discovery": self._published()}

        def report(results: list[tuple[bool, Any]]) -> HttpReply:
            out = {name: ("ok" if ok else val.getErrorMessage())
                   for name, (ok, val) in zip(checks, results, strict=True)}
            ok = self.ready and all(r[0] for r in results)
            out["node"] = "ok" if self.ready else "starting"
            # not a reason to be unready: loaded models are served, cold ones go elsewhere
            out["loads"] = self.backend.stuck_reason() or "ok"
            return json_reply(json.dumps(out).encode(), 200 if ok else 503)

        return defer.DeferredList(list(checks.values()), consumeErrors=True).addCallback(report)


def forward_marker(cfg: Config) -> ForwardMarker:
    """The cluster's forward token; a node without a secret (config.py allows that for a single
    node only) gets one nobody else can produce, so no marker from outside is ever trusted."""
    secret = read_secret(cfg.cluster.secret, cfg.cluster.secret_file)
    return ForwardMarker(secret) if secret else ForwardMarker.node_local()


def write_ports_file(path: str, rest_port: int, grpc_port: int | None) -> None:
    """The bound ports, for whoever started the node on port 0; whole or not at all."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"rest_port": rest_port, "grpc_port": grpc_port}, f)
    os.replace(tmp, path)


def read_file(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def grpc_credentials(cert: str | None, key: str | None) -> grpc.ServerCredentials | None:
    if not cert or not key:
        return None
    return grpc.ssl_server_credentials([(read_file(key), read_file(cert))])


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """The REST port's TLS: Python's server defaults (TLS 1.2+), the certificate chain and key."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context
