"""Predicted runtime of a task on a node: an analytic estimate, corrected by what was learned.

The analytic estimate is compute over measured speed: ``compute_units`` (10^6
operations) on a node whose benchmark reached ``tflops_milli`` takes
``compute_units / tflops_milli`` ms, slowed by the node's load. Real workloads
are not matrix multiplications: a stencil is bound by memory bandwidth, a small
MLP by kernel launches, a hash search does not use the GPU at all. So the model
learns, from the runtimes nodes report with verified results, the log-ratio of
actual to analytic runtime, with scikit-learn's histogram gradient boosting,
from the task's features (workload, compute) and the node's (device class,
benchmark speed). Load enters through the analytic part (a node at 50 % load
runs at half speed), memory through the placement constraints. Until it has
history it predicts the analytic estimate.

Training never blocks placement: ``observe`` only appends, and a refit runs on a
background thread (or synchronously, for a deterministic simulation) when the
history has grown by ``refit_growth``; the fitted model is swapped in whole.
Placement must stay fast (a few ms at 1,000 nodes), and one scikit-learn
``predict`` call costs about 2.5 ms whatever its size. So compute and speed are
bucketed in steps of 2^(1/4) (about 19 %), and each fit precomputes, in one
batch, the correction of every workload and size bucket on every (device class,
speed bucket) it has seen: a placement then only looks corrections up, per
distinct group of candidates, not per node; anything missing (a new class) is
predicted once and cached.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

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
_MAX_SIZE_BUCKET = 4 * 40
"""Sizes up to 2^40 compute units are precomputed at each fit."""


def _speed_bucket(value: int) -> int:
    """log2 in quarter steps (about 19 %): nodes of one class fall in one or two speed
    buckets; tasks of similar compute and memory in one size bucket."""
    return round(4 * math.log2(max(value, 1)))


class RuntimeModel:
    """Predicts runtimes; learns from observations (see the module docstring)."""

    def __init__(self, *, min_history: int = 12, refit_growth: float = 0.5,
                 background: bool = True, max_history: int = 50_000, seed: int = 0) -> None:
        self.min_history = min_history
        self.refit_growth = refit_growth
        self.background = background
        self.seed = seed
        self.history: deque[Observation] = deque(maxlen=max_history)
        self.errors: deque[float] = deque(maxlen=1000)
        """Absolute percentage errors of the latest predictions checked against reality."""
        self._state: tuple[Any, dict[str, int], int, dict[tuple[str, int, str, int], float]] = (
            None, {}, 0, {})
        """(fitted model or None, device class -> one-hot index, version, precomputed
        corrections): swapped whole."""
        self._fitted_on = 0
        self._fitting = False
        self._lock = threading.Lock()
        self._cache: dict[tuple[Any, ...], float] = {}
        self._buckets: dict[int, int] = {}

    # -- prediction -------------------------------------------------------------------------

    def features(self, task: TaskShape, node: NodeShape,
                 classes: dict[str, int] | None = None) -> list[float]:
        """The model's input row."""
        classes = self._state[1] if classes is None else classes
        row = [1.0 if task.workload == w else 0.0 for w in _WORKLOAD_NAMES]
        row += [_speed_bucket(task.compute_units) / 4]
        onehot = [0.0] * len(classes)
        if node.device_class in classes:
            onehot[classes[node.device_class]] = 1.0
        row += onehot
        row += [_speed_bucket(node.tflops_milli) / 4]
        return row

    def predict(self, task: TaskShape, nodes: Sequence[NodeLike]) -> list[float]:
        """Predicted runtime in ms of ``task`` on each of ``nodes``."""
        model, classes, version, grid = self._state
        units = max(task.compute_units, 1) * 1000
        w = WORKLOADS.get(task.workload)
        host_only = w is not None and not w.uses_accelerator
        cap = MAX_LOAD_PERMILLE
        if model is None:
            correction: dict[tuple[str, int], float] = {}
            keys = [("", 0)] * len(nodes)
            correction[("", 0)] = 1.0
        else:
            buckets = self._buckets
            for n in nodes:
                if n.tflops_milli not in buckets:
                    buckets[n.tflops_milli] = _speed_bucket(n.tflops_milli)
            keys = [(n.device_class, buckets[n.tflops_milli]) for n in nodes]
            # The grid computed at the fit has (almost) every correction; what it lacks
            # (a class never seen, a size beyond the history) is predicted once, cached.
            size = (task.workload, _speed_bucket(task.compute_units))
            shape = TaskShape(task.workload, round(2 ** (size[1] / 4)), 0)
            correction = {}
            missing = []
            for key in set(keys):
                cached = grid.get((*size, *key))
                if cached is None:
                    cached = self._cache.get((version, size, key))
                if cached is None:
                    missing.append(key)
                else:
                    correction[key] = cached
            if missing:
                rows = [self.features(shape, NodeShape(c, round(2 ** (b / 4)), 0), classes)
                        for c, b in missing]
                ratios = np.exp(model.predict(np.asarray(rows, dtype=np.float64)))
                if len(self._cache) > 200_000:
                    self._cache.clear()
                for key, r in zip(missing, ratios, strict=True):
                    correction[key] = self._cache[(version, size, key)] = float(r)
        host = HOST_CPU_TFLOPS_MILLI
        return [units * correction[k]
                / ((min(n.tflops_milli, host) if host_only else max(n.tflops_milli, 1))
                   * (1000 - min(cap, max(0, n.load_permille))))
                for n, k in zip(nodes, keys, strict=True)]

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
            from sklearn.ensemble import HistGradientBoostingRegressor  # ~0.8 s to import

            model = HistGradientBoostingRegressor(
                max_iter=100, learning_rate=0.2, min_samples_leaf=2 if len(y) < 200 else 5,
                random_state=self.seed)
            model.fit(x, y)
            grid = self._grid(model, classes, snapshot)
            # Swap in whole: a placement running now uses the old model or the new one.
            self._state = (model, classes, self._state[2] + 1, grid)
            self._fitted_on = len(snapshot)
        finally:
            with self._lock:
                self._fitting = False

    def _grid(self, model: Any, classes: dict[str, int],
              snapshot: list[Observation]) -> dict[tuple[str, int, str, int], float]:
        """Corrections for every workload, size bucket and seen (class, speed bucket),
        computed once per fit (one batch call), so placement looks them up."""
        nodes = sorted({(o.node.device_class, _speed_bucket(o.node.tflops_milli))
                        for o in snapshot})
        top = min(_MAX_SIZE_BUCKET, max(_speed_bucket(o.task.compute_units)
                                        for o in snapshot) + 8)
        keys = [(w, ub, c, sb) for w in _WORKLOAD_NAMES for ub in range(top + 1)
                for c, sb in nodes]
        rows = [self.features(TaskShape(w, round(2 ** (ub / 4)), 0),
                              NodeShape(c, round(2 ** (sb / 4)), 0), classes)
                for w, ub, c, sb in keys]
        ratios = np.exp(model.predict(np.asarray(rows, dtype=np.float64)))
        return {k: float(r) for k, r in zip(keys, ratios, strict=True)}

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
