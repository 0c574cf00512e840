"""What a user program costs: compute units, peak memory and the runtime bound, from its graph.

Compute (per step, then times ``steps``):

- the floating-point operations of matrix products and convolutions, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` while the program runs on fake tensors
  (``FakeTensorMode``: shapes only, no arithmetic, no memory);
- plus, per byte that every other non-view operator reads and writes, ``BYTE_FLOPS``
  when the operator's operands total more than ``CACHE_BYTES`` and ``CACHED_BYTE_FLOPS``
  otherwise: element-wise work, reductions and copies are bound by memory bandwidth, not
  by the arithmetic the node's speed (a float32 matmul) measures. A byte from main
  memory costs about as long as 15-30 FLOPs of matmul on CPUs and GPUs alike (measured
  here: 45 GFLOP/s vs 1.4 GB/s on 64 MiB operands; an H100: 50 TFLOP/s vs 3 TB/s);
  operands that stay in cache stream some 20 times faster (measured here: a 512x512
  float64 stencil step, about 25 GB/s);
- plus ``OP_FLOPS`` per operator call: the dispatch overhead of an eager call (about
  10 us on a CPU). On a fast GPU a unit is far less than 10 us, so a program of many
  tiny ops is underpriced there; programs of real size are dominated by the first two.

One compute unit = 10^6 of these operations (``workloads.base.units``).

Peak memory (``memory_mb``): the program's weights and constants, plus its inputs, plus
the largest sum of tensors alive at once while one step runs, found by walking the graph
in order, each operator's outputs allocated when it runs and freed after their last use
(views allocate nothing). Outputs are alive at the end. Steps do not add: carried
outputs replace the inputs they feed.

Runtime bound (``runtime_bound_ms``): ``RUNTIME_FLOOR_MS + units / SLOWEST_UNITS_PER_MS``
milliseconds, at most ``MAX_RUNTIME_MS``: the time the slowest node the network admits
(``SLOWEST_UNITS_PER_MS`` = 10 GFLOP/s, a quarter of this 2-core development machine's
float32 matmul) would need, plus 10 s for the child, the load and the checks. A
submitter may state a tighter bound (``max_runtime_ms``), never a looser one. A node
stops a program at the bound the task states; honest estimates sit far below it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from workloads.base import OPS_PER_UNIT, WorkRefused, mebibytes, units
from workloads.lazy import torch

BYTE_FLOPS = 24
"""Operations charged per byte read or written by a memory-bound operator on operands
larger than ``CACHE_BYTES``."""
CACHED_BYTE_FLOPS = 1
"""The same, on operands that fit in ``CACHE_BYTES``."""
CACHE_BYTES = 8 * 2**20
"""Operands up to this total are taken to stay in cache (a last-level cache's order)."""
OP_FLOPS = 500_000
"""Operations charged per operator call (dispatch overhead)."""
RUNTIME_FLOOR_MS = 10_000
"""Added to every runtime bound: child start, load, checks, the first kernels."""
SLOWEST_UNITS_PER_MS = 10
"""The slowest node speed the bound allows for: 10 units/ms = 10 GFLOP/s."""
MAX_RUNTIME_MS = 86_400_000
"""No task runs longer than a day."""

# Operators that only re-describe memory (no bytes move), or only check metadata.
_VIEWS = frozenset("""
alias as_strided detach diagonal expand expand_as flatten movedim narrow permute
_reshape_alias select slice split split_with_sizes squeeze t transpose unbind unflatten
unfold unsqueeze view view_as chunk _unsafe_view _assert_tensor_metadata lift_fresh_copy
""".split())
# Operators whose arithmetic FlopCounterMode counts (their traffic is then not charged).
_COUNTED = frozenset("""
mm addmm bmm baddbmm matmul linear conv1d conv2d conv3d convolution _convolution
conv_transpose1d conv_transpose2d conv_transpose3d convolution_backward einsum mv addmv
dot scaled_dot_product_attention _scaled_dot_product_flash_attention_for_cpu
""".split())


@dataclass(frozen=True)
class Estimate:
    """What a quote shows for a user program."""

    flops: int
    """Operations of the whole run (all steps), as defined in the module docstring."""
    units: int
    """``flops`` in compute units (10^6), rounded up, at least 1."""
    memory_mb: int
    """Peak memory in MiB (module docstring)."""
    max_runtime_ms: int
    """The runtime bound for ``units`` (``runtime_bound_ms``)."""
    ops: int
    """Operator calls per step."""


def runtime_bound_ms(compute_units: int) -> int:
    """The largest wall-clock bound a task of ``compute_units`` may state (docstring)."""
    return min(MAX_RUNTIME_MS, RUNTIME_FLOOR_MS + math.ceil(compute_units /
                                                            SLOWEST_UNITS_PER_MS))


def _nbytes(value: Any) -> int:
    """Bytes of the tensors in a node's ``val`` (a tensor, or a tuple/list of them)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, tuple | list):
        return sum(_nbytes(v) for v in value)
    return 0


def _opname(node: torch.fx.Node) -> str:
    target = node.target
    return target._opname if isinstance(target, torch._ops.OpOverload) else ""


def graph_costs(ep: torch.export.ExportedProgram) -> tuple[int, int, int]:
    """``(traffic charge of uncounted ops in operations, op calls, peak live bytes)`` of
    one step."""
    nodes = list(ep.graph.nodes)
    last_use: dict[torch.fx.Node, int] = {}
    for i, node in enumerate(nodes):
        for arg in node.all_input_nodes:
            last_use[arg] = i
    traffic = calls = live = peak = 0
    sizes: dict[torch.fx.Node, int] = {}
    for i, node in enumerate(nodes):
        if node.op == "call_function":
            name = _opname(node)
            if name:
                calls += 1
            size = 0 if (not name or name in _VIEWS) else _nbytes(node.meta.get("val"))
            if name and name not in _VIEWS and name not in _COUNTED:
                moved = size + sum(_nbytes(a.meta.get("val")) for a in node.all_input_nodes)
                traffic += moved * (CACHED_BYTE_FLOPS if moved <= CACHE_BYTES else BYTE_FLOPS)
            sizes[node] = size
            live += size
            peak = max(peak, live)
        for arg in node.all_input_nodes:
            if last_use.get(arg) == i and node.op != "output":
                live -= sizes.pop(arg, 0)
    return traffic, calls, peak


def counted_flops(ep: torch.export.ExportedProgram, inputs: list[torch.Tensor]) -> int:
    """Matmul and convolution FLOPs of one step, run on fake tensors (no arithmetic)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fakes = [mode.from_tensor(t) for t in inputs]
            module = ep.module()
            with FlopCounterMode(display=False) as counter:
                module(*fakes)
        return int(counter.get_total_flops())
    except WorkRefused:
        raise
    except Exception as e:  # the counter or a fake kernel cannot handle the program
        raise WorkRefused("program-failed", "the FLOP counter could not run the program "
                          f"on fake tensors: {type(e).__name__}: {str(e)[:200]}") from None


def estimate_loaded(ep: torch.export.ExportedProgram, inputs: list[torch.Tensor],
                    steps: int) -> Estimate:
    """The estimate of a loaded, checked program on ``inputs`` (module docstring)."""
    traffic, calls, peak = graph_costs(ep)
    per_step = counted_flops(ep, inputs) + traffic + OP_FLOPS * calls
    flops = per_step * steps
    state = sum(_nbytes(t) for t in ep.state_dict.values()) + sum(
        _nbytes(t) for t in ep.constants.values())
    compute = units(flops)
    return Estimate(flops=flops, units=compute,
                    memory_mb=mebibytes(state + sum(_nbytes(t) for t in inputs) + peak),
                    max_runtime_ms=runtime_bound_ms(compute), ops=calls)


__all__ = ["OPS_PER_UNIT", "Estimate", "estimate_loaded", "runtime_bound_ms"]
