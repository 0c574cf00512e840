"""Train a one-hidden-layer MLP on scikit-learn's bundled 8x8 digits (no download)."""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any

import numpy as np

from workloads.base import (
    ParamSpec,
    Workload,
    WorkloadResult,
    cpu_generator,
    deterministic,
    finish,
    mebibytes,
    seed_spec,
    units,
)
from workloads.canonical import canonical_json, round_tensor, tensor_b64
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


class MlpDigits(Workload):
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

    def train(self, params: dict[str, Any], device: torch.device
              ) -> tuple[dict[str, torch.Tensor], int, int, float]:
        """Train; return (weights, correct test predictions, test size, last batch loss)."""
        gen = cpu_generator(params["seed"])
        features, labels = _digits()
        perm = torch.randperm(len(labels), generator=gen)
        n_train, n_test = _split_sizes()
        x = torch.tensor(features, device=device)[perm.to(device)]
        y = torch.tensor(labels, device=device)[perm.to(device)]
        x_train, y_train, x_test, y_test = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
        h = params["hidden"]

        def uniform(*shape: int, fan_in: int) -> torch.Tensor:
            # PyTorch's Linear default range, drawn on the CPU (see cpu_generator).
            bound = fan_in ** -0.5
            t = (torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound
            return t.to(device).requires_grad_()

        weights = {"w1": uniform(N_FEATURES, h, fan_in=N_FEATURES),
                   "b1": uniform(h, fan_in=N_FEATURES),
                   "w2": uniform(h, N_CLASSES, fan_in=h),
                   "b2": uniform(N_CLASSES, fan_in=h)}

        def logits(batch: torch.Tensor) -> torch.Tensor:
            hidden = torch.relu(batch @ weights["w1"] + weights["b1"])
            return hidden @ weights["w2"] + weights["b2"]

        # foreach=False: the same per-tensor arithmetic on CPU and CUDA.
        opt = torch.optim.Adam(weights.values(), lr=params["lr"], foreach=False)
        loss = torch.zeros((), dtype=torch.float64)
        for _ in range(params["epochs"]):
            order = torch.randperm(n_train, generator=gen).to(device)
            for start in range(0, n_train, params["batch_size"]):
                idx = order[start:start + params["batch_size"]]
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(logits(x_train[idx]), y_train[idx])
                loss.backward()
                opt.step()
        with torch.no_grad():
            correct = int((logits(x_test).argmax(dim=1) == y_test).sum().item())
        return {k: v.detach() for k, v in weights.items()}, correct, n_test, float(loss.item())

    def run(self, params: dict[str, Any], device: torch.device) -> WorkloadResult:
        """Train, then hash the rounded weights and the correct-prediction count."""
        started = time.perf_counter_ns()
        with deterministic(device):
            weights, correct, n_test, loss = self.train(params, device)
            encoded = {k: tensor_b64(round_tensor(v, self.digest_bits))
                       for k, v in weights.items()}
        output = canonical_json({"workload": self.name, "params": params,
                                 "digest_bits": self.digest_bits, "correct": correct,
                                 "test_size": n_test, "weights": encoded})
        summary = {"accuracy": correct / n_test, "correct": correct, "test_size": n_test,
                   "final_batch_loss": loss}
        return finish(output, summary, started, device)
