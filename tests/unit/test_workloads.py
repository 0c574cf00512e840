"""Workloads: seeded, bounded, and hashed canonically so replicas agree."""

from __future__ import annotations

import hashlib
import json
import math
import random
import struct
from collections.abc import Iterator
from fractions import Fraction

import pytest
import torch

from destra.errors import DestraError, InvalidParams, UnknownWorkload, WorkloadFailed
from workloads import WORKLOADS, WorkloadResult, get_workload
from workloads.canonical import (
    canonical_json,
    round_tensor,
    tensor_b64,
    tensor_bytes,
    tensor_from_b64,
)
from workloads.sweep import Sweep

CPU = torch.device("cpu")
# The seeded workloads; ``program`` (a user's own program) has no runnable defaults and
# is tested by tests/unit/test_program.py.
NAMES = sorted(n for n in WORKLOADS if n != "program")

# Small runs for tests that repeat a workload several times.
SMALL: dict[str, dict[str, str]] = {
    "mlp-digits": {"epochs": "2"},
    "nbody": {"n": "16", "steps": "20"},
    "heat2d": {"grid": "32", "steps": "50"},
    "matmul": {"n": "64", "repeats": "1"},
    "sha256-search": {"count": "500"},
    "sweep": {"lrs": "0.01,0.03", "hidden_sizes": "8", "epochs": "2"},
}
# A bigger problem of the same kind, for cost estimates.
BIGGER: dict[str, dict[str, str]] = {
    "mlp-digits": {"hidden": "128"},
    "nbody": {"n": "256"},
    "heat2d": {"grid": "256"},
    "matmul": {"n": "512"},
    "sha256-search": {"count": "100000"},
    "sweep": {"lrs": "0.001,0.003,0.01,0.03", "hidden_sizes": "16,32,64"},
}


def run(name: str, raw: dict[str, str]) -> WorkloadResult:
    workload = get_workload(name)
    return workload.run(workload.validate(raw), CPU)


@pytest.fixture
def restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", NAMES)
def test_every_workload_runs_its_defaults_and_digests_its_output(name: str) -> None:
    result = run(name, {})
    assert len(result.digest) == 32
    assert result.digest == hashlib.sha256(result.output).digest()
    assert json.loads(result.output)["workload"] == name
    assert result.runtime_ms >= 0 and result.summary


@pytest.mark.parametrize("name", NAMES)
def test_every_workload_declares_docs_precision_and_defaults_within_bounds(name: str) -> None:
    workload = get_workload(name)
    assert workload.name == name and workload.doc and workload.params
    assert workload.digest_bits in (0, *range(8, 53))
    defaults = workload.defaults()
    assert workload.validate({k: str(v) for k, v in defaults.items()}) == defaults
    assert workload.memory_mb(defaults) >= 1


@pytest.mark.parametrize("name", NAMES)
def test_same_params_give_the_same_digest_twice_and_on_one_or_two_threads(
        name: str, restore_threads: None) -> None:
    torch.set_num_threads(1)
    one, again = run(name, SMALL[name]), run(name, SMALL[name])
    torch.set_num_threads(2)
    two = run(name, SMALL[name])
    assert one.digest == again.digest == two.digest
    assert one.output == two.output


def test_a_run_leaves_global_torch_settings_as_it_found_them() -> None:
    before = (torch.are_deterministic_algorithms_enabled(), torch.get_float32_matmul_precision())
    run("matmul", SMALL["matmul"])
    assert (torch.are_deterministic_algorithms_enabled(),
            torch.get_float32_matmul_precision()) == before


@pytest.mark.parametrize("name", [n for n in NAMES if n != "sha256-search"])
def test_a_different_seed_gives_a_different_digest(name: str) -> None:
    assert run(name, SMALL[name]).digest != run(name, {**SMALL[name], "seed": "1"}).digest


def test_a_different_prefix_gives_a_different_sha256_search_digest() -> None:
    assert run("sha256-search", {}).digest != run("sha256-search", {"prefix": "00"}).digest


def _numeric_param(name: str) -> tuple[str, int | float]:
    spec = next(s for s in get_workload(name).params if s.kind in ("int", "float"))
    assert spec.max is not None
    return spec.name, spec.max


@pytest.mark.parametrize("name", NAMES)
def test_an_out_of_range_value_is_rejected_naming_the_parameter_and_range(name: str) -> None:
    param, top = _numeric_param(name)
    too_big = str(top * 2 + 1)
    with pytest.raises(InvalidParams, match=rf"'{param}' = '{too_big}' is out of range") as e:
        get_workload(name).validate({param: too_big})
    assert str(top) in str(e.value)


