"""The demo keeps working: ``scripts/demo.py`` on tiny settings, in its own process, against real
DevServers and tfscache nodes, and its summary says what the cache did.

The summary is read by label ("  <label>  <value>" lines after "== tfscache demo summary"), so
added lines, a per-node table or new options do not break the test."""

from __future__ import annotations

import os
import re
import signal
import sys

from twisted.internet import defer
from twisted.trial import unittest

from tests.harness.process import REPO_ROOT, run_in_repo

MAX_MODELS = 2
# more models than the nodes have slots for (2 nodes x 2 by default, or 1 x 2): evictions and
# reloads from the disk cache are certain, and the run stays ~15 s
ARGS = ["--models", "8", "--max-models", str(MAX_MODELS), "--requests", "60", "--concurrency", "4"]


def summary(text: str) -> dict[str, str]:
    """The demo summary's "label -> value" pairs (the value as printed)."""
    _, found, rest = text.partition("== tfscache demo summary")
    if not found:
        return {}
    rows = {}
    for line in rest.splitlines():
        m = re.match(r"^  (\S.*?)\s{2,}(\S.*)$", line)
        if m:
            rows.setdefault(m.group(1), m.group(2))
    return rows


def number(value: str) -> float:
    """The first number in a summary value ("60 in 2.3s (27/s)" -> 60)."""
    m = re.search(r"-?\d+(?:\.\d+)?", value)
    if m is None:
        raise ValueError(f"no number in {value!r}")
    return float(m.group(0))


class DemoTests(unittest.TestCase):
    timeout = 240  # ~15 s alone; TensorFlow imports and other test processes share the CPUs

    @defer.inlineCallbacks
    def test_demo_runs_and_the_cache_works(self):  # type: ignore[no-untyped-def]
        env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="2")
        stdout, stderr, code = yield run_in_repo(
            sys.executable, [os.path.join(REPO_ROOT, "scripts", "demo.py"), *ARGS], env)
        if code < 0:
            self.fail(f"the demo was ended by signal {-code} ({signal.Signals(-code).name}):\n"
                      + stdout.decode(errors="replace")[-3000:] + stderr.decode(errors="replace")[-3000:])
        text = stdout.decode(errors="replace")
        self.assertEqual(code, 0, text[-3000:] + stderr.decode(errors="replace")[-3000:])
        rows = summary(text)
        self.assertTrue(rows, text[-3000:])

        def get(label: str) -> float:
            self.assertIn(label, rows, rows)
            return number(rows[label])

        self.assertEqual(get("requests"), 60)
        self.assertEqual(get("wrong predictions"), 0)
        hits, misses = get("cache hits"), get("cache misses")
        # every request is looked up at least once at an owner (a retry on another owner adds one)
        self.assertGreaterEqual(hits + misses, 60)
        self.assertGreater(hits, 0)
        copies, loads, unloads = get("copies from source"), get("loads into TF Serving"), get("unloads (LRU)")
        self.assertGreater(copies, 0)
        self.assertLessEqual(copies, misses)  # a copy only on a miss, never per request
        self.assertGreater(unloads, 0)  # more models than slots: LRU made room
        # a model unloaded to make room came back from the disk cache, without a second copy
        self.assertGreater(loads, copies)
        loaded = get("models loaded at the end")
        self.assertEqual(loaded, loads - unloads)
        self.assertGreater(loaded, 0)
        # at most max_models per node: the per-node table (if any) says how many nodes there are
        nodes = len(re.findall(r"^  node-\d+\s+(?:\d+\s+){6}\d+\s*$", text, re.M)) or 1
        self.assertLessEqual(loaded, MAX_MODELS * nodes)
