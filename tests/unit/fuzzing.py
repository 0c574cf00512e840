"""Shared pieces of the fuzz suite (``tests/unit/test_fuzz_*.py``): settings profiles,
Avro-schema-driven value strategies, byte mutations, and the per-target input counts.

Profiles, chosen by ``DESTRA_FUZZ_PROFILE``:

* ``ci`` (the default): a few dozen examples a test, the whole suite in seconds;
* ``long``: ``DESTRA_FUZZ_EXAMPLES`` examples a test (default 5,000), for ``bench/fuzz.py``.

``count(target, n)`` tallies the generated inputs each target received (shrinking and
explicit examples included); with ``DESTRA_FUZZ_COUNTS`` set to a path, the tallies are
written there as JSON when the process exits, for the bench to print.
"""

from __future__ import annotations

import atexit
import json
import os
from collections import Counter
from collections.abc import Mapping
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from schemas.catalog import default_catalog
from schemas.ranges import MAX, MAX_LENGTH, MIN, MIN_LENGTH

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
          HealthCheck.large_base_example]
settings.register_profile("ci", max_examples=int(os.environ.get("DESTRA_FUZZ_EXAMPLES", 40)),
                          deadline=None, database=None, suppress_health_check=_QUIET,
                          derandomize=True)
settings.register_profile("long",
                          max_examples=int(os.environ.get("DESTRA_FUZZ_EXAMPLES", 5_000)),
                          deadline=None, database=None, suppress_health_check=_QUIET)
settings.load_profile(os.environ.get("DESTRA_FUZZ_PROFILE", "ci"))

COUNTS: Counter[str] = Counter()
"""Generated inputs fed to each target (a decoder, a handler, a sealed format...)."""


def count(target: str, n: int = 1) -> None:
    """Tally ``n`` generated inputs fed to ``target``."""
    COUNTS[target] += n


def _write_counts() -> None:
    with open(os.environ["DESTRA_FUZZ_COUNTS"], "w") as f:
        json.dump(dict(COUNTS), f)


if os.environ.get("DESTRA_FUZZ_COUNTS"):  # bench/fuzz.py collects them from each run
    atexit.register(_write_counts)


# ---------------------------------------------------------------- values


INT_LIMITS = {"int": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}
HUGE = 1_100_000
"""Characters or bytes of a huge field: over a megabyte on the wire."""

_TEXT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
    st.sampled_from(["", "\x00", "a\x00b", "é", "\u202e", "\U0001f600", "\ufeff", "\ud800",
                     "null", "-1", "9" * 40, " ", "task-7f3a", "alice", "node-3f9c"]),
)
_BYTES = st.one_of(st.binary(max_size=80), st.sampled_from([b"", b"\x00", bytes(32),
                                                           b"\xff" * 64]))


def _bounds(spec: Mapping[str, Any], kind: str) -> list[int]:
    lo, hi = INT_LIMITS[kind]
    edges = {lo, hi, lo + 1, hi - 1, -1, 0, 1, 2**31, -(2**31) - 1, 2**53 + 1}
    for key in (MIN, MAX):
        if key in spec:
            edges |= {spec[key] - 1, spec[key], spec[key] + 1}
    return sorted(edges)


def _sized(spec: Mapping[str, Any]) -> list[int]:
    lengths = {0, 1}
    for key in (MIN_LENGTH, MAX_LENGTH):
        if key in spec:
            lengths |= {max(0, spec[key] - 1), spec[key], spec[key] + 1}
    return sorted(lengths)


def values(schema: Any, spec: Mapping[str, Any] | None = None, *,
           named: dict[str, Any] | None = None,
           wrong_types: bool = False) -> st.SearchStrategy[Any]:
    """Values for an (inlined) Avro schema, biased to the edges of its ``destra.*`` ranges:
    boundary integers, lengths at the limits, huge fields, unicode (NUL, lone surrogates).
    ``wrong_types`` mixes in values of other types, which the encoder must refuse."""
    spec = spec or {}
    named = {} if named is None else named
    strategy = _values(schema, spec, named, wrong_types)
    if wrong_types:
        strategy = st.one_of(strategy, st.none(), st.integers(), st.floats(), _TEXT, _BYTES,
                             st.booleans(), st.lists(st.integers(), max_size=3))
    return strategy


