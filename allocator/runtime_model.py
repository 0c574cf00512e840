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
class, speed bucket) groups of the candidates, not per node (speeds are bucketed
in steps of 2^(1/4), about 19 %; load is in the analytic part, not a feature),
and is cached per model version.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from sklearn.ensemble import HistGradientBoostingRegressor

from workloads import WORKLOADS

MAX_LOAD_PERMILLE = 950
HOST_CPU_TFLOPS_MILLI = 50
"""Assumed host-CPU speed for workloads that do not use the accelerator (about what this
project's CPU benchmark measures on a few cores); the model learns each class's real one."""


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


class NodeLike(Protocol):
    """Anything with a node's shape (``NodeShape``, ``placement.NodeView``)."""

    @property
    def device_class(self) -> str: ...
    @property
    def tflops_milli(self) -> int: ...
    @property
    def load_permille(self) -> int: ...


def _speed(task: TaskShape, tflops_milli: int) -> int:
    """The speed the task can use: the device's, or the host CPU's for CPU-only work."""
    w = WORKLOADS.get(task.workload)
    if w is not None and not w.uses_accelerator:
        return min(tflops_milli, HOST_CPU_TFLOPS_MILLI)
    return max(tflops_milli, 1)


def analytic_ms(task: TaskShape, node: NodeLike) -> float:
    """Compute over usable speed, slowed by load: the prior, and the model's baseline."""
    load = min(MAX_LOAD_PERMILLE, max(0, node.load_permille))
    return max(task.compute_units, 1) / _speed(task, node.tflops_milli) * 1000 / (1000 - load)


@dataclass(frozen=True)
class Observation:
    """One replica's reported runtime, with what was predicted for it at placement."""

    task: TaskShape
    node: NodeShape
    runtime_ms: float
    predicted_ms: float | None = None


_WORKLOAD_NAMES = sorted(WORKLOADS)


def _speed_bucket(tflops_milli: int) -> int:
    """log2 of the speed in quarter steps: nodes of one class fall in one or two buckets."""
    return round(4 * math.log2(max(tflops_milli, 1)))


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
        row += [_speed_bucket(node.tflops_milli) / 4]
        return row

    def predict(self, task: TaskShape, nodes: Sequence[NodeLike]) -> list[float]:
        """Predicted runtime in ms of ``task`` on each of ``nodes``."""
        model, classes, version = self._state
        units = max(task.compute_units, 1)
        # Per distinct (class, speed): the usable speed and the learned correction.
        groups = {(n.device_class, n.tflops_milli) for n in nodes}
        factor: dict[tuple[str, int], float] = {}
        missing: dict[tuple[Any, ...], list[tuple[str, int]]] = {}
        for device_class, tflops in groups:
            if model is None:
                factor[(device_class, tflops)] = 1000 / _speed(task, tflops)
                continue
            key = (version, task, device_class, _speed_bucket(tflops))
            cached = self._cache.get(key)
            if cached is None:
                missing.setdefault(key, []).append((device_class, tflops))
            else:
                factor[(device_class, tflops)] = 1000 / _speed(task, tflops) * cached
        if missing:
            keys = list(missing)
            rows = [self.features(task, NodeShape(k[2], round(2 ** (k[3] / 4)), 0), classes)
                    for k in keys]
            ratios = np.exp(model.predict(np.asarray(rows, dtype=np.float64)))
            if len(self._cache) > 200_000:
                self._cache.clear()
            for k, r in zip(keys, ratios, strict=True):
                self._cache[k] = float(r)
                for device_class, tflops in missing[k]:
                    factor[(device_class, tflops)] = 1000 / _speed(task, tflops) * float(r)
        cap = MAX_LOAD_PERMILLE
        return [units * factor[(n.device_class, n.tflops_milli)]
                / (1000 - min(cap, max(0, n.load_permille))) for n in nodes]

    def predict_one(self, task: TaskShape, node: NodeLike) -> float:
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
