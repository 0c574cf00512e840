"""The event catalogue: every ``.avsc`` loaded, expanded, parsed and fingerprinted once.

Event schemas name the shared ``network.destra.Envelope`` by reference; the
loader inlines it, so each event schema stands alone (the form the official
``avro`` library, the compatibility checker and the history files use).

The fingerprint is CRC-64-AVRO of the Parsing Canonical Form, as the 8 bytes
the single-object encoding puts on the wire (little-endian, like Java's
``SchemaNormalization``). Schemas declare no ``logicalType``: avro-python
1.12 keeps ``{"type": "long"}`` for a logical-typed primitive in its
canonical form where Java and fastavro write ``"long"``, so the fingerprints
would disagree between libraries.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastavro import parse_schema
from fastavro.schema import fingerprint as _fastavro_fingerprint
from fastavro.schema import to_parsing_canonical_form

from schemas.errors import UnknownSchema
from schemas.ranges import Checker, compile_checker

NAMESPACE = "network.destra"
ENVELOPE = f"{NAMESPACE}.Envelope"
MARKER = b"\xc3\x01"
"""The two bytes that open every Avro single-object encoded datum."""

PACKAGE_DIR = Path(__file__).resolve().parent
AVSC_DIR = PACKAGE_DIR / "avsc"
HISTORY_DIR = PACKAGE_DIR / "history"

RESERVED_FIELDS = frozenset({"event_id", "occurred_at", "producer_id", "signature", "signer",
                             "catalog"})
"""Names an event's own fields may not take: ``new_event`` uses them as keywords."""

_VERSION_FILE = re.compile(r"v([1-9][0-9]*)\.avsc")


class SchemaDefinitionError(ValueError):
    """An ``.avsc`` breaks a house rule (a programming error, caught by the unit tests)."""


@dataclass(frozen=True)
class SchemaVersion:
    """One schema of one event type: the current one or a released one."""

    name: str
    version: int | None
    """The released version number, or None for the current schema."""
    json: Mapping[str, Any]
    parsed: Any
    canonical_form: str
    fingerprint: bytes


@dataclass(frozen=True)
class Reading:
    """What decoding needs for one fingerprint: writer, reader (None: same) and checks."""

    name: str
    writer: Any
    reader: Any | None
    check: Checker


@dataclass(frozen=True)
class Writing:
    """What encoding needs for one event type: the 10-byte header, the schema, the checks."""

    name: str
    header: bytes
    parsed: Any
    check: Checker


def fingerprint_of(schema_json: Any) -> tuple[str, bytes]:
    """The Parsing Canonical Form and its CRC-64-AVRO fingerprint (wire byte order)."""
    canonical = to_parsing_canonical_form(copy.deepcopy(schema_json))
    return canonical, bytes.fromhex(_fastavro_fingerprint(canonical, "CRC-64-AVRO"))


def _version(name: str, version: int | None, schema_json: dict[str, Any]) -> SchemaVersion:
    canonical, fp = fingerprint_of(schema_json)
    parsed = parse_schema(copy.deepcopy(schema_json))
    _python_defaults(parsed, {})
    return SchemaVersion(name, version, schema_json, parsed, canonical, fp)


_JSON_KINDS: dict[str, tuple[type, ...]] = {
    "null": (type(None),), "boolean": (bool,), "int": (int,), "long": (int,),
    "float": (int, float), "double": (int, float), "string": (str,), "bytes": (str, bytes),
    "fixed": (str, bytes), "enum": (str,), "record": (dict,), "map": (dict,), "array": (list,),
}


def _python_defaults(schema: Any, named: dict[str, Any]) -> None:
    """Turn every field default of a parsed schema into the value a reader must give.

    JSON has no bytes: Avro writes a ``bytes`` or ``fixed`` default as a string
    whose code points 0-255 are the bytes. fastavro fills a missing field with
    the JSON value as it is, so an event written before a ``bytes`` field with
    default ``""`` existed would decode with ``""`` (text), not ``b""``.
    """
    if isinstance(schema, list):
        for branch in schema:
            _python_defaults(branch, named)
        return
    if not isinstance(schema, dict):
        return
    kind = schema.get("type")
    if kind in ("record", "error", "enum", "fixed"):
        named[schema["name"]] = schema
    if kind in ("record", "error"):
        for field in schema["fields"]:
            _python_defaults(field["type"], named)
            if "default" in field:
                field["default"] = _python_value(field["type"], field["default"], named)
    elif kind == "array":
        _python_defaults(schema["items"], named)
    elif kind == "map":
        _python_defaults(schema["values"], named)
    elif isinstance(kind, dict | list):
        _python_defaults(kind, named)