@pytest.mark.parametrize("name", NAMES)
def test_an_unknown_parameter_is_rejected_by_name(name: str) -> None:
    with pytest.raises(InvalidParams, match=r"unknown parameter 'colour'"):
        get_workload(name).validate({"colour": "blue"})


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", ["abc", "", "nan", "1e999", " 7"])
def test_a_non_numeric_value_is_rejected_naming_it(name: str, bad: str) -> None:
    param, _ = _numeric_param(name)
    with pytest.raises(InvalidParams, match=rf"'{param}' = '{bad}' is not"):
        get_workload(name).validate({param: bad})


def test_an_integer_parameter_refuses_a_fraction() -> None:
    with pytest.raises(InvalidParams, match=r"'n' = '1.5' is not an integer"):
        get_workload("nbody").validate({"n": "1.5"})


@pytest.mark.parametrize("bad", ["nan", "inf", "-1e999"])
def test_a_float_parameter_refuses_non_finite_values(bad: str) -> None:
    with pytest.raises(InvalidParams, match=rf"'dt' = '{bad}' is not a finite number"):
        get_workload("nbody").validate({"dt": bad})


def test_a_choice_parameter_names_its_choices() -> None:
    with pytest.raises(InvalidParams, match=r"'dtype' = 'float16'.*float32, float64"):
        get_workload("matmul").validate({"dtype": "float16"})


def test_sha256_search_refuses_a_prefix_that_is_not_hex() -> None:
    with pytest.raises(InvalidParams, match=r"'prefix' = 'xyz'"):
        get_workload("sha256-search").validate({"prefix": "xyz"})


def test_an_unknown_workload_is_rejected_listing_the_known_ones() -> None:
    with pytest.raises(UnknownWorkload, match=r"'folding'.*matmul, mlp-digits") as e:
        get_workload("folding")
    assert isinstance(e.value, DestraError)


@pytest.mark.parametrize("name", NAMES)
def test_compute_units_grow_with_problem_size(name: str) -> None:
    workload = get_workload(name)
    small = workload.compute_units(workload.defaults())
    assert 1 <= small < workload.compute_units(workload.validate(BIGGER[name]))


def test_mlp_digits_learns_the_digits_at_its_defaults() -> None:
    result = run("mlp-digits", {})
    body = json.loads(result.output)
    assert body["correct"] / body["test_size"] > 0.85
    assert result.summary["accuracy"] == body["correct"] / body["test_size"]
    weights = tensor_from_b64(body["weights"]["w1"])
    assert weights.shape == (64, 32) and weights.dtype == torch.float64


def test_nbody_energy_drift_is_small_and_shrinks_with_the_time_step() -> None:
    coarse = run("nbody", {"n": "16", "steps": "50", "dt": "0.004"})
    fine = run("nbody", {"n": "16", "steps": "200", "dt": "0.001"})
    assert fine.summary["relative_energy_drift"] < 1e-6
    assert fine.summary["relative_energy_drift"] < coarse.summary["relative_energy_drift"]


def test_sha256_search_results_match_an_independent_hashlib_scan() -> None:
    prefix, start, count, difficulty = bytes.fromhex("cafe"), 10**12, 3000, 7
    result = run("sha256-search", {"prefix": "cafe", "start": str(start), "count": str(count),
                                   "difficulty": str(difficulty), "max_results": "5"})
    expected = [n for n in range(start, start + count)
                if int.from_bytes(hashlib.sha256(prefix + struct.pack(">Q", n)).digest(), "big")
                < 1 << (256 - difficulty)]
    body = json.loads(result.output)
    assert body["total_found"] == len(expected) > 5
    assert body["nonces"] == expected[:5]


def test_heat2d_keeps_the_boundary_and_stays_within_its_bounds() -> None:
    body = json.loads(run("heat2d", {}).output)
    field = tensor_from_b64(body["field"])
    assert field[0].abs().max() < 1e-12 and field[-1].abs().max() < 1e-12  # the poles
    assert body["min"] >= -0.5 and body["max"] <= 1.5


def test_matmul_output_is_exact_integer_sums() -> None:
    body = json.loads(run("matmul", {"n": "32", "dtype": "float64"}).output)
    float32 = json.loads(run("matmul", {"n": "32"}).output)
    assert body["row_sums"] == float32["row_sums"] and len(body["col_sums"]) == 32
    assert sum(body["row_sums"]) == sum(body["col_sums"])


