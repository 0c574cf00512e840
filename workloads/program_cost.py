"""What a user program costs: compute units, peak memory and the runtime bound, from its graph.

Compute (per step, then times ``steps``) is a roofline estimate per operator call, in
operations of the node's reference speed (a large float32 matmul,
``node_runner.capability``):

- matrix products and convolutions: their floating-point operations, counted per call by
  ``torch.utils.flop_counter.FlopCounterMode`` while the program runs on fake tensors
  (``FakeTensorMode``: shapes only, no arithmetic, no memory). A convolution with few
  input channels per group runs far below the matmul's rate (its kernels vectorize
  across input channels: 3 RGB channels fill 3 of 16 lanes), so its FLOPs are divided by
  ``min(1, channels / CONV_LANES)``: the first layer of an image model costs about five
  times its FLOPs (measured here: 0.10-0.13 of the matmul rate at 3 channels, 0.6-1.1 at
  32 and more);
- every call (those too): the bytes it reads and writes times ``BYTE_FLOPS`` when its
  operands total more than ``CACHE_BYTES`` and ``CACHED_BYTE_FLOPS`` otherwise, and the
  call is charged the larger of that and its FLOPs. Element-wise work, reductions and
  copies are bound by memory bandwidth, not by the arithmetic the node's speed measures
  (measured here, 2 threads at 220-340 GFLOP/s: 5-6 FLOP-times per byte on operands up
  to 24 MiB, which stay in this machine's last-level cache, 21-37 on 64-96 MiB ones);
  pooling (``WINDOW_OPS``) costs ``WINDOW_FACTOR`` times as much a byte (a CPU's
  ``max_pool2d`` ran at 100-180 FLOP-times a byte);
- plus ``OP_FLOPS`` per operator call: the dispatch overhead of an eager call in the
  exported module (about 10 us on a CPU). On a fast GPU a unit is far less than 10 us,
  so a program of many tiny ops is underpriced there; programs of real size are
  dominated by the terms above.

The constants are this development machine's (``bench/program_estimate.py`` prints the
estimate against the measured runtime x speed for the examples). A GPU's ratios of
bandwidth and of small-channel convolutions to its matmul rate differ, so the same
program's units are a price, and an ordering of tasks, more than a runtime prediction.

One compute unit = 10^6 of these operations (``workloads.base.units``).

Peak memory (``memory_mb``): the program's weights and constants, plus its inputs, plus
the largest sum of tensors alive at once while one step runs, found by walking the graph
in order, each operator's outputs allocated when it runs and freed after their last use
(views allocate nothing). Outputs are alive at the end. Steps do not add: carried
outputs replace the inputs they feed.

Runtime bound (``runtime_bound_ms``): ``RUNTIME_FLOOR_MS + units / SLOWEST_UNITS_PER_MS``
milliseconds, at most ``MAX_RUNTIME_MS``: the time the slowest node the network admits
(``SLOWEST_UNITS_PER_MS`` = 10 GFLOP/s, well under this 2-core development machine's
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
from workloads.program_tensors import tensor_bytes

BYTE_FLOPS = 24
"""Operations charged per byte an operator call reads and writes, on operands totalling
more than ``CACHE_BYTES``."""
CACHED_BYTE_FLOPS = 6
"""The same, on operands that fit in ``CACHE_BYTES``."""
CACHE_BYTES = 32 * 2**20
"""Operands up to this total are taken to stay in cache (a server's last-level cache)."""
WINDOW_FACTOR = 24
"""Pooling (``WINDOW_OPS``) costs this many times the byte charge."""
CONV_LANES = 16
"""Input channels per group at which a convolution runs at the matmul's rate."""
OP_FLOPS = 3_000_000
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
_CONVS = frozenset("""
conv1d conv2d conv3d convolution _convolution conv_transpose1d conv_transpose2d
conv_transpose3d convolution_backward
""".split())
WINDOW_OPS = frozenset("""
max_pool1d max_pool2d max_pool3d max_pool2d_with_indices max_pool3d_with_indices
avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d
adaptive_avg_pool3d _adaptive_avg_pool2d _adaptive_avg_pool3d adaptive_max_pool1d
adaptive_max_pool2d adaptive_max_pool3d max_pool2d_with_indices_backward
max_pool3d_with_indices_backward avg_pool2d_backward avg_pool3d_backward
_adaptive_avg_pool2d_backward _adaptive_avg_pool3d_backward
adaptive_max_pool2d_backward adaptive_max_pool3d_backward max_unpool2d max_unpool3d
""".split())
"""Windowed reductions, slow per byte on CPUs."""


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


def _opname(node: torch.fx.Node) -> str:
    target = node.target
    return target._opname if isinstance(target, torch._ops.OpOverload) else ""


def peak_bytes(ep: torch.export.ExportedProgram) -> int:
    """The largest sum of tensors alive at once during one step (module docstring)."""
    nodes = list(ep.graph.nodes)
    last_use: dict[torch.fx.Node, int] = {}
    for i, node in enumerate(nodes):
        for arg in node.all_input_nodes:
            last_use[arg] = i
    live = peak = 0
    sizes: dict[torch.fx.Node, int] = {}
    for i, node in enumerate(nodes):
        if node.op == "call_function":
            name = _opname(node)
            size = 0 if (not name or name in _VIEWS) else tensor_bytes(node.meta.get("val"))
            sizes[node] = size
            live += size
            peak = max(peak, live)
        for arg in node.all_input_nodes:
            if last_use.get(arg) == i and node.op != "output":
                live -= sizes.pop(arg, 0)
    return peak


def largest_tensor_bytes(ep: torch.export.ExportedProgram) -> int:
    """The largest single tensor one step makes (views excluded), in bytes."""
    return max((tensor_bytes(node.meta.get("val")) for node in ep.graph.nodes
                if node.op == "call_function" and _opname(node) not in _VIEWS), default=0)


def call_charge(name: str, flops: int, moved: int, in_channels: int = 0) -> int:
    """Operations charged for one call of operator ``name`` (module docstring): ``flops``
    as counted, ``moved`` bytes read and written, ``in_channels`` per group for a
    convolution."""
    if name in _VIEWS:
        return OP_FLOPS
    if name in _CONVS and in_channels > 0:
        flops = flops * CONV_LANES // min(CONV_LANES, in_channels)
    traffic = moved * (CACHED_BYTE_FLOPS if moved <= CACHE_BYTES else BYTE_FLOPS)
    if name in WINDOW_OPS:
        traffic *= WINDOW_FACTOR
    return OP_FLOPS + max(flops, traffic)


def _in_channels(name: str, args: tuple[Any, ...]) -> int:
    """Input channels per group of a convolution call: dim 1 of its weight (the second
    argument; the third of ``convolution_backward``)."""
    if name not in _CONVS:
        return 0
    weight = args[2] if name == "convolution_backward" else args[1]
    return int(weight.shape[1]) if isinstance(weight, torch.Tensor) and weight.dim() > 1 else 0


def step_charges(ep: torch.export.ExportedProgram, inputs: list[torch.Tensor]
                 ) -> tuple[int, int]:
    """``(operations, operator calls)`` of one step: the program interpreted on fake
    tensors, each call's FLOPs counted on its own."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    total = calls = 0

    class Charging(torch.fx.Interpreter):
        def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
            nonlocal total, calls
            if not isinstance(target, torch._ops.OpOverload):
                return super().call_function(target, args, kwargs)
            with FlopCounterMode(display=False) as counter:
                out = super().call_function(target, args, kwargs)
            name = target._opname
            moved = tensor_bytes([out, *args, *kwargs.values()])
            total += call_charge(name, int(counter.get_total_flops()),
                                 0 if name in _VIEWS else moved, _in_channels(name, args))
            calls += 1
            return out

    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fakes = [mode.from_tensor(t) for t in inputs]
            Charging(ep.module()).run(*fakes)
        return total, calls
    except WorkRefused:
        raise
    except Exception as e:  # the counter or a fake kernel cannot handle the program
        raise WorkRefused("program-failed", "the FLOP counter could not run the program "
                          f"on fake tensors: {type(e).__name__}: {str(e)[:200]}") from None


def estimate_loaded(ep: torch.export.ExportedProgram, inputs: list[torch.Tensor],
                    steps: int) -> Estimate:
    """The estimate of a loaded, checked program on ``inputs`` (module docstring)."""
    per_step, calls = step_charges(ep, inputs)
    flops = per_step * steps
    state = tensor_bytes([*ep.state_dict.values(), *ep.constants.values()])
    compute = units(flops)
    return Estimate(flops=flops, units=compute,
                    memory_mb=mebibytes(state + tensor_bytes(inputs)
                                        + peak_bytes(ep)),
                    max_runtime_ms=runtime_bound_ms(compute), ops=calls)


__all__ = ["OPS_PER_UNIT", "Estimate", "estimate_loaded", "runtime_bound_ms"]