def _python_value(schema: Any, value: Any, named: Mapping[str, Any]) -> Any:
    """A JSON default of ``schema`` as the Python value fastavro reads for that type."""
    if isinstance(schema, str):
        if schema in named:
            return _python_value(named[schema], value, named)
        if schema == "bytes" and isinstance(value, str):
            return value.encode("latin-1")
        return value
    if isinstance(schema, list):  # a union: the first branch the JSON value can be
        for branch in schema:
            if isinstance(value, _JSON_KINDS.get(_kind(branch, named), ())):
                return _python_value(branch, value, named)
        return value
    kind = schema["type"]
    if kind == "fixed" and isinstance(value, str):
        return value.encode("latin-1")
    if kind in ("record", "error") and isinstance(value, dict):
        types = {f["name"]: f["type"] for f in schema["fields"]}
        return {k: _python_value(types[k], v, named) if k in types else v
                for k, v in value.items()}
    if kind == "array" and isinstance(value, list):
        return [_python_value(schema["items"], v, named) for v in value]
    if kind == "map" and isinstance(value, dict):
        return {k: _python_value(schema["values"], v, named) for k, v in value.items()}
    if kind in ("record", "error", "array", "map", "enum", "fixed"):
        return value  # a value that does not fit its type: left for the reader to refuse
    return _python_value(kind, value, named)  # {"type": "bytes"} and the like


def _kind(schema: Any, named: Mapping[str, Any]) -> str:
    if isinstance(schema, str):
        return str(named[schema]["type"]) if schema in named else schema
    if isinstance(schema, list):
        return "union"
    kind = schema["type"]
    return kind if isinstance(kind, str) and kind in _JSON_KINDS else _kind(kind, named)


class Catalog:
    """Every event schema, current and released, with the lookups the codec needs."""

    def __init__(self, avsc_dir: Path = AVSC_DIR, history_dir: Path = HISTORY_DIR) -> None:
        self.avsc_dir = Path(avsc_dir)
        self.history_dir = Path(history_dir)
        self._current: dict[str, SchemaVersion] = {}
        self._history: dict[str, list[SchemaVersion]] = {}
        for name, schema_json in sorted(load_current(self.avsc_dir).items()):
            self._current[name] = _version(name, None, schema_json)
            self._history[name] = [
                _version(name, number, released)
                for number, released in load_history(self.history_dir, name)
            ]
        self._writing: dict[str, Writing] = {}
        self._reading: dict[bytes, Reading] = {}
        for name, current in self._current.items():
            check = compile_checker(current.json)
            self._writing[name] = Writing(name, MARKER + current.fingerprint, current.parsed, check)
            for old in self._history[name]:
                # A released version equal to the current one reads without resolution.
                reader = None if old.fingerprint == current.fingerprint else current.parsed
                self._reading[old.fingerprint] = Reading(name, old.parsed, reader, check)
            self._reading[current.fingerprint] = Reading(name, current.parsed, None, check)

    @property
    def names(self) -> tuple[str, ...]:
        """Every event type, sorted (the Envelope is not an event)."""
        return tuple(self._current)

    def __contains__(self, name: object) -> bool:
        return name in self._current

    def __iter__(self) -> Iterator[str]:
        return iter(self._current)

    def current(self, name: str) -> SchemaVersion:
        """The current schema of an event type."""
        try:
            return self._current[name]
        except KeyError:
            raise UnknownSchema(f"no schema for event type {name!r}") from None

    def schema_json(self, name: str) -> dict[str, Any]:
        """The expanded schema as JSON data (a copy), e.g. for the official avro library."""
        return copy.deepcopy(dict(self.current(name).json))

    def parsed(self, name: str) -> Any:
        """The fastavro parsed schema."""
        return self.current(name).parsed

    def fingerprint(self, name: str) -> bytes:
        """The 8-byte CRC-64-AVRO fingerprint, in the byte order written on the wire."""
        return self.current(name).fingerprint

    def history(self, name: str) -> list[SchemaVersion]:
        """The released versions of an event type, oldest first."""
        self.current(name)
        return list(self._history[name])

    def lookup(self, fingerprint: bytes) -> tuple[str, Any]:
        """The event name and writer schema (parsed) of a current or released fingerprint."""
        reading = self.reading(fingerprint)
        return reading.name, reading.writer

    def reading(self, fingerprint: bytes) -> Reading:
        """Everything decoding needs for a fingerprint; raises UnknownSchema."""
        try:
            return self._reading[fingerprint]
        except KeyError:
            raise UnknownSchema(f"unknown schema fingerprint {bytes(fingerprint).hex()}") from None

    def writing(self, name: str) -> Writing:
        """Everything encoding needs for an event type; raises UnknownSchema."""
        try:
            return self._writing[name]
        except KeyError:
            raise UnknownSchema(f"no schema for event type {name!r}") from None

    def defaults(self, name: str) -> dict[str, Any]:
        """The top-level fields that declare a default, with a copy of it as a Python value
        (``b""`` for a ``bytes`` field's ``""``)."""
        return {f["name"]: copy.deepcopy(f["default"])
                for f in self.current(name).parsed["fields"] if "default" in f}


