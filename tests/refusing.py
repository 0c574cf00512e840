"""A test-only workload that refuses deterministically (``workloads.base.WorkRefused``), and
how a test registers it without touching the production registry: ``with_refuser`` for a
test's own process (monkeypatch ``workloads.WORKLOADS``), ``site_dir`` for the processes
of a local network (a ``sitecustomize`` on their ``PYTHONPATH`` that installs it)."""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from workloads.base import ParamSpec, Workload, WorkloadResult, WorkRefused, finish, seed_spec
from workloads.canonical import canonical_json


class Refuser(Workload):
    """Test-only: refuses when its private ``refuse`` says so, or when its private
    ``program`` misses the public ``program_sha256``; else outputs its seed. ``exact``
    (public) makes a task homogeneous."""

    name = "refuser"
    doc = "test-only workload that refuses deterministically"
    params = (
        ParamSpec(name="units", kind="int", default=1, min=1, max=1000, public=True),
        ParamSpec(name="exact", kind="int", default=0, min=0, max=1, public=True),
        ParamSpec(name="program_sha256", kind="str", default="", public=True),
        ParamSpec(name="refuse", kind="str", default="no", choices=("no", "disallowed-op")),
        ParamSpec(name="program", kind="str", default=""),
        seed_spec(),
    )
    bit_exact = False
    digest_bits = 0
    uses_accelerator = False

    def homogeneous(self, params: dict[str, Any]) -> bool:
        return bool(params["exact"])

    def compute_units(self, params: dict[str, Any]) -> int:
        return int(params["units"])

    def memory_mb(self, params: dict[str, Any]) -> int:
        return 1

    def run(self, params: dict[str, Any], device: Any) -> WorkloadResult:
        started = time.perf_counter_ns()
        if params["refuse"] != "no":
            raise WorkRefused(params["refuse"], "op aten.foo is not on the allowed list")
        if params["program_sha256"]:
            program = base64.b64decode(params["program"])
            if hashlib.sha256(program).hexdigest() != params["program_sha256"]:
                raise WorkRefused("bad-hash", "the program's SHA-256 is not the one submitted")
        return finish(canonical_json({"seed": params["seed"], "units": params["units"]}), {},
                      started, device)


def with_refuser(registry: Mapping[str, Workload]) -> Mapping[str, Workload]:
    """``registry`` with the refuser added."""
    w = Refuser()
    return MappingProxyType({**registry, w.name: w})


def install() -> None:
    """Add the refuser to this process's registry (``workloads.WORKLOADS``)."""
    import workloads

    workloads.WORKLOADS = with_refuser(workloads.WORKLOADS)  # type: ignore[misc]


def site_dir(folder: Path) -> Path:
    """A folder holding a ``sitecustomize`` that installs the refuser: put it first on a
    process's ``PYTHONPATH`` (with the project's root after it)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "from tests.refusing import install\n\ninstall()\n")
    return folder
