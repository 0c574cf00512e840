"""Tensor files of user programs: a strict safetensors reader and a canonical writer.

A user program's inputs arrive, and its outputs leave, as safetensors files: an 8-byte
little-endian header length, a JSON header ``{name: {"dtype", "shape", "data_offsets"}}``
(plus an optional ``"__metadata__"`` map of strings), then the raw little-endian tensor
bytes. The format holds no code: reading it never unpickles anything.

``read_tensors`` checks everything a node relies on before a byte of data is used: the
header length, the JSON, each dtype (``DTYPES``), each shape, that the data regions tile
the data section exactly in order (no overlap, no gap, no trailing bytes), and bounded
counts (``MAX_TENSORS``, ``MAX_HEADER_BYTES``). Any failure is
``WorkRefused("bad-input", ...)``.

``write_tensors`` is canonical: for the same tensors (same names, dtypes, shapes and
bytes) it writes the same bytes on any platform and library version: keys in the given
order's natural sort, compact JSON with sorted keys, the header padded with spaces to a
multiple of 8 bytes, data in key order. The ``safetensors`` package reads it (tested).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from typing import TypeVar

from workloads.base import WorkRefused
from workloads.lazy import torch

T = TypeVar("T")

MAX_TENSORS = 256
"""The most tensors an input or output file may hold."""
MAX_HEADER_BYTES = 1 << 20
"""The largest JSON header accepted (1 MiB: far more than 256 entries need)."""
MAX_RANK = 8
"""The most dimensions a tensor may have."""

_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool",
}
_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,128}")


def dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype code -> torch dtype, for the dtypes user programs may use."""
    return {code: getattr(torch, name) for code, name in _DTYPE_NAMES.items()}


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of ``dtype``; ``WorkRefused("bad-input")`` for others."""
    for code, t in dtypes().items():
        if t == dtype:
            return code
    raise WorkRefused("bad-input", f"dtype {dtype} is not supported; supported: "
                      f"{', '.join(_DTYPE_NAMES.values())}")


def _bad(detail: str) -> WorkRefused:
    return WorkRefused("bad-input", f"tensor file: {detail}")


def _header(data: bytes | memoryview) -> tuple[dict[str, object], int]:
    """The parsed JSON header and where the data section starts."""
    if len(data) < 8:
        raise _bad("shorter than its 8-byte header length")
    (n,) = struct.unpack_from("<Q", data, 0)
    if n < 2 or n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise _bad(f"header length {n} is out of range")
    try:
        header = json.loads(bytes(data[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _bad(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise _bad("header is not a JSON object")
    return header, 8 + n


def _entry(name: str, entry: object) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype code, shape, begin, end) of one header entry, checked for form."""
    if not _NAME_RE.fullmatch(name):
        raise _bad(f"tensor name {name[:40]!r} is not 1-128 of [A-Za-z0-9_.-]")
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _bad(f"entry {name!r} is not {{dtype, shape, data_offsets}}")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if code not in _DTYPE_NAMES:
        raise _bad(f"{name!r} has dtype {code!r}; supported: {', '.join(_DTYPE_NAMES)}")
    if (not isinstance(shape, list) or len(shape) > MAX_RANK
            or not all(type(d) is int and d >= 0 for d in shape)):
        raise _bad(f"{name!r} has shape {str(shape)[:60]}, not <= {MAX_RANK} extents >= 0")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)):
        raise _bad(f"{name!r} has data_offsets {str(offsets)[:60]}")
    return code, tuple(shape), offsets[0], offsets[1]


