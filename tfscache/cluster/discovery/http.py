"""The HTTP client of the etcd and Consul discoveries: treq on an Agent of its own.

One stack for both (etcd's v3 JSON gateway and Consul's HTTP API are a handful of JSON
endpoints each), on the reactor: no thread per call or per watch.  Two things differ from a
plain ``treq`` Agent:

- an endpoint that is an IP address is connected to directly.  Twisted's ``HostnameEndpoint``
  resolves even an IP literal through ``getaddrinfo`` in the reactor's shared thread pool,
  where a burst of disk or S3 copies could hold up a lease keepalive until the lease expired;
- every connection has TCP keepalive after ``keepalive_idle`` seconds of silence, so that the
  kernel ends a long watch whose peer vanished without a FIN or RST (a half-open connection).

TLS: the CA of ``ca_cert`` (default: the system's roots) and the client certificate, if any.
"""

from __future__ import annotations

import contextlib
import json
import socket
from typing import Any

from treq.client import HTTPClient
from twisted.internet import defer, ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IConsumer, IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer


@implementer(IPolicyForHTTPS)
class TLSPolicy:
    """Verify the server against ``ca_cert`` (default: the system's roots); present the client
    certificate when both its files are given."""

    def __init__(self, ca_cert: str | None = None, client_cert: str | None = None,
                 client_key: str | None = None) -> None:
        self.trust: Any = None
        if ca_cert:
            with open(ca_cert, "rb") as f:
                self.trust = ssl.Certificate.loadPEM(f.read())
        self.client: Any = None
        if client_cert and client_key:
            with open(client_cert, "rb") as c, open(client_key, "rb") as k:
                self.client = ssl.PrivateCertificate.loadPEM(c.read() + b"\n" + k.read())

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return ssl.optionsForClientTLS(hostname.decode("ascii").strip("[]"),
                                       trustRoot=self.trust or ssl.platformTrust(), clientCertificate=self.client)


def keepalive_options(idle: int) -> list[tuple[int, int, int]]:
    """TCP keepalive after ``idle`` seconds of silence, then 3 probes ``idle/3`` apart."""
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", max(1, idle // 3)), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):  # Linux; macOS has only some of them
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    return options


@implementer(IStreamClientEndpoint)
class _KeepaliveEndpoint:
    """A TCP endpoint whose connections get TCP keepalive options once connected, and whose
    factories do not log "Starting factory" / "Stopping factory" for every connection (the
    pool's HTTP factory is noisy by default)."""

    def __init__(self, endpoint: IStreamClientEndpoint, idle: int) -> None:
        self.endpoint, self.options = endpoint, keepalive_options(idle)

    def connect(self, protocolFactory: IProtocolFactory) -> Any:
        if isinstance(protocolFactory, Factory):
            protocolFactory.noisy = False

        def configure(protocol: IProtocol) -> IProtocol:
            handle = getattr(getattr(protocol, "transport", None), "getHandle", lambda: None)()
            if isinstance(handle, socket.socket):
                with contextlib.suppress(OSError):
                    for level, name, value in self.options:
                        handle.setsockopt(level, name, value)
            return protocol

        return self.endpoint.connect(protocolFactory).addCallback(configure)


@implementer(IAgentEndpointFactory)
class EndpointFactory:
    """Endpoints for the Agent: IP addresses connected to directly, names resolved."""

    def __init__(self, reactor: Any, policy: IPolicyForHTTPS, connect_timeout: float, keepalive_idle: int) -> None:
        self.reactor, self.policy = reactor, policy
        self.connect_timeout, self.keepalive_idle = connect_timeout, keepalive_idle

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii").strip("[]")
        endpoint: IStreamClientEndpoint
        if isIPAddress(host):
            endpoint = TCP4ClientEndpoint(self.reactor, host, uri.port, timeout=self.connect_timeout)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(self.reactor, host, uri.port, timeout=self.connect_timeout)
        else:
            endpoint = HostnameEndpoint(self.reactor, host, uri.port, timeout=self.connect_timeout)
        endpoint = _KeepaliveEndpoint(endpoint, self.keepalive_idle)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self.policy.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint


@implementer(IBodyProducer)
class JsonBody:
    """A request body written at once.  Not treq's default for bytes (a FileBodyProducer, a
    cooperative task): a TLS connection lost while it writes pauses that stopped task, and
    Twisted logs the TaskStopped it raises as an unhandled error."""

    def __init__(self, body: Any) -> None:
        self.data = json.dumps(body).encode()
        self.length = len(self.data)

    def startProducing(self, consumer: IConsumer) -> defer.Deferred[None]:
        consumer.write(self.data)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def http_client(reactor: Any, policy: IPolicyForHTTPS, connect_timeout: float, keepalive_idle: int = 10,
                per_host: int = 4) -> tuple[HTTPClient, HTTPConnectionPool]:
    """A treq client and its connection pool (close it with ``closeCachedConnections``)."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = per_host
    agent = Agent.usingEndpointFactory(reactor, EndpointFactory(reactor, policy, connect_timeout, keepalive_idle),
                                       pool=pool)
    return HTTPClient(agent), pool
