"""Modules whose layers are parametrized (``torch.nn.utils.parametrize``: ``weight_norm``,
``spectral_norm``, custom ones) or pruned (``torch.nn.utils.prune``): the fused paths read
parameters straight from ``_parameters`` for speed, and must step aside where a tensor is
computed on access instead (they raised ``KeyError`` or read a BatchNorm's computed weight as
absent); pruning's weight is recomputed in the layer's forward pre-hook, which the modules
run themselves (they never call the layer). Oracles: in inference the module with the
computed tensors stored as plain parameters; in training the module under
``spatialattn.ops.decomposed()`` (attribute access, plain PyTorch)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

from spatialattn import CBAM, PointwiseSpatialAttention, SpatialAttention, ops

from ._references import randomize_


class _Scaled(nn.Module):
    """A parametrization: the stored tensor times 1.5."""

    def forward(self, t):
        return t * 1.5


def _sam_weight_norm():
    m = randomize_(SpatialAttention(16, bias=True))
    weight_norm(m.conv)
    return m


def _sam_bn_weight():
    m = randomize_(SpatialAttention(16))
    parametrize.register_parametrization(m.bn, "weight", _Scaled())
    return m


def _sam_bias():
    m = randomize_(SpatialAttention(16, bias=True))
    parametrize.register_parametrization(m.conv, "bias", _Scaled())
    return m


def _cbam_spectral():
    m = randomize_(CBAM(16))
    spectral_norm(m.channel.fc1)
    weight_norm(m.spatial.conv)
    return m


def _cbam_fc2_bias():
    m = randomize_(CBAM(16))
    parametrize.register_parametrization(m.channel.fc2, "bias", _Scaled())
    return m


def _pointwise_weight_norm():
    m = randomize_(PointwiseSpatialAttention(16))
    weight_norm(m.conv)
    return m


def _sam_pruned():
    m = randomize_(SpatialAttention(16))
    prune.l1_unstructured(m.conv, "weight", amount=0.5)
    return m


CASES = {
    "sam_weight_norm": _sam_weight_norm,
    "sam_bn_weight": _sam_bn_weight,
    "sam_bias": _sam_bias,
    "cbam_spectral_and_weight_norm": _cbam_spectral,
    "cbam_fc2_bias": _cbam_fc2_bias,
    "pointwise_weight_norm": _pointwise_weight_norm,
    "sam_pruned": _sam_pruned,
}


def _built(case: str, halve_stored: bool = False) -> nn.Module:
    torch.manual_seed(0)  # (spectral_norm starts its power iteration from random vectors)
    m = CASES[case]().eval()
    if halve_stored:  # a change of what the parametrizations compute from
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "parametrizations" in name or name.endswith("_orig"):
                    p.mul_(0.5)
    return m


def _baked(case: str, halve_stored: bool = False) -> nn.Module:
    """The same module with every computed tensor stored as a plain parameter."""
    m = _built(case, halve_stored)
    for layer in list(m.modules()):
        if parametrize.is_parametrized(layer):
            for name in list(layer.parametrizations):
                parametrize.remove_parametrizations(layer, name, leave_parametrized=True)
        if prune.is_pruned(layer) and hasattr(layer, "weight_orig"):
            prune.remove(layer, "weight")
    return m


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_inference_uses_the_computed_parameters(case, layout):
    x = torch.randn(3, 16, 9, 11, generator=torch.Generator().manual_seed(1))
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    m = _built(case)
    with torch.no_grad():
        want = _baked(case)(x)
        for _ in range(2):  # the second call through any cached inference plan
            torch.testing.assert_close(m(x), want, rtol=1e-6, atol=1e-6)
        stored = [p for name, p in m.named_parameters() if "parametrizations" in name or name.endswith("_orig")]
        assert stored
        for p in stored:  # a change of what the computed tensors come from: seen at the next call
            p.mul_(0.5)
        torch.testing.assert_close(m(x), _baked(case, halve_stored=True)(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_gradients_reach_the_parametrizations(case):
    torch.manual_seed(0)  # (spectral_norm starts its power iteration from random vectors)
    m = CASES[case]().train()
    torch.manual_seed(0)
    ref = CASES[case]().train()  # (a pruned module cannot be deep-copied)
    x = torch.randn(3, 16, 9, 11)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    m(x1).square().sum().backward()
    with ops.decomposed():
        ref(x2).square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    grads = dict(ref.named_parameters())
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        # (sums over every pixel, in another order than the plain path's: float32 rounding)
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=2e-5, msg=lambda s: f"{name}: {s}")
    buffers = dict(ref.named_buffers())
    for name, b in m.named_buffers():
        torch.testing.assert_close(b, buffers[name], rtol=1e-6, atol=1e-7, msg=lambda s: f"{name}: {s}")


class _Masked(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, t):
        return t * self.mask


@pytest.mark.parametrize("kind", ["sam", "cbam", "pointwise"])
def test_pruned_layers_train_like_a_masking_parametrization(kind):
    # prune's weight = weight_orig * mask is recomputed in the layer's forward pre-hook, which
    # the modules run themselves (they never call the layer); before, the second step failed
    def build():
        torch.manual_seed(0)
        m = {"sam": lambda: SpatialAttention(16), "cbam": lambda: CBAM(16, reduction=4),
             "pointwise": lambda: PointwiseSpatialAttention(16)}[kind]()
        return randomize_(m).train()

    pruned, masked = build(), build()
    layers = {"sam": ["conv"], "cbam": ["channel.fc1", "spatial.conv"], "pointwise": ["conv"]}[kind]
    for name in layers:
        prune.l1_unstructured(pruned.get_submodule(name), "weight", amount=0.4)
        parametrize.register_parametrization(
            masked.get_submodule(name), "weight", _Masked(pruned.get_submodule(name).weight_mask.clone()))
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (pruned, masked)]
    g = torch.Generator().manual_seed(2)
    for step in range(3):
        x = torch.randn(2, 16, 7, 9, generator=g)
        for m, opt in zip((pruned, masked), opts):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for name in layers:
        a, b = pruned.get_submodule(name), masked.get_submodule(name)
        torch.testing.assert_close(a.weight_orig, b.parametrizations.weight.original, rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 16, 7, 9, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(pruned.eval()(x), masked.eval()(x), rtol=1e-5, atol=1e-6)
