"""Calling gRPC from the reactor: grpcio futures as Deferreds, gRPC errors as ServingErrors."""

from __future__ import annotations

from typing import Any

import grpc
from twisted.internet import defer, reactor

from tfscache.errors import NODE_UNAVAILABLE_KEY, Code, ServingError


def rpc_error_to_serving_error(e: grpc.RpcError, target: str = "") -> ServingError:
    """UNAVAILABLE is node-wide unless the server's trailing metadata says it is about one
    model only: a failed connection has no server metadata at all, and a server other than
    tfscache (TF Serving) means itself when it says UNAVAILABLE."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = (e.details() if hasattr(e, "details") else None) or str(code)
    node_wide = False
    if code == grpc.StatusCode.UNAVAILABLE:
        trailers = (e.trailing_metadata() if hasattr(e, "trailing_metadata") else None) or ()
        node_wide = (NODE_UNAVAILABLE_KEY, "0") not in tuple(trailers)
    return ServingError(Code(code.value[0]), details, node_wide)


def future_to_deferred(call: Any, target: str = "") -> defer.Deferred[Any]:
    """Bridge a grpcio future (done-callbacks run in grpc's threads) to the reactor thread.

    Cancelling the Deferred cancels the RPC."""
    d: defer.Deferred[Any] = defer.Deferred(lambda _d: call.cancel())

    def done(fut: Any) -> None:
        reactor.callFromThread(_deliver, d, fut, target)  # type: ignore[attr-defined]

    call.add_done_callback(done)
    return d


def _deliver(d: defer.Deferred[Any], fut: Any, target: str) -> None:
    if d.called:
        return  # cancelled already
    try:
        result = fut.result()
    except grpc.FutureCancelledError:
        return
    except grpc.RpcError as e:
        d.errback(rpc_error_to_serving_error(e, target))
        return
    except Exception as e:  # pragma: no cover - grpc raises RpcError for call failures
        d.errback(ServingError(Code.INTERNAL, f"gRPC call failed: {e}"))
        return
    d.callback(result)
