"""A cluster member: where another node reaches one tfscache node (its client-facing ports)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


class MemberError(ValueError):
    """A member record that cannot be used (bad JSON, missing field, wrong type)."""


def _port(value: Any, key: str) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise MemberError(f"{key}: expected a TCP port, got {value!r}")
    return value


@dataclass(frozen=True)
class Member:
    id: str
    host: str
    rest_port: int
    grpc_port: int

    @property
    def _host_for_url(self) -> str:
        return f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host

    @property
    def rest_base(self) -> str:
        """``http://host:port`` of the member's REST API (no trailing slash)."""
        return f"http://{self._host_for_url}:{self.rest_port}"

    @property
    def grpc_target(self) -> str:
        """``host:port`` of the member's gRPC API, as grpcio wants it."""
        return f"{self._host_for_url}:{self.grpc_port}"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "host": self.host, "rest_port": self.rest_port, "grpc_port": self.grpc_port}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any) -> Member:
        if not isinstance(data, dict):
            raise MemberError(f"expected a mapping, got {type(data).__name__}")
        try:
            ident, host = data["id"], data["host"]
            rest, grpc_ = data["rest_port"], data["grpc_port"]
        except KeyError as e:
            raise MemberError(f"missing field {e.args[0]}")
        if not isinstance(ident, str) or not ident:
            raise MemberError(f"id: expected a non-empty string, got {ident!r}")
        if not isinstance(host, str) or not host:
            raise MemberError(f"host: expected a non-empty string, got {host!r}")
        return cls(ident, host, _port(rest, "rest_port"), _port(grpc_, "grpc_port"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Member:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise MemberError(f"not JSON: {e}")
        return cls.from_dict(data)