def test_sweep_expands_one_mlp_task_per_grid_point() -> None:
    sweep = Sweep()
    tasks = sweep.expand(sweep.validate({"lrs": "0.01,0.1", "hidden_sizes": "8,16,32"}))
    assert len(tasks) == 6 and {name for name, _ in tasks} == {"mlp-digits"}
    assert {(t["lr"], t["hidden"]) for _, t in tasks} == {
        (lr, h) for lr in ("0.01", "0.1") for h in ("8", "16", "32")}


def test_sweep_gather_picks_the_most_accurate_point_in_any_order() -> None:
    sweep = Sweep()
    tasks = sweep.expand(sweep.validate({**SMALL["sweep"], "lrs": "0.0001,0.01,0.03"}))
    results = [(raw, run(name, raw)) for name, raw in tasks]
    best = max(json.loads(r.output)["correct"] for _, r in results)
    gathered = sweep.gather(results)
    assert gathered.summary["best_correct"] == best
    assert sweep.gather(list(reversed(results))).digest == gathered.digest
    assert gathered.summary["best_params"]["lr"] != 0.0001  # a tiny rate barely learns


def _fake_point(lr: str, correct: int) -> tuple[dict[str, str], WorkloadResult]:
    raw = {"lr": lr, "hidden": "8"}
    params = get_workload("mlp-digits").validate(raw)
    output = canonical_json({"workload": "mlp-digits", "params": params, "correct": correct,
                             "test_size": 449})
    return raw, WorkloadResult(output=output, digest=hashlib.sha256(output).digest())


def test_sweep_gather_breaks_ties_the_same_way_whatever_the_order() -> None:
    points = [_fake_point("0.02", 400), _fake_point("0.01", 400), _fake_point("0.5", 10)]
    first, second = Sweep().gather(points), Sweep().gather(points[::-1])
    assert first.output == second.output
    assert first.summary["best_params"]["lr"] == 0.01


def test_sweep_gather_refuses_a_result_whose_digest_does_not_match() -> None:
    raw, result = _fake_point("0.01", 400)
    forged = WorkloadResult(output=result.output, digest=bytes(32))
    with pytest.raises(WorkloadFailed, match="digest"):
        Sweep().gather([(raw, forged)])


def test_sweep_refuses_more_than_64_points_and_bad_list_items() -> None:
    sweep = get_workload("sweep")
    lrs = ",".join(str(0.001 * (i + 1)) for i in range(9))
    with pytest.raises(InvalidParams, match="72 points"):
        sweep.validate({"lrs": lrs, "hidden_sizes": "4,5,6,7,8,9,10,11"})
    with pytest.raises(InvalidParams, match=r"'lrs' = '0.01,fast'.*'lr' = 'fast'"):
        sweep.validate({"lrs": "0.01,fast"})
    with pytest.raises(InvalidParams, match=r"'hidden_sizes' = '8,8' repeats"):
        sweep.validate({"hidden_sizes": "8,8"})


# --- canonical rounding and encoding ---


def _reference_round(x: float, bits: int) -> float:
    """Round half away from zero to bits+1 significant bits, exactly, with fractions."""
    if x == 0.0:
        return 0.0
    mantissa, exponent = math.frexp(abs(x))  # abs(x) = mantissa * 2**exponent, m in [0.5, 1)
    scaled = Fraction(mantissa) * 2 ** (bits + 1)
    kept = math.floor(scaled + Fraction(1, 2))
    return math.copysign(float(Fraction(kept) * Fraction(2) ** (exponent - bits - 1)), x)


@pytest.mark.parametrize("bits", [0, 1, 7, 24, 32, 51])
def test_rounding_matches_an_exact_reference(bits: int) -> None:
    rng = random.Random(bits)
    values = [rng.gauss(0, 1) * 10 ** rng.randint(-30, 30) for _ in range(500)]
    got = round_tensor(torch.tensor(values, dtype=torch.float64), bits).tolist()
    assert got == [_reference_round(v, bits) for v in values]


def test_rounding_at_a_tie_goes_away_from_zero() -> None:
    tie = torch.tensor([1 + 2**-24, -(1 + 2**-24), 1 + 2**-24 - 2**-52], dtype=torch.float64)
    assert round_tensor(tie, 23).tolist() == [1 + 2**-23, -(1 + 2**-23), 1.0]
    tie32 = torch.tensor([1 + 2**-23], dtype=torch.float32)
    assert round_tensor(tie32, 22).item() == 1 + 2**-22


