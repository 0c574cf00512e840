"""A user program's price from its graph (``workloads.program_cost``): the roofline per call."""

from __future__ import annotations

import torch

from workloads.program_cost import (
    BYTE_FLOPS,
    CACHE_BYTES,
    CACHED_BYTE_FLOPS,
    CONV_LANES,
    OP_FLOPS,
    WINDOW_FACTOR,
    call_charge,
    step_charges,
)


def charged(module: torch.nn.Module, *inputs: torch.Tensor) -> tuple[int, int]:
    """``(operations, calls)`` of one step of ``module`` exported on ``inputs``."""
    ep = torch.export.export(module, inputs)
    return step_charges(ep, list(inputs))


class Conv(torch.nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class MatMul(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b


class Pool(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.max_pool2d(x, 2)


class Relu(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)


def test_a_large_matmul_is_charged_its_flops_and_one_call() -> None:
    a, b = torch.zeros(512, 256), torch.zeros(256, 384)
    ops, calls = charged(MatMul(), a, b)
    assert calls == 1
    assert ops == 2 * 512 * 256 * 384 + OP_FLOPS


def test_a_convolution_on_few_input_channels_costs_more_than_its_flops() -> None:
    # Same FLOPs (c_in x c_out = 96 both), different input channels per group.
    x3, x32 = torch.zeros(4, 3, 32, 32), torch.zeros(4, 32, 32, 32)
    narrow, _ = charged(Conv(3, 32), x3)
    wide, _ = charged(Conv(32, 3), x32)
    flops = 2 * 4 * 32 * 32 * 96 * 9
    assert narrow - OP_FLOPS == flops * CONV_LANES // 3
    assert wide - OP_FLOPS == flops  # 32 channels: the matmul rate, FLOPs over traffic
    assert narrow > 4 * wide


def test_pooling_costs_more_a_byte_than_an_elementwise_op() -> None:
    x = torch.zeros(8, 16, 32, 32)
    pool, _ = charged(Pool(), x)
    relu, _ = charged(Relu(), x)
    size = x.numel() * 4
    assert relu == OP_FLOPS + 2 * size * CACHED_BYTE_FLOPS
    assert pool == OP_FLOPS + (size + size // 4) * CACHED_BYTE_FLOPS * WINDOW_FACTOR


def test_operands_past_the_cache_cost_more_a_byte() -> None:
    small, large = CACHE_BYTES, CACHE_BYTES + 1
    assert call_charge("add", 0, small) == OP_FLOPS + small * CACHED_BYTE_FLOPS
    assert call_charge("add", 0, large) == OP_FLOPS + large * BYTE_FLOPS
    # A call is charged the larger of its FLOPs and its traffic, not their sum.
    assert call_charge("mm", 10**12, large) == OP_FLOPS + 10**12
    assert call_charge("view", 0, large) == OP_FLOPS
