"""2-D heat diffusion on a latitude-longitude style grid, explicit five-point stencil."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any

from schemas.errors import InvalidParams
from workloads.base import (
    ParamSpec,
    Workload,
    WorkloadResult,
    cpu_generator,
    finish,
    mebibytes,
    seed_spec,
    units,
)
from workloads.canonical import canonical_json, round_tensor, tensor_b64, tensor_bytes
from workloads.checkpoints import Checkpointed, run_whole, split_evenly, want_int, want_tensor
from workloads.lazy import torch

# Fields up to 256 x 256 travel whole; larger ones as a strided preview plus a hash.
_FULL_FIELD_CELLS = 256 * 256
_PREVIEW = 256
_FLOPS_PER_CELL = 6


@dataclass(frozen=True)
class HeatState:
    """The field after ``step`` time steps (the scheme has no other memory)."""

    step: int
    u: torch.Tensor


class Heat2d(Workload, Checkpointed):
    """Explicit heat equation with fixed (Dirichlet) boundary; float64, rounded to 32 bits."""

    name = "heat2d"
    doc = (
        "Heat diffusion u += alpha * laplacian(u) on a grid x grid field whose rows are "
        "latitudes: the boundary is held at cos(latitude) (0 at the poles), the interior "
        "starts at that profile plus a seeded Gaussian anomaly. alpha = kappa*dt/dx^2 is "
        "bounded by 0.25, the explicit scheme's stability limit. Float64 (the stencil is "
        "memory-bound, so doubles cost 2x memory, not 30x time); diffusion damps errors, "
        "so rounding the final field to 32 explicit mantissa bits absorbs device noise."
    )
    params = (
        ParamSpec(name="grid", public=True, kind="int", default=64, min=8, max=8192,
                  doc="cells per side, boundary included"),
        ParamSpec(name="steps", public=True, kind="int", default=200, min=1, max=100_000,
                  doc="explicit time steps"),
        ParamSpec(name="alpha", kind="float", default=0.2, min=0.01, max=0.25,
                  doc="diffusion number kappa*dt/dx^2 (stable up to 0.25)"),
        seed_spec(),
    )
    bit_exact = False
    digest_bits = 32

    def compute_units(self, params: dict[str, Any]) -> int:
        """Five-point stencil: about 6 FLOPs per interior cell per step."""
        return units(_FLOPS_PER_CELL * (params["grid"] - 2) ** 2 * params["steps"])

    def memory_mb(self, params: dict[str, Any]) -> int:
        """The field plus about four field-sized float64 temporaries per step."""
        return mebibytes(8 * 5 * params["grid"] ** 2)

    def run(self, params: dict[str, Any], device: torch.device) -> WorkloadResult:
        """Diffuse, then hash the rounded field (whole, or a preview plus its SHA-256):
        every segment, then ``final_result`` (``run_whole``)."""
        return run_whole(self, params, device)

    # ------------------------------------------------------------------ checkpoints
    # Segment = k time steps (k = ceil(steps / 64)); the state is the float64 field.

    def segments(self, params: dict[str, Any]) -> int:
        """ceil(steps / k) segments of k = ceil(steps / 64) steps."""
        return split_evenly(params["steps"])[1]

    def segment_units(self, params: dict[str, Any]) -> int:
        """The stencil over k steps."""
        k = split_evenly(params["steps"])[0]
        return units(_FLOPS_PER_CELL * (params["grid"] - 2) ** 2 * k)

    def initial_state(self, params: dict[str, Any], device: torch.device) -> HeatState:
        """The cos(latitude) profile plus the seeded anomaly, as run() builds it."""
        g = params["grid"]
        gen = cpu_generator(params["seed"])
        lat = torch.linspace(-math.pi / 2, math.pi / 2, g, dtype=torch.float64)
        u = torch.cos(lat).clamp(min=0.0).unsqueeze(1).repeat(1, g)
        u[1:-1, 1:-1] += 0.1 * torch.randn(g - 2, g - 2, generator=gen, dtype=torch.float64)
        return HeatState(step=0, u=u.to(device))

    def advance(self, params: dict[str, Any], state: HeatState, segment: int,
                device: torch.device) -> HeatState:
        """Steps [segment*k, min((segment+1)*k, steps)) with run()'s update."""
        k = split_evenly(params["steps"])[0]
        first, last = segment * k, min((segment + 1) * k, params["steps"])
        if state.step != first or first >= last:
            raise InvalidParams(f"{self.name}: state after step {state.step} is not the "
                                f"pre-state of segment {segment} (step {first})")
        u, alpha = state.u.clone(), params["alpha"]
        for _ in range(first, last):
            inner = u[1:-1, 1:-1]
            lap = u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:] - 4.0 * inner
            u[1:-1, 1:-1] = inner + alpha * lap
        return HeatState(step=last, u=u)

    def state_fields(self, state: HeatState) -> dict[str, int | torch.Tensor]:
        """Step count and field."""
        return {"step": state.step, "u": state.u}

    def state_from_fields(self, params: dict[str, Any], fields: dict[str, Any],
                          device: torch.device) -> HeatState:
        """Check the field's shape against ``grid``."""
        if set(fields) != {"step", "u"}:
            raise InvalidParams(f"{self.name}: checkpoint fields {sorted(fields)} are not "
                                "['step', 'u']")
        g = params["grid"]
        return HeatState(step=want_int(fields, "step", 0, params["steps"]),
                         u=want_tensor(fields, "u", torch.float64, (g, g), device))

    def final_result(self, params: dict[str, Any], state: HeatState,
                     device: torch.device, started_ns: int | None = None) -> WorkloadResult:
        """run()'s output from the final field."""
        started = time.perf_counter_ns() if started_ns is None else started_ns
        if state.step != params["steps"]:
            raise InvalidParams(f"{self.name}: state after step {state.step} is not final")
        g, u = params["grid"], state.u
        rounded = round_tensor(u, self.digest_bits)
        stats = round_tensor(torch.stack([u.mean(), u.min(), u.max()]), self.digest_bits)
        body: dict[str, Any] = {"mean": float(stats[0]), "min": float(stats[1]),
                                "max": float(stats[2])}
        if g * g <= _FULL_FIELD_CELLS:
            body["field"] = tensor_b64(rounded)
        else:
            stride = -(-g // _PREVIEW)
            body["preview"] = tensor_b64(rounded[::stride, ::stride].contiguous())
            body["preview_stride"] = stride
            body["field_sha256"] = hashlib.sha256(tensor_bytes(rounded)).hexdigest()
        output = canonical_json({"workload": self.name, "params": params,
                                 "digest_bits": self.digest_bits, **body})
        summary = {"mean": body["mean"], "min": body["min"], "max": body["max"],
                   "cells": g * g}
        return finish(output, summary, started, device)
