"""How bytes move: the REST port's HTTP server, and the HTTP and gRPC clients that forward."""
