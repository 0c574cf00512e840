"""A grid sweep over mlp-digits: the network fans out `expand` and reduces with `gather`."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from destra.errors import InvalidParams, WorkloadFailed
from workloads.base import ParamSpec, Workload, WorkloadResult, finish, seed_spec
from workloads.canonical import canonical_json, sha256
from workloads.lazy import torch
from workloads.mlp_digits import MlpDigits

MAX_POINTS = 64
_MLP = MlpDigits()


def _spec(name: str) -> ParamSpec:
    return next(spec for spec in _MLP.params if spec.name == name)


class Sweep(Workload):
    """Learning rates x hidden sizes of mlp-digits; the best point by exact test accuracy."""

    name = "sweep"
    doc = (
        "Grid search over mlp-digits: one task per (lr, hidden) pair from the comma-separated "
        "lists, at most 64 points, all with the same epochs, batch size and seed. The best "
        "point has the most correct test predictions; ties go to the point whose canonical "
        "parameter JSON sorts first. Precision is mlp-digits' (24 bits); the output lists "
        "every point's digest, so it agrees exactly when the points do."
    )
    params = (
        ParamSpec(name="lrs", public=True, kind="str", default="0.003,0.03",
                  doc="comma-separated Adam learning rates"),
        ParamSpec(name="hidden_sizes", public=True, kind="str", default="16,32",
                  doc="comma-separated hidden layer widths"),
        ParamSpec(name="epochs", public=True, kind="int", default=_spec("epochs").default,
                  min=_spec("epochs").min, max=_spec("epochs").max, doc="epochs per point"),
        ParamSpec(name="batch_size", public=True, kind="int", default=_spec("batch_size").default,
                  min=_spec("batch_size").min, max=_spec("batch_size").max,
                  doc="mini-batch size per point"),
        seed_spec(),
    )
    bit_exact = False
    digest_bits = MlpDigits.digest_bits

    def _grid(self, params: dict[str, Any], key: str, target: str) -> list[int | float]:
        raw = params[key]
        values: list[int | float] = []
        for token in raw.split(","):
            try:
                value = _spec(target).parse(_MLP.name, token.strip())
            except InvalidParams as e:
                raise InvalidParams(f"{self.name}: parameter {key!r} = {raw!r}: {e}") from None
            if float(value) in values:
                raise InvalidParams(
                    f"{self.name}: parameter {key!r} = {raw!r} repeats {token.strip()!r}")
            values.append(float(value) if target == "lr" else int(value))
        return values

    def check(self, params: dict[str, Any]) -> None:
        """Every list item is a valid mlp-digits value, none repeats, at most 64 points."""
        points = len(self._grid(params, "lrs", "lr")) * len(
            self._grid(params, "hidden_sizes", "hidden"))
        if points > MAX_POINTS:
            raise InvalidParams(
                f"{self.name}: parameters 'lrs' x 'hidden_sizes' give {points} points; "
                f"allowed: at most {MAX_POINTS}")

    def expand(self, params: dict[str, Any]) -> list[tuple[str, dict[str, str]]]:
        """One (workload name, raw string params) task per grid point, lr-major order."""
        return [(_MLP.name, {"lr": repr(lr), "hidden": str(hidden),
                             "epochs": str(params["epochs"]),
                             "batch_size": str(params["batch_size"]),
                             "seed": str(params["seed"])})
                for lr in self._grid(params, "lrs", "lr")
                for hidden in self._grid(params, "hidden_sizes", "hidden")]

    def gather(self, results: Sequence[tuple[dict[str, Any], WorkloadResult]]
               ) -> WorkloadResult:
        """Reduce point results (in any order) to the best one, reading the verified outputs."""
        if not results:
            raise WorkloadFailed(f"{self.name}: gather needs at least one point result")
        points = []
        for raw, result in results:
            if sha256(result.output) != result.digest:
                raise WorkloadFailed(f"{self.name}: a point's digest does not match its output")
            body = json.loads(result.output)
            params = _MLP.validate({k: str(v) for k, v in raw.items()})
            if body.get("workload") != _MLP.name or body.get("params") != params:
                raise WorkloadFailed(f"{self.name}: result for {params} is for another task")
            points.append({"params": params, "correct": body["correct"],
                           "test_size": body["test_size"], "digest": result.digest.hex()})
        points.sort(key=lambda p: canonical_json(p["params"]))
        best = min(points, key=lambda p: (-p["correct"], canonical_json(p["params"])))
        output = canonical_json({"workload": self.name, "best": best, "points": points})
        summary = {"best_params": best["params"], "best_correct": best["correct"],
                   "best_accuracy": best["correct"] / best["test_size"], "points": len(points)}
        runtime = sum(result.runtime_ms for _, result in results)
        return WorkloadResult(output=output, digest=sha256(output), summary=summary,
                              runtime_ms=runtime)

    def compute_units(self, params: dict[str, Any]) -> int:
        """The sum over the grid points."""
        return sum(_MLP.compute_units(_MLP.validate(raw)) for _, raw in self.expand(params))

    def memory_mb(self, params: dict[str, Any]) -> int:
        """The largest point (points run one after another, or on different nodes)."""
        return max(_MLP.memory_mb(_MLP.validate(raw)) for _, raw in self.expand(params))

    def run(self, params: dict[str, Any], device: torch.device) -> WorkloadResult:
        """Run every point here, one after another, then gather (tests and single nodes)."""
        started = time.perf_counter_ns()
        results = [(raw, _MLP.run(_MLP.validate(raw), device)) for _, raw in self.expand(params)]
        gathered = self.gather(results)
        return finish(gathered.output, gathered.summary, started, device)