def test_rounding_carries_into_the_exponent() -> None:
    below_two = torch.tensor([2 - 2**-52, 2 - 2**-10, 2 - 2**-11 - 2**-12], dtype=torch.float64)
    assert round_tensor(below_two, 10).tolist() == [2.0, 2 - 2**-10, 2 - 2**-10]


def test_rounding_flushes_negative_zero_and_subnormals_and_keeps_infinity() -> None:
    special = torch.tensor([-0.0, 5e-324, -2e-310, math.inf, -math.inf], dtype=torch.float64)
    out = round_tensor(special, 24)
    assert out.tolist() == [0.0, 0.0, 0.0, math.inf, -math.inf]
    assert not torch.signbit(out[:3]).any()


def test_rounding_keeps_all_bits_at_full_precision_and_is_idempotent() -> None:
    t = torch.randn(100, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(round_tensor(t, 52), t)
    once = round_tensor(t, 20)
    assert torch.equal(round_tensor(once, 20), once)
    assert (once.view(torch.int64) & ((1 << 32) - 1)).eq(0).all()


def test_rounding_refuses_nan_bad_bits_and_integer_tensors() -> None:
    with pytest.raises(WorkloadFailed, match="NaN"):
        round_tensor(torch.tensor([1.0, math.nan]), 10)
    with pytest.raises(ValueError, match=r"\[0, 23\]"):
        round_tensor(torch.tensor([1.0]), 24)
    with pytest.raises(TypeError):
        round_tensor(torch.tensor([1]), 10)


def test_tensor_bytes_are_pinned_and_round_trip() -> None:
    t = torch.tensor([[1.0, -2.0]], dtype=torch.float32)
    expected = (b"DTEN1\x07float32\x02" + struct.pack("<QQ", 1, 2) + struct.pack("<2f", 1, -2))
    assert tensor_bytes(t) == expected
    assert torch.equal(tensor_from_b64(tensor_b64(t)), t)
    assert tensor_bytes(t.t().contiguous().t()) == expected  # strides do not matter


def test_canonical_json_refuses_nan() -> None:
    assert canonical_json({"b": 1, "a": [0.5]}) == b'{"a":[0.5],"b":1}'
    with pytest.raises(WorkloadFailed):
        canonical_json({"x": math.nan})


GOLDEN = [
    ("heat2d", {"grid": "8", "steps": "1"},
     "0472c2334cc5f35b6a129baa163c542faa222e35295fe27540b830843a19efc9"),
    ("heat2d", {"grid": "16", "steps": "130", "seed": "3"},
     "ebff51c3f025ce232892d91bd5f34c4c33bcdf616aa087a17110f55889954447"),
    ("heat2d", {"grid": "200", "steps": "3"},
     "ba76b70bcc1142f61ce04be6d92947b35cc7713cdf635498f0a186b940177a7b"),
    ("nbody", {"n": "16", "steps": "150", "seed": "2"},
     "ce41186082ba170fdc1cfc02e7d0c7cc84aca0b3629da8a1fba56ccedbede666"),
    ("nbody", {"n": "8", "steps": "1"},
     "d3265b34ad21613d1b7692094a5d36eed0163a2adc5b8c01f53e10d7673d32dd"),
    ("mlp-digits", {"hidden": "8", "epochs": "70", "seed": "5"},
     "6bbe3971b579b3f5ee78b7b8cdf4b05b932a753874eeacb3ece0dc512fc37072"),
    ("mlp-digits", {"hidden": "16", "epochs": "2"},
     "84aea1ccf6330c3ad2128ea301e6ee7251b0ea3c429ac6d48f55718b43288fbe"),
    ("mlp-digits", {"hidden": "8", "epochs": "3", "batch_size": "2048", "lr": "0.05"},
     "69d1d4295b5f91b36b6127341382f37268c420736d93142172f1e3a8d15c96b3"),
]
"""Digests on this CPU of ``run()`` before the iterative workloads ran segment by segment
(``workloads.checkpoints.run_whole``): a replica of an older version must still agree."""


@pytest.mark.parametrize(("name", "raw", "digest"), GOLDEN)
def test_iterative_workloads_keep_their_digests(name: str, raw: dict[str, str],
                                                digest: str) -> None:
    w = get_workload(name)
    assert w.run(w.validate(dict(raw)), torch.device("cpu")).digest.hex() == digest
