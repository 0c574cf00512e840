"""``bench/gpu_check.py``, the prepared script for a session lent a GPU: its CPU side runs
here (every case, a digest each, nothing failed), so it is ready when a device is."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402


def test_the_gpu_check_runs_every_case_on_the_cpu_without_a_failure() -> None:
    assert gpu_check.missing_modules() == []
    lines = gpu_check.report(quick=True)
    runs = [line for line in lines if not line.startswith("capability") and " s; " in line]
    labels = {line.split(": cpu")[0] for line in runs}
    assert {"matmul", "nbody", "program: wave2d 64^2, 20 steps, exact"} <= labels, labels
    assert len(runs) == len(gpu_check.cases(quick=True))
    assert not [line for line in runs if "FAILED" in line or "DIFFERS" in line], runs
    assert all("digest" in line for line in runs), runs
