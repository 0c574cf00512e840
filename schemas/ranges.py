"""Range rules declared in the schemas, compiled once into a fast checker.

A field may carry ``"destra.min"`` / ``"destra.max"`` (inclusive, on int and
long) and ``"destra.min_length"`` / ``"destra.max_length"`` (on string, bytes,
array and map; strings count characters). On a ``["null", X]`` union the rule
applies when the value is not null. Extra attributes leave the Parsing
Canonical Form, and so the fingerprint, unchanged.

Every int and long is also checked to be a real ``int`` within Avro's range,
and every boolean a real ``bool``: fastavro's writer silently truncates
``1.5`` to ``1``, writes ``True`` as ``1`` and ``"no"`` as true, and money
must never pass through a float. Other types the writer itself refuses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

MIN, MAX = "destra.min", "destra.max"
MIN_LENGTH, MAX_LENGTH = "destra.min_length", "destra.max_length"
RANGE_KEYS = (MIN, MAX, MIN_LENGTH, MAX_LENGTH)

_INT_LIMITS = {"int": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}
_SIZED = {"string", "bytes", "array", "map"}
_NO_LIMIT = 1 << 62  # longer than anything that fits in memory

Checker = Callable[[Mapping[str, Any]], str | None]
"""Returns None for a valid record, else one line: field path, value, what is wrong."""


class RangeRuleError(ValueError):
    """A schema declares a range rule that cannot apply to its field's type."""


@dataclass(frozen=True)
class _Record:
    keys: frozenset[str]
    ints: tuple[tuple[str, int, int, bool], ...]  # name, lo, hi, nullable
    sized: tuple[tuple[str, int, int, bool], ...]  # name, min_len, max_len, nullable
    bools: tuple[tuple[str, bool], ...]  # name, nullable
    records: tuple[tuple[str, _Record, bool], ...]  # name, rule, nullable
    record_arrays: tuple[tuple[str, _Record], ...]


def compile_checker(schema: Mapping[str, Any]) -> Checker:
    """A checker for records of an expanded (no named references) record schema.

    A generated straight-line predicate answers the common case (valid) in
    about a third of the time of the rule walk; the walk runs only on failure,
    to say what is wrong. A unit test holds the two to the same verdicts.
    """
    rule = _compile_record(schema)
    fast = _generate(rule)

    def check(record: Mapping[str, Any]) -> str | None:
        if fast(record):
            return None
        return _check(rule, record, "") or "invalid record"

    return check


def _unwrap(type_: Any) -> tuple[Any, bool]:
    """The type under a ``["null", X]`` union, and whether it was nullable."""
    if isinstance(type_, list):
        branches = [t for t in type_ if t != "null"]
        if len(branches) == 1 and len(branches) < len(type_):
            return branches[0], True
        return type_, False
    return type_, False


def _type_name(type_: Any) -> str:
    if isinstance(type_, dict):
        return str(type_["type"])
    if isinstance(type_, list):
        return "union"
    return str(type_)


def _compile_record(schema: Mapping[str, Any]) -> _Record:
    ints: list[tuple[str, int, int, bool]] = []
    sized: list[tuple[str, int, int, bool]] = []
    bools: list[tuple[str, bool]] = []
    records: list[tuple[str, _Record, bool]] = []
    record_arrays: list[tuple[str, _Record]] = []
    for field in schema["fields"]:
        name = field["name"]
        type_, nullable = _unwrap(field["type"])
        kind = _type_name(type_)
        declared = [k for k in RANGE_KEYS if k in field]
        for key in declared:
            # Only integers: they bound ints and lengths, and go into generated source.
            if type(field[key]) is not int:
                raise RangeRuleError(f"{schema['name']}.{name}: {key} must be an integer")
        if kind in _INT_LIMITS:
            lo, hi = _INT_LIMITS[kind]
            ints.append((name, max(lo, field.get(MIN, lo)), min(hi, field.get(MAX, hi)), nullable))
            declared = [k for k in declared if k not in (MIN, MAX)]
        elif kind in _SIZED and (MIN_LENGTH in field or MAX_LENGTH in field):
            lo, hi = field.get(MIN_LENGTH, 0), field.get(MAX_LENGTH, _NO_LIMIT)
            sized.append((name, lo, hi, nullable))
            declared = [k for k in declared if k not in (MIN_LENGTH, MAX_LENGTH)]
        elif kind == "boolean":
            bools.append((name, nullable))
        if declared:
            raise RangeRuleError(f"{schema['name']}.{name}: {declared} do not apply to {kind}")
        if kind == "record":
            records.append((name, _compile_record(type_), nullable))
        elif kind == "array" and _type_name(type_["items"]) == "record":
            record_arrays.append((name, _compile_record(type_["items"])))
    return _Record(
        keys=frozenset(f["name"] for f in schema["fields"]),
        ints=tuple(ints),
        sized=tuple(sized),
        bools=tuple(bools),
        records=tuple(records),
        record_arrays=tuple(record_arrays),
    )


