"""Example user program: a small CNN classifying a batch of 32x32 RGB images (inference).

One step, nothing carried; float32 outputs rounded to 16 mantissa bits, so replicas on
different device classes agree (``mantissa_bits`` > 0 lets the task run anywhere).

    python examples/cnn_infer.py [OUT_DIR] [--submit]
"""

from __future__ import annotations

import torch
from example_common import Example, arguments, main


class SmallCnn(torch.nn.Module):
    """conv-relu-pool x2, global average pool, linear, softmax."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, width, 3, padding=1)
        self.c2 = torch.nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = torch.nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        h = torch.nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
        h = torch.nn.functional.max_pool2d(torch.relu(self.c2(h)), 2)
        return (torch.softmax(self.fc(h.mean(dim=(2, 3))), dim=-1),)


def build(batch: int = 8, width: int = 8, size: int = 32) -> Example:
    """The exported CNN (seeded weights) and a seeded batch of images."""
    torch.manual_seed(0)
    model = SmallCnn(width).eval()
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    ep = torch.export.export(model, (images,))
    return Example(ep=ep, inputs=(images,), steps=1, carry=0, mantissa_bits=16)


if __name__ == "__main__":
    main("cnn_infer", build(), arguments(__doc__ or "").parse_args())
