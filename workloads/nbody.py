"""Gravitational n-body with Plummer softening, integrated by kick-drift-kick leapfrog."""

from __future__ import annotations

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
from workloads.canonical import canonical_json, round_tensor, tensor_b64
from workloads.checkpoints import Checkpointed, run_whole, split_evenly, want_int, want_tensor
from workloads.lazy import torch

# Pair interactions per force chunk: bounds each (rows, n, 3) float64 temporary at 48 MiB.
_CHUNK_PAIRS = 1 << 21
# FLOPs per pair interaction: difference, squared distance, softened r^-3, accumulate.
_FLOPS_PER_PAIR = 20
_DRIFT_GRID = 2**30


def _accelerations(pos: torch.Tensor, mass: torch.Tensor, eps2: float) -> torch.Tensor:
    """a_i = sum_j m_j (x_j - x_i) / (|x_j - x_i|^2 + eps^2)^(3/2), with G = 1.

    Each row's sum runs over all j in one reduction, so chunking rows never changes it.
    """
    n = pos.shape[0]
    rows = max(1, _CHUNK_PAIRS // n)
    out = torch.empty_like(pos)
    for start in range(0, n, rows):
        diff = pos.unsqueeze(0) - pos[start:start + rows].unsqueeze(1)  # (rows, n, 3)
        inv_r3 = ((diff * diff).sum(dim=2) + eps2) ** -1.5  # i == j contributes 0 * eps^-3
        out[start:start + rows] = ((mass * inv_r3).unsqueeze(2) * diff).sum(dim=1)
    return out


def _energy(pos: torch.Tensor, vel: torch.Tensor, mass: torch.Tensor, eps2: float) -> float:
    """Kinetic plus softened potential energy (the potential the softened force derives from)."""
    kinetic = 0.5 * (mass * (vel * vel).sum(dim=1)).sum()
    n = pos.shape[0]
    rows = max(1, _CHUNK_PAIRS // n)
    potential = torch.zeros((), dtype=pos.dtype, device=pos.device)
    for start in range(0, n, rows):
        diff = pos.unsqueeze(0) - pos[start:start + rows].unsqueeze(1)
        inv_r = ((diff * diff).sum(dim=2) + eps2) ** -0.5
        pair = mass[start:start + rows].unsqueeze(1) * mass.unsqueeze(0) * inv_r
        index = torch.arange(start, start + pair.shape[0], device=pos.device)
        # Keep j > i only: each pair once, no self-energy.
        keep = torch.arange(n, device=pos.device).unsqueeze(0) > index.unsqueeze(1)
        potential = potential - (pair * keep).sum()
    return float((kinetic + potential).item())


@dataclass(frozen=True)
class NBodyState:
    """Between leapfrog steps: masses, positions, velocities, the last accelerations
    (the next kick reads them; recomputing would cost a force evaluation) and the
    initial energy (the output's drift is measured against it)."""

    step: int
    mass: torch.Tensor
    pos: torch.Tensor
    vel: torch.Tensor
    acc: torch.Tensor
    e0: torch.Tensor
    """0-d float64, exact (a Python float would be too, but tensors share the encoding)."""


class NBody(Workload, Checkpointed):
    """Leapfrog n-body in float64; output = rounded final state + rounded energy drift."""

    name = "nbody"
    doc = (
        "Gravitational n-body (G = 1) with Plummer softening, kick-drift-kick leapfrog. "
        "Masses, positions (unit Gaussian cloud) and small random velocities come from "
        "`seed`. Float64 throughout; final positions and velocities rounded to 32 explicit "
        "mantissa bits. N-body is chaotic: last-bit differences grow exponentially with "
        "steps, so long runs only agree on the same hardware class (bit_exact)."
    )
    params = (
        ParamSpec(name="n", public=True, kind="int", default=64, min=2, max=16_384,
                  doc="number of bodies"),
        ParamSpec(name="steps", public=True, kind="int", default=100, min=1, max=100_000,
                  doc="leapfrog steps"),
        ParamSpec(name="dt", kind="float", default=1e-3, min=1e-6, max=0.1, doc="time step"),
        ParamSpec(name="softening", kind="float", default=0.05, min=1e-4, max=1.0,
                  doc="Plummer softening length"),
        seed_spec(),
    )
    bit_exact = True
    digest_bits = 32

    def compute_units(self, params: dict[str, Any]) -> int:
        """One force evaluation (n^2 pairs) per step, plus two for the energies."""
        return units(_FLOPS_PER_PAIR * params["n"] ** 2 * (params["steps"] + 2))

    def memory_mb(self, params: dict[str, Any]) -> int:
        """State vectors plus about four chunk-sized (rows, n, 3) float64 temporaries."""
        n = params["n"]
        rows = max(1, _CHUNK_PAIRS // n)
        return mebibytes(8 * (10 * n + 4 * 3 * min(rows, n) * n))

    def run(self, params: dict[str, Any], device: torch.device) -> WorkloadResult:
        """Integrate, then hash the rounded state and the rounded relative energy drift:
        every segment, then ``final_result`` (``run_whole``)."""
        return run_whole(self, params, device)

    # ------------------------------------------------------------------ checkpoints
    # Segment = k leapfrog steps (k = ceil(steps / 64)).

    def segments(self, params: dict[str, Any]) -> int:
        """ceil(steps / k) segments of k = ceil(steps / 64) steps."""
        return split_evenly(params["steps"])[1]

    def segment_units(self, params: dict[str, Any]) -> int:
        """k force evaluations."""
        k = split_evenly(params["steps"])[0]
        return units(_FLOPS_PER_PAIR * params["n"] ** 2 * k)

    def initial_state(self, params: dict[str, Any], device: torch.device) -> NBodyState:
        """The seeded cloud at rest as a whole, its energy and accelerations, as run()."""
        n, eps2 = params["n"], params["softening"] ** 2
        gen = cpu_generator(params["seed"])
        mass = (0.5 + torch.rand(n, generator=gen, dtype=torch.float64)) / n
        pos = torch.randn(n, 3, generator=gen, dtype=torch.float64)
        vel = 0.1 * torch.randn(n, 3, generator=gen, dtype=torch.float64)
        mass, pos, vel = mass.to(device), pos.to(device), vel.to(device)
        vel = vel - (mass.unsqueeze(1) * vel).sum(dim=0) / mass.sum()
        e0 = _energy(pos, vel, mass, eps2)
        acc = _accelerations(pos, mass, eps2)
        return NBodyState(step=0, mass=mass, pos=pos, vel=vel, acc=acc,
                          e0=torch.tensor(e0, dtype=torch.float64))

    def advance(self, params: dict[str, Any], state: NBodyState, segment: int,
                device: torch.device) -> NBodyState:
        """Steps [segment*k, min((segment+1)*k, steps)) with run()'s kick-drift-kick."""
        k = split_evenly(params["steps"])[0]
        first, last = segment * k, min((segment + 1) * k, params["steps"])
        if state.step != first or first >= last:
            raise InvalidParams(f"{self.name}: state after step {state.step} is not the "
                                f"pre-state of segment {segment} (step {first})")
        dt, eps2 = params["dt"], params["softening"] ** 2
        pos, vel, acc, mass = state.pos, state.vel, state.acc, state.mass
        for _ in range(first, last):
            vel = vel + 0.5 * dt * acc
            pos = pos + dt * vel
            acc = _accelerations(pos, mass, eps2)
            vel = vel + 0.5 * dt * acc
        return NBodyState(step=last, mass=mass, pos=pos, vel=vel, acc=acc, e0=state.e0)

    def state_fields(self, state: NBodyState) -> dict[str, int | torch.Tensor]:
        """Step count and every tensor of the state."""
        return {"step": state.step, "mass": state.mass, "pos": state.pos, "vel": state.vel,
                "acc": state.acc, "e0": state.e0}

    def state_from_fields(self, params: dict[str, Any], fields: dict[str, Any],
                          device: torch.device) -> NBodyState:
        """Check every field's shape against ``n``."""
        names = {"step", "mass", "pos", "vel", "acc", "e0"}
        if set(fields) != names:
            raise InvalidParams(f"{self.name}: checkpoint fields {sorted(fields)} are not "
                                f"{sorted(names)}")
        n, f64 = params["n"], torch.float64
        return NBodyState(step=want_int(fields, "step", 0, params["steps"]),
                          mass=want_tensor(fields, "mass", f64, (n,), device),
                          pos=want_tensor(fields, "pos", f64, (n, 3), device),
                          vel=want_tensor(fields, "vel", f64, (n, 3), device),
                          acc=want_tensor(fields, "acc", f64, (n, 3), device),
                          e0=want_tensor(fields, "e0", f64, (), torch.device("cpu")))

    def final_result(self, params: dict[str, Any], state: NBodyState,
                     device: torch.device, started_ns: int | None = None) -> WorkloadResult:
        """run()'s output from the final positions and velocities."""
        started = time.perf_counter_ns() if started_ns is None else started_ns
        if state.step != params["steps"]:
            raise InvalidParams(f"{self.name}: state after step {state.step} is not final")
        e0 = float(state.e0.item())
        e1 = _energy(state.pos, state.vel, state.mass, params["softening"] ** 2)
        drift = abs((e1 - e0) / e0)
        bits = self.digest_bits
        body = {"positions": tensor_b64(round_tensor(state.pos, bits)),
                "velocities": tensor_b64(round_tensor(state.vel, bits))}
        drift_rounded = round(drift * _DRIFT_GRID) / _DRIFT_GRID
        output = canonical_json({"workload": self.name, "params": params, "digest_bits": bits,
                                 "energy_drift": drift_rounded, **body})
        summary = {"energy_start": e0, "energy_end": e1, "relative_energy_drift": drift}
        return finish(output, summary, started, device)
