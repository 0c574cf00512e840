"""Train a one-hidden-layer MLP on scikit-learn's bundled 8x8 digits (no download)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

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

N_FEATURES = 64
N_CLASSES = 10
TEST_FRACTION = 0.25


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as (features scaled to [0, 1], labels); read once per process."""
    from sklearn.datasets import load_digits  # slow import, only needed here

    data = load_digits()
    features = np.asarray(data.data, dtype=np.float64) / 16.0
    labels = np.asarray(data.target, dtype=np.int64)
    features.setflags(write=False)
    labels.setflags(write=False)
    return features, labels


def _split_sizes() -> tuple[int, int]:
    n = len(_digits()[1])
    n_test = int(n * TEST_FRACTION)
    return n - n_test, n_test


_WEIGHTS = ("w1", "b1", "w2", "b2")
_MAX_ADAM_STEPS = 2**24  # Adam keeps its step count in a float32 tensor: exact below this


@dataclass(frozen=True)
class MlpState:
    """Training state between epochs: all that the next epoch's arithmetic reads.

    ``rng`` is the CPU generator's state (``torch.Generator.get_state()``): each epoch
    draws its batch order from it, so resuming must resume the stream, not reseed it.
    """

    epoch: int
    """Epochs done."""
    weights: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor]
    """Adam's first moments, per weight."""
    exp_avg_sq: dict[str, torch.Tensor]
    """Adam's second moments, per weight."""
    step: int
    """Adam steps done (bias correction reads it)."""
    rng: torch.Tensor


