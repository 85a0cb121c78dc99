"""Discovery's life cycle (cluster/discovery/lifecycle.py): each state machine's transition
table is total and walked row by row; then a discovery on a fake clock goes through the
publication's states as a backend would drive it."""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet import defer, task
from twisted.trial import unittest

from tests.test_discovery import Health, LogCapture, member
from tfscache.cluster.discovery import DiscoveryBase
from tfscache.cluster.discovery.lifecycle import PUBLICATION, REACHABILITY, publication, reachability

ARGS = {"missed": (3,), "lost": (3,), "failed": ("reading", "refused"), "failed_tls": ("reading", "TLS"),
        "reached": ("follow",)}


class Recorder:
    """A core that records the outputs it is asked for."""

    def __init__(self) -> None:
        self.publication_state = self.reachability_state = ""
        self.outputs: list[str] = []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args: self.outputs.append(name)


def path_to(table: list[tuple[str, str, str, str | None]], target: str) -> list[str]:
    """The inputs that lead from the initial state to ``target`` (breadth first)."""
    start = table[0][0]
    queue: deque[tuple[str, list[str]]] = deque([(start, [])])
    seen = {start}
    while queue:
        state, inputs = queue.popleft()
        if state == target:
            return inputs
        for old, name, new, _output in table:
            if old == state and new not in seen:
                seen.add(new)
                queue.append((new, [*inputs, name]))
    raise AssertionError(f"{target} cannot be reached")


class TransitionTableTests(unittest.TestCase):
    machines = (("publication_state", PUBLICATION, publication), ("reachability_state", REACHABILITY, reachability))

    def test_every_input_has_one_transition_in_every_state(self) -> None:
        for _attribute, table, _make in self.machines:
            states = {row[0] for row in table}
            inputs = {row[1] for row in table}
            pairs = [(row[0], row[1]) for row in table]
            self.assertEqual(len(pairs), len(set(pairs)), "a state and input listed twice")
            self.assertEqual(set(pairs), {(s, i) for s in states for i in inputs})
            self.assertTrue({row[2] for row in table} <= states)

    def test_walk_every_transition(self) -> None:
        for attribute, table, make in self.machines:
            for state, name, new, output in table:
                core = Recorder()
                machine: Any = make(core)  # type: ignore[operator]
                for step in path_to(table, state):
                    getattr(machine, step)(*ARGS.get(step, ()))
                self.assertEqual(getattr(core, attribute), state)
                core.outputs.clear()
                getattr(machine, name)(*ARGS.get(name, ()))
                row = (state, name, new, output)
                self.assertEqual(getattr(core, attribute), new, row)
                self.assertEqual(core.outputs, [output] if output else [], row)


class Scripted(DiscoveryBase):
    """A backend whose record lives in a set: refresh writes it, suspend and remove drop it."""

    backend = "scripted"

    def __init__(self, clock: task.Clock, health: Health) -> None:
        super().__init__(member("me"), clock, health, ttl=3.0)
        self.record = False
        self.writes = 0

    async def _refresh(self) -> None:
        if not self.published:
            self.writes += 1
        self.record = self.published = True

    async def _suspend(self) -> None:
        self.record = self.published = False

    async def _remove(self) -> None:
        self.record = self.published = False

    async def _follow(self) -> None:
        await defer.Deferred()  # the test hands lists in with _set_members


class PublicationOnAClockTests(unittest.TestCase):
    def test_a_life(self) -> None:
        logs, clock, health = LogCapture(self), task.Clock(), Health()
        d = Scripted(clock, health)
        d.startService()
        self.addCleanup(d.stopService)
        other = member("other")
        self.assertEqual((d.publication_state, d.reachability_state), ("idle", "reachable"))
        d._set_members([other])
        self.assertEqual(d.members(), [other])  # not publishing: taken as it is
        d.publish()
        self.assertEqual((d.publication_state, d.record, d.writes), ("unconfirmed", True, 1))
        d._set_members([other])  # the watch not caught up: taken, no warning
        self.assertEqual((d.publication_state, logs.count(d, "came back without")), ("unconfirmed", 0))
        d._set_members([member("me"), other])
        self.assertEqual(d.publication_state, "confirmed")
        d.record = False
        d._set_members([other])  # lost: written again at once, the last list kept
        self.assertEqual((d.publication_state, d.record, d.writes), ("lost", True, 2))
        self.assertEqual(len(d.members()), 2)
        self.assertEqual(logs.count(d, "came back without"), 1)
        d._set_members([other])  # still missing: written once more, no second warning
        self.assertEqual((d.publication_state, d.writes, logs.count(d, "came back without")), ("lost", 3, 1))
        d._set_members([member("me"), other])
        self.assertEqual(d.publication_state, "confirmed")
        health.ok = False
        clock.advance(d.refresh_interval)
        self.assertEqual((d.publication_state, d.record), ("unhealthy", False))
        self.assertEqual(logs.count(d, "fails its health check"), 1)
        d._set_members([other])  # unhealthy: a list without this node is the truth
        self.assertEqual(d.members(), [other])
        health.ok = True
        clock.advance(d.refresh_interval)
        self.assertEqual((d.publication_state, d.record, logs.count(d, "healthy again")), ("unconfirmed", True, 1))
        d.withdraw()
        self.assertEqual((d.publication_state, d.record), ("idle", False))
        clock.advance(10 * d.refresh_interval)
        self.assertEqual(d.record, False)  # withdrawn: no more rounds

    def test_reachability(self) -> None:
        logs, clock = LogCapture(self), task.Clock()
        d = Scripted(clock, Health())
        d._unreachable("reading the member list", ConnectionRefusedError())
        d._unreachable("reading the member list", ConnectionRefusedError())
        self.assertEqual((d.reachability_state, logs.count(d, "unreachable")), ("unreachable", 1))
        from OpenSSL import SSL

        d._unreachable("reading", SSL.Error([("SSL routines", "", "certificate verify failed")]))
        d._unreachable("reading", SSL.Error([("SSL routines", "", "certificate verify failed")]))
        self.assertEqual((d.reachability_state, logs.count(d, "goes on as a TLS failure")), ("unreachable_tls", 1))
        d._reached("follow")
        self.assertEqual((d.reachable, logs.count(d, "reachable again")), (True, 1))
