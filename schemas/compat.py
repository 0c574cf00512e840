"""Schema evolution: every current schema against every released version, both ways.

A released version lives in ``history/<Name>/vN.avsc`` (expanded JSON) and is
never edited. A change ships by ``release``: it checks that the new schema
reads everything every earlier version wrote (new reads old, so replay from
offset 0 works) and that every earlier version reads what the new one writes
(old reads new, so consumers not yet upgraded keep going), then writes the
next version. The verdicts come from the official ``avro`` library's checker.

Range attributes and docs are not part of the Parsing Canonical Form, so
changing them needs no release; tightening a range can still reject
recorded events on replay, which review must catch. Defaults (of fields and
of enums) are not part of it either, but a reader resolves with them, so a
changed default is released, as a version with the same fingerprint.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import avro.errors
import avro.schema
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

from schemas.catalog import Catalog, load_history
from schemas.errors import IncompatibleSchema


def check_pair(reader_json: Mapping[str, Any], writer_json: Mapping[str, Any]) -> list[str]:
    """Why a reader with ``reader_json`` cannot read data written with ``writer_json``.

    Empty when it can.
    """
    try:
        reader = avro.schema.parse(json.dumps(reader_json))
        writer = avro.schema.parse(json.dumps(writer_json))
    except avro.errors.AvroException as e:
        return [f"schema does not parse: {e}"]
    result = ReaderWriterCompatibilityChecker().get_compatibility(reader, writer)
    if result.compatibility is SchemaCompatibilityType.compatible:
        return []
    where = ", ".join(sorted(result.locations))
    return [f"{message} (at {where})" for message in sorted(result.messages)]


def check_versions(current: Mapping[str, Any], released: Sequence[Mapping[str, Any]]) -> list[str]:
    """Problems of a schema against each earlier version, in both directions."""
    problems = []
    for number, old in enumerate(released, start=1):
        problems += [f"new cannot read v{number}: {p}" for p in check_pair(current, old)]
        problems += [f"v{number} cannot read new: {p}" for p in check_pair(old, current)]
    return problems


def check_catalog(catalog: Catalog) -> dict[str, list[str]]:
    """For every event type, its problems against its released versions (empty: fine)."""
    return {
        name: check_versions(catalog.current(name).json, [v.json for v in catalog.history(name)])
        for name in catalog.names
    }


def release_form(schema: Any) -> Any:
    """What a release pins of a schema: all of it but docs and ``destra.*`` range attributes.

    More than the Parsing Canonical Form, which drops the defaults a reader
    resolves with (a field's, an enum's) and the aliases.
    """
    if isinstance(schema, list):
        return [release_form(item) for item in schema]
    if isinstance(schema, dict):
        return {key: release_form(value) for key, value in schema.items()
                if key != "doc" and not key.startswith("destra.")}
    return schema


def unreleased(catalog: Catalog, history_dir: Path | None = None) -> list[str]:
    """Event types whose current schema is not its latest released version."""
    history_dir = catalog.history_dir if history_dir is None else history_dir
    out = []
    for name in catalog.names:
        versions = load_history(history_dir, name)
        latest = release_form(versions[-1][1]) if versions else None
        if latest != release_form(catalog.current(name).json):
            out.append(name)
    return out


def release(catalog: Catalog, history_dir: Path | None = None) -> list[str]:
    """Write ``vN+1.avsc`` for every changed schema; all or nothing.

    Returns the written paths relative to ``history_dir``. Raises
    IncompatibleSchema, writing nothing, when any change is incompatible with
    any released version.
    """
    history_dir = catalog.history_dir if history_dir is None else Path(history_dir)
    pending: list[tuple[Path, Mapping[str, Any]]] = []
    problems: list[str] = []
    for name in unreleased(catalog, history_dir):
        current = catalog.current(name).json
        released = [schema for _, schema in load_history(history_dir, name)]
        problems += [f"{name}: {p}" for p in check_versions(current, released)]
        pending.append((Path(name) / f"v{len(released) + 1}.avsc", current))
    if problems:
        raise IncompatibleSchema("refusing to release:\n  " + "\n  ".join(problems))
    for relative, schema in pending:
        path = history_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(schema, indent=2, ensure_ascii=False) + "\n")
    return [str(relative) for relative, _ in pending]
