"""Static discovery: the member list comes from the configuration and never changes.

An empty list is a one-node cluster of just this node (the default).  Every node of a static
cluster should list the same members, itself included, so that all routers agree on owners;
a node missing from its own list is added to it (with a warning).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from tfscache.cluster.discovery.lifecycle import publication
from tfscache.cluster.members import Member, MemberError
from tfscache.interfaces import IDiscovery


@implementer(IDiscovery)
class StaticDiscovery(service.Service):
    log = Logger()
    backend = "static"

    def __init__(self, members: Iterable[Member], self_member: Member) -> None:
        self.self_member = self_member
        listed: dict[str, Member] = {}
        for m in members:
            same_address = (m.host, m.rest_port, m.grpc_port) == (
                self_member.host, self_member.rest_port, self_member.grpc_port)
            if m.id == self_member.id or same_address:
                m = self_member
            listed[m.id] = m
        if listed and self_member.id not in listed:
            self.log.warn("node {node} is not in cluster.discovery.members: adding it; list it on "
                          "every node so that all routers agree on owners", node=self_member.id)
        listed[self_member.id] = self_member
        self._members = sorted(listed.values(), key=lambda m: m.id)
        self.publication_state = ""
        self._publication = publication(self)

    @classmethod
    def from_config(cls, entries: Sequence[Any], self_member: Member) -> StaticDiscovery:
        """From ``cluster.discovery.members``: mappings of host, rest_port, grpc_port and an
        optional id (default ``host:rest_port``)."""
        members = []
        for i, entry in enumerate(entries):
            if isinstance(entry, Member):
                members.append(entry)
                continue
            data = dict(entry) if isinstance(entry, dict) else entry
            if isinstance(data, dict) and not data.get("id"):
                data["id"] = f"{data.get('host')}:{data.get('rest_port')}"
            try:
                members.append(Member.from_dict(data))
            except MemberError as e:
                raise ValueError(f"cluster.discovery.members[{i}]: {e}")
        return cls(members, self_member)

    def members(self) -> list[Member]:
        return list(self._members)

    def subscribe(self, callback: Callable[[list[Member]], None]) -> None:
        pass  # the list never changes

    @property
    def published(self) -> bool:
        return self.publication_state != "idle"

    def publish(self) -> defer.Deferred[None]:
        self._publication.publish()
        self._publication.seen()  # the list is the configuration's, this node always in it
        return defer.succeed(None)

    def withdraw(self) -> defer.Deferred[None]:
        self._publication.withdraw()
        return defer.succeed(None)

    # the publication's outputs (lifecycle.PUBLICATION): a static list is never lost, and its
    # publishing is not gated on health (there is no record to withdraw)
    def record_lost(self, count: int) -> None:
        pass

    def republish_lost(self, count: int) -> None:
        pass

    def became_unhealthy(self) -> None:
        pass

    def became_healthy(self) -> None:
        pass