def _values(schema: Any, spec: Mapping[str, Any], named: dict[str, Any],
            wrong: bool) -> st.SearchStrategy[Any]:
    if isinstance(schema, list):
        return st.one_of([_values(b, spec, named, wrong) for b in schema])
    if isinstance(schema, str):
        if schema in named:
            return _values(named[schema], spec, named, wrong)
        schema = {"type": schema}
    kind = schema["type"]
    if isinstance(kind, (dict, list)):
        return _values(kind, spec, named, wrong)
    if kind in ("record", "enum", "fixed"):
        named[schema["name"]] = schema
        if "namespace" in schema:
            named[f"{schema['namespace']}.{schema['name']}"] = schema
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind in INT_LIMITS:
        lo, hi = INT_LIMITS[kind]
        return st.one_of(st.sampled_from(_bounds(spec, kind)), st.integers(lo, hi),
                         st.integers(-1000, 10**6))
    if kind in ("float", "double"):
        return st.floats(allow_nan=True)
    if kind in ("string", "bytes"):
        base = _TEXT if kind == "string" else _BYTES
        unit = "é" if kind == "string" else b"\xff"
        at_limit = st.sampled_from(_sized(spec)).map(lambda n: unit * n)
        huge = st.just(unit * HUGE)
        return st.one_of(base, base, at_limit, huge)
    if kind == "enum":
        return st.one_of(st.sampled_from(schema["symbols"]), _TEXT)
    if kind == "fixed":
        return st.binary(min_size=schema["size"], max_size=schema["size"])
    if kind == "array":
        items = _values(schema["items"], {}, named, wrong)
        return st.one_of(st.lists(items, max_size=4),
                         st.sampled_from(_sized(spec)).flatmap(
                             lambda n: st.lists(items, min_size=n, max_size=n)))
    if kind == "map":
        vals = _values(schema["values"], {}, named, wrong)
        return st.one_of(st.dictionaries(_TEXT, vals, max_size=4),
                         st.sampled_from(_sized(spec)).map(
                             lambda n: {f"k{i}": "v" for i in range(n)}))
    if kind == "record":
        return st.fixed_dictionaries({
            f["name"]: values(f["type"], f, named=named, wrong_types=wrong)
            for f in schema["fields"]})
    raise AssertionError(f"no strategy for Avro type {kind!r}")


def field_specs(name: str) -> dict[str, Mapping[str, Any]]:
    """An event type's own fields (the envelope's left out), by name."""
    return {f["name"]: f for f in default_catalog().schema_json(name)["fields"]
            if f["name"] != "envelope"}


@st.composite
def fuzzed_fields(draw: st.DrawFn, name: str, *, wrong_types: bool = False,
                  pool: Mapping[str, st.SearchStrategy[Any]] | None = None) -> dict[str, Any]:
    """Some of ``name``'s fields with fuzzed values (the others are left as they are).
    ``pool`` gives a field plausible values too (ids a processor knows), so a fuzzed
    event often reaches past the first lookup."""
    specs = field_specs(name)
    chosen = draw(st.lists(st.sampled_from(sorted(specs)), min_size=1, max_size=4, unique=True))
    out: dict[str, Any] = {}
    for field in chosen:
        strategy = values(specs[field]["type"], specs[field], wrong_types=wrong_types)
        if pool and field in pool:
            strategy = st.one_of(pool[field], pool[field], strategy)
        out[field] = draw(strategy)
    return out


# ---------------------------------------------------------------- bytes


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` after one to three mutations: bit flips, truncation, extension, a splice,
    a byte set to an edge value, or a fingerprint swapped for a random or another one."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["flip", "flip", "truncate", "extend", "splice", "edge",
                                    "fingerprint", "known-fingerprint", "delete"]))
        if how == "flip" and out:
            i = draw(st.integers(0, len(out) - 1))
            out[i] ^= 1 << draw(st.integers(0, 7))
        elif how == "truncate":
            del out[draw(st.integers(0, len(out))):]
        elif how == "extend":
            out += draw(st.binary(min_size=1, max_size=64))
        elif how == "splice":
            i = draw(st.integers(0, len(out)))
            out[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif how == "delete" and out:
            i = draw(st.integers(0, len(out) - 1))
            del out[i:i + draw(st.integers(1, 8))]
        elif how == "edge" and out:
            i = draw(st.integers(0, len(out) - 1))
            out[i] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF]))
        elif how == "fingerprint" and len(out) >= 10:
            out[2:10] = draw(st.binary(min_size=8, max_size=8))
        elif how == "known-fingerprint" and len(out) >= 10:
            out[2:10] = draw(st.sampled_from(known_fingerprints()))
    return bytes(out)


def known_fingerprints() -> list[bytes]:
    """Every fingerprint the catalogue reads: current and released schemas."""
    catalog = default_catalog()
    prints = []
    for name in catalog.names:
        prints.append(catalog.fingerprint(name))
        prints += [v.fingerprint for v in catalog.history(name)]
    return sorted(set(prints))
