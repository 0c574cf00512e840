"""Canonical forms of workload outputs, so replicas on different hardware hash the same bytes.

Rounding rule (``round_tensor``): a float32 or float64 value keeps ``bits`` of its
explicit (stored) mantissa bits; the rest are rounded to nearest on the IEEE-754 bit
pattern, ties away from zero. Rounding is done by adding half of the dropped range to
the integer view and masking, so a mantissa that overflows carries into the exponent
(1.1111…1 rounds up to 10.0, i.e. the next power of two) and the largest finite values
may round to infinity. Subnormals are flushed to +0.0 first, because flush-to-zero
differs between CPUs, GPUs and ``torch.set_flush_denormal``; -0.0 becomes +0.0 because
the sign of zero depends on summation order. NaN is an error: it means the run failed.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import struct
from typing import Any

import numpy as np

from destra.errors import WorkloadFailed
from workloads.lazy import torch


# dtype -> (integer view dtype, explicit mantissa bits, smallest positive normal)
@functools.cache
def _float_layouts() -> dict[torch.dtype, tuple[torch.dtype, int, float]]:
    return {
        torch.float32: (torch.int32, 23, float(torch.finfo(torch.float32).tiny)),
        torch.float64: (torch.int64, 52, float(torch.finfo(torch.float64).tiny)),
    }

_MAGIC = b"DTEN1"


def round_tensor(t: torch.Tensor, bits: int) -> torch.Tensor:
    """Return ``t`` rounded to ``bits`` explicit mantissa bits (see module docstring).

    ``bits`` runs from 0 (powers of two only) to 23 for float32 or 52 for float64
    (no rounding). The result has the dtype and device of ``t``; ``t`` is not changed.
    """
    layouts = _float_layouts()
    if t.dtype not in layouts:
        raise TypeError(f"round_tensor needs float32 or float64, got {t.dtype}")
    int_dtype, mantissa, tiny = layouts[t.dtype]
    if not 0 <= bits <= mantissa:
        raise ValueError(f"bits must be in [0, {mantissa}] for {t.dtype}, got {bits}")
    if bool(torch.isnan(t).any()):
        raise WorkloadFailed("cannot round NaN: the computation diverged")
    # Flushing also turns -0.0 into +0.0: every |x| < tiny (zeros included) maps to 0.
    flushed = torch.where(t.abs() < tiny, torch.zeros_like(t), t)
    drop = mantissa - bits
    if drop == 0:
        return flushed.clone()
    pattern = flushed.contiguous().view(int_dtype)
    half = 1 << (drop - 1)
    mask = ~((1 << drop) - 1)
    # Adding to the signed view equals adding to the unsigned pattern: the sign bit is
    # never reached, because only inf/NaN have an all-ones exponent and inf's mantissa is 0.
    rounded = torch.bitwise_and(pattern + half, mask)
    return rounded.view(t.dtype)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Encode ``t`` as ``DTEN1``, dtype name, rank, shape and little-endian row-major data.

    Layout: magic ``b"DTEN1"``, one byte of dtype-name length, the dtype name in ASCII
    (``"float32"``), a uint8 rank, ``rank`` uint64 LE extents, then the elements in C
    order, each little-endian. The same values give the same bytes on any platform.
    """
    array = t.detach().to("cpu").contiguous().numpy()
    name = str(t.dtype).removeprefix("torch.").encode("ascii")
    header = _MAGIC + struct.pack("<B", len(name)) + name + struct.pack("<B", t.dim())
    header += b"".join(struct.pack("<Q", extent) for extent in t.shape)
    data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes(order="C")
    return header + data


def tensor_b64(t: torch.Tensor) -> str:
    """``tensor_bytes(t)`` as ASCII base64, for embedding a tensor in canonical JSON."""
    return base64.b64encode(tensor_bytes(t)).decode("ascii")


def tensor_from_b64(text: str) -> torch.Tensor:
    """Decode what ``tensor_b64`` wrote (for submitters and tests)."""
    raw = base64.b64decode(text)
    if not raw.startswith(_MAGIC):
        raise ValueError("not a canonical tensor encoding")
    pos = len(_MAGIC)
    name_len = raw[pos]
    name = raw[pos + 1 : pos + 1 + name_len].decode("ascii")
    pos += 1 + name_len
    rank = raw[pos]
    shape = struct.unpack_from(f"<{rank}Q", raw, pos + 1)
    pos += 1 + 8 * rank
    array = np.frombuffer(raw[pos:], dtype=np.dtype(name).newbyteorder("<"))
    return torch.from_numpy(array.astype(np.dtype(name)).reshape(shape))


def canonical_json(obj: Any) -> bytes:
    """Serialize ``obj`` as sorted-key, compact, ASCII JSON; NaN and infinity are refused."""
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except ValueError as e:
        raise WorkloadFailed(f"output is not canonical JSON: {e}") from e
    return text.encode("ascii")


def rounded_floats(t: torch.Tensor, bits: int) -> list[float]:
    """The values of ``t`` rounded to ``bits`` as a flat list of Python floats."""
    return [float(x) for x in round_tensor(t.detach().to(torch.float64), bits).flatten().tolist()]


def sha256(data: bytes) -> bytes:
    """The 32-byte SHA-256 of ``data`` (the digest every workload reports)."""
    return hashlib.sha256(data).digest()
