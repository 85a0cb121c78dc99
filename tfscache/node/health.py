"""BackendMonitor: watches this node's TF Serving.

Every few seconds it asks TF Serving for the status of a model the cache believes loaded.  It
tells the rest of the node whether the backend is healthy (readiness, gRPC health, discovery
publishes only while healthy), and notices a backend that came back EMPTY after a restart:
the cache then forgets what it believed loaded, so the next requests load again instead of
failing until tfscache is restarted.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from tfscache.errors import Code, ServingError
from tfscache.node.manager import CacheManager
from tfscache.node.serving import ServingController, State
from tfscache.util.deferreds import SharedResult


class BackendMonitor(service.Service):
    log = Logger()

    def __init__(self, cache: CacheManager, backend: ServingController, clock: IReactorTime,
                 interval: float = 5.0) -> None:
        self.cache, self.backend, self.interval = cache, backend, interval
        self.clock = clock
        self.healthy: bool | None = None
        self._listeners: list[Callable[[bool], None]] = []
        self._loop: task.LoopingCall | None = None
        self._checking: SharedResult | None = None

    def subscribe(self, listener: Callable[[bool], None]) -> None:
        self._listeners.append(listener)

    def startService(self) -> None:
        service.Service.startService(self)
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: self.log.failure("backend monitor stopped", failure=f))

    def stopService(self) -> None:
        service.Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def check(self) -> defer.Deferred[None]:
        """One probe; concurrent callers share it."""
        if self._checking is None or self._checking.done:
            self._checking = SharedResult(defer.ensureDeferred(self._probe()))
        return self._checking.observe()

    async def _probe(self) -> None:
        loaded = self.cache.loaded()
        try:
            if not loaded:
                await self.backend.check()
            else:
                mid = loaded[0]
                try:
                    resp = await self.backend.status(mid.name, timeout=2.0)
                    available = any(s.version == mid.version and s.state == State.AVAILABLE
                                    for s in resp.model_version_status)
                except ServingError as e:
                    if e.code != Code.NOT_FOUND:
                        raise
                    available = False
                if not available:
                    self.log.warn(
                        "TF Serving at {target} no longer serves model={model} version={version}: it "
                        "restarted; forgetting {count} loaded models",
                        target=self.backend.grpc_target, model=mid.name, version=mid.version,
                        count=len(loaded),
                    )
                    await self.cache.backend_lost()
        except ServingError as e:
            self._set(False, e.message)
        else:
            self._set(True, "")

    def _set(self, healthy: bool, why: str) -> None:
        if healthy == self.healthy:
            return
        self.healthy = healthy
        if healthy:
            self.log.info("TF Serving at {target} is healthy", target=self.backend.grpc_target)
        else:
            self.log.warn("TF Serving at {target} is unhealthy: {why}", target=self.backend.grpc_target, why=why)
        for listener in self._listeners:
            listener(healthy)
