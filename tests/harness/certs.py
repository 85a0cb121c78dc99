"""A throwaway CA, a server certificate for 127.0.0.1 / localhost and a client certificate, for
TLS tests."""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: str, key: ec.EllipticCurvePrivateKey) -> None:
    with open(path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def _write_cert(path: str, cert: x509.Certificate) -> None:
    with open(path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def make_tls_files() -> dict[str, str]:
    """Write ca.pem, server.pem, server.key, client.pem and client.key into a temp dir; return
    their paths (keys ``ca``, ``cert``, ``key``, ``client_cert``, ``client_key``).  Each call
    makes a new CA, so a second call's ``ca`` is the wrong CA for the first one's certs."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("tfscache test CA")).issuer_name(_name("tfscache test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def issue(cn: str, extension: x509.ExtensionType) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(extension, critical=False)
                .sign(ca_key, hashes.SHA256()))
        return cert, key

    # the server certificate has no extended key usage: etcd's gateway also presents it as a
    # client certificate to etcd's own gRPC port
    server = issue("localhost", x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                              x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]))
    client = issue("tfscache-client", x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]))
    d = tempfile.mkdtemp(prefix="tfscache-tls-")
    paths = {k: os.path.join(d, f) for k, f in (("ca", "ca.pem"), ("cert", "server.pem"), ("key", "server.key"),
                                                ("client_cert", "client.pem"), ("client_key", "client.key"))}
    _write_cert(paths["ca"], ca)
    for (cert, key), cert_path, key_path in ((server, "cert", "key"), (client, "client_cert", "client_key")):
        _write_cert(paths[cert_path], cert)
        _write_key(paths[key_path], key)
    return paths