def tensor_bytes(value: object) -> int:
    """Bytes of the tensors in ``value``: a tensor, or a tuple or list of them (anything
    else counts 0)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, tuple | list):
        return sum(tensor_bytes(v) for v in value)
    return 0


def read_tensors(data: bytes | memoryview) -> dict[str, torch.Tensor]:
    """Parse a safetensors file strictly (see the module docstring); CPU tensors, by name,
    in the file's data order. ``WorkRefused("bad-input")`` for anything malformed.

    From ``bytes``, each tensor is a copy; from a writable memoryview (a sandbox child's
    mapped job, page-aligned), tensors aligned to their element size in it are views of
    it, not copies."""
    return _parse(data, materialize=True)


def check_tensors(data: bytes) -> dict[str, int]:
    """``read_tensors``' checks without making the tensors (no copy of the data); the
    bytes of each tensor, by name, in the file's data order."""
    sizes: dict[str, int] = {}
    _parse(data, materialize=False, sizes=sizes)
    return sizes


def _parse(data: bytes | memoryview, materialize: bool, sizes: dict[str, int] | None = None
           ) -> dict[str, torch.Tensor]:
    header, start = _header(data)
    view = memoryview(data)
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _bad("__metadata__ is not a map of strings")
    if len(header) > MAX_TENSORS:
        raise _bad(f"{len(header)} tensors; at most {MAX_TENSORS}")
    entries = sorted(((name, *_entry(name, e)) for name, e in header.items()),
                     key=lambda x: (x[3], x[4]))
    table = dtypes()
    out: dict[str, torch.Tensor] = {}
    pos = 0
    for name, code, shape, begin, end in entries:
        dtype = table[code]
        numel = 1
        for d in shape:
            numel *= d
        itemsize = torch.empty((), dtype=dtype).element_size()
        size = numel * itemsize
        if begin != pos or end - begin != size:
            raise _bad(f"{name!r} occupies bytes [{begin}, {end}), expected [{pos}, "
                       f"{pos + size}): regions must tile the data in order")
        if code == "BOOL" and bytes(view[start + begin:start + end]).translate(
                None, b"\x00\x01"):
            raise _bad(f"{name!r} is bool but holds bytes other than 0 and 1")
        if materialize:
            region = view[start + begin:start + end]
            if view.readonly or (start + begin) % itemsize:  # one copy: writable (torch
                region = memoryview(bytearray(region))  # warns on bytes), aligned
            flat = torch.frombuffer(region, dtype=dtype) if size else torch.empty(0, dtype=dtype)
            out[name] = flat.reshape(shape)
        if sizes is not None:
            sizes[name] = size
        pos = end
    if start + pos != len(data):
        raise _bad(f"{len(data) - start - pos} bytes after the last tensor")
    return out


def _natural(name: str) -> tuple[str, int]:
    """Sort key putting ``out2`` before ``out10``."""
    m = re.fullmatch(r"(.*?)([0-9]+)", name)
    return (m.group(1), int(m.group(2))) if m else (name, -1)


def write_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    """Canonical safetensors bytes of ``tensors`` (see the module docstring)."""
    if len(tensors) > MAX_TENSORS:
        raise _bad(f"{len(tensors)} tensors; at most {MAX_TENSORS}")
    names = sorted(tensors, key=_natural)
    header: dict[str, object] = {}
    chunks: list[bytes] = []
    pos = 0
    for name in names:
        if not _NAME_RE.fullmatch(name):
            raise _bad(f"tensor name {name[:40]!r} is not 1-128 of [A-Za-z0-9_.-]")
        t = tensors[name].detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": dtype_code(t.dtype), "shape": list(t.shape),
                        "data_offsets": [pos, pos + len(raw)]}
        chunks.append(raw)
        pos += len(raw)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("ascii")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def numbered(prefix: str, tensors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{prefix0: t0, prefix1: t1, ...}``: the names inputs and outputs go by."""
    return {f"{prefix}{i}": t for i, t in enumerate(tensors)}


def positional(prefix: str, named: dict[str, T]) -> list[T]:
    """The tensors (or their sizes) of a file named ``prefix0..prefix{n-1}``, in order;
    ``WorkRefused("bad-input")`` for any other set of names."""
    want = [f"{prefix}{i}" for i in range(len(named))]
    if sorted(named, key=_natural) != want:
        got = ", ".join(sorted(named, key=_natural)[:6])
        raise _bad(f"tensors must be named {prefix}0..{prefix}{len(named) - 1}; got {got}")
    return [named[name] for name in want]
