"""The modules under torch's dispatch modes and on the meta device: shape inference with fake
tensors, FLOP counting, deferred initialisation. The kernels must not be called directly
there (a fake tensor has no data); the custom ops take over (they pass through the mode and
have fake implementations)."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from spatialattn import ops
from spatialattn.nn import CBAM, PointwiseSpatialAttention, SpatialAttention


BUILD = {  # a fresh module of each kind per test
    "sam": lambda: SpatialAttention(16),
    "sam-3x3-no-norm": lambda: SpatialAttention(16, kernel_size=3, norm=None, bias=True),
    "cbam": lambda: CBAM(16, reduction=4),
    "cbam-timm-parallel": lambda: CBAM(16, reduction=4, preset="timm", arrangement="parallel"),
    "pointwise": lambda: PointwiseSpatialAttention(16),
}
MODULES = sorted(BUILD)


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fake_tensor_shape_inference(name, training, channels_last):
    """Forward (and backward in training) on fake tensors gives the eager output's shape,
    dtype and strides, and reads no data (the C++ kernels had been handed the fake tensors:
    "data is not allocated yet")."""
    torch.manual_seed(0)
    m = BUILD[name]().train(training)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 16, 9, 7).contiguous(memory_format=fmt)
    want = m(x.clone().requires_grad_(training))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx = mode.from_tensor(x).requires_grad_(training)
        y = m(fx)
        if training:
            y.sum().backward()
            assert fx.grad is not None and fx.grad.shape == x.shape
    assert type(y).__name__ == "FakeTensor"
    assert (y.shape, y.dtype) == (want.shape, want.dtype)
    assert y.stride() == want.stride()


@pytest.mark.parametrize("name", MODULES)
def test_meta_device(name):
    """Built and run on the meta device (deferred initialisation, shape checks): asking
    whether autocast is on for "meta" had raised in every module."""
    m = BUILD[name]().to("meta")
    for training in (False, True):
        y = m.train(training)(torch.empty(2, 16, 9, 7, device="meta"))
        assert y.device.type == "meta" and y.shape == (2, 16, 9, 7)


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("training", [False, True])
def test_flop_counter_counts_as_the_plain_decomposition(monkeypatch, name, training):
    """FlopCounterMode sees the custom ops (not the unseen direct kernel calls, which counted
    nothing) and counts them as the plain-PyTorch decomposition's convolutions."""
    torch.manual_seed(0)
    m = BUILD[name]().train(training)
    x = torch.randn(2, 16, 9, 7)

    def count():
        xg = x.clone().requires_grad_()
        with FlopCounterMode(display=False) as counter:
            m(xg).sum().backward()
        return counter.get_total_flops()

    got = count()
    monkeypatch.setattr(ops, "_torch_ops_only", lambda: True)  # the reference decomposition
    want = count()
    assert got == want > 0


def test_kernels_are_not_handed_a_tensor_subclass():
    """A fake tensor used outside its mode (or any tensor subclass) takes the custom ops."""
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(torch.randn(2, 16, 9, 7))
        w = mode.from_tensor(torch.randn(1, 2, 7, 7))
    assert ops._fast_device(fx) == "op"
    with mode:
        y = ops.spatial_attention_fused(fx, w)
    assert type(y).__name__ == "FakeTensor" and y.shape == fx.shape
