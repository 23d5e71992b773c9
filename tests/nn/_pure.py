"""A module as a pure function of its input and parameters, for gradcheck / gradgradcheck."""
from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch.func import functional_call


def as_function(m: torch.nn.Module) -> Tuple[Callable[..., torch.Tensor], Tuple[torch.Tensor, ...]]:
    """``(f, params)``: ``f(x, *params)`` runs ``m`` with those parameters and a fresh copy of
    its buffers at every call (a training BatchNorm updates them, and gradcheck calls ``f``
    many times); ``params`` are leaf copies of ``m``'s parameters that require grad."""
    names = [k for k, _ in m.named_parameters()]
    buffers = {k: v.clone() for k, v in m.named_buffers()}

    def f(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return functional_call(m, (dict(zip(names, params)), {k: v.clone() for k, v in buffers.items()}), (x,))

    return f, tuple(p.detach().clone().requires_grad_() for p in m.parameters())
