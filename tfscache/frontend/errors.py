"""TF Serving's error formats: REST ``{"error": "..."}`` with its HTTP codes; gRPC status."""

from __future__ import annotations

import json

import grpc
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from tfscache.errors import NO_ROOM_KEY, NODE_UNAVAILABLE_KEY, Code, ServingError

log = Logger()

GRPC_CODES = {c.value[0]: c for c in grpc.StatusCode}


def as_serving_error(error: BaseException | Failure) -> ServingError:
    """Any error as a client-safe ServingError: unexpected ones are logged with their
    traceback here and reach the client as INTERNAL, with no internals."""
    failure = error if isinstance(error, Failure) else Failure(error)
    if isinstance(failure.value, ServingError):
        return failure.value
    if failure.check(defer.CancelledError):  # the client went away: nothing went wrong here
        return ServingError(Code.CANCELLED, "Request cancelled")
    log.failure("unexpected error while serving a request", failure=failure)
    return ServingError(Code.INTERNAL, "Internal error in tfscache (see its log)")


def rest_error_body(err: ServingError) -> bytes:
    return json.dumps({"error": err.message}).encode()


def grpc_status(err: ServingError) -> grpc.StatusCode:
    return GRPC_CODES.get(int(err.code), grpc.StatusCode.UNKNOWN)


def node_unavailable_marker(err: ServingError) -> str | None:
    """The NODE_UNAVAILABLE_KEY value a node sends with this error: only UNAVAILABLE has one,
    so the router of another node knows whether to mark this node down."""
    if err.code != Code.UNAVAILABLE:
        return None
    return "1" if err.node_wide else "0"


def error_markers(err: ServingError) -> list[tuple[str, str]]:
    """The markers a node sends with this error (REST headers, gRPC trailing metadata) for
    the router of another node: NODE_UNAVAILABLE_KEY (mark it down?) and NO_ROOM_KEY (pass the
    request to the next owner?)."""
    markers = []
    node = node_unavailable_marker(err)
    if node is not None:
        markers.append((NODE_UNAVAILABLE_KEY, node))
    if err.no_room:
        markers.append((NO_ROOM_KEY, "1"))
    return markers