class MlpDigits(Workload, Checkpointed):
    """Adam on mini-batches; output = rounded weights + exact count of correct test digits."""

    name = "mlp-digits"
    doc = (
        "Train a 64-hidden-10 ReLU MLP with Adam on sklearn's digits (1,797 8x8 images); "
        "75/25 train/test split, initial weights and batch order all drawn from `seed`. "
        "Float64 throughout (tiny model, so cheap), weights rounded to 24 explicit mantissa "
        "bits before hashing: training amplifies last-bit differences between devices to "
        "about 1e-13 relative, far below the 6e-8 step of the rounding. Accuracy is an "
        "integer count of correct test predictions, so it is exact."
    )
    params = (
        ParamSpec(name="hidden", public=True, kind="int", default=32, min=4, max=4096,
                  doc="hidden layer width"),
        ParamSpec(name="epochs", public=True, kind="int", default=5, min=1, max=10_000,
                  doc="passes over the training set"),
        ParamSpec(name="lr", kind="float", default=0.01, min=1e-5, max=1.0,
                  doc="Adam learning rate"),
        ParamSpec(name="batch_size", public=True, kind="int", default=128, min=8, max=2048,
                  doc="mini-batch size (>= training set size means full batch)"),
        seed_spec(),
    )
    bit_exact = False
    digest_bits = 24

    def compute_units(self, params: dict[str, Any]) -> int:
        """Forward 2*(64h+10h) FLOPs per sample, backward about twice that, plus Adam."""
        n_train, n_test = _split_sizes()
        per_sample = 2 * (N_FEATURES + N_CLASSES) * params["hidden"]
        n_params = (N_FEATURES + 1) * params["hidden"] + (params["hidden"] + 1) * N_CLASSES
        steps = params["epochs"] * -(-n_train // params["batch_size"])
        ops = 3 * per_sample * n_train * params["epochs"] + 12 * n_params * steps
        return units(ops + per_sample * n_test)

    def memory_mb(self, params: dict[str, Any]) -> int:
        """Data set, activations of one batch (and the test set), and 4 copies of the weights."""
        n_train, n_test = _split_sizes()
        h = params["hidden"]
        n_params = (N_FEATURES + 1) * h + (h + 1) * N_CLASSES
        rows = max(min(params["batch_size"], n_train), n_test)
        return mebibytes(8 * ((n_train + n_test) * N_FEATURES + 3 * rows * h + 4 * n_params))

    def run(self, params: dict[str, Any], device: torch.device) -> WorkloadResult:
        """Train, then hash the rounded weights and the correct-prediction count:
        every segment (epochs), then ``final_result`` (``run_whole``)."""
        return run_whole(self, params, device)

    # ------------------------------------------------------------------ checkpoints
    # Segment = k epochs (k = ceil(epochs / 64)). An epoch boundary is where run()'s loop
    # holds nothing but weights, Adam's moments and step, and the generator: the data
    # split is re-derived from the seed (the generator's first draw), exactly as run().

    def _shapes(self, params: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        h = params["hidden"]
        return {"w1": (N_FEATURES, h), "b1": (h,), "w2": (h, N_CLASSES), "b2": (N_CLASSES,)}

    def _data(self, params: dict[str, Any], device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                         torch.Generator]:
        """(x_train, y_train, x_test, y_test, generator after the split's draw), as run()."""
        gen = cpu_generator(params["seed"])
        features, labels = _digits()
        perm = torch.randperm(len(labels), generator=gen)
        n_train, _ = _split_sizes()
        x = torch.tensor(features, device=device)[perm.to(device)]
        y = torch.tensor(labels, device=device)[perm.to(device)]
        return x[:n_train], y[:n_train], x[n_train:], y[n_train:], gen

    def segments(self, params: dict[str, Any]) -> int:
        """ceil(epochs / k) segments of k = ceil(epochs / 64) epochs."""
        return split_evenly(params["epochs"])[1]

    def segment_units(self, params: dict[str, Any]) -> int:
        """The training arithmetic of k epochs (no test-set evaluation)."""
        n_train, _ = _split_sizes()
        h, k = params["hidden"], split_evenly(params["epochs"])[0]
        per_sample = 2 * (N_FEATURES + N_CLASSES) * h
        n_params = (N_FEATURES + 1) * h + (h + 1) * N_CLASSES
        steps = k * -(-n_train // params["batch_size"])
        return units(3 * per_sample * n_train * k + 12 * n_params * steps)

    def initial_state(self, params: dict[str, Any], device: torch.device) -> MlpState:
        """Weights drawn as run() draws them; Adam's moments zero, as its lazy init."""
        gen = self._data(params, device)[4]
        weights = {}
        for name, shape in self._shapes(params).items():
            fan_in = N_FEATURES if name in ("w1", "b1") else params["hidden"]
            bound = fan_in ** -0.5
            t = (torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound
            weights[name] = t.to(device)
        return MlpState(epoch=0, weights=weights,
                        exp_avg={k: torch.zeros_like(v) for k, v in weights.items()},
                        exp_avg_sq={k: torch.zeros_like(v) for k, v in weights.items()},
                        step=0, rng=gen.get_state())

    def advance(self, params: dict[str, Any], state: MlpState, segment: int,
                device: torch.device) -> MlpState:
        """Run epochs [segment*k, min((segment+1)*k, epochs)) with run()'s exact loop."""
        k = split_evenly(params["epochs"])[0]
        first, last = segment * k, min((segment + 1) * k, params["epochs"])
        if state.epoch != first or first >= last:
            raise InvalidParams(f"{self.name}: state after epoch {state.epoch} is not the "
                                f"pre-state of segment {segment} (epoch {first})")
        x_train, y_train, _, _, gen = self._data(params, device)
        gen.set_state(state.rng)
        weights = {k: v.detach().clone().requires_grad_() for k, v in state.weights.items()}
        opt = torch.optim.Adam(weights.values(), lr=params["lr"], foreach=False)
        for name, w in weights.items():
            # What Adam's lazy init makes at step 0, and what it holds later.
            opt.state[w] = {"step": torch.tensor(float(state.step), dtype=torch.float32),
                            "exp_avg": state.exp_avg[name].clone(),
                            "exp_avg_sq": state.exp_avg_sq[name].clone()}

        def logits(batch: torch.Tensor) -> torch.Tensor:
            hidden = torch.relu(batch @ weights["w1"] + weights["b1"])
            return hidden @ weights["w2"] + weights["b2"]

        n_train = len(y_train)
        for _ in range(first, last):
            order = torch.randperm(n_train, generator=gen).to(device)
            for start in range(0, n_train, params["batch_size"]):
                idx = order[start:start + params["batch_size"]]
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(logits(x_train[idx]), y_train[idx])
                loss.backward()
                opt.step()
        moments = {name: opt.state[w] for name, w in weights.items()}
        return MlpState(epoch=last, weights={k: v.detach() for k, v in weights.items()},
                        exp_avg={k: m["exp_avg"] for k, m in moments.items()},
                        exp_avg_sq={k: m["exp_avg_sq"] for k, m in moments.items()},
                        step=int(moments["w1"]["step"].item()), rng=gen.get_state())

    def state_fields(self, state: MlpState) -> dict[str, int | torch.Tensor]:
        """Counters, weights, both Adam moments and the generator state."""
        fields: dict[str, int | torch.Tensor] = {"epoch": state.epoch, "step": state.step,
                                                 "rng": state.rng}
        for name in _WEIGHTS:
            fields[name] = state.weights[name]
            fields[f"exp_avg.{name}"] = state.exp_avg[name]
            fields[f"exp_avg_sq.{name}"] = state.exp_avg_sq[name]
        return fields

    def state_from_fields(self, params: dict[str, Any], fields: dict[str, Any],
                          device: torch.device) -> MlpState:
        """Check every field's type and shape against ``params``."""
        shapes = self._shapes(params)
        expected = {"epoch", "step", "rng"} | {f"{p}{n}" for n in _WEIGHTS
                                                for p in ("", "exp_avg.", "exp_avg_sq.")}
        if set(fields) != expected:
            raise InvalidParams(f"{self.name}: checkpoint fields {sorted(fields)} are not "
                                f"{sorted(expected)}")
        rng = fields["rng"]
        if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.dim() != 1:
            raise InvalidParams(f"{self.name}: checkpoint field 'rng' is not a uint8 vector")
        try:
            torch.Generator(device="cpu").set_state(rng)
        except RuntimeError as e:
            raise InvalidParams(f"{self.name}: checkpoint field 'rng' is invalid: {e}") from None

        def tensors(prefix: str) -> dict[str, torch.Tensor]:
            return {n: want_tensor(fields, prefix + n, torch.float64, shapes[n], device)
                    for n in _WEIGHTS}

        return MlpState(epoch=want_int(fields, "epoch", 0, params["epochs"]),
                        weights=tensors(""), exp_avg=tensors("exp_avg."),
                        exp_avg_sq=tensors("exp_avg_sq."),
                        step=want_int(fields, "step", 0, _MAX_ADAM_STEPS), rng=rng.clone())

    def final_result(self, params: dict[str, Any], state: MlpState,
                     device: torch.device, started_ns: int | None = None) -> WorkloadResult:
        """run()'s output from the trained weights: rounded weights and the test count."""
        started = time.perf_counter_ns() if started_ns is None else started_ns
        if state.epoch != params["epochs"]:
            raise InvalidParams(f"{self.name}: state after epoch {state.epoch} is not final")
        _, _, x_test, y_test, _ = self._data(params, device)
        w = state.weights
        with torch.no_grad():
            hidden = torch.relu(x_test @ w["w1"] + w["b1"])
            correct = int(((hidden @ w["w2"] + w["b2"]).argmax(dim=1) == y_test).sum().item())
        n_test = len(y_test)
        encoded = {k: tensor_b64(round_tensor(v, self.digest_bits)) for k, v in w.items()}
        output = canonical_json({"workload": self.name, "params": params,
                                 "digest_bits": self.digest_bits, "correct": correct,
                                 "test_size": n_test, "weights": encoded})
        summary = {"accuracy": correct / n_test, "correct": correct, "test_size": n_test}
        return finish(output, summary, started, device)
