"""Fuzzing the CLI's parameter parsing: ``destra submit WORKLOAD -p key=value ...``.

The ``-p`` pairs are split (``click.BadParameter`` for one without ``=``), then checked
against the workload's declared parameters and priced, as ``Client.quote`` does: the
input is accepted, or refused with a ``DestraError`` (``UnknownWorkload``,
``InvalidParams``, ``UnknownTier``, ``InvalidRequest``); nothing else escapes, and what
is accepted fits in a ``TaskSubmitted``.
"""

from __future__ import annotations

import click
from hypothesis import example, given
from hypothesis import strategies as st

from allocator.pricing import PriceBook
from destra.cli import _params
from destra.errors import DestraError
from schemas import new_event
from schemas.codec import encode
from schemas.samples import SAMPLE_TIME_MS, sample_event
from tests.unit.fuzzing import count
from workloads import WORKLOADS, get_workload

NAMES = sorted({spec.name for w in WORKLOADS.values() for spec in w.params})
_EDGES = ["", "0", "-0", "1", "-1", "2147483648", "9" * 30, "1e308", "1e309", "-1e309", "nan",
          "inf", "-inf", "0x10", "1_000", " 1", "1 ", "+1", "1.5", "１", "٣", "\x00", "é" * 1100,
          "9" * 5000, "1" + "0" * 4400]


def _value(spec_name: str) -> st.SearchStrategy[str]:
    choices = sorted({c for w in WORKLOADS.values() for s in w.params
                      if s.name == spec_name for c in s.choices})
    return st.one_of(st.sampled_from(_EDGES), st.integers().map(str),
                     st.floats().map(repr), st.text(max_size=30),
                     st.sampled_from(choices or [""]))


_PAIR = st.one_of(
    st.sampled_from(NAMES).flatmap(lambda n: _value(n).map(lambda v: f"{n}={v}")),
    st.text(max_size=30),
    st.sampled_from(["=", "=x", "x=", "a=b=c", "==", "seed=="]),
)


def _submit_parsing(workload: str, pairs: tuple[str, ...], replicas: int, tier: str) -> None:
    """What ``destra submit`` does with its arguments before it reaches the network."""
    count("cli: -p parameters")
    try:
        params = _params(pairs)
    except click.BadParameter:
        return  # click prints it as a usage error
    try:
        w = get_workload(workload)
        parsed = w.validate(params)
        units = w.compute_units(parsed)
        memory = w.memory_mb(parsed)
        quote = PriceBook().quote(workload, units, replicas, tier, SAMPLE_TIME_MS, 60_000)
    except DestraError:
        return
    assert isinstance(units, int) and units >= 1
    assert isinstance(memory, int) and memory >= 0
    public, private = w.split(params)
    assert {**public, **private} == params
    # What is accepted fits in a submission: the codec takes it.
    encode(sample_event("TaskSubmitted").replace(
        workload=workload, params=public, compute_units=units, replicas=replicas, quorum=1,
        quoted_price_micro=quote.price_micro, max_price_micro=quote.price_micro))
    new_event("TaskSubmitted", "cli")  # (cheap: nothing else to check)


@given(workload=st.one_of(st.sampled_from(sorted(WORKLOADS)), st.text(max_size=20)),
       pairs=st.lists(_PAIR, max_size=6).map(tuple),
       replicas=st.integers(1, 15),
       tier=st.one_of(st.sampled_from(["consumer", "prosumer", "datacenter"]),
                      st.text(max_size=12)))
@example(workload="nbody", pairs=("steps=" + "9" * 5000,), replicas=3, tier="consumer")
def test_workload_parameters_are_accepted_or_refused_with_a_destra_error(
        workload: str, pairs: tuple[str, ...], replicas: int, tier: str) -> None:
    _submit_parsing(workload, pairs, replicas, tier)


@given(workload=st.sampled_from(sorted(WORKLOADS)), data=st.data())
def test_each_declared_parameter_at_its_edges(workload: str, data: st.DataObject) -> None:
    w = get_workload(workload)
    pairs = []
    for spec in w.params:
        if data.draw(st.booleans()):
            edges = [str(v) for v in (spec.min, spec.max) if v is not None]
            edges += [str(v + d) for v in (spec.min, spec.max) if isinstance(v, int)
                      for d in (-1, 1)]
            value = data.draw(st.one_of(st.sampled_from(edges or ["x"]), _value(spec.name)))
            pairs.append(f"{spec.name}={value}")
    _submit_parsing(workload, tuple(pairs), 3, "consumer")
