"""Errors carried with a TF Serving (gRPC) status code, so every front end can answer in
TF Serving's own format: REST ``{"error": msg}`` with the mapped HTTP code, gRPC status."""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """google.rpc.Code / grpc.StatusCode numbers, which TF Serving uses throughout."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


# TF Serving's mapping of status codes to HTTP codes (http_rest_api_handler / util).
HTTP_STATUS: dict[Code, int] = {
    Code.OK: 200,
    Code.CANCELLED: 499,
    Code.UNKNOWN: 500,
    Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400,
    Code.ABORTED: 409,
    Code.OUT_OF_RANGE: 400,
    Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
    Code.DATA_LOSS: 500,
    Code.UNAUTHENTICATED: 401,
}


# Set by a node on its UNAVAILABLE answers (REST header, gRPC trailing metadata): "1" when
# the node itself cannot serve (draining, its TF Serving unreachable), "0" when only the model
# asked for cannot (its copy failed: disk full, model source unreachable).  A router marks an
# owner down only for the former; an UNAVAILABLE without it (TF Serving's own, a proxy's, a
# connection that failed) counts as node-wide, as before.
NODE_UNAVAILABLE_KEY = "x-tfscache-node-unavailable"

# Set to "1" by a node on its RESOURCE_EXHAUSTED answers that mean "no room for this model here
# in time" (TF Serving's slots or the disk cache full of models in use): another owner may have
# room, so a router passes the request on (spill-over).  Another RESOURCE_EXHAUSTED (a message
# over the size limit, TF Serving's own) has no marker and goes back to the client.
NO_ROOM_KEY = "x-tfscache-no-room"


class ServingError(Exception):
    """An error with a TF Serving status code and a message fit for the client.

    ``node_wide``: the node is unusable for every model, not just this request's (see
    NODE_UNAVAILABLE_KEY).  ``no_room``: a RESOURCE_EXHAUSTED for lack of room for the model
    on this node, which another owner may have (see NO_ROOM_KEY)."""

    def __init__(self, code: Code, message: str, node_wide: bool = False, no_room: bool = False) -> None:
        super().__init__(message)
        self.code = Code(code)
        self.message = message
        self.node_wide = node_wide
        self.no_room = no_room and self.code == Code.RESOURCE_EXHAUSTED

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)

    def __repr__(self) -> str:
        return f"ServingError({self.code.name}, {self.message!r})"


class ModelLoadError(ServingError):
    """TF Serving tried the model and it failed to load (a broken SavedModel, a wrong layout):
    the model's fault whatever the code (TF Serving says NOT_FOUND for a missing
    saved_model.pb), so it is negatively cached, unlike a NOT_FOUND from the model source."""


def invalid(message: str) -> ServingError:
    return ServingError(Code.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServingError:
    return ServingError(Code.NOT_FOUND, message)


def unavailable(message: str, node_wide: bool = False) -> ServingError:
    return ServingError(Code.UNAVAILABLE, message, node_wide)


def no_room(message: str) -> ServingError:
    """RESOURCE_EXHAUSTED: no room for the model on this node (another owner may have it)."""
    return ServingError(Code.RESOURCE_EXHAUSTED, message, no_room=True)


def deadline(message: str) -> ServingError:
    return ServingError(Code.DEADLINE_EXCEEDED, message)
