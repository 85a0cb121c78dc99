"""The reactor tfscache runs on: Twisted's asyncio reactor, on uvloop where it is installed.

The gRPC front end and the gRPC forwards use ``grpc.aio``, which runs on an asyncio loop; with
Twisted's asyncio reactor both share one loop and one thread, so a gRPC call costs no thread
hand-off and waiting for a cold model holds no thread.  ``twistd -r tfscache`` and
``trial --reactor=tfscache`` pick it by name (``twisted/plugins/tfscache_plugin.py``); the twistd
plugin installs it itself when no reactor was chosen.

uvloop takes over SIGCHLD, so Twisted's ``spawnProcess`` never sees its children end under it.
The daemon starts no process; the tests, whose harness does, run on the same reactor on the
standard library's loop (``trial --reactor=tfscache-asyncio``).
"""

from __future__ import annotations

import asyncio
import sys


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio works too
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def install() -> None:
    """Install the asyncio reactor on a new (uv)loop; Twisted's reactor-installer hook."""
    _install(new_event_loop())


def install_stdlib() -> None:
    """The same reactor on the standard library's loop (``trial --reactor=tfscache-asyncio``)."""
    _install(asyncio.new_event_loop())


def _install(loop: asyncio.AbstractEventLoop) -> None:
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor
    from twisted.internet.base import ReactorBase
    from twisted.internet.main import installReactor

    class Reactor(AsyncioSelectorReactor):
        def crash(self) -> None:
            # A crash while the loop is not running (trial's disttrial workers fire
            # "shutdown", whose trigger crashes the reactor, after every test) must not leave
            # a stop pending on the loop: the next run would return at once
            if self._asyncioEventloop.is_running():
                super().crash()  # type: ignore[no-untyped-call]
            else:
                ReactorBase.crash(self)

    # current as well as running: code run before the reactor runs (callWhenRunning, service
    # start-up) makes grpc.aio objects and tasks, which bind to the current loop
    asyncio.set_event_loop(loop)
    installReactor(Reactor(loop))


def ensure_installed() -> None:
    """Install it unless a reactor is installed already; refuse a reactor without asyncio."""
    if "twisted.internet.reactor" not in sys.modules:
        install()
        return
    from twisted.internet import reactor

    if not hasattr(reactor, "_asyncioEventloop"):
        raise RuntimeError(
            f"tfscache needs Twisted's asyncio reactor (twistd -r tfscache), not {type(reactor).__name__}")


def event_loop(reactor: object | None = None) -> asyncio.AbstractEventLoop:
    """``reactor``'s asyncio loop (default: the installed reactor's, which this module installs)."""
    if reactor is None:
        from twisted.internet import reactor as installed

        reactor = installed
    loop: asyncio.AbstractEventLoop = reactor._asyncioEventloop  # type: ignore[attr-defined]
    return loop
