"""Real processes for the tests: start on loopback ports, wait until ready, stop.

These run in test set-up, outside the reactor's event handling, so they may block: readiness
is a probe (a TCP connect or an HTTP GET) that is retried until it answers or a deadline
passes, never a fixed sleep.

Ports: a server of our own binds port 0 and says in its log which port it got
(``ports_from_log``); a port is never picked free here and bound later by another process
(something else may take it in between).  Where a port must be known before its server starts
(an external server that cannot report one, the members of a static cluster),
``listen_port()`` picks one below the ephemeral range, which no port-0 bind or outgoing
connection is ever given, and the start is retried on another one if it was taken anyway
(``AddressInUse``).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from typing import TypeVar

from twisted.internet.defer import Deferred

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE_DIR = os.environ.get("TFSCACHE_CACHE", os.path.expanduser("~/.cache/tfscache"))
PYTHON = sys.executable


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def listen_port() -> int:
    """A TCP port on 127.0.0.1, below the ephemeral range, that nothing listens on right now:
    for a server that must be told its port.  Its start must retry on ``AddressInUse``."""
    high = _ephemeral_low()
    while True:
        port = random.randrange(10000, high)
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def unused_port() -> int:
    """A port that nothing listens on, for a client to be refused (a dead endpoint): never
    bound by a test server."""
    return listen_port()


class AddressInUse(RuntimeError):
    """The process could not bind the port it was given: start it again on another."""


ADDRESS_IN_USE = re.compile(r"address already in use|couldn.t listen|cannot listen on|errno 98|EADDRINUSE", re.I)


T = TypeVar("T")


def retry_on_collision(start: Callable[[], T], attempts: int = 5) -> T:
    """``start()`` again while it raises ``AddressInUse`` (it picks new ports each time)."""
    for attempt in range(attempts):
        try:
            return start()
        except AddressInUse:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def tcp_ready(port: int, host: str = "127.0.0.1") -> Callable[[], bool]:
    def probe() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    return probe


def http_ready(url: str, accept: Sequence[int] = (200,)) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return resp.status in accept
        except urllib.error.HTTPError as e:
            return e.code in accept
        except OSError:
            return False

    return probe


class ManagedProcess:
    """One child process with its output in a log file; started and stopped by a test."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        ready: Callable[[], bool],
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        log_dir: str | None = None,
        limits: Sequence[str] = (),
        ports_from_log: str | None = None,
    ) -> None:
        self.name = name
        # a regular expression whose groups are the ports the process bound (it was given 0)
        self.ports_from_log = re.compile(ports_from_log) if ports_from_log else None
        self.ports: tuple[int, ...] = ()
        # resource limits, as prlimit(1) options ("--fsize=1048576:unlimited"): prlimit sets
        # them and execs the command, so no Python runs in the forked child (a preexec_fn would,
        # in a test worker that has done gRPC work: see run_in_repo)
        self.argv = ["prlimit", *limits, "--", *argv] if limits else list(argv)
        self.ready = ready
        self.env = dict(os.environ, **(env or {}))
        self.cwd = cwd
        self.log_dir = log_dir or tempfile.mkdtemp(prefix=f"tfscache-{name}-")
        self.log_path = os.path.join(self.log_dir, f"{name}.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> ManagedProcess:
        self.ports = ()
        self._log_offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
        )
        log.close()
        pids = os.environ.get("TFSCACHE_TEST_PIDS")
        if pids:  # scripts/test stops whatever a crashed test leaves behind
            with open(pids, "a") as f:
                f.write(f"{self.proc.pid}\n")
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                tail = self.log_tail()
                error = AddressInUse if ADDRESS_IN_USE.search(tail) else RuntimeError
                raise error(f"{self.name} exited with {self.proc.returncode} before it was ready:\n" + tail)
            if self.ports_from_log is not None and not self.ports:
                self.ports = self._read_ports()
            if (self.ports or self.ports_from_log is None) and self.ready():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} not ready after {timeout}s:\n" + self.log_tail())
            time.sleep(delay)  # back-off between readiness probes, not synchronisation
            delay = min(delay * 1.5, 0.5)

    def _read_ports(self) -> tuple[int, ...]:
        """The ports in this start's log line, once it is written."""
        assert self.ports_from_log is not None
        try:
            with open(self.log_path, "rb") as f:
                f.seek(getattr(self, "_log_offset", 0))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ()
        m = self.ports_from_log.search(text)
        return tuple(int(g) for g in m.groups()) if m else ()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, signum: int) -> None:
        if self.running:
            assert self.proc is not None
            os.killpg(self.proc.pid, signum)

    def kill(self) -> None:
        """SIGKILL: a crash, for failover tests."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"


class ProcessFixture:
    """A server process a test starts and stops: subclasses set ``self.process``."""

    process: ManagedProcess
    _started_once = False

    def choose_ports(self) -> bool:
        """New ports (``listen_port()``) and the argv that uses them, after a first start whose
        port was taken; False where the fixture has no ports of its own to choose."""
        return False

    def start(self, timeout: float = 60.0):  # type: ignore[no-untyped-def]
        for attempt in range(5):
            try:
                self.process.start(timeout)
                break
            except AddressInUse:
                # a restart keeps its ports (its clients know them): the first start only
                if self._started_once or attempt == 4 or not self.choose_ports():
                    raise
        self._started_once = True
        return self

    def stop(self) -> int | None:
        return self.process.stop()

    def kill(self) -> None:
        self.process.kill()

    def restart(self, timeout: float = 60.0):  # type: ignore[no-untyped-def]
        """Stop, then start again on the same ports with the same data."""
        self.process.stop()
        return self.start(timeout)


def run_in_repo(executable: str, args: Sequence[str], env: dict[str, str]) -> Deferred[tuple[bytes, bytes, int]]:
    """Run a script of the repo's with the repo as its working directory, on the reactor:
    fires with (stdout, stderr, exit code), the code negative (-signal) when a signal ended it.

    The child is started by ``env -C``, not with Twisted's ``path=``: a working directory of
    its own makes Twisted fork and run Python in the child before the exec, and a forked copy
    of a process that has done gRPC work can crash there (grpc's fork handlers, its threads:
    grpc/grpc#13998, #32992) -- a test worker has always done gRPC work by then.  Without
    ``path`` Twisted uses posix_spawn, which runs no Python and no fork handlers in the child."""
    from twisted.internet import utils

    env_binary = shutil.which("env") or "/usr/bin/env"
    d = utils.getProcessOutputAndValue(env_binary, ["-C", REPO_ROOT, executable, *args], env=env)
    # a signal's end fails with a bare (stdout, stderr, signal) tuple, which trial cannot report
    return d.addErrback(lambda f: (f.value[0], f.value[1], -f.value[2]) if isinstance(f.value, tuple) else f)
