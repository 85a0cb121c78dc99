"""Calling grpcio's synchronous channels from the reactor: their futures as Deferreds (the
control calls to TF Serving's ModelService, and the tests' clients).  The data path uses
``tfscache.transport.grpc_client`` (grpc.aio, no threads)."""

from __future__ import annotations

from typing import Any

import grpc
from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads

from tfscache.errors import Code, ServingError
from tfscache.transport.grpc_client import rpc_error_to_serving_error


def future_to_deferred(reactor: IReactorFromThreads, call: Any, target: str = "") -> defer.Deferred[Any]:
    """Bridge a grpcio future (done-callbacks run in grpc's threads) to ``reactor``'s thread.

    Cancelling the Deferred cancels the RPC."""
    d: defer.Deferred[Any] = defer.Deferred(lambda _d: call.cancel())

    def done(fut: Any) -> None:
        reactor.callFromThread(_deliver, d, fut, target)

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
