"""A bounded thread pool of a component's own, for blocking work that must not wait behind
(or hold) the reactor's shared pool: model copies, etcd calls."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool


def _daemon_thread(*args: Any, **kwargs: Any) -> threading.Thread:
    # an interpreter that exits without a reactor shutdown (a test run) must not wait for idle
    # threads; work cut short that way leaves at most a staging directory, deleted at start-up
    return threading.Thread(*args, daemon=True, **kwargs)


class OwnThreadPool:
    """Up to ``size`` daemon threads named after ``name``, started at the first ``run()``.

    ``stop()`` joins them off the reactor thread (a call in flight may take up to its own
    timeout) and fires once they are gone; a later ``run()`` starts a new pool.  With
    ``stop_at_shutdown`` the pool also stops as the reactor's own pool does, during shutdown
    (after the 'before' phase, so after a node's drain), calling ``stop_work`` first to ask
    the work still running to stop."""

    def __init__(
        self, reactor: Any, size: int, name: str, *,
        stop_at_shutdown: bool = False, stop_work: Callable[[], None] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"the {name} thread pool needs at least one thread")
        self.size = size
        self.name = name
        self._reactor = reactor
        self._stop_at_shutdown = stop_at_shutdown
        self._stop_work = stop_work
        self._pool: ThreadPool | None = None
        self._trigger: Any = None

    @property
    def started(self) -> bool:
        return self._pool is not None

    def start(self) -> ThreadPool:
        if self._pool is None:
            pool = ThreadPool(minthreads=0, maxthreads=self.size, name=self.name)
            pool.threadFactory = _daemon_thread  # type: ignore[assignment]
            pool.start()
            self._pool = pool
            if self._stop_at_shutdown:
                self._trigger = self._reactor.addSystemEventTrigger("during", "shutdown", self._shutting_down)
        return self._pool

    def run(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return threads.deferToThreadPool(self._reactor, self.start(), f, *args)

    def _shutting_down(self) -> defer.Deferred[None]:
        self._trigger = None  # firing now: nothing to remove
        if self._stop_work is not None:
            self._stop_work()
        return self.stop()

    def stop(self) -> defer.Deferred[None]:
        if self._trigger is not None:
            self._reactor.removeSystemEventTrigger(self._trigger)
            self._trigger = None
        pool, self._pool = self._pool, None
        if pool is None:
            return defer.succeed(None)
        done: defer.Deferred[None] = defer.Deferred()

        def join() -> None:
            try:
                pool.stop()
            finally:
                self._reactor.callFromThread(done.callback, None)

        threading.Thread(target=join, name=f"{self.name}-stop", daemon=True).start()
        return done
