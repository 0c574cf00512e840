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
(the addresses ``destra infra up --advertise`` names); clients check it
(``ssl.endpoint.identification.algorithm``). When the certificate on disk lacks a
requested name, a new broker key and certificate are issued from the same CA: clients
keep trusting the CA, so their credentials files stay valid.
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

from schemas.errors import InfraError

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


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host.lower())


def _alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    return list(dict.fromkeys(_general_name(h) for h in ["localhost", "127.0.0.1", *hosts]))


def broker_hosts(files: TlsFiles) -> list[str]:
    """The names (DNS) and addresses (IP) the broker certificate on disk carries."""
    cert = x509.load_pem_x509_certificates(files.broker_keystore.read_bytes())[0]
    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*alt.get_values_for_type(x509.DNSName),
            *(str(a) for a in alt.get_values_for_type(x509.IPAddress))]


def missing_hosts(files: TlsFiles, hosts: list[str]) -> list[str]:
    """Those of ``hosts`` the broker certificate on disk does not name."""
    have = {_general_name(h) for h in broker_hosts(files)}
    return [h for h in dict.fromkeys(hosts) if _general_name(h) not in have]


def tls_files(directory: Path) -> TlsFiles:
    """Where ``ensure_tls`` keeps the files in ``directory`` (whether or not made yet)."""
    return TlsFiles(directory / "ca.pem", directory / "ca.key", directory / "broker.pem")


def ensure_tls(directory: Path, hosts: list[str] | None = None) -> TlsFiles:
    """The CA and broker certificate in ``directory``, made when absent (keys 0600).

    A broker certificate that lacks one of ``hosts`` is replaced by one that names them
    all (and every name it had), signed by the same CA (``missing_hosts`` tells first).
    """
    hosts = list(hosts or [])
    files = tls_files(directory)
    if files.ca_cert.exists() and files.ca_key.exists() and files.broker_keystore.exists():
        missing = missing_hosts(files, hosts)
        if missing:
            ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), None)
            if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
                raise InfraError(f"{files.ca_key} is not the EC key of a Destra CA")
            _issue_broker(files, x509.load_pem_x509_certificate(files.ca_cert.read_bytes()),
                          ca_key, [*broker_hosts(files), *hosts])
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
    pem = serialization.Encoding.PEM
    _write_secret(files.ca_key, ca_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    files.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    _issue_broker(files, ca_cert, ca_key, hosts)
    return files


def _issue_broker(files: TlsFiles, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                  hosts: list[str]) -> None:
    """A new broker key and certificate naming ``hosts`` (and the loopback ones), signed by
    the CA, written with the CA certificate as ``broker.pem`` (0600)."""
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    until = now + datetime.timedelta(days=_VALID_DAYS)
    broker_key = ec.generate_private_key(ec.SECP256R1())
    broker_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(BROKER_CN)).issuer_name(ca_cert.subject)
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
    _write_secret(files.broker_keystore, broker_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        + broker_cert.public_bytes(pem) + ca_cert.public_bytes(pem))
