"""The local network's certificate authority and broker certificate, made with ``cryptography``.

``ensure_tls(dir)`` writes, once, into ``dir`` (``$DESTRA_HOME/tls`` for ``destra infra
up``):

- ``ca.pem``: the CA certificate every client trusts (it travels inside each party's
  Kafka credentials file, see ``streams.security``);
- ``ca.key``: the CA's private key (0600), kept to issue a new broker certificate;
- ``broker.pem``: the broker's private key (PKCS#8) and certificate chain in one file
  (0600), Kafka's ``ssl.keystore.type=PEM``. Its subject, ``CN=destra-broker``, is the
  principal a broker presents to the controllers (mutual TLS), so it is a super user.

The broker certificate names ``localhost``, ``127.0.0.1`` and the extra hosts given
(``DESTRA_KAFKA_HOST``); clients check it (``ssl.endpoint.identification.algorithm``).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

BROKER_CN = "destra-broker"
BROKER_PRINCIPAL = f"User:CN={BROKER_CN}"
"""The principal a broker's TLS certificate authenticates as on the controller listener."""

_VALID_DAYS = 3650


@dataclass(frozen=True)
class TlsFiles:
    """Where the CA and the broker's key and certificate are."""

    ca_cert: Path
    ca_key: Path
    broker_keystore: Path

    def ca_pem(self) -> str:
        """The CA certificate, PEM text."""
        return self.ca_cert.read_text()


def _write_secret(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(["localhost", "127.0.0.1", *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def ensure_tls(directory: Path, hosts: list[str] | None = None) -> TlsFiles:
    """The CA and broker certificate in ``directory``, made when absent (keys 0600)."""
    files = TlsFiles(directory / "ca.pem", directory / "ca.key", directory / "broker.pem")
    if files.ca_cert.exists() and files.ca_key.exists() and files.broker_keystore.exists():
        return files
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    until = now + datetime.timedelta(days=_VALID_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("destra local CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    broker_key = ec.generate_private_key(ec.SECP256R1())
    broker_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(BROKER_CN)).issuer_name(ca_name)
        .public_key(broker_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(_alt_names(hosts or [])), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    _write_secret(files.ca_key, ca_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    _write_secret(files.broker_keystore, broker_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        + broker_cert.public_bytes(pem) + ca_cert.public_bytes(pem))
    files.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    return files
