"""Example user program: training an MLP, one SGD-with-momentum step per program step.

The program maps ``(w1, b1, w2, b2, m_w1, m_b1, m_w2, m_b2, x, y)`` to
``(w1', b1', w2', b2', m_w1', ..., loss)``; the task iterates it ``steps`` times with
``carry = 8`` (the parameters and momenta feed back; the batch stays). The gradient
comes from ``torch.func.grad`` over ``torch.func.functional_call``, traced to plain ATen
ops by ``make_fx`` (forward and backward in one graph), then exported.

    python examples/mlp_train.py [OUT_DIR] [--submit]
"""

from __future__ import annotations

import torch
from example_common import Example, arguments, main
from torch.fx.experimental.proxy_tensor import make_fx

LR = 0.1
MOMENTUM = 0.9


class Mlp(torch.nn.Module):
    """in -> hidden (ReLU) -> classes."""

    def __init__(self, n_in: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(n_in, hidden)
        self.l2 = torch.nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(x)))


_NAMES = ("l1.weight", "l1.bias", "l2.weight", "l2.bias")


def train_step(model: Mlp, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One step: params and momenta in, updated params and momenta and the loss out."""
    params = dict(zip(_NAMES, tensors[:4], strict=True))
    moms, x, y = tensors[4:8], tensors[8], tensors[9]

    def loss_of(p: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = torch.func.functional_call(model, p, (x,))
        return torch.nn.functional.cross_entropy(logits, y)

    loss = loss_of(params)
    grads = torch.func.grad(loss_of)(params)
    new_moms = [MOMENTUM * m + grads[n] for m, n in zip(moms, _NAMES, strict=True)]
    new_params = [params[n] - LR * m for n, m in zip(_NAMES, new_moms, strict=True)]
    return (*new_params, *new_moms, loss)


def build(n: int = 256, n_in: int = 32, hidden: int = 64, classes: int = 4,
          steps: int = 50) -> Example:
    """The exported training step and seeded data: two-moons-like labelled clusters."""
    torch.manual_seed(0)
    model = Mlp(n_in, hidden, classes)
    gen = torch.Generator().manual_seed(1)
    centres = torch.randn(classes, n_in, generator=gen) * 2
    y = torch.randint(0, classes, (n,), generator=gen)
    x = centres[y] + torch.randn(n, n_in, generator=gen)
    params = [model.get_parameter(name).detach().clone() for name in _NAMES]
    inputs = (*params, *(torch.zeros_like(p) for p in params), x, y)
    graph = make_fx(lambda *t: train_step(model, *t))(*inputs)
    ep = torch.export.export(graph, inputs)
    return Example(ep=ep, inputs=inputs, steps=steps, carry=8, mantissa_bits=20)


if __name__ == "__main__":
    main("mlp_train", build(), arguments(__doc__ or "").parse_args())
