"""A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files (TLS tests)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path


def write_test_certs(out: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server.pem, server.key) in `out`; the server certificate is signed by the CA and valid
    for IP 127.0.0.1 and DNS localhost for one day. client.pem / client.key: a client certificate the CA
    signed (mTLS)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("twotower test CA")).issuer_name(name("twotower test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(san, critical=False).sign(ca_key, hashes.SHA256()))  # fmt: skip
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = (x509.CertificateBuilder().subject_name(name("twotower test client")).issuer_name(ca.subject)
              .public_key(client_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
              .sign(ca_key, hashes.SHA256()))  # fmt: skip
    pem = serialization.Encoding.PEM
    for path, c, k in ((out / "server", cert, key), (out / "client", client, client_key)):
        path.with_suffix(".pem").write_bytes(c.public_bytes(pem))
        path.with_suffix(".key").write_bytes(k.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))  # fmt: skip
    (out / "ca.pem").write_bytes(ca.public_bytes(pem))
    return out / "ca.pem", out / "server.pem", out / "server.key"
