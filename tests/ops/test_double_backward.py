"""Double backward (``create_graph=True``) through the attention layers.

The fused kernels' backward is first order only: differentiating through it a second time
raises an error that names the way out, :func:`spatialattn.ops.decomposed`, under which the
plain PyTorch ops run and second-order gradients are exact (gradgradcheck).
"""
from __future__ import annotations

import pytest
import torch

import spatialattn as sa
from spatialattn import ops

from ..nn._pure import as_function


def _module(kind: str, training: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    m = sa.SpatialAttention(8) if kind == "sam" else sa.CBAM(8, reduction=2)
    return m.double().train(training)


@pytest.mark.parametrize("kind", ["sam", "cbam"])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("squared", [False, True])
def test_second_differentiation_through_the_kernels_raises(kind, training, squared):
    """Whether or not the upstream gradient itself requires grad (``y.sum()``: it does not,
    and ``once_differentiable`` would have returned constants, losing the second-order terms
    without a word), differentiating the first-order gradient raises and names the way out."""
    m = _module(kind, training)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64, requires_grad=True)
    y = m(x)
    (gx,) = torch.autograd.grad(y.square().sum() if squared else y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"first order only.*decomposed\(\)"):
        torch.autograd.grad(gx.square().sum(), x)


@pytest.mark.parametrize("kind", ["sam", "cbam"])
def test_create_graph_alone_gives_the_first_order_gradients(kind):
    """``create_graph=True`` without a second differentiation: the same gradients."""
    m = _module(kind, False)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad(m(x).square().sum(), x)[0]
    got = torch.autograd.grad(m(x).square().sum(), x, create_graph=True)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["sam", "cbam"])
@pytest.mark.parametrize("training", [False, True])
def test_decomposed_gives_exact_second_order_gradients(kind, training):
    f, params = as_function(_module(kind, training))
    x = torch.randn(2, 8, 4, 5, dtype=torch.float64, requires_grad=True)
    with ops.decomposed():
        assert ops._torch_ops_only()
        assert torch.autograd.gradgradcheck(f, (x, *params))
    assert not ops._torch_ops_only()


def test_decomposed_matches_the_kernels_to_first_order():
    """The same values and first-order gradients inside and outside the block (a gradient
    penalty computed either way agrees on its first-order part)."""
    m = _module("cbam", True)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64, requires_grad=True)
    y = m(x)
    g = torch.autograd.grad(y.square().sum(), x)[0]
    m2 = _module("cbam", True)
    with ops.decomposed():
        y2 = m2(x)
    g2 = torch.autograd.grad(y2.square().sum(), x)[0]
    torch.testing.assert_close(y2, y)
    torch.testing.assert_close(g2, g)


@pytest.mark.parametrize("kind", ["sam", "cbam"])
def test_second_differentiation_through_the_custom_ops_raises(monkeypatch, kind):
    """The same message where the custom ops run in eager mode (under a dispatch mode, say):
    their backward ops had no autograd formula, and torch's error did not say what to do."""
    monkeypatch.setattr(ops, "_fast_device", lambda x: "op")
    m = _module(kind, True)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(m(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"first order only.*decomposed\(\)"):
        torch.autograd.grad(gx.square().sum(), x)