def _check(rule: _Record, record: Mapping[str, Any], path: str) -> str | None:
    """The first problem of a record, with its path; the readable twin of ``_generate``."""
    if not isinstance(record, Mapping):
        return f"{path or 'record'} = {record!r}: not a record"
    if record.keys() != rule.keys:
        return _key_problem(rule, record, path)
    for name, lo, hi, nullable in rule.ints:
        value = record[name]
        if type(value) is not int or value < lo or value > hi:
            if value is None and nullable:
                continue
            if type(value) is not int:
                return f"{path}{name} = {value!r}: not an integer"
            return f"{path}{name} = {value!r}: out of range {lo}..{hi}"
    for name, lo, hi, nullable in rule.sized:
        value = record[name]
        if value is None and nullable:
            continue
        try:
            size = len(value)
        except TypeError:
            return f"{path}{name} = {value!r}: has no length"
        if size < lo or size > hi:
            return f"{path}{name} = {_short(value)}: length {size} out of range {lo}..{hi}"
    for name, nullable in rule.bools:
        value = record[name]
        if type(value) is not bool and not (value is None and nullable):
            return f"{path}{name} = {_short(value)}: not a boolean"
    for name, sub, nullable in rule.records:
        value = record[name]
        if value is None and nullable:
            continue
        problem = _check(sub, value, f"{path}{name}.")
        if problem:
            return problem
    for name, sub in rule.record_arrays:
        items = record[name]
        if type(items) is not list:  # what fastavro writes as an array
            return f"{path}{name} = {_short(items)}: not a list"
        for i, item in enumerate(items):
            problem = _check(sub, item, f"{path}{name}[{i}].")
            if problem:
                return problem
    return None


def _key_problem(rule: _Record, record: Mapping[str, Any], path: str) -> str:
    missing = sorted(rule.keys - record.keys())
    unknown = sorted(record.keys() - rule.keys)
    parts = []
    if missing:
        parts.append(f"missing {', '.join(path + k for k in missing)}")
    if unknown:
        parts.append(f"unknown {', '.join(path + str(k) for k in unknown)}")
    return "; ".join(parts)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _generate(rule: _Record) -> Callable[[Any], bool]:
    """Compile a rule into one Python function that returns whether a record is valid.

    The source holds only integers (checked when compiling the rule) and
    field names through repr(); Avro restricts names to [A-Za-z_][A-Za-z0-9_]*
    besides.
    """
    namespace: dict[str, Any] = {}
    lines: list[str] = []
    _emit(rule, "valid", namespace, lines)
    exec("\n".join(lines), namespace)  # noqa: S102 - source built above from integers and repr()
    fn: Callable[[Any], bool] = namespace["valid"]
    return fn


def _emit(rule: _Record, fn: str, namespace: dict[str, Any], lines: list[str]) -> None:
    namespace[f"{fn}_keys"] = rule.keys
    body = [f"if r.keys() != {fn}_keys: return False"]

    def guard(name: str, bad: str, nullable: bool) -> None:
        bad = f"v is not None and ({bad})" if nullable else bad
        body.extend([f"v = r[{name!r}]", f"if {bad}:", "    return False"])

    for name, lo, hi, nullable in rule.ints:
        guard(name, f"type(v) is not int or v < {lo} or v > {hi}", nullable)
    for name, lo, hi, nullable in rule.sized:
        guard(name, f"not {lo} <= len(v) <= {hi}", nullable)
    for name, nullable in rule.bools:
        guard(name, "type(v) is not bool", nullable)
    for i, (name, sub, nullable) in enumerate(rule.records):
        child = f"{fn}_r{i}"
        _emit(sub, child, namespace, lines)
        guard(name, f"not {child}(v)", nullable)
    for i, (name, sub) in enumerate(rule.record_arrays):
        child = f"{fn}_a{i}"
        _emit(sub, child, namespace, lines)
        body += [f"v = r[{name!r}]", "if type(v) is not list: return False",
                 "for item in v:", f"    if not {child}(item): return False"]
    body.append("return True")
    # Any exception (no keys(), no len()) means the record is not what the schema says.
    lines += [f"def {fn}(r):", "    try:"] + [f"        {line}" for line in body]
    lines += ["    except Exception:", "        return False"]
