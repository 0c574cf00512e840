"""The PyTorch workloads node runners execute, by name.

Each workload is seeded and deterministic, declares bounded parameters, estimates its
compute (1 unit = 10^6 operations) and memory, and hashes a canonical output so that
replicas on different hardware can agree (see ``workloads.canonical``).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from destra.errors import UnknownWorkload
from workloads.base import ParamSpec, Workload, WorkloadResult
from workloads.heat2d import Heat2d
from workloads.matmul import Matmul
from workloads.mlp_digits import MlpDigits
from workloads.nbody import NBody
from workloads.program import PROGRAM
from workloads.sha256_search import Sha256Search
from workloads.sweep import Sweep

WORKLOADS: Mapping[str, Workload] = MappingProxyType({
    w.name: w for w in (MlpDigits(), NBody(), Heat2d(), Matmul(), Sha256Search(), Sweep(),
                        PROGRAM)
})


def get_workload(name: str) -> Workload:
    """The workload registered as ``name``; ``UnknownWorkload`` lists the known names."""
    try:
        return WORKLOADS[name]
    except KeyError:
        raise UnknownWorkload(
            f"unknown workload {name!r}; known: {', '.join(sorted(WORKLOADS))}") from None


__all__ = ["WORKLOADS", "ParamSpec", "Workload", "WorkloadResult", "get_workload"]
