"""The life cycle of a discovery, as two state machines (Automat), shared by every backend.

``Publication``: whether this node is being published, and what a member list without it
means.  Its transitions are the table ``PUBLICATION`` (a test walks it):

- ``idle``: not published (before ``publish()``, after ``withdraw()``);
- ``unconfirmed``: published (its record being written, or written) and not yet seen in a
  member list: a list without it is the watch not caught up yet (a node that just started),
  taken as it is;
- ``confirmed``: its record was seen in a list: a list without it, once the record is written,
  means the backend lost it (a Consul ``-dev`` agent restarted, etcd wiped);
- ``lost``: the record is being put back; the last list is kept (when it has this node) until
  a list with it arrives;
- ``unhealthy``: TF Serving fails its health check: not published, a list without this node is
  the truth.

``Reachability``: whether the backend answers, so that an outage is logged once (and a TLS
failure that goes on from it once more), not once per retry:

- ``reachable``; ``unreachable``; ``unreachable_tls`` (the TLS failure has been said).

Each machine drives a core (``PublicationCore``, ``ReachabilityCore``: the discovery) whose
output methods log and act; the state's name is kept on the core for reading (``state``).
"""

from __future__ import annotations

from typing import Any, Protocol

from automat import TypeMachineBuilder


# -- publication ---------------------------------------------------------------------------------
class PublicationInputs(Protocol):
    def publish(self) -> None:
        """``publish()`` was called."""

    def withdraw(self) -> None:
        """``withdraw()`` was called (or the service stops)."""

    def healthy(self) -> None:
        """A publish round found TF Serving healthy."""

    def unhealthy(self) -> None:
        """A publish round found TF Serving failing its health check."""

    def seen(self) -> None:
        """A member list with this node arrived."""

    def missed(self, count: int) -> None:
        """A member list without this node arrived, its record not written (or not this
        node's to write: Kubernetes)."""

    def lost(self, count: int) -> None:
        """A member list without this node arrived while its record is written."""


class PublicationCore(Protocol):
    publication_state: str

    def record_lost(self, count: int) -> None:
        """Warn that the backend lost the record, and republish at once."""

    def republish_lost(self, count: int) -> None:
        """Republish at once (the record is still missing; no new warning)."""

    def became_unhealthy(self) -> None:
        """Warn that this node is not published until its health check passes."""

    def became_healthy(self) -> None:
        """Say that this node is healthy again and published."""


_WANTED = ("unconfirmed", "confirmed", "lost")
# (state, input, new state, output or None): every input in every state
PUBLICATION: list[tuple[str, str, str, str | None]] = [
    ("idle", "publish", "unconfirmed", None),
    ("idle", "withdraw", "idle", None),
    ("idle", "healthy", "idle", None),      # a round that finished after withdraw()
    ("idle", "unhealthy", "idle", None),
    ("idle", "seen", "idle", None),
    ("idle", "missed", "idle", None),
    ("idle", "lost", "idle", None),
    *[(s, "publish", s, None) for s in _WANTED],
    *[(s, "withdraw", "idle", None) for s in _WANTED],
    *[(s, "healthy", s, None) for s in _WANTED],
    *[(s, "unhealthy", "unhealthy", "became_unhealthy") for s in _WANTED],
    ("unconfirmed", "seen", "confirmed", None),
    ("unconfirmed", "missed", "unconfirmed", None),
    ("unconfirmed", "lost", "unconfirmed", None),   # not seen yet: the watch catching up
    ("confirmed", "seen", "confirmed", None),
    ("confirmed", "missed", "confirmed", None),
    ("confirmed", "lost", "lost", "record_lost"),
    ("lost", "seen", "confirmed", None),
    ("lost", "missed", "lost", None),               # the republish is in flight
    ("lost", "lost", "lost", "republish_lost"),     # republished, and still missing
    ("unhealthy", "publish", "unhealthy", None),
    ("unhealthy", "withdraw", "idle", None),
    ("unhealthy", "healthy", "unconfirmed", "became_healthy"),
    ("unhealthy", "unhealthy", "unhealthy", None),
    ("unhealthy", "seen", "unhealthy", None),
    ("unhealthy", "missed", "unhealthy", None),
    ("unhealthy", "lost", "unhealthy", None),
]

# -- reachability --------------------------------------------------------------------------------
class ReachabilityInputs(Protocol):
    def failed(self, doing: str, why: str) -> None:
        """A call to the backend failed (not a TLS failure)."""

    def failed_tls(self, doing: str, why: str) -> None:
        """A call to the backend failed its TLS handshake."""

    def denied(self) -> None:
        """The backend refused this node's credentials (logged by the caller)."""

    def reached(self, loop: str) -> None:
        """A call of ``loop`` ("publish" or "follow") got through."""


class ReachabilityCore(Protocol):
    reachability_state: str

    def outage_began(self, doing: str, why: str) -> None:
        """Warn once: the backend is unreachable, the last members are kept."""

    def outage_is_tls(self, doing: str, why: str) -> None:
        """Warn once: the outage goes on as a TLS failure."""

    def outage_ended(self, loop: str) -> None:
        """Say once that the backend is reachable again."""


REACHABILITY: list[tuple[str, str, str, str | None]] = [
    ("reachable", "failed", "unreachable", "outage_began"),
    ("reachable", "failed_tls", "unreachable_tls", "outage_began"),
    ("reachable", "denied", "unreachable", None),
    ("reachable", "reached", "reachable", None),
    ("unreachable", "failed", "unreachable", None),
    ("unreachable", "failed_tls", "unreachable_tls", "outage_is_tls"),
    ("unreachable", "denied", "unreachable", None),
    ("unreachable", "reached", "reachable", "outage_ended"),
    ("unreachable_tls", "failed", "unreachable_tls", None),
    ("unreachable_tls", "failed_tls", "unreachable_tls", None),
    ("unreachable_tls", "denied", "unreachable_tls", None),
    ("unreachable_tls", "reached", "reachable", "outage_ended"),
]


def _build(inputs: Any, core: Any, table: list[tuple[str, str, str, str | None]], attribute: str) -> Any:
    """A TypeMachine from ``table``: each transition records the new state's name on the core
    (``attribute``), then calls the core's output method, if any, with the input's arguments."""
    builder: Any = TypeMachineBuilder(inputs, core)
    names = list(dict.fromkeys(row[0] for row in table))
    states = {name: builder.state(name) for name in names}  # the first row's state is the initial one

    def transition(new: str, output: str | None) -> Any:
        def implementation(_inputs: Any, core: Any, *args: Any) -> None:
            setattr(core, attribute, new)
            if output is not None:
                getattr(core, output)(*args)
        return implementation

    for state, input_name, new, output in table:
        states[state].upon(getattr(inputs, input_name)).to(states[new])(transition(new, output))
    return builder.build()


PublicationMachine = _build(PublicationInputs, PublicationCore, PUBLICATION, "publication_state")
ReachabilityMachine = _build(ReachabilityInputs, ReachabilityCore, REACHABILITY, "reachability_state")


def publication(core: PublicationCore) -> PublicationInputs:
    core.publication_state = PUBLICATION[0][0]
    machine: PublicationInputs = PublicationMachine(core)
    return machine


def reachability(core: ReachabilityCore) -> ReachabilityInputs:
    core.reachability_state = REACHABILITY[0][0]
    machine: ReachabilityInputs = ReachabilityMachine(core)
    return machine


__all__ = ["PUBLICATION", "REACHABILITY", "PublicationInputs", "ReachabilityInputs", "publication", "reachability"]
