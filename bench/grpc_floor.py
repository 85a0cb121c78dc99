"""The grpc.aio floor: the least a forwarder built on grpc.aio does per call, as a contender.

A bare relay, nothing of tfscache in it: a grpc.aio server on uvloop whose one generic handler
reads the request as raw bytes (the reader API of a stream-unary handler, as tfscache's front
end does), calls the same method with the same bytes and deadline on one aio channel to
``--target``, and returns the reply's bytes.  No routing, model state, metrics or error mapping.
What tfscache's gRPC path costs beyond this contender, in the same cell of
``bench.data_plane``, is tfscache's own work; the floor itself is grpc.aio's.

    python -m bench.grpc_floor --target HOST:PORT   # prints {"grpc_port": N} once it listens
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc

from tfscache.reactor import new_event_loop


class _Relay(grpc.GenericRpcHandler):
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.methods: dict[str, Any] = {}

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        forward = self.methods.get(method)
        if forward is None:
            forward = self.methods[method] = self.channel.unary_unary(method)

        async def relay(_requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
            request = await context.read()
            reply: bytes = await forward(request, timeout=context.time_remaining())
            return reply

        return grpc.stream_unary_rpc_method_handler(relay)


async def serve(target: str, host: str) -> None:
    channel = grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", -1),
                                                         ("grpc.max_send_message_length", -1)])
    server = grpc.aio.server(handlers=[_Relay(channel)], options=[
        ("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
    port = server.add_insecure_port(f"{host}:0")
    await server.start()
    print(json.dumps({"grpc_port": port}), flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="host:port to relay every call to")
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args(argv)
    loop = new_event_loop()  # uvloop, as tfscache's reactor
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(serve(args.target, args.host))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
