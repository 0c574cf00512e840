"""`destra infra up --advertise`: the addresses parsed, the broker certificate reissued to
name them from the same CA, the listeners written, the choice remembered."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from destra.settings import Settings
from infra import services
from infra.kafka import Advertised, BrokerSecurity, KafkaCluster, parse_advertised
from infra.tls import broker_hosts, ensure_tls, missing_hosts
from schemas.errors import InfraError


def test_addresses_parse_with_default_ports_and_bad_ones_are_refused() -> None:
    assert parse_advertised(["127.0.0.2", "gpu.Example.com:30000,[fd00::2]:31000"], 19092) == [
        Advertised("127.0.0.2", 19392), Advertised("gpu.example.com", 30000),
        Advertised("fd00::2", 31000)]
    assert str(Advertised("fd00::2", 31000)) == "[fd00::2]:31000"
    for bad in ("0.0.0.0", "a_b", "h:port", "h:19092", "h:19192", "h:1", "a:1:2",
                "h:30000,g:30000"):
        with pytest.raises(InfraError):
            parse_advertised([bad], 19092)


def test_a_certificate_lacking_an_advertised_name_is_reissued_from_the_same_ca(
        tmp_path: Path) -> None:
    files = ensure_tls(tmp_path / "tls")
    ca_before, ca_key_before = files.ca_cert.read_bytes(), files.ca_key.read_bytes()
    assert sorted(broker_hosts(files)) == ["127.0.0.1", "localhost"]
    assert missing_hosts(files, ["127.0.0.2", "gpu.example.com"]) == [
        "127.0.0.2", "gpu.example.com"]

    ensure_tls(tmp_path / "tls", ["127.0.0.2", "gpu.example.com"])
    assert sorted(broker_hosts(files)) == ["127.0.0.1", "127.0.0.2", "gpu.example.com",
                                           "localhost"]
    assert missing_hosts(files, ["127.0.0.2", "GPU.example.com"]) == []
    # The same CA, so every credentials file (which carries the CA) stays valid; the new
    # certificate is signed by it; the keys stay 0600.
    assert files.ca_cert.read_bytes() == ca_before and files.ca_key.read_bytes() == ca_key_before
    ca = x509.load_pem_x509_certificate(ca_before)
    chain = x509.load_pem_x509_certificates(files.broker_keystore.read_bytes())
    assert chain[0].issuer == ca.subject and chain[-1] == ca
    ca_public = ca.public_key()
    assert isinstance(ca_public, ec.EllipticCurvePublicKey)
    sig_hash = chain[0].signature_hash_algorithm
    assert sig_hash is not None
    ca_public.verify(chain[0].signature, chain[0].tbs_certificate_bytes, ec.ECDSA(sig_hash))
    for secret in (files.ca_key, files.broker_keystore):
        assert secret.stat().st_mode & 0o777 == 0o600
    # Asked again for names it has: nothing changes.
    cert = files.broker_keystore.read_bytes()
    ensure_tls(tmp_path / "tls", ["127.0.0.2"])
    assert files.broker_keystore.read_bytes() == cert
    # Later names add to the earlier ones.
    ensure_tls(tmp_path / "tls", ["fd00::2"])
    alt = x509.load_pem_x509_certificates(files.broker_keystore.read_bytes())[0].extensions \
        .get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("fd00::2") in alt.get_values_for_type(x509.IPAddress)
    assert "gpu.example.com" in alt.get_values_for_type(x509.DNSName)


def _properties(tmp_path: Path, advertise: list[Advertised], brokers: int = 1) -> list[str]:
    security = BrokerSecurity(ensure_tls(tmp_path / "tls"), "pw")
    cluster = KafkaCluster(tmp_path / "k", tmp_path / "libs", brokers=brokers, port=20000,
                           security=security, advertise=advertise)
    return [cluster._properties(n) for n in cluster.nodes]


def test_advertised_listeners_are_extra_and_the_controller_stays_on_loopback(
        tmp_path: Path) -> None:
    plain = _properties(tmp_path, [])[0]
    assert "listeners=CLIENT://127.0.0.1:20000,CONTROLLER://127.0.0.1:20100\n" in plain
    assert "advertised.listeners=CLIENT://127.0.0.1:20000\n" in plain
    assert "EXTERNAL" not in plain

    props = _properties(tmp_path, [Advertised("gpu.example.com", 30000),
                                   Advertised("fd00::2", 31000)], brokers=3)
    second = props[1]
    assert ("listeners=CLIENT://127.0.0.1:20001,CONTROLLER://127.0.0.1:20101,"
            "EXTERNAL://0.0.0.0:30001,EXTERNAL_2://[::]:31001\n") in second
    assert ("advertised.listeners=CLIENT://127.0.0.1:20001,EXTERNAL://gpu.example.com:30001,"
            "EXTERNAL_2://[fd00::2]:31001\n") in second
    assert "listener.security.protocol.map=CLIENT:SASL_SSL,CONTROLLER:SSL," \
           "EXTERNAL:SASL_SSL,EXTERNAL_2:SASL_SSL\n" in second
    assert "controller.quorum.voters=1@127.0.0.1:20100,2@127.0.0.1:20101,3@127.0.0.1:20102" \
        in second
    assert "inter.broker.listener.name=CLIENT\n" in second
    assert "listener.name.external.scram-sha-512.sasl.jaas.config=" in second
    # A plaintext broker is never offered to other machines.
    with pytest.raises(InfraError, match="never advertised"):
        KafkaCluster(tmp_path / "k", tmp_path / "libs", advertise=[Advertised("h", 30000)])


def test_the_choice_is_remembered_and_none_forgets_it(tmp_path: Path) -> None:
    home = Settings(home=tmp_path)
    tmp_path.mkdir(exist_ok=True)
    assert services.chosen_advertise(home) == []
    named = home.with_(kafka_advertise=("gpu.example.com:30000",))
    chosen = services.chosen_advertise(named)
    services._record_advertise(named, chosen)
    assert services.chosen_advertise(home) == [Advertised("gpu.example.com", 30000)]
    forget = home.with_(kafka_advertise=("none",))
    services._record_advertise(forget, services.chosen_advertise(forget))
    assert services.chosen_advertise(home) == []
    # From the environment too, as a comma list.
    env = Settings.from_env({"DESTRA_HOME": str(tmp_path),
                             "DESTRA_KAFKA_ADVERTISE": "a.example, 10.0.0.5:31000"})
    assert env.kafka_advertise == ("a.example", "10.0.0.5:31000")


def test_advertise_is_refused_for_insecure_and_external_brokers(tmp_path: Path) -> None:
    for settings in (Settings(home=tmp_path, kafka_insecure=True, kafka_advertise=("h",)),
                     Settings(home=tmp_path, kafka_bootstrap="x:9092", kafka_advertise=("h",))):
        with pytest.raises(InfraError):
            services.up(settings)


@pytest.mark.parametrize("formatted_secure", [False, True])
def test_a_broker_formatted_in_the_other_mode_is_refused_with_the_reason(
        tmp_path: Path, formatted_secure: bool) -> None:
    """A data directory formatted plaintext has no SCRAM credential in its metadata: started
    secured, the broker would never get ready. Said at once, with what to do."""
    security = BrokerSecurity(ensure_tls(tmp_path / "tls"), "pw")
    made = KafkaCluster(tmp_path / "k", tmp_path / "libs", port=20000,
                        security=security if formatted_secure else None)
    made.write_configs()
    node = made.nodes[0]
    (node.data_dir / "data").mkdir(parents=True)
    (node.data_dir / "data" / "meta.properties").write_text("cluster.id=x\n")
    other = KafkaCluster(tmp_path / "k", tmp_path / "libs", port=20000,
                         security=None if formatted_secure else security)
    with pytest.raises(InfraError, match="was formatted for a"):
        other.write_configs()
    same = KafkaCluster(tmp_path / "k", tmp_path / "libs", port=20000,
                        security=security if formatted_secure else None)
    same.write_configs()  # as it was made: fine
