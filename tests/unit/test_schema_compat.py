"""Schema evolution: released versions stay readable both ways; breaking changes are refused."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_writer

from destra.errors import IncompatibleSchema, UnknownSchema
from schemas import Catalog, decode, default_catalog, encode, new_event
from schemas.catalog import AVSC_DIR, HISTORY_DIR, MARKER, SchemaVersion, _python_defaults
from schemas.compat import check_catalog, check_pair, release, unreleased
from schemas.samples import sample_event

Edit = Callable[[dict[str, Any]], None]


def _evolved(tmp_path: Path, name: str, edit: Edit) -> Catalog:
    """A copy of the shipped catalogue and history, with one schema edited."""
    avsc, history = tmp_path / "avsc", tmp_path / "history"
    shutil.copytree(AVSC_DIR, avsc)
    shutil.copytree(HISTORY_DIR, history)
    path = avsc / f"{name}.avsc"
    schema = json.loads(path.read_text())
    edit(schema)
    path.write_text(json.dumps(schema, indent=2))
    return Catalog(avsc, history)


def _field(schema: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in schema["fields"] if f["name"] == name)


def _add_defaulted_temperature(schema: dict[str, Any]) -> None:
    schema["fields"].append({"name": "gpu_temp_c", "type": ["null", "int"], "default": None,
                             "doc": "GPU temperature, if the driver reports it."})


def _add_required_temperature(schema: dict[str, Any]) -> None:
    schema["fields"].append({"name": "gpu_temp_c", "type": "int", "doc": "GPU temperature."})


def _seq_to_string(schema: dict[str, Any]) -> None:
    seq = _field(schema, "seq")
    seq["type"] = "string"
    del seq["destra.min"]


def test_every_current_schema_is_compatible_with_every_released_version_both_ways() -> None:
    catalog = default_catalog()
    assert all(catalog.history(name) for name in catalog.names), "every type has a release"
    assert check_catalog(catalog) == {name: [] for name in catalog.names}


def test_every_current_schema_is_released() -> None:
    # A changed .avsc must ship with its history/<Name>/vN.avsc: run compat.release.
    assert unreleased(default_catalog()) == []


def test_changing_a_long_to_a_string_is_incompatible_both_ways() -> None:
    old = default_catalog().schema_json("NodeHeartbeat")
    new = default_catalog().schema_json("NodeHeartbeat")
    _seq_to_string(new)
    assert any("string" in p and "long" in p for p in check_pair(new, old))
    assert check_pair(old, new)


def test_adding_a_field_without_a_default_breaks_reading_old_events() -> None:
    old = default_catalog().schema_json("NodeHeartbeat")
    new = default_catalog().schema_json("NodeHeartbeat")
    _add_required_temperature(new)
    assert any("gpu_temp_c" in p for p in check_pair(new, old))
    assert check_pair(old, new) == [], "old readers just skip the new field"


def test_removing_a_field_without_a_default_breaks_old_readers() -> None:
    old = default_catalog().schema_json("NodeHeartbeat")
    new = default_catalog().schema_json("NodeHeartbeat")
    new["fields"] = [f for f in new["fields"] if f["name"] != "free_slots"]
    assert check_pair(new, old) == []
    assert any("free_slots" in p for p in check_pair(old, new))


def test_adding_a_defaulted_field_is_compatible_both_ways() -> None:
    old = default_catalog().schema_json("NodeHeartbeat")
    new = default_catalog().schema_json("NodeHeartbeat")
    _add_defaulted_temperature(new)
    assert check_pair(new, old) == [] and check_pair(old, new) == []


def test_a_reader_with_a_new_defaulted_field_reads_old_bytes(tmp_path: Path) -> None:
    evolved = _evolved(tmp_path, "NodeHeartbeat", _add_defaulted_temperature)
    old_event = sample_event("NodeHeartbeat")
    old_bytes = encode(old_event)  # written with the released v1 schema

    # The new reader knows v1's fingerprint and resolves v1 into its own schema.
    assert evolved.fingerprint("NodeHeartbeat") != old_bytes[2:10]
    read = decode(old_bytes, catalog=evolved)
    assert read.fields == {**old_event.fields, "gpu_temp_c": None}

    # New bytes carry the new fingerprint, which a reader still on v1 does not know:
    # upgrade readers before writers.
    new_bytes = encode(read.replace(gpu_temp_c=71), catalog=evolved)
    assert decode(new_bytes, catalog=evolved).fields["gpu_temp_c"] == 71
    with pytest.raises(UnknownSchema):
        decode(new_bytes)


def _written_with(old: SchemaVersion, fields: Mapping[str, Any]) -> bytes:
    """Single-object bytes of ``fields`` as a producer on released version ``old`` wrote them."""
    body = io.BytesIO()
    known = {f["name"] for f in old.json["fields"]}
    schemaless_writer(body, old.parsed, {k: v for k, v in fields.items() if k in known})
    return MARKER + old.fingerprint + body.getvalue()


@pytest.mark.parametrize(("name", "version", "field"), [
    ("TaskSubmitted", 1, "signing_key"),
    ("TaskAssigned", 1, "submitter_key"),
    ("TaskAssigned", 2, "result_key"),
])
def test_a_bytes_field_added_later_reads_from_old_events_as_empty_bytes(
    name: str, version: int, field: str
) -> None:
    catalog = default_catalog()
    old = catalog.history(name)[version - 1]
    assert field not in {f["name"] for f in old.json["fields"]}
    assert _field(catalog.schema_json(name), field)["default"] == "", "JSON has no bytes"

    read = decode(_written_with(old, sample_event(name).fields))
    assert read.fields[field] == b"" and isinstance(read.fields[field], bytes)
    assert new_event(name, "test").fields[field] == b"", "new events get the same default"


def test_json_defaults_of_bytes_and_fixed_become_bytes_wherever_they_nest() -> None:
    schema: Any = parse_schema({"type": "record", "name": "R", "fields": [
        {"name": "union", "type": ["bytes", "null"], "default": "\u00ff"},
        {"name": "null", "type": ["null", "bytes"], "default": None},
        {"name": "fixed", "type": {"type": "fixed", "name": "F", "size": 1}, "default": "\u0001"},
        {"name": "named", "type": "F", "default": "\u0002"},
        {"name": "array", "type": {"type": "array", "items": "bytes"}, "default": ["a"]},
        {"name": "map", "type": {"type": "map", "values": "bytes"}, "default": {"k": "v"}},
        {"name": "record", "type": {"type": "record", "name": "S", "fields": [
            {"name": "inner", "type": "bytes", "default": "z"}]}, "default": {"inner": "y"}},
        {"name": "text", "type": "string", "default": "t"},
    ]})
    _python_defaults(schema, {})
    assert {f["name"]: f["default"] for f in schema["fields"]} == {
        "union": b"\xff", "null": None, "fixed": b"\x01", "named": b"\x02", "array": [b"a"],
        "map": {"k": b"v"}, "record": {"inner": b"y"}, "text": "t"}
    assert schema["fields"][6]["type"]["fields"][0]["default"] == b"z"


def _choice(schema: dict[str, Any]) -> dict[str, Any]:
    enum: dict[str, Any] = _field(schema, "choice")["type"]
    return enum


def _add_veto(schema: dict[str, Any]) -> None:
    _choice(schema)["symbols"].append("VETO")


def test_a_reader_with_the_enum_default_reads_a_vote_choice_added_later(tmp_path: Path) -> None:
    catalog = default_catalog()
    vetoing = catalog.schema_json("VoteCast")
    _add_veto(vetoing)
    # A reader on today's schema that has heard of the writer's newer version
    # (history/VoteCast/v3 written, avsc not yet upgraded) resolves it into its own.
    avsc, history = tmp_path / "avsc", tmp_path / "history"
    shutil.copytree(AVSC_DIR, avsc)
    shutil.copytree(HISTORY_DIR, history)
    (history / "VoteCast" / "v3.avsc").write_text(json.dumps(vetoing))
    reader = Catalog(avsc, history)
    newer = reader.history("VoteCast")[-1]
    assert newer.fingerprint != reader.fingerprint("VoteCast")

    read = decode(_written_with(newer, {**sample_event("VoteCast").fields, "choice": "VETO"}),
                  catalog=reader)
    assert read.fields["choice"] == "ABSTAIN"
    assert check_pair(catalog.schema_json("VoteCast"), vetoing) == []
    # v1 had no default: a reader still on it must upgrade before a choice is added.
    assert check_pair(catalog.history("VoteCast")[0].json, vetoing)


def test_a_changed_default_is_released_though_the_fingerprint_stays(tmp_path: Path) -> None:
    evolved = _evolved(tmp_path, "VoteCast", lambda s: _choice(s).update(default="NO"))
    assert unreleased(evolved) == ["VoteCast"]
    assert release(evolved) == ["VoteCast/v4.avsc"]
    versions = Catalog(evolved.avsc_dir, evolved.history_dir).history("VoteCast")
    assert versions[-1].fingerprint == versions[-2].fingerprint


def test_a_changed_doc_or_range_needs_no_release(tmp_path: Path) -> None:
    def edit(schema: dict[str, Any]) -> None:
        _field(schema, "voter_id")["doc"] = "Who votes, again."
        _field(schema, "voter_id")["destra.max_length"] = 64

    assert unreleased(_evolved(tmp_path, "VoteCast", edit)) == []


def test_release_refuses_an_incompatible_change_and_writes_nothing(tmp_path: Path) -> None:
    evolved = _evolved(tmp_path, "NodeHeartbeat", _seq_to_string)
    assert check_catalog(evolved)["NodeHeartbeat"]
    with pytest.raises(IncompatibleSchema, match="NodeHeartbeat"):
        release(evolved)
    assert sorted(p.name for p in (evolved.history_dir / "NodeHeartbeat").iterdir()) == ["v1.avsc"]


def test_release_refuses_a_field_added_without_a_default(tmp_path: Path) -> None:
    evolved = _evolved(tmp_path, "NodeHeartbeat", _add_required_temperature)
    with pytest.raises(IncompatibleSchema, match="new cannot read v1"):
        release(evolved)


def test_release_writes_the_next_version_of_a_compatible_change(tmp_path: Path) -> None:
    evolved = _evolved(tmp_path, "NodeHeartbeat", _add_defaulted_temperature)
    assert unreleased(evolved) == ["NodeHeartbeat"]
    assert release(evolved) == ["NodeHeartbeat/v2.avsc"]
    assert unreleased(evolved) == []
    assert release(evolved) == [], "releasing again changes nothing"

    reloaded = Catalog(evolved.avsc_dir, evolved.history_dir)
    assert [v.version for v in reloaded.history("NodeHeartbeat")] == [1, 2]
    assert check_catalog(reloaded)["NodeHeartbeat"] == []
    assert reloaded.lookup(reloaded.fingerprint("NodeHeartbeat"))[0] == "NodeHeartbeat"


def test_release_writes_v1_for_a_new_event_type(tmp_path: Path) -> None:
    avsc, history = tmp_path / "avsc", tmp_path / "history"
    shutil.copytree(AVSC_DIR, avsc)
    shutil.copytree(HISTORY_DIR, history)
    (avsc / "NodeRetired.avsc").write_text(json.dumps({
        "type": "record", "name": "NodeRetired", "namespace": "network.destra",
        "doc": "A node left the network.",
        "fields": [
            {"name": "envelope", "type": "network.destra.Envelope", "doc": "Metadata."},
            {"name": "node_id", "type": "string", "doc": "The node.", "destra.min_length": 1},
        ],
    }))
    catalog = Catalog(avsc, history)
    assert unreleased(catalog) == ["NodeRetired"]
    assert release(catalog) == ["NodeRetired/v1.avsc"]
    released = json.loads((history / "NodeRetired" / "v1.avsc").read_text())
    assert released == catalog.schema_json("NodeRetired"), "history holds the expanded schema"
