"""Predicted runtime of a task on a node: an analytic estimate, corrected by what was learned.

The analytic estimate is compute over measured speed: ``compute_units`` (10^6
operations) on a node whose benchmark reached ``tflops_milli`` takes
``compute_units / tflops_milli`` ms, slowed by the node's load. Real workloads
are not matrix multiplications: a stencil is bound by memory bandwidth, a small
MLP by kernel launches, a hash search does not use the GPU at all. So the model
learns, from the runtimes nodes report with verified results, the log-ratio of
actual to analytic runtime, with scikit-learn's histogram gradient boosting,
from the task's features (workload, compute, memory) and the node's (device
class, benchmark speed, load). Until it has history it predicts the analytic
estimate.

Training never blocks placement: ``observe`` only appends, and a refit runs on a
background thread (or synchronously, for a deterministic simulation) when the
history has grown by ``refit_growth``; the fitted model is swapped in whole.
Prediction is one ``predict`` call per placement over the distinct (device
class, speed, load decile) groups of the candidates, not per node, and is cached
per model version.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.ensemble import HistGradientBoostingRegressor

from workloads import WORKLOADS

MAX_LOAD_PERMILLE = 950


@dataclass(frozen=True)
class TaskShape:
    """What the model knows of a task."""

    workload: str
    compute_units: int
    memory_mb: int


@dataclass(frozen=True)
class NodeShape:
    """What the model knows of a node when the task starts there."""

    device_class: str
    tflops_milli: int
    load_permille: int


def analytic_ms(task: TaskShape, node: NodeShape) -> float:
    """Compute over measured speed, slowed by load: the prior, and the model's baseline."""
    load = min(MAX_LOAD_PERMILLE, max(0, node.load_permille))
    return max(task.compute_units, 1) / max(node.tflops_milli, 1) * 1000 / (1000 - load)


@dataclass(frozen=True)
class Observation:
    """One replica's reported runtime, with what was predicted for it at placement."""

    task: TaskShape
    node: NodeShape
    runtime_ms: float
    predicted_ms: float | None = None


_WORKLOAD_NAMES = sorted(WORKLOADS)


class RuntimeModel:
    """Predicts runtimes; learns from observations (see the module docstring)."""

    def __init__(self, *, min_history: int = 12, refit_growth: float = 0.25,
                 background: bool = True, max_history: int = 50_000, seed: int = 0) -> None:
        self.min_history = min_history
        self.refit_growth = refit_growth
        self.background = background
        self.seed = seed
        self.history: deque[Observation] = deque(maxlen=max_history)
        self.errors: deque[float] = deque(maxlen=1000)
        """Absolute percentage errors of the latest predictions checked against reality."""
        self._state: tuple[Any, dict[str, int], int] = (None, {}, 0)
        """(fitted model or None, device class -> one-hot index, version): swapped whole."""
        self._fitted_on = 0
        self._fitting = False
        self._lock = threading.Lock()
        self._cache: dict[tuple[Any, ...], float] = {}

    # -- prediction -------------------------------------------------------------------------

    def features(self, task: TaskShape, node: NodeShape,
                 classes: dict[str, int] | None = None) -> list[float]:
        """The model's input row."""
        classes = self._state[1] if classes is None else classes
        row = [1.0 if task.workload == w else 0.0 for w in _WORKLOAD_NAMES]
        row += [math.log1p(task.compute_units), math.log1p(task.memory_mb)]
        onehot = [0.0] * len(classes)
        if node.device_class in classes:
            onehot[classes[node.device_class]] = 1.0
        row += onehot
        row += [math.log1p(node.tflops_milli), min(node.load_permille, 1000) / 1000]
        return row

    def predict(self, task: TaskShape, nodes: Sequence[NodeShape]) -> list[float]:
        """Predicted runtime in ms of ``task`` on each of ``nodes``."""
        model, classes, version = self._state
        if model is None:
            return [analytic_ms(task, n) for n in nodes]
        # Group by what the features see (load in deciles): few rows per decision.
        keys = [(version, task, n.device_class, n.tflops_milli, n.load_permille // 100)
                for n in nodes]
        missing = sorted({k for k in keys if k not in self._cache}, key=repr)
        if missing:
            rows = [self.features(task, NodeShape(k[2], k[3], k[4] * 100 + 50), classes)
                    for k in missing]
            ratios = model.predict(np.asarray(rows, dtype=np.float64))
            if len(self._cache) > 200_000:
                self._cache.clear()
            for k, r in zip(missing, ratios, strict=True):
                self._cache[k] = float(r)
        return [analytic_ms(task, n) * math.exp(self._cache[k])
                for n, k in zip(nodes, keys, strict=True)]

    def predict_one(self, task: TaskShape, node: NodeShape) -> float:
        """Predicted runtime in ms of ``task`` on ``node``."""
        return self.predict(task, [node])[0]

    # -- learning ---------------------------------------------------------------------------

    def observe(self, obs: Observation) -> None:
        """A reported runtime; refits (in the background) when enough is new."""
        if obs.runtime_ms <= 0:
            return
        if obs.predicted_ms is not None and obs.predicted_ms > 0:
            self.errors.append(abs(obs.predicted_ms - obs.runtime_ms) / obs.runtime_ms)
        self.history.append(obs)
        n = len(self.history)
        if n < self.min_history or n < self._fitted_on * (1 + self.refit_growth):
            return
        with self._lock:
            if self._fitting:
                return
            self._fitting = True
        snapshot = list(self.history)
        if self.background:
            threading.Thread(target=self._fit, args=(snapshot,), daemon=True,
                             name="runtime-model-fit").start()
        else:
            self._fit(snapshot)

    def fit(self, observations: Sequence[Observation]) -> None:
        """Fit now on ``observations`` (replacing the history)."""
        self.history.clear()
        self.history.extend(observations)
        with self._lock:
            self._fitting = True
        self._fit(list(observations))

    def _fit(self, snapshot: list[Observation]) -> None:
        try:
            classes = {c: i for i, c in enumerate(sorted({o.node.device_class
                                                           for o in snapshot}))}
            x = np.asarray([self.features(o.task, o.node, classes) for o in snapshot])
            y = np.asarray([math.log(o.runtime_ms / analytic_ms(o.task, o.node))
                            for o in snapshot])
            # Small histories (a young network) need small leaves to tell workloads apart.
            model = HistGradientBoostingRegressor(
                max_iter=150, learning_rate=0.15, min_samples_leaf=2 if len(y) < 200 else 5,
                random_state=self.seed)
            model.fit(x, y)
            # Swap in whole: a placement running now uses the old model or the new one.
            self._state = (model, classes, self._state[2] + 1)
            self._fitted_on = len(snapshot)
        finally:
            with self._lock:
                self._fitting = False

    @property
    def version(self) -> int:
        """Fits so far; 0 while predicting the analytic estimate."""
        return self._state[2]

    # -- error ------------------------------------------------------------------------------

    def mdape(self) -> float | None:
        """Median absolute percentage error of recent predictions, as a fraction."""
        return float(np.median(self.errors)) if self.errors else None

    def evaluate(self, held_out: Sequence[Observation]) -> float:
        """Median absolute percentage error on observations it was not trained on."""
        errors = []
        for o in held_out:
            predicted = self.predict_one(o.task, o.node)
            errors.append(abs(predicted - o.runtime_ms) / o.runtime_ms)
        return float(np.median(errors))
