"""Real processes for the tests: start on free loopback ports, wait until ready, stop.

These run in test set-up, outside the reactor's event handling, so they may block: readiness
is a probe (a TCP connect or an HTTP GET) that is retried until it answers or a deadline
passes, never a fixed sleep.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE_DIR = os.environ.get("TFSCACHE_CACHE", os.path.expanduser("~/.cache/tfscache"))
PYTHON = sys.executable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.preexec_fn = preexec_fn  # runs in the child before exec (resource limits)
        self.argv = list(argv)
        self.ready = ready
        self.env = dict(os.environ, **(env or {}))
        self.cwd = cwd
        self.log_dir = log_dir or tempfile.mkdtemp(prefix=f"tfscache-{name}-")
        self.log_path = os.path.join(self.log_dir, f"{name}.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> ManagedProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
            preexec_fn=self.preexec_fn,
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
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before it was ready:\n"
                    + self.log_tail()
                )
            if self.ready():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} not ready after {timeout}s:\n" + self.log_tail())
            time.sleep(delay)  # back-off between readiness probes, not synchronisation
            delay = min(delay * 1.5, 0.5)

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

    def start(self, timeout: float = 60.0):  # type: ignore[no-untyped-def]
        self.process.start(timeout)
        return self

    def stop(self) -> int | None:
        return self.process.stop()

    def kill(self) -> None:
        self.process.kill()

    def restart(self, timeout: float = 60.0):  # type: ignore[no-untyped-def]
        """Stop, then start again on the same ports with the same data."""
        self.process.stop()
        return self.start(timeout)
