"""The catalogue: house rules of the schemas, fingerprints the official library agrees with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import avro.schema
import pytest

from destra.errors import UnknownSchema
from schemas import Catalog, default_catalog
from schemas.catalog import AVSC_DIR, HISTORY_DIR, SchemaDefinitionError, fingerprint_of
from schemas.ranges import RangeRuleError, _check, _compile_record, _generate
from schemas.samples import sample_event

EVENTS = {
    "NodeRegistered", "NodeHeartbeat", "TaskSubmitted", "TaskAssigned", "DataKeyGranted",
    "ResultCommitted", "ResultRevealed", "TaskVerified", "TaskFailed", "NodePenalized",
    "LedgerEntryPosted", "TokensMinted", "PriceUpdated", "ProposalSubmitted", "VoteCast",
    "RevealOpened", "ReissueRequested", "AccountRegistered", "DataKeyRefused",
    "DeadLettered", "CheckpointRequested", "CheckpointProvided", "ProposalDecided",
    "ParameterChanged", "AccountOperation",
}


def _fields(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """Every field of a schema, nested records included."""
    out = []
    for field in schema["fields"]:
        out.append(field)
        for type_ in field["type"] if isinstance(field["type"], list) else [field["type"]]:
            if isinstance(type_, dict) and type_.get("type") == "record":
                out += _fields(type_)
            if isinstance(type_, dict) and type_.get("type") == "array" \
                    and isinstance(type_["items"], dict):
                out += _fields(type_["items"])
    return out


def _copy_catalog(tmp_path: Path) -> tuple[Path, Path]:
    avsc = tmp_path / "avsc"
    shutil.copytree(AVSC_DIR, avsc)
    return avsc, tmp_path / "history"


def test_the_catalogue_holds_every_event_type_and_not_the_envelope() -> None:
    assert set(default_catalog().names) == EVENTS


@pytest.mark.parametrize("name", sorted(EVENTS))
def test_every_event_starts_with_the_inlined_envelope(name: str) -> None:
    schema = default_catalog().schema_json(name)
    assert schema["name"] == name and schema["namespace"] == "network.destra"
    envelope = schema["fields"][0]
    assert envelope["name"] == "envelope"
    assert [f["name"] for f in envelope["type"]["fields"]] == [
        "event_id", "occurred_at", "producer_id", "signature", "signer"]


@pytest.mark.parametrize("name", sorted(EVENTS))
def test_every_field_is_documented(name: str) -> None:
    schema = default_catalog().schema_json(name)
    assert schema.get("doc")
    assert all(field.get("doc") for field in _fields(schema))


@pytest.mark.parametrize("name", sorted(EVENTS))
def test_money_is_a_non_negative_long_of_micro_tokens(name: str) -> None:
    for field in _fields(default_catalog().schema_json(name)):
        if field["name"].endswith("_micro"):
            assert field["type"] == "long", field["name"]
            signed = (name, field["name"]) == ("LedgerEntryPosted", "amount_micro")
            assert signed or field.get("destra.min", -1) >= 0, field["name"]


@pytest.mark.parametrize("name", sorted(EVENTS))
def test_ids_may_not_be_empty(name: str) -> None:
    for field in _fields(default_catalog().schema_json(name)):
        if field["name"].endswith("_id") and field["type"] in ("string", ["null", "string"]):
            assert field.get("destra.min_length", 0) >= 1, field["name"]


@pytest.mark.parametrize("name", sorted(EVENTS))
def test_our_fingerprint_is_the_one_the_official_avro_library_computes(name: str) -> None:
    catalog = default_catalog()
    official = avro.schema.parse(json.dumps(catalog.schema_json(name)))
    assert catalog.current(name).canonical_form == official.canonical_form
    assert catalog.fingerprint(name) == official.fingerprint("CRC-64-AVRO")
    assert len(catalog.fingerprint(name)) == 8


@pytest.mark.parametrize(("schema", "java_long"), [
    ("null", 7195948357588979594),
    ("boolean", -6970731678124411036),
    ({"type": "fixed", "name": "foo", "size": 15}, 1756455273707447556),
])
def test_fingerprint_bytes_are_the_java_test_vectors_little_endian(
    schema: Any, java_long: int
) -> None:
    # Vectors from Apache Avro's share/test/data/schema-tests.txt (Java's 64-bit value);
    # the single-object encoding writes that value little-endian.
    _, fingerprint = fingerprint_of(schema)
    assert int.from_bytes(fingerprint, "little", signed=True) == java_long


def test_lookup_knows_current_and_released_fingerprints() -> None:
    catalog = default_catalog()
    for name in catalog.names:
        assert catalog.lookup(catalog.fingerprint(name))[0] == name
        for released in catalog.history(name):
            found, writer = catalog.lookup(released.fingerprint)
            assert found == name and writer["name"] == f"network.destra.{name}"


def test_lookup_of_an_unknown_fingerprint_raises_unknown_schema_with_its_hex() -> None:
    with pytest.raises(UnknownSchema, match="deadbeefdeadbeef"):
        default_catalog().lookup(bytes.fromhex("deadbeefdeadbeef"))


def test_schema_json_is_a_copy_the_caller_may_change() -> None:
    catalog = default_catalog()
    catalog.schema_json("TaskFailed")["fields"].clear()
    assert catalog.schema_json("TaskFailed")["fields"]


def test_the_default_catalogue_is_built_once() -> None:
    assert default_catalog() is default_catalog()


def test_a_catalogue_loads_from_any_folder(tmp_path: Path) -> None:
    avsc, history = _copy_catalog(tmp_path)
    catalog = Catalog(avsc, history)
    assert catalog.names == default_catalog().names
    assert catalog.history("TaskFailed") == []


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s["fields"][1].pop("doc"), "no doc"),
    (lambda s: s["fields"][1].update(type={"type": "long", "logicalType": "timestamp-millis"}),
     "logicalType"),
    (lambda s: s["fields"].pop(0), "first field must be envelope"),
    (lambda s: s.update(name="Something"), "must define the record"),
    (lambda s: s["fields"].append({"name": "signer", "type": "string", "doc": "x"}), "reserved"),
])
def test_a_schema_that_breaks_a_house_rule_is_refused(
    tmp_path: Path, edit: Any, message: str
) -> None:
    avsc, history = _copy_catalog(tmp_path)
    path = avsc / "TaskFailed.avsc"
    schema = json.loads(path.read_text())
    edit(schema)
    path.write_text(json.dumps(schema))
    with pytest.raises(SchemaDefinitionError, match=message):
        Catalog(avsc, history)


@pytest.mark.parametrize(("field", "rule", "message"), [
    ("reason", {"destra.min": 0}, "do not apply to string"),
    ("reason", {"destra.min_length": "1"}, "must be an integer"),
    ("reason", {"destra.max_length": 1.5}, "must be an integer"),
])
def test_a_range_rule_that_cannot_apply_is_refused(
    tmp_path: Path, field: str, rule: dict[str, Any], message: str
) -> None:
    avsc, history = _copy_catalog(tmp_path)
    path = avsc / "TaskFailed.avsc"
    schema = json.loads(path.read_text())
    next(f for f in schema["fields"] if f["name"] == field).update(rule)
    path.write_text(json.dumps(schema))
    with pytest.raises(RangeRuleError, match=message):
        Catalog(avsc, history)


def test_history_with_a_gap_is_refused(tmp_path: Path) -> None:
    avsc, history = _copy_catalog(tmp_path)
    shutil.copytree(HISTORY_DIR, history)
    (history / "TaskFailed" / "v1.avsc").rename(history / "TaskFailed" / "v2.avsc")
    with pytest.raises(SchemaDefinitionError, match="without gaps"):
        Catalog(avsc, history)


def _mutations(value: Any) -> list[Any]:
    """Plausible wrong and right values for a field, to probe the range checks."""
    out: list[Any] = [None, "", b"", 0, -1, 1, 2**31, 2**63, -(2**63) - 1, 1.5, True, [], {}]
    if isinstance(value, int) and not isinstance(value, bool):
        out += [value + 1, value - 1, -value]
    if isinstance(value, str | bytes):
        out += [value * 2, value[:1], value * 200]
    if isinstance(value, dict):
        out += [{**value, "extra": 1}, {k: v for k, v in list(value.items())[1:]}]
    if isinstance(value, list):
        out += [value[:1], value * 6, [{}]]
    return out


@pytest.mark.parametrize("name", sorted(EVENTS))
def test_the_fast_range_check_agrees_with_the_thorough_one(name: str) -> None:
    rule = _compile_record(default_catalog().schema_json(name))
    fast = _generate(rule)
    event = sample_event(name)
    records = [dict(event.fields)]
    for key, value in event.fields.items():
        records += [{**event.fields, key: bad} for bad in _mutations(value)]
    envelope = event.envelope
    for key, value in envelope.items():
        records += [{**event.fields, "envelope": {**envelope, key: bad}}
                    for bad in _mutations(value)]
    verdicts = {(fast(r), _check(rule, r, "") is None) for r in records}
    assert verdicts <= {(True, True), (False, False)}
    assert verdicts == {(True, True), (False, False)}
