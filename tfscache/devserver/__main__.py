"""DevServer: a TF-Serving-compatible server on TensorFlow, for tests and the demo.

    python -m tfscache.devserver --port 8500 --rest_api_port 8501 [--model_config_file F]
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from tensorflow_serving.config import model_server_config_pb2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", "--grpc-port", dest="port", type=int, default=8500)
    ap.add_argument("--rest_api_port", "--rest-port", dest="rest_port", type=int, default=8501)
    ap.add_argument("--model_config_file", "--model-config-file", dest="config_file")
    ap.add_argument("--file_system_poll_wait_seconds", "--file-system-poll-wait-seconds",
                    dest="poll_wait", type=float, default=1.0)
    ap.add_argument("--max_num_load_retries", "--max-num-load-retries", dest="retries", type=int, default=0)
    ap.add_argument("--load_retry_interval_micros", dest="retry_micros", type=int, default=1_000_000)
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s devserver %(levelname)s %(message)s",
                        stream=sys.stdout)
    from google.protobuf import text_format

    from tfscache.devserver import grpc_service, rest
    from tfscache.devserver.servables import ServableManager
    from tfscache.errors import ServingError

    manager = ServableManager(args.poll_wait, args.retries, args.retry_micros / 1e6)
    if args.config_file:
        with open(args.config_file) as f:
            config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
        try:
            manager.reload(config, deadline=None)
        except ServingError as e:  # as TF Serving: a model that fails to load is its status
            logging.error("start-up config: %s", e.message)
    grpc_server, grpc_port = grpc_service.make_server(manager, args.host, args.port)
    grpc_server.start()
    http = rest.make_server(manager, args.host, args.rest_port)
    threading.Thread(target=http.serve_forever, name="rest", daemon=True).start()
    logging.info("DevServer ready: gRPC %s:%d, REST %s:%d", args.host, grpc_port, args.host,
                 http.server_address[1])

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    http.shutdown()
    grpc_server.stop(grace=2).wait()
    manager.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
