"""The modules under torch.func transforms (grad / vmap through functional_call) and forward-mode AD.

Our autograd Functions and custom ops have no functorch rules; inside a transform the ops
take the plain PyTorch decomposition, so gradients and batching come out as in eager mode.
"""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap

import spatialattn as sa
from spatialattn import ops

from ._pure import as_function


def _module(kind: str, mode: str) -> torch.nn.Module:
    torch.manual_seed(0)
    m = sa.SpatialAttention(8) if kind == "sam" else sa.CBAM(8, reduction=4, preset="official")
    return m.train() if mode == "train" else m.eval()


@pytest.mark.parametrize("kind", ["sam", "cbam"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_func_grad_matches_autograd(kind, mode):
    m = _module(kind, mode).double()
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    params = {k: v.detach().clone() for k, v in m.named_parameters()}
    buffers = {k: v.clone() for k, v in m.named_buffers()}  # training BatchNorm updates them

    def loss(p, b, t):
        return (functional_call(m, (p, b), (t,)) ** 2).sum()

    g_params = grad(loss)(params, {k: v.clone() for k, v in buffers.items()}, x)
    g_x = grad(loss, argnums=2)(params, {k: v.clone() for k, v in buffers.items()}, x)
    xr = x.clone().requires_grad_()
    (m(xr) ** 2).sum().backward()  # eager autograd on the fused kernels
    torch.testing.assert_close(g_x, xr.grad)
    for name, p in m.named_parameters():
        torch.testing.assert_close(g_params[name], p.grad, msg=name)


@pytest.mark.parametrize("kind", ["sam", "cbam"])
def test_vmap_over_images_matches_batch(kind):
    m = _module(kind, "eval")
    x = torch.randn(3, 8, 7, 5)
    with torch.no_grad():
        per_image = vmap(lambda t: m(t.unsqueeze(0)).squeeze(0))(x)
        torch.testing.assert_close(per_image, m(x), rtol=1e-6, atol=1e-6)


def test_transforms_do_not_leave_the_fast_path_off():
    x = torch.randn(1, 4, 3, 3)
    assert not ops._torch_ops_only()
    seen = []
    vmap(lambda t: (seen.append(ops._torch_ops_only()), t)[1])(x)
    assert seen == [True] and not ops._torch_ops_only()


@pytest.mark.parametrize("kind", ["sam", "cbam"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_forward_mode_ad(kind, mode):
    """Forward-mode AD (``torch.autograd.forward_ad`` dual tensors, not a ``torch.func``
    transform): the eager Functions have no ``jvp`` and had raised NotImplementedError; inside
    a dual level the decomposition runs. Checked against finite differences by gradcheck
    (float64, forward and reverse mode), input and parameters."""
    f, params = as_function(_module(kind, mode).double())
    x = torch.randn(2, 8, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, *params), check_forward_ad=True, check_backward_ad=True,
                                    check_batched_grad=False)
