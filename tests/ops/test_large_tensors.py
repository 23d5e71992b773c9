"""Tensors of more than 2**31 elements through the C++ kernels (64-bit offsets).

Opt-in: each case holds about 13 GiB (a bfloat16 ``x``, ``y`` and ``grad_x`` of 4.3 GB each)
and takes 10-20 s on 2 cores, so the tests run only with ``SPATIALATTN_LARGE_TESTS=1`` and
18 GiB of available memory. Their GPU counterpart is ``test_cuda.py``'s
``test_tensor_over_2_31_elements``.
"""
from __future__ import annotations

import os

import pytest
import torch

from spatialattn import CBAM, ops

pytestmark = pytest.mark.usefixtures("cpp_module")  # (tests/ops/conftest.py: skipped without the extension)

SHAPE = (2049, 64, 128, 128)  # 2.15e9 elements: the last images lie past 2**31


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@pytest.fixture(autouse=True)
def opted_in():
    if os.environ.get("SPATIALATTN_LARGE_TESTS") != "1":
        pytest.skip("opt-in: SPATIALATTN_LARGE_TESTS=1 (about 13 GiB of memory per case)")
    if _available_bytes() < 18 * 2**30:
        pytest.skip(f"needs 18 GiB of available memory, {_available_bytes() / 2**30:.1f} GiB available")


def _large_x(layout: str) -> torch.Tensor:
    """Ones, except the last two images (random): wrong offsets would read ones or fault."""
    x = torch.empty(SHAPE, dtype=torch.bfloat16)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    assert x.numel() > 2**31
    x[:-2].fill_(1.0)
    x[-2:].normal_(generator=torch.Generator().manual_seed(3))
    return x.requires_grad_()


def _check_last_images(fn, layout):
    x = _large_x(layout)
    y = fn(x)
    (gx,) = torch.autograd.grad(y, x, y.detach())  # y as the upstream gradient: no fourth tensor
    tail = x.detach()[-2:].clone().requires_grad_()
    y_tail = fn(tail)
    (g_tail,) = torch.autograd.grad(y_tail, tail, y_tail.detach())
    # the same kernels on the same images: the same bits
    torch.testing.assert_close(y[-2:], y_tail, rtol=0, atol=0)
    torch.testing.assert_close(gx[-2:], g_tail, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fused_sam_past_2_31_elements(layout):
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(1, 2, 7, 7, generator=g) * 0.2, torch.randn(1, generator=g)
    _check_last_images(lambda x: ops.spatial_attention_fused(x, weight, bias), layout)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cbam_past_2_31_elements(layout):
    torch.manual_seed(0)
    module = CBAM(SHAPE[1]).eval()  # eval: per-image results (a training BatchNorm mixes the batch)
    _check_last_images(module, layout)
