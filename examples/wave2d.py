"""Example user program: the 2D wave equation on a periodic grid, one leapfrog step per
program step.

State ``(u, v)``: displacement and velocity. A step: ``v += c^2 dt^2/dx^2 * laplacian(u)``
(five-point stencil with ``torch.roll``), ``u += v``. ``carry = 2``; the coefficient is
the third input, unchanged. float64 and exact digests (``mantissa_bits = 0``): the
replicas must then share a device class.

    python examples/wave2d.py [OUT_DIR] [--submit]
"""

from __future__ import annotations

import torch
from example_common import Example, arguments, main


class WaveStep(torch.nn.Module):
    """One leapfrog step of u_tt = c^2 laplacian(u)."""

    def forward(self, u: torch.Tensor, v: torch.Tensor,
                coeff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lap = (torch.roll(u, 1, 0) + torch.roll(u, -1, 0) + torch.roll(u, 1, 1)
               + torch.roll(u, -1, 1) - 4 * u)
        v = v + coeff * lap
        return u + v, v


def build(grid: int = 64, steps: int = 100) -> Example:
    """A Gaussian bump at rest in the middle of the grid; Courant number 0.5."""
    x = torch.arange(grid, dtype=torch.float64) - grid / 2
    u = torch.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (grid / 16) ** 2)
    inputs = (u, torch.zeros_like(u), torch.tensor(0.25, dtype=torch.float64))
    ep = torch.export.export(WaveStep(), inputs)
    return Example(ep=ep, inputs=inputs, steps=steps, carry=2, mantissa_bits=0)


if __name__ == "__main__":
    main("wave2d", build(), arguments(__doc__ or "").parse_args())
