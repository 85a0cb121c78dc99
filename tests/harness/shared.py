"""Fixtures shared by every test in one test process (Trial has no setUpClass): started on
first use, stopped when the process exits."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

_started: dict[str, Any] = {}


def shared(key: str, start: Callable[[], Any], stop: Callable[[Any], Any]) -> Any:
    if key not in _started:
        value = start()
        _started[key] = value
        atexit.register(stop, value)
    return _started[key]


def backend() -> Any:
    """One TF Serving backend (DevServer) for the whole test process."""
    from tests.harness.devserver import DevServer

    return shared("backend", lambda: DevServer().start(), lambda b: b.stop())


def as_objects(directory: str) -> dict[str, bytes]:
    """Every file under ``directory``, keyed by its relative path with ``/``: an object store's
    keys for a model source written on disk."""
    out = {}
    for dirpath, _dirs, files in os.walk(directory):
        for f in files:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, directory).replace(os.sep, "/")] = fh.read()
    return out


def model_dir(key: str, write: Callable[[str], None]) -> str:
    """A model source directory, written once per test process."""

    def make() -> str:
        path = tempfile.mkdtemp(prefix=f"tfscache-models-{key}-")
        write(path)
        return path

    return shared("models:" + key, make, lambda p: shutil.rmtree(p, ignore_errors=True))