@functools.cache
def default_catalog() -> Catalog:
    """The catalogue shipped in this package, built once per process."""
    return Catalog()


def load_current(avsc_dir: Path) -> dict[str, dict[str, Any]]:
    """Every event schema in a folder, with the Envelope inlined, checked against house rules."""
    raw = {p.stem: json.loads(p.read_text()) for p in sorted(Path(avsc_dir).glob("*.avsc"))}
    if "Envelope" not in raw:
        raise SchemaDefinitionError(f"{avsc_dir}: no Envelope.avsc")
    envelope = raw.pop("Envelope")
    _check_rules("Envelope", envelope)
    out = {}
    for name, schema in raw.items():
        _check_event(name, schema)
        expanded = copy.deepcopy(schema)
        expanded["fields"][0]["type"] = copy.deepcopy(envelope)
        _check_rules(name, expanded)
        out[name] = expanded
    return out


def load_history(history_dir: Path, name: str) -> list[tuple[int, dict[str, Any]]]:
    """The released versions of one event type, as (number, expanded JSON), oldest first."""
    folder = Path(history_dir) / name
    versions = []
    for path in folder.glob("v*.avsc") if folder.is_dir() else ():
        match = _VERSION_FILE.fullmatch(path.name)
        if match:
            versions.append((int(match.group(1)), json.loads(path.read_text())))
    versions.sort(key=lambda v: v[0])
    if [number for number, _ in versions] != list(range(1, len(versions) + 1)):
        raise SchemaDefinitionError(f"{folder}: versions must run v1, v2, ... without gaps")
    return versions


def _check_event(name: str, schema: Mapping[str, Any]) -> None:
    full = f"{schema.get('namespace', NAMESPACE)}.{schema.get('name')}"
    if schema.get("type") != "record" or full != f"{NAMESPACE}.{name}":
        raise SchemaDefinitionError(f"{name}.avsc must define the record {NAMESPACE}.{name}")
    fields = schema.get("fields") or []
    if not fields or fields[0].get("name") != "envelope" or fields[0].get("type") != ENVELOPE:
        raise SchemaDefinitionError(f"{name}: the first field must be envelope: {ENVELOPE}")
    clashes = RESERVED_FIELDS & {f["name"] for f in fields}
    if clashes:
        raise SchemaDefinitionError(f"{name}: reserved field names {sorted(clashes)}")


def _check_rules(name: str, node: Any, path: str = "") -> None:
    """Every field documented; no logicalType (it splits fingerprints between libraries)."""
    if isinstance(node, list):
        for item in node:
            _check_rules(name, item, path)
        return
    if not isinstance(node, dict):
        return
    if "logicalType" in node:
        raise SchemaDefinitionError(f"{name}{path}: logicalType is not allowed")
    for field in node.get("fields", ()):
        if not field.get("doc"):
            raise SchemaDefinitionError(f"{name}{path}.{field.get('name')}: no doc")
        _check_rules(name, field["type"], f"{path}.{field['name']}")
    for key in ("items", "values"):
        if key in node:
            _check_rules(name, node[key], path)
