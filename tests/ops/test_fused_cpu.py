"""Fused SAM kernels (C++ on CPU, custom ops) against the plain PyTorch reference."""
from __future__ import annotations

import contextlib
import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from spatialattn import ops
from spatialattn.ops import _cpp, reference
from spatialattn.ops import _library as lib

from ._autograd_graph import node_names
from ._fake_layouts import LAYOUTS, check_custom_op_layouts, check_saved_maps_in_any_layout
from ._sam_reference import ref_sam

ORDERS = [("max", "mean"), ("mean", "max"), ("max",), ("mean",)]


pytestmark = pytest.mark.usefixtures("cpp_module")  # (tests/ops/conftest.py: skipped without the extension)


def make_x(shape, layout, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "noncontig":
        n, c, h, w = shape
        x = torch.randn(n, c, h, 2 * w, generator=g, dtype=dtype)[..., ::2]
        assert x.numel() == 0 or not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
        return x
    x = torch.randn(shape, generator=g, dtype=dtype)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("with_scale", [False, True])
def test_forward_matches_reference(layout, dtype, order, with_scale):
    x = make_x((2, 37, 9, 11), layout, dtype)
    assert ops.backend(x) == "cpp"
    s = torch.rand(2, 37, 1, 1, dtype=dtype) if with_scale else None
    torch.testing.assert_close(ops.channel_pool(x, order, channel_scale=s), reference.channel_pool(x, order, s), **TOL[dtype])
    a = torch.rand(2, 1, 9, 11, dtype=dtype)
    # the product is elementwise: bit-identical to the reference
    torch.testing.assert_close(ops.gate_multiply(x, a, s), reference.gate_multiply(x, a, s), rtol=0, atol=0)
    w = torch.randn(1, len(order), 7, 7, dtype=dtype)
    b = torch.randn(1, dtype=dtype)
    y, attn = ops.spatial_attention_fused(x, w, b, order=order, channel_scale=s, return_attention=True)
    y_ref, attn_ref = ref_sam(x, w, b, order, 1, s)
    torch.testing.assert_close(attn, attn_ref, **TOL[dtype])
    # the gate differs from the reference only by the conv's summation order; given the
    # gate, the product is exact, and the output stays within the gate's error times |x|
    torch.testing.assert_close(y, reference.gate_multiply(x, attn, s), rtol=0, atol=0)
    torch.testing.assert_close(y, y_ref, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * 8)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fused_norm_dilation_kernel3(layout):
    x = make_x((3, 20, 12, 10), layout)
    w = torch.randn(1, 2, 3, 3)
    bn = torch.nn.BatchNorm2d(1).eval()
    with torch.no_grad():
        bn.running_mean.fill_(0.3), bn.running_var.fill_(2.0), bn.weight.fill_(1.5), bn.bias.fill_(-0.2)
    ns, nsh = ops.batchnorm_affine(bn)
    y = ops.spatial_attention_fused(x, w, None, order=("mean", "max"), dilation=2, norm_scale=ns, norm_shift=nsh)
    pooled = reference.channel_pool(x, ("mean", "max"))
    y_ref = x * torch.sigmoid(bn(F.conv2d(pooled, w, padding=2, dilation=2)))
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    assert ops.batchnorm_affine(torch.nn.BatchNorm2d(1).train()) is None


def _affine_reference(bn):
    inv = 1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
    scale = bn.weight.double() * inv
    return scale, bn.bias.double() - bn.running_mean.double() * scale


def test_batchnorm_affine_cache_follows_every_change():
    # without autograd the pair is cached on the module; each way of changing the norm
    # must show in the next call
    bn = torch.nn.BatchNorm2d(1).eval()

    def check():
        with torch.no_grad():
            ns, nsh = ops.batchnorm_affine(bn)
        rs, rsh = _affine_reference(bn)
        torch.testing.assert_close(ns.double(), rs, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(nsh.double(), rsh, rtol=1e-6, atol=1e-7)
        return ns, nsh

    with torch.no_grad():
        first = ops.batchnorm_affine(bn)
        assert ops.batchnorm_affine(bn)[0] is first[0]  # cached
        bn.running_mean.fill_(0.3)  # in place (version counter)
    check()
    with torch.no_grad():
        bn.running_var.mul_(4.0)
        bn.weight.fill_(1.5)
        bn.bias.add_(-0.2)
    check()
    bn.load_state_dict({k: v * 0.5 + 0.1 for k, v in bn.state_dict().items() if v.is_floating_point()}, strict=False)
    check()
    bn.running_var = torch.full((1,), 9.0)  # a new tensor object
    check()
    bn.eps = 0.5
    check()
    bn.weight.data = torch.full((1,), 3.0)  # same object and version, new storage (as .to(device) does)
    check()
    # two swaps between calls: the second storage could take the address of the one the cache
    # was made from (glibc did not hand it back in practice here; the cache holds it anyway)
    for v in (2.0, 5.0, 0.5, 7.0):
        bn.running_var.data = torch.full((1,), v)
        bn.running_var.data = torch.full((1,), v + 1.0)
        check()
    bn.double()  # same parameter objects, new storage
    ns, _ = check()
    assert ns.dtype == torch.float64
    with torch.no_grad():
        stale = ops.batchnorm_affine(bn)[0]
        stale.add_(1.0)  # a caller writing into the returned pair invalidates it
    check()
    # with autograd the pair is computed afresh and carries the gradient to gamma / beta
    ns, nsh = ops.batchnorm_affine(bn)
    assert ns.requires_grad and nsh.requires_grad
    (ns + nsh).sum().backward()
    inv = 1.0 / torch.sqrt(bn.running_var + bn.eps)  # d(scale + shift)/d gamma = inv * (1 - mean)
    torch.testing.assert_close(bn.weight.grad, inv * (1 - bn.running_mean))
    torch.testing.assert_close(bn.bias.grad, torch.ones_like(bn.bias))


@pytest.mark.parametrize("kind", ["sam", "cbam"])
def test_eval_module_in_inference_mode_then_with_input_gradient(kind):
    # the first call (inference mode) fills the affine cache; a later call that needs the
    # gradient w.r.t. the input (saliency on a frozen model) saves the cached pair for backward
    from spatialattn import CBAM, SpatialAttention

    torch.manual_seed(0)
    m = (SpatialAttention(8) if kind == "sam" else CBAM(8, reduction=4)).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 8, 5, 6)
    with torch.inference_mode():
        y_inf = m(x)
        torch.testing.assert_close(m(x), y_inf, rtol=0, atol=0)  # cache hit in inference mode
    xr = x.clone().requires_grad_()
    y = m(xr)
    torch.testing.assert_close(y.detach(), y_inf, rtol=0, atol=0)
    y.sum().backward()
    xd = x.double().requires_grad_()
    m.double()(xd).sum().backward()  # reference: float64, the pair computed afresh
    torch.testing.assert_close(xr.grad, xd.grad.float(), rtol=1e-4, atol=1e-5)


def test_batchnorm_affine_of_inference_tensors():
    with torch.inference_mode():  # inference tensors have no version counter: no cache
        bn = torch.nn.BatchNorm2d(1).eval()
        bn.running_mean.fill_(0.25)
        ns, nsh = ops.batchnorm_affine(bn)
        rs, rsh = _affine_reference(bn)
        torch.testing.assert_close(nsh.double(), rsh)
        bn.running_mean.fill_(-1.0)
        torch.testing.assert_close(ops.batchnorm_affine(bn)[1].double(), _affine_reference(bn)[1])


@pytest.mark.parametrize("shape", [(0, 8, 5, 5), (2, 8, 1, 1), (2, 8, 1, 9), (1, 1, 4, 4)])
def test_edge_shapes(shape):
    x = torch.randn(shape)
    w = torch.randn(1, 2, 7, 7)
    s = torch.rand(shape[0], shape[1], 1, 1)
    y, attn = ops.spatial_attention_fused(x, w, None, channel_scale=s, return_attention=True)
    y_ref, attn_ref = ref_sam(x, w, None, ("max", "mean"), 1, s)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(attn, attn_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ops.channel_pool(x, ("max", "mean")), reference.channel_pool(x))
    xr = x.clone().requires_grad_()
    ops.spatial_attention_fused(xr, w, None).sum().backward()
    xr2 = x.clone().requires_grad_()
    ref_sam(xr2, w, None, ("max", "mean"), 1, None)[0].sum().backward()
    torch.testing.assert_close(xr.grad, xr2.grad, rtol=1e-5, atol=1e-6)


def _gradcheck_inputs(layout, with_scale, order, seed=0):
    x = make_x((2, 5, 6, 7), layout, torch.float64, seed).detach().requires_grad_()
    s = torch.rand(2, 5, 1, 1, dtype=torch.float64, requires_grad=True) if with_scale else None
    w = torch.randn(1, len(order), 3, 3, dtype=torch.float64, requires_grad=True)
    return x, s, w


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("with_scale", [False, True])
def test_gradcheck_cpp(layout, order, with_scale):
    x, s, w = _gradcheck_inputs(layout, with_scale, order)
    b = torch.randn(1, dtype=torch.float64, requires_grad=True)
    ns = torch.rand(1, dtype=torch.float64, requires_grad=True) + 0.5
    nsh = torch.randn(1, dtype=torch.float64, requires_grad=True)
    a = torch.rand(2, 1, 6, 7, dtype=torch.float64, requires_grad=True)

    def sam(x, s, w, b, ns, nsh):  # both outputs, so the gradient through the map is checked too
        return ops.spatial_attention_fused(x, w, b, order=order, channel_scale=s, norm_scale=ns,
                                           norm_shift=nsh, return_attention=True)

    assert torch.autograd.gradcheck(sam, (x, s, w, b, ns, nsh), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x, s: ops.channel_pool(x, order, channel_scale=s), (x, s), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x, a, s: ops.gate_multiply(x, a, s), (x, a, s), fast_mode=True)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_float32_grads_match_reference(layout):
    x = make_x((2, 24, 9, 8), layout).requires_grad_()
    s = torch.rand(2, 24, 1, 1, requires_grad=True)
    w = torch.randn(1, 2, 7, 7, requires_grad=True)
    b = torch.randn(1, requires_grad=True)
    g = torch.randn(2, 24, 9, 8)
    y = ops.spatial_attention_fused(x, w, b, channel_scale=s)
    grads = torch.autograd.grad(y, (x, s, w, b), g)
    y_ref, _ = ref_sam(x, w, b, ("max", "mean"), 1, s)
    grads_ref = torch.autograd.grad(y_ref, (x, s, w, b), g)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_max_ties_split_evenly(layout):
    # every pixel has its max shared by several channels (integer-valued input)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 3, (2, 6, 5, 5), generator=g).double()
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    gp = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    got = torch.autograd.grad(ops.channel_pool(x, ("max", "mean")), x, gp)[0]
    want = torch.autograd.grad(reference.channel_pool(x, ("max", "mean")), x, gp)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # amax semantics: at a pixel with k tied maxima each one gets 1/k of the gradient
    xd = x.detach()
    ties = (xd == xd.amax(1, keepdim=True)).sum(1)
    assert (ties > 1).any()
    mask = xd == xd.amax(1, keepdim=True)
    expect_max_part = mask * gp[:, :1] / ties.unsqueeze(1)
    torch.testing.assert_close(got - gp[:, 1:] / 6, expect_max_part, rtol=1e-12, atol=1e-12)
    # and the whole SAM (max-pool path inside the fused backward)
    w = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    gy = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    got = torch.autograd.grad(ops.spatial_attention_fused(x, w), x, gy)[0]
    want = torch.autograd.grad(ref_sam(x, w, None, ("max", "mean"), 1, None)[0], x, gy)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_nan_propagates(layout):
    x = make_x((2, 40, 6, 6), layout)
    x[0, 7, 2, 3] = float("nan")
    x[1, :, 1, 1] = float("inf")
    x[1, 4, 1, 1] = -float("inf")
    pooled = ops.channel_pool(x, ("max", "mean"))
    ref = reference.channel_pool(x, ("max", "mean"))
    torch.testing.assert_close(pooled, ref, equal_nan=True)
    assert torch.isnan(pooled[0, :, 2, 3]).all()
    assert pooled[1, 0, 1, 1] == float("inf") and torch.isnan(pooled[1, 1, 1, 1])
    w = torch.randn(1, 2, 3, 3)
    y = ops.spatial_attention_fused(x, w)
    y_ref, _ = ref_sam(x, w, None, ("max", "mean"), 1, None)
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref)) and torch.isnan(y[0, :, 2, 3]).all()


@pytest.mark.parametrize("width", [7, 8, 9, 16, 17, 24, 25, 56])
@pytest.mark.parametrize("kernel", [(7, 1), (3, 2)])
def test_conv_rows_at_every_width(width, kernel):
    # the small-map conv works on 16-lane output vectors of two 256-bit halves in AVX2 builds
    # and leaves out a half past the row's end: widths on both sides of 8 and 16 columns
    # left in the last vector; 9 rows reach the 8-row sweep of 7x7 kernels and its remainder
    k, dil = kernel
    x = make_x((2, 6, 9, width), "nchw").requires_grad_()
    w = torch.randn(1, 2, k, k, requires_grad=True)
    g = torch.randn(2, 6, 9, width)
    y, attn = ops.spatial_attention_fused(x, w, dilation=dil, return_attention=True)
    # against float64: the kernels' float32 sums and torch's take other orders (the weight
    # gradient of the baseline build differed from torch's float32 one by 1.2e-5 at 7x25)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y_ref, attn_ref = ref_sam(xd, wd, None, ("max", "mean"), dil, None)
    torch.testing.assert_close(attn.double(), attn_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(y, (x, w), g), torch.autograd.grad(y_ref, (xd, wd), g.double())):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_nchw_pooling_nan_in_whole_vectors_and_in_the_rest():
    # the mean's division by C runs on whole vectors and then one pixel at a time; a NaN sum
    # sends its pixel to the scan for NaN in either part (35 pixels: 32 in vectors, 3 after)
    x = make_x((2, 5, 5, 7), "nchw")
    x[0, 3, 0, 2] = float("nan")  # pixel 2: in the first vector
    x[0, 1, 4, 5] = float("nan")  # pixel 33: after the last whole vector
    x[1, 0, 4, 6] = float("inf")  # pixel 34: inf and -inf make a NaN sum but a finite max
    x[1, 2, 4, 6] = -float("inf")
    pooled = ops.channel_pool(x, ("max", "mean"))
    torch.testing.assert_close(pooled, reference.channel_pool(x, ("max", "mean")), equal_nan=True)
    assert torch.isnan(pooled[0, :, 0, 2]).all() and torch.isnan(pooled[0, :, 4, 5]).all()
    assert pooled[1, 0, 4, 6] == float("inf") and torch.isnan(pooled[1, 1, 4, 6])
    assert not torch.isnan(pooled[0, :, 4, 4]).any()


def test_out_argument_and_no_grad_path():
    x = torch.randn(2, 16, 8, 8)
    w = torch.randn(1, 2, 7, 7)
    out = torch.empty_like(x)
    y = ops.spatial_attention_fused(x, w, out=out)
    assert y.data_ptr() == out.data_ptr()
    # against the exact (float64) result: the 98-term fp32 conv sums of weights ~ N(0, 1) are
    # within ~3e-6 of it in any summation order (torch's fp32 conv as much as ours), so a
    # 1e-6 comparison between two fp32 computations passes or fails by luck (5-11 of 200 seeds)
    y64 = ref_sam(x.double(), w.double(), None, ("max", "mean"), 1, None)[0]
    torch.testing.assert_close(y.double(), y64, rtol=1e-6, atol=4e-6)
    # an out= of other strides or dtype is refused by the kernels, naming what must match
    for bad in (torch.empty_like(x, memory_format=torch.channels_last), torch.empty_like(x, dtype=torch.float64)):
        with pytest.raises(RuntimeError, match="out= must have the shape, strides and dtype of x"):
            ops.spatial_attention_fused(x, w, out=bad)
    with pytest.raises(ValueError, match="out="):
        ops.spatial_attention_fused(x.requires_grad_(), w, out=out)


def test_unnormalised_pooling_order_is_refused():
    x = torch.randn(2, 8, 5, 5)
    for order in (("max", "avg"), ()):
        with pytest.raises(ValueError, match="expected one or more of 'max', 'mean'"):
            ops.spatial_attention_fused(x, torch.randn(1, max(1, len(order)), 7, 7), order=order)
        with pytest.raises(ValueError, match="expected one or more of 'max', 'mean'"):
            ops.channel_pool(x, order)


@pytest.mark.parametrize("x, error, message", [
    (torch.randn(8, 5, 5), ValueError, r"x: expected a 4-D tensor \[N, C, H, W\], got shape \(8, 5, 5\)"),
    (torch.randn(1, 2, 8, 5, 5), ValueError, r"x: expected a 4-D tensor \[N, C, H, W\], got shape \(1, 2, 8, 5, 5\)"),
    (torch.ones(2, 8, 5, 5, dtype=torch.int64), TypeError, r"x: expected a floating-point tensor, got torch.int64"),
    (torch.ones(2, 8, 5, 5, dtype=torch.bool), TypeError, r"x: expected a floating-point tensor, got torch.bool"),
])
def test_bad_x_is_refused_by_every_op(x, error, message):
    # the fused paths take 4-D floating-point tensors only, and the PyTorch fallbacks used to
    # fail deep inside torch (a conv asking for 2 channels) or, for channel_pool and
    # global_pool of a 3-D tensor, pool silently over the wrong dims
    w = torch.randn(1, 2, 7, 7)
    calls = {
        "spatial_attention_fused": lambda: ops.spatial_attention_fused(x, w),
        "spatial_attention_fused_batchnorm": lambda: ops.spatial_attention_fused_batchnorm(x, w, None, torch.nn.BatchNorm2d(1)),
        "channel_pool": lambda: ops.channel_pool(x),
        "global_pool": lambda: ops.global_pool(x),
        "with_global_pool": lambda: ops.with_global_pool(x, lambda t, p: (t,)),
    }
    for name, call in calls.items():
        with pytest.raises(error, match=message):
            call()
        with ops.decomposed():  # the plain-PyTorch route (export, checks) refuses it the same way
            with pytest.raises(error, match=message):
                call()


def test_out_partly_overlapping_x_is_refused():
    # an out= sharing some of x's memory would be written before x is read: refused (out=x,
    # the whole of it, is the in-place call)
    base = torch.randn(2 * 8 * 5 * 5 + 25)
    x, out = base[:400].view(2, 8, 5, 5), base[25:].view(2, 8, 5, 5)
    before = base.clone()
    with pytest.raises(RuntimeError, match="refer to a single memory location"):
        ops.spatial_attention_fused(x, torch.randn(1, 2, 7, 7), out=out)
    assert torch.equal(base, before)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("args, message", [
    (dict(weight=(1, 2, 4, 4)), r"kernel size must be odd to keep the map size, got 4x4"),
    (dict(weight=(1, 2, 7, 2)), r"kernel size must be odd to keep the map size, got 7x2"),
    (dict(weight=(2, 2, 7, 7)), r"weight must be \(1, 2, kh, kw\), got \[2, 2, 7, 7\]"),
    (dict(bias=(2,)), r"bias must have shape \(1,\), got \[2\]"),
    (dict(bias=()), r"bias must have shape \(1,\), got \[\]"),
    (dict(norm=(2,)), r"norm_scale must have shape \(1,\), got \[2\]"),
    (dict(dilation=0), r"dilation must be >= 1, got 0"),
    (dict(dilation=-2), r"dilation must be >= 1, got -2"),
])
def test_bad_small_map_arguments_are_refused(cpp_module, args, message, grad):
    # the kernels' own checks (ops is public too): an even kernel, a bias or norm of more than
    # one value, a dilation below 1 were taken before and gave a wrong map or a crash
    x = torch.randn(2, 8, 5, 5, requires_grad=grad)
    w = torch.randn(args.get("weight", (1, 2, 7, 7)))
    b = torch.randn(args["bias"]) if "bias" in args else None
    ns = torch.ones(args["norm"]) if "norm" in args else None
    nsh = torch.zeros(args["norm"]) if "norm" in args else None
    with pytest.raises(ValueError, match=message):
        ops.spatial_attention_fused(x, w, b, norm_scale=ns, norm_shift=nsh, dilation=args.get("dilation", 1))
    if ns is None:  # the training-BatchNorm op and CBAM inference in one call check the same
        with pytest.raises(ValueError, match=message):
            ops.spatial_attention_fused_batchnorm(x, w, b, torch.nn.BatchNorm2d(1), dilation=args.get("dilation", 1))
        for images in (x.detach(), x.detach()[:1]):  # whole images, and the one-region path of batch 1
            with pytest.raises(ValueError, match=message):
                cpp_module.cbam_forward(images, [1, 0], torch.randn(2, 8), None, torch.randn(8, 2), None, w, b,
                                        None, None, [0, 1], args.get("dilation", 1))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(3, 32, 9, 7), (1, 40, 13, 13)])
def test_in_place_output(cpp_module, layout, shape):
    # out=x (whole images, and the shared rows of a batch below the thread count): the same
    # bits as into a fresh tensor, and those within float32 rounding of the float64 result.
    # (Such an output is never streamed, use_stream's output_read; the store kind does not
    # change the bits, so no test here can see that choice.)
    x0 = make_x(shape, layout, seed=5)
    w = torch.randn(1, 2, 7, 7, generator=torch.Generator().manual_seed(6))
    attn = torch.rand(shape[0], 1, shape[2], shape[3], generator=torch.Generator().manual_seed(7))
    s = torch.rand(shape[0], shape[1], 1, 1, generator=torch.Generator().manual_seed(8)) + 0.5
    want = ops.spatial_attention_fused(x0, w, channel_scale=s)
    want_gate = cpp_module.gate_forward(x0, attn, None, None)
    x = x0.clone()
    y = ops.spatial_attention_fused(x, w, channel_scale=s, out=x)
    assert y.data_ptr() == x.data_ptr() and torch.equal(x, want)
    x = x0.clone()
    assert cpp_module.gate_forward(x, attn, None, x).data_ptr() == x.data_ptr()
    assert torch.equal(x, want_gate)
    y64 = ref_sam(x0.double(), w.double(), None, ("max", "mean"), 1, s.double())[0]
    torch.testing.assert_close(want.double(), y64, rtol=1e-6, atol=4e-6)
    torch.testing.assert_close(want_gate, x0 * attn)


@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (2, 40, 6, 5), (1, 40, 9, 4)])
@pytest.mark.parametrize("with_scale", [False, True])
def test_channels_last_product_streamed_and_unaligned(cpp_module, shape, with_scale):
    # the channels_last product over a run of pixels (C a multiple of 8): ordinary stores,
    # non-temporal ones from an aligned y, and the per-pixel path an unaligned y falls back to
    # when streaming all give the same bits, within float32 rounding of the float64 result
    x = make_x(shape, "channels_last", seed=3)
    w = torch.randn(1, 2, 7, 7, generator=torch.Generator().manual_seed(4))
    s = torch.rand(shape[0], shape[1], 1, 1) + 0.5 if with_scale else None
    buf = torch.empty(x.numel() + 1)
    unaligned = buf[1:].as_strided(x.shape, x.stride())
    assert unaligned.data_ptr() % 32 != 0
    outs = []
    try:
        for stream, out in ((-1, None), (0, None), (0, unaligned)):
            cpp_module.set_stream_bytes(stream)
            outs.append(ops.spatial_attention_fused(x, w, channel_scale=s, out=out).clone())
    finally:
        cpp_module.set_stream_bytes(-1)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    y64 = ref_sam(x.double(), w.double(), None, ("max", "mean"), 1, None if s is None else s.double())[0]
    torch.testing.assert_close(outs[0].double(), y64, rtol=1e-6, atol=4e-6)


def _tied_sam_inputs(shape, dtype, acc, seed):
    """``(generator, x, weight, channel scale, upstream gradient)`` for bit-equality tests: x of
    integers (tied maxima) in ``dtype``, the weight in ``acc``; the generator to draw more from."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2).round().to(dtype)
    w = torch.randn(1, 2, 7, 7, generator=g).to(acc)
    s = (torch.rand(shape[0], shape[1], 1, 1, generator=g) + 0.5).to(dtype)
    gy = torch.randn(shape, generator=g).to(dtype)
    return g, x, w, s, gy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threads", [1, 3])
def test_nchw_backward_streamed_equals_cached(cpp_module, dtype, threads):
    # streamed (forced here), the NCHW gradient pass writes float32 / float16 / bfloat16 rows
    # (AVX2 builds: float32) with non-temporal stores straight from its sweep from the first
    # vector-size boundary of each row (plain stores before it and after the last whole vector),
    # rows with the channel-scale gradient too; float64 goes through a buffer. The bits of the
    # cached stores either way: the fused backward (bands
    # of rows and whole images, the leftover images of batch 1 and 2 with three threads), the
    # training BatchNorm, the gate multiply's and the pooling's backward (the phases' rows and
    # flat blocks); rows of 15 to 660 pixels at every alignment; the prefetch on (ahead rows).
    from spatialattn.nn import SpatialAttention

    m = cpp_module
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    cases = [(2, 24, 9, 7), (3, 20, 13, 11), (2, 18, 20, 20), (1, 40, 33, 20), (2, 16, 3, 5)]

    def run(shape):
        g, x0, w, s, gy = _tied_sam_inputs(shape, dtype, acc, seed=shape[1] + shape[2])
        out = []
        for scale in (None, s):
            y, attn, logits, pooled = m.sam_forward(x0, w, None, scale, None, None, [0, 1], 1, None)
            out += [t for t in m.sam_backward(gy, None, x0, scale, w, None, attn, logits, pooled, [0, 1], 1,
                                              scale is not None, True, False, False) if t is not None]
        x, a, sg = (x0.clone().requires_grad_(), torch.rand(shape[0], 1, *shape[2:], generator=g).to(dtype)
                    .requires_grad_(), s.clone().requires_grad_())
        out += list(torch.autograd.grad(ops.gate_multiply(x, a, sg), (x, a, sg), gy))
        x = x0.clone().requires_grad_()
        pooled = ops.channel_pool(x, ("max", "mean"), dtype=acc)
        out += list(torch.autograd.grad(pooled, x, torch.randn(pooled.shape, generator=g).to(acc)))
        if dtype in (torch.float32, torch.float64):
            torch.manual_seed(0)  # the module's initial weights
            mod = SpatialAttention(shape[1], norm="bn").train().to(dtype)
            for scale in (None, s):
                x = x0.clone().requires_grad_()
                y, _ = mod.attend(x, scale)
                out += [y] + list(torch.autograd.grad(y, [x] + list(mod.parameters()), gy))
        return out

    try:
        m.set_row_prefetch(1)
        for shape, band, shared in itertools.product(cases, (0, 2), (False, True)):
            m.set_band_rows(band)
            m.set_shared_backward_bytes(0 if shared else -1)  # the leftover images streamed in units
            runs = []
            for stream_bytes in (-1, 0):
                m.set_stream_bytes(stream_bytes)
                runs.append(run(shape))
            assert len(runs[0]) == len(runs[1])
            for a, b in zip(*runs):
                _same(a, b)
        # and the streamed gradient of the fused op against float64 autograd (one case)
        m.set_stream_bytes(0)
        _, x, w, _, gy = _tied_sam_inputs(cases[2], dtype, acc, seed=1)
        x = x + torch.rand(x.shape, generator=torch.Generator().manual_seed(2)).to(dtype) * 0.5  # no ties
        y, attn, logits, pooled = m.sam_forward(x, w, None, None, None, None, [0, 1], 1, None)
        gx = m.sam_backward(gy, None, x, None, w, None, attn, logits, pooled, [0, 1], 1, False, True, False, False)[0]
        xd = x.double().requires_grad_()
        (want,) = torch.autograd.grad(ref_sam(xd, w.double(), None, ("max", "mean"), 1, None)[0], xd, gy.double())
        tol = {torch.float32: 2e-5, torch.float64: 1e-10}.get(dtype, 3e-2)
        torch.testing.assert_close(gx.double(), want, rtol=tol, atol=tol * max(1.0, float(want.abs().max())))
    finally:
        torch.set_num_threads(old)
        for knob in ("set_row_prefetch", "set_stream_bytes", "set_shared_backward_bytes"):
            getattr(m, knob)(-1)
        m.set_band_rows(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels", [32, 48, 40])
@pytest.mark.parametrize("threads", [1, 3])
def test_channels_last_backward_streamed_equals_cached(cpp_module, dtype, channels, threads):
    # streamed (beyond the LLC; forced here) the channels_last gradient pass writes whole
    # aligned rows of channels (C a multiple of 16) with non-temporal stores straight from its
    # sweep, the one max channel of a pixel without ties added in its lane; other rows go
    # through a buffer. Either way the bits of the cached stores: with and without a channel
    # scale and its gradient, ties, the training BatchNorm; against float64 as well.
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    shape = (3, channels, 9, 7)
    try:
        for ties, scaled in itertools.product((False, True), (False, True)):
            g = torch.Generator().manual_seed(channels + 7 * ties + 3 * scaled)
            x0 = torch.randn(shape, generator=g)
            if ties:
                x0 = x0.round()
            x = x0.to(dtype).contiguous(memory_format=torch.channels_last)
            gy = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
            wt = torch.randn(1, 2, 7, 7, generator=g) * 0.2
            s = torch.rand(shape[0], channels, 1, 1, generator=g) + 0.5 if scaled else None
            bnw, bnb = torch.ones(1) * 1.5, torch.zeros(1) + 0.1
            outs = []
            for stream_bytes in (-1, 0):
                cpp_module.set_stream_bytes(stream_bytes)
                y, attn, logits, pooled = cpp_module.sam_forward(x, wt, None, s, None, None, [0, 1], 1, None)
                grads = cpp_module.sam_backward(gy, None, x, s, wt, None, attn, logits, pooled, [0, 1], 1, scaled,
                                                True, False, False)
                f = cpp_module.sam_forward_bn(x, wt, None, s, bnw, bnb, 1e-5, [0, 1], 1)
                grads_bn = cpp_module.sam_backward_bn(gy, None, x, s, wt, bnw, f[1], f[2], f[3], f[4], 1e-5, [0, 1],
                                                      1, scaled, True, False, True)
                outs.append([t for t in list(grads) + list(grads_bn) if t is not None])
            for a, b in zip(*outs):
                assert torch.equal(a, b)
            xd = x.double().requires_grad_()
            sd = s.double().requires_grad_() if scaled else None
            wd = wt.double().requires_grad_()
            y_ref = ref_sam(xd, wd, None, ("max", "mean"), 1, sd)[0]
            want = torch.autograd.grad(y_ref, [t for t in (xd, sd, wd) if t is not None], gy.double())
            got = outs[0][:len(want)]  # grad x, grad scale (scaled), grad weight
            if not ties:  # (with ties the max's share may go to a tied channel x rounds differently to)
                tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
                for a, r in zip(got, want):
                    scale = max(1.0, float(r.abs().max()))
                    torch.testing.assert_close(a.double().reshape(r.shape), r, rtol=tol["rtol"],
                                               atol=tol["atol"] * scale)
    finally:
        cpp_module.set_stream_bytes(-1)
        torch.set_num_threads(old)


def test_saves_no_scaled_copy_for_backward():
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    s = torch.rand(2, 16, 1, 1, requires_grad=True)
    w = torch.randn(1, 2, 7, 7, requires_grad=True)
    big = []

    def pack(t):
        if t.numel() == x.numel():
            big.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ops.spatial_attention_fused(x, w, channel_scale=s)
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_on_cpu_falls_back_and_matches(dtype, monkeypatch):
    # without the C++ kernels (the half kernels themselves: test_half_cpu.py)
    monkeypatch.setattr(_cpp, "get", lambda: None)
    x = torch.randn(2, 16, 6, 6).to(dtype)
    w = torch.randn(1, 2, 7, 7)
    assert ops.backend(x) == "torch"
    y, attn = ops.spatial_attention_fused(x, w, return_attention=True)
    y_ref, attn_ref = ref_sam(x, w, None, ("max", "mean"), 1, None)
    assert y.dtype == dtype and attn.dtype == torch.float32
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(attn, attn_ref)


def test_custom_ops_opcheck():
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64, requires_grad=True)
    s = torch.rand(2, 5, 1, 1, dtype=torch.float64, requires_grad=True)
    a = torch.rand(2, 1, 4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(lib.channel_pool_op, (x, s, [0, 1], torch.float64))
    torch.library.opcheck(lib.gate_multiply_op, (x, a, s))
    torch.library.opcheck(lib.sam_op, (x, w, b, s, None, None, [1, 0], 1))


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_custom_ops_outputs_match_their_fakes(monkeypatch, backend, layout):
    if backend == "torch":
        monkeypatch.setattr(_cpp, "get", lambda: None)
    check_custom_op_layouts(layout, torch.float64, torch.device("cpu"))


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("small_layout", LAYOUTS[1:])
def test_custom_ops_fakes_with_small_inputs_in_other_layouts(monkeypatch, backend, small_layout):
    """The weight, channel scale and attention map in other layouts than NCHW (the fakes had
    given their gradients the inputs' strides, the ops return them contiguous: a compiled
    training step of a ``model.to(memory_format=torch.channels_last)`` failed Inductor's
    stride check on the 7x7 weight's gradient)."""
    if backend == "torch":
        monkeypatch.setattr(_cpp, "get", lambda: None)
    check_custom_op_layouts("channels_last" if small_layout == "channels_last" else "nchw", torch.float64,
                            torch.device("cpu"), small_layout=small_layout)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_backward_ops_take_saved_maps_in_any_layout(monkeypatch, backend, dtype):
    if backend == "torch":
        monkeypatch.setattr(_cpp, "get", lambda: None)
    check_saved_maps_in_any_layout(dtype, torch.device("cpu"))


def test_inductor_takes_a_transposed_input():
    """A dense ``x`` in neither layout through Inductor, forward and backward (the fakes had
    kept its strides while the kernels return an NCHW copy's: Inductor's stride assert failed)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    w = torch.randn(1, 2, 7, 7, generator=g, requires_grad=True)
    x = torch.randn(2, 6, 5, 4, generator=g).transpose(2, 3).requires_grad_()

    def f(x, w):
        return ops.spatial_attention_fused(x, w).flatten(1) * 2  # flatten: a stride-sensitive view

    want = f(x, w)
    gw, gx = torch.autograd.grad(want.square().sum(), (w, x))
    # caches off for the backward too, which compiles at its first call: a cached graph would
    # hide a changed fake (and a cached kernel built for another vector ISA, from a process
    # with another ATEN_CPU_CAPABILITY, computed garbage here: torch's cache key misses it)
    with torch._inductor.config.patch(force_disable_caches=True):
        got = torch.compile(f, backend="inductor", fullgraph=True)(x, w)
        cgw, cgx = torch.autograd.grad(got.square().sum(), (w, x))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(cgx, gx)
    torch.testing.assert_close(cgw, gw)


def test_torch_compile_runs_the_fused_op():
    # torch.compile runs the fused op (torch.export the plain decomposition: the test below).
    # torch 2.9.1's Dynamo folded torch.compiler.is_exporting() to True in every graph it traced,
    # so compiled models ran the decomposition (this test and the half-precision compile tests
    # failed there); the ops now read torch.export's flag.
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    x, w = torch.randn(2, 6, 5, 4), torch.randn(1, 2, 7, 7)
    got = torch.compile(lambda x, w: ops.spatial_attention_fused(x, w), backend=backend, fullgraph=True)(x, w)
    compiled = {node.target for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}
    assert torch.ops.spatialattn.sam.default in compiled and torch.conv2d not in compiled, compiled
    torch.testing.assert_close(got, ops.spatial_attention_fused(x, w), rtol=0, atol=0)
    assert not ops.is_exporting()
    torch._dynamo.reset()


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    s = torch.rand(2, 8, 1, 1, requires_grad=True)
    w = torch.randn(1, 2, 7, 7, requires_grad=True)

    def f(x, s, w):
        p = ops.channel_pool(x, ("max", "mean"), channel_scale=s)
        y1 = ops.gate_multiply(x, torch.sigmoid(p[:, :1]), s)
        y2 = ops.spatial_attention_fused(x, w, channel_scale=s)
        return (y1 * y2).sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(cf(x, s, w), (x, s, w))
    want = torch.autograd.grad(f(x, s, w), (x, s, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_torch_export_uses_reference_decomposition():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(1, 2, 7, 7))

        def forward(self, x):
            return ops.spatial_attention_fused(x, self.w)

    torch.manual_seed(0)
    m = M()
    x = torch.randn(2, 8, 6, 6)
    ep = torch.export.export(m, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("spatialattn" in t for t in targets)
    # the exported reference vs the fused kernel: same math, other summation order
    torch.testing.assert_close(ep.module()(x), m(x), rtol=1e-5, atol=1e-5)


def test_fallback_when_cpp_disabled(monkeypatch):
    monkeypatch.setenv("SPATIALATTN_DISABLE_CPP", "1")
    _cpp.reset()
    try:
        x = torch.randn(2, 8, 5, 5, dtype=torch.float64, requires_grad=True)
        assert _cpp.get() is None and ops.backend(x) == "torch"
        s = torch.rand(2, 8, 1, 1, dtype=torch.float64, requires_grad=True)
        w = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
        y = ops.spatial_attention_fused(x, w, channel_scale=s)
        torch.testing.assert_close(y, ref_sam(x, w, None, ("max", "mean"), 1, s)[0])
        assert torch.autograd.gradcheck(lambda x, s, w: ops.spatial_attention_fused(x, w, channel_scale=s), (x, s, w),
                                        fast_mode=True)
        # the custom ops' own PyTorch implementations (used where no kernel exists)
        b = torch.randn(1, dtype=torch.float64, requires_grad=True)
        ns = torch.rand(1, dtype=torch.float64, requires_grad=True)
        nsh = torch.randn(1, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda x, s, w, b, ns, nsh: lib.sam_op(x, w, b, s, ns, nsh, [0, 1], 1)[:2], (x, s, w, b, ns, nsh),
            fast_mode=True,
        )
        a = torch.rand(2, 1, 5, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, s: lib.channel_pool_op(x, s, [1, 0], torch.float64), (x, s),
                                        fast_mode=True)
        assert torch.autograd.gradcheck(lambda x, a, s: lib.gate_multiply_op(x, a, s), (x, a, s), fast_mode=True)
    finally:
        monkeypatch.delenv("SPATIALATTN_DISABLE_CPP")
        _cpp.reset()
    assert _cpp.get() is not None


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_broadcast_upstream_gradient(layout):
    # y.sum() hands backward a stride-0 gradient; the kernels use it without materialising it
    x = make_x((2, 20, 7, 9), layout, torch.float64).requires_grad_()
    s = torch.rand(2, 20, 1, 1, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 2, 7, 7, dtype=torch.float64, requires_grad=True)
    a = torch.rand(2, 1, 7, 9, dtype=torch.float64, requires_grad=True)
    got = torch.autograd.grad(ops.spatial_attention_fused(x, w, channel_scale=s).sum() * 3, (x, s, w))
    want = torch.autograd.grad(ref_sam(x, w, None, ("max", "mean"), 1, s)[0].sum() * 3, (x, s, w))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
    got = torch.autograd.grad(ops.gate_multiply(x, a, s).sum(), (x, a, s))
    want = torch.autograd.grad(reference.gate_multiply(x, a, s).sum(), (x, a, s))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
@pytest.mark.parametrize("shape", [(2, 70, 9, 11), (1, 5, 1, 1), (0, 3, 4, 4)])
def test_global_pool_matches_reference(layout, shape):
    x = make_x(shape, layout)
    if x.numel():
        x[0, 1, 0, 0] = float("nan")
    for order in (("mean", "max"), ("max",), ("max", "mean"), ("max", "mean", "max")):
        got = ops.global_pool(x, order)
        want = torch.stack([x.amax(dim=(2, 3)) if k == "max" else x.mean(dim=(2, 3)) for k in order])
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, equal_nan=True)
    xr, xw = x.detach().requires_grad_(), x.detach().requires_grad_()
    ops.global_pool(xr).sum().backward()  # autograd path, against amax / mean's own gradients
    (xw.amax(dim=(2, 3)).sum() + xw.mean(dim=(2, 3)).sum()).backward()
    keep = torch.ones(x.shape[:2], dtype=torch.bool)
    if x.numel():
        keep[0, 1] = False  # the NaN channel: amax's gradient is NaN there, ours gives the max term none
    torch.testing.assert_close(xr.grad[keep], xw.grad[keep], rtol=1e-6, atol=1e-6)


def test_autocast_keeps_small_maps_in_float32():
    x = torch.randn(2, 16, 6, 6)
    w = torch.randn(1, 2, 7, 7)
    y_ref, attn_ref = ref_sam(x, w, None, ("max", "mean"), 1, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, attn = ops.spatial_attention_fused(x, w, return_attention=True)
        yb, attnb = ops.spatial_attention_fused(x.bfloat16(), w, return_attention=True)
    assert y.dtype == torch.float32 and attn.dtype == torch.float32
    torch.testing.assert_close(attn, attn_ref, rtol=1e-6, atol=1e-6)
    assert yb.dtype == torch.bfloat16 and attnb.dtype == torch.float32
    torch.testing.assert_close(attnb, ref_sam(x.bfloat16(), w, None, ("max", "mean"), 1, None)[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("band_rows", [0, 1, 2, 5])
@pytest.mark.parametrize("streamed", [False, True])
def test_work_split_and_row_bands_match_reference(cpp_module, layout, threads, band_rows, streamed):
    # With N >= threads whole images go to each thread and are streamed in bands of rows
    # (gate and gradient lag the pooling by the conv's reach); the leftover images run one
    # phase at a time, or (streamed: forced here, by default where they exceed the LLC) in
    # units of rows, a run of units per thread (every thread: set_shared_bytes(0)). Every
    # split, band height and reach (dilation 2: reach 6 > some H) must give the reference's
    # numbers, forward and backward, dense and broadcast gradients.
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    cpp_module.set_band_rows(band_rows)
    if streamed:
        cpp_module.set_shared_backward_bytes(0)
        cpp_module.set_shared_bytes(0)
    try:
        for n, h, w, dil, order in [(5, 9, 7, 1, ("mean", "max")), (1, 6, 5, 1, ("max", "mean")),
                                    (3, 4, 8, 2, ("max",)), (4, 11, 3, 1, ("mean",))]:
            g = torch.Generator().manual_seed(n * 100 + h)
            x = make_x((n, 6, h, w), layout, torch.float64, seed=h).requires_grad_()
            s = torch.rand(n, 6, 1, 1, dtype=torch.float64, generator=g).requires_grad_()
            wt = torch.randn(1, len(order), 7, 7, dtype=torch.float64, generator=g).requires_grad_()
            b = torch.randn(1, dtype=torch.float64, generator=g).requires_grad_()
            ns = (torch.rand(1, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
            nsh = torch.randn(1, dtype=torch.float64, generator=g).requires_grad_()
            gy = torch.randn(n, 6, h, w, dtype=torch.float64, generator=g)
            ga = torch.randn(n, 1, h, w, dtype=torch.float64, generator=g)
            params = (x, s, wt, b, ns, nsh)
            y, a = ops.spatial_attention_fused(x, wt, b, order=order, dilation=dil, channel_scale=s, norm_scale=ns,
                                               norm_shift=nsh, return_attention=True)
            y_ref, a_ref = ref_sam(x, wt, b, order, dil, s, ns, nsh)
            torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(a, a_ref, rtol=1e-12, atol=1e-12)
            for loss, loss_ref in (((y * gy).sum() + (a * ga).sum(), (y_ref * gy).sum() + (a_ref * ga).sum()),
                                   (y.sum() * 2, y_ref.sum() * 2)):
                got = torch.autograd.grad(loss, params, retain_graph=True)
                want = torch.autograd.grad(loss_ref, params, retain_graph=True)
                for name, gg, rr in zip(("x", "scale", "weight", "bias", "norm_scale", "norm_shift"), got, want):
                    torch.testing.assert_close(gg, rr, rtol=1e-10, atol=1e-10, msg=lambda m: f"grad {name}: {m}")
    finally:
        torch.set_num_threads(old)
        cpp_module.set_band_rows(0)
        cpp_module.set_shared_backward_bytes(-1)
        cpp_module.set_shared_bytes(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_scale", [False, True])
def test_nchw_pooling_eight_channels_per_sweep(cpp_module, dtype, with_scale):
    # Where the accumulator rows exceed 16 KiB (here 2115 float32 pixels: 16.9 KB) the NCHW
    # pooling takes eight channels per sweep, each half the four-channel step: the same
    # bits as four per sweep (threshold raised), in the pooled maps and the whole SAM, and
    # the reference's values. 23 channels: two eight-sweeps, one four-sweep, two single ones;
    # 2115 pixels: a 3-pixel vector tail. Also forced (threshold 0) on a small map.
    for shape in [(2, 23, 47, 45), (1, 12, 3, 5)]:
        x = make_x(shape, "nchw", torch.float32, seed=3).to(dtype)
        c = shape[1]
        x[0, c - 3, 1, 1] = x[0, 3, 1, 1] = x[0, :, 1, 1].max() + 1  # tied maxima across the sweeps
        x[-1, c - 6, 2, 0] = float("nan")
        s = (torch.rand(shape[0], shape[1], 1, 1) + 0.5).to(dtype) if with_scale else None
        w = torch.randn(1, 2, 7, 7).to(ops._lib._acc(x))
        wide = 16384 if shape[2] * shape[3] > 2048 else 0
        outs = {}
        try:
            for name, limit in (("wide", wide), ("narrow", 1 << 62)):
                cpp_module.set_pool_wide_bytes(limit)
                outs[name] = (cpp_module.pool_forward(x, s, [0, 1]),
                              *cpp_module.sam_forward(x, w, None, s, None, None, [1, 0], 1, None))
        finally:
            cpp_module.set_pool_wide_bytes(-1)
        for a, b in zip(outs["wide"], outs["narrow"]):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        acc = ops._lib._acc(x)
        ref = reference.channel_pool(x.to(acc), ("max", "mean"), None if s is None else s.to(acc), acc)
        torch.testing.assert_close(outs["wide"][0], ref, rtol=1e-5, atol=1e-5, equal_nan=True)


def _short_run_grads(x, w, s, bn):
    """Output and gradients (x, weight, scale) of the fused SAM (with a training-mode
    BatchNorm: its gradients too), for an upstream gradient of random values and one of a
    single value broadcast (the backward's one-value path)."""
    out = []
    for g in (torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(x.dtype),
              torch.ones((), dtype=x.dtype).expand(x.shape)):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        ss = None if s is None else s.clone().requires_grad_()
        if bn:
            norm = torch.nn.BatchNorm2d(1).to(w.dtype).train()
            y = ops.spatial_attention_fused_batchnorm(xx, ww, None, norm, channel_scale=ss)
            leaves = [xx, ww, norm.weight, norm.bias] + ([] if ss is None else [ss])
        else:
            y = ops.spatial_attention_fused(xx, ww, channel_scale=ss)
            leaves = [xx, ww] + ([] if ss is None else [ss])
        out += [y, *torch.autograd.grad(y, leaves, g)]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_scale", [False, True])
def test_nchw_pooling_of_short_runs_in_registers(cpp_module, dtype, with_scale):
    # NCHW runs of one vector up to 256 pixels (7x7, 13x13, 14x14 maps whole, or a thread's
    # share of them) are pooled, and the backward's pass A sums and counts them, with every
    # accumulator in registers (AVX-512 builds; the pooling in AVX2 builds too; elsewhere both
    # settings take the sweeps): the same bits as the sweeps over accumulators in memory, in
    # the pooled maps, the whole SAM and its training-BatchNorm form, forward and backward,
    # and the reference's values. Runs: a whole vector (4x4), an overlapping last vector (7x7:
    # 49; 3x9 in float64's 8 lanes), two pieces (13x13: 128 + 41), a remainder under a vector
    # joined to the piece before it (8x17: 136 = 112 + 24), the limit (16x16) and one past it
    # (257: the sweeps), shorter than a vector (3x5); channel counts leaving 0-3 channels after
    # the groups of four; ties across channels, signed zeros; a NaN in the forward's input
    # (the gradients are taken without it: through the conv and a batch's BatchNorm it would
    # make them NaN wherever it reaches); 1-3 threads (shares that split images).
    shapes = [(2, 37, 7, 7), (1, 64, 13, 13), (2, 6, 8, 17), (1, 9, 4, 4), (2, 11, 16, 16), (1, 8, 1, 257),
              (2, 5, 3, 5), (1, 12, 3, 9)]
    old = torch.get_num_threads()
    try:
        for shape, threads in itertools.product(shapes, (1, 2, 3)):
            torch.set_num_threads(threads)
            x = make_x(shape, "nchw", torch.float32, seed=11).to(dtype)
            n, c = shape[:2]
            x[0, c - 1, 0, 1] = x[0, 1, 0, 1] = x[0, :, 0, 1].max() + 1  # a tie across channel groups
            x[0, :, 0, 2] = -0.0
            x[0, 0, 0, 2] = 0.0  # a max among signed zeros: the first channel's (+0)
            finite = x.clone()
            x[-1, c - 2, -1, -1] = float("nan")
            s = (torch.rand(n, c, 1, 1) + 0.5).to(dtype if dtype == torch.float64 else torch.float32) if with_scale else None
            acc = ops._lib._acc(x)
            w = torch.randn(1, 2, 7, 7).to(acc)
            outs = {}
            try:
                for on in (True, False):
                    cpp_module.set_pool_short(on)
                    outs[on] = (cpp_module.pool_forward(x, s, [0, 1]),
                                *cpp_module.sam_forward(x, w, None, s, None, None, [1, 0], 1, None),
                                *cpp_module.sam_forward_bn(x, w, None, s, torch.ones(1, dtype=acc),
                                                           torch.zeros(1, dtype=acc), 1e-5, [0, 1], 1)[:4],
                                *_short_run_grads(finite, w, s, bn=False), *_short_run_grads(finite, w, s, bn=True))
            finally:
                cpp_module.set_pool_short(True)
            n_fwd = 1 + 4 + 4  # the pooling, sam_forward's and sam_forward_bn's outputs
            assert not any(t.isnan().any() for t in outs[True][n_fwd:]), "the gradients are of finite inputs"
            for a, b in zip(outs[True], outs[False]):
                torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{shape}, {threads} threads: {m}")
                num = ~a.isnan()
                assert torch.equal(torch.signbit(a[num]), torch.signbit(b[num])), f"{shape}, {threads} threads: zero signs"
            ref = reference.channel_pool(x.to(acc), ("max", "mean"), None if s is None else s.to(acc), acc)
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            torch.testing.assert_close(outs[True][0], ref, rtol=tol, atol=tol, equal_nan=True)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("channels", [5, 40, 72])
@pytest.mark.parametrize("kinds", [[0, 1], [1], [0], [1, 0, 1]])
def test_channels_last_pooling_shares_cross_images(cpp_module, threads, channels, kinds):
    # The channels_last channel pooling runs image by image within each thread's share of the
    # N*H*W pixels (at::parallel_for, grain 64): 4 images of 35 pixels (140) are one share of
    # four images on 1 thread, two shares of two whole images on 2, and on 3 shares of 47 / 47
    # / 46 pixels that start and end inside images. 5 channels: scalar; 40: the 32-channel
    # AVX2 accumulators and a tail of 8; 72: the 64-channel ones and a tail. One slot of a
    # kind, either kind alone, and a repeated slot.
    x = make_x((4, channels, 5, 7), "channels_last", seed=5)
    x[1, channels // 2, 2, 3] = float("nan")
    s = torch.rand(4, channels, 1, 1) + 0.5
    order = tuple("max" if k == 0 else "mean" for k in kinds)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for sc in (None, s):
            got = cpp_module.pool_forward(x, sc, kinds)
            torch.testing.assert_close(got, reference.channel_pool(x, order, sc), rtol=1e-6, atol=1e-6,
                                       equal_nan=True)
    finally:
        torch.set_num_threads(old)


def test_row_band_rule(cpp_module):
    # Both layouts: whole images while an image (x, or x + gradient) is at most 1/8 of the LLC
    # (channels_last: and the pass's tensors fit the LLC); above that, channels_last in bands of
    # ~384 KiB, NCHW in bands of ~2 MiB including the lag, and at least 4 KiB of each channel row.
    m = cpp_module
    limit = m.whole_image_bytes()
    assert limit > 0
    row = 128 * 104 * 4  # one row of 128 channels x 104 pixels, float32
    h_cl = limit // row + 50  # a channels_last image above the limit
    assert m.band_rows(row, 3, h_cl, True) == (384 << 10) // row - 3
    assert m.band_rows(row, 3, limit // row, True) == limit // row  # within it: whole
    # the pass's tensors beyond the LLC: channels_last in bands, NCHW whole as before
    assert m.band_rows(row, 3, limit // row, True, in_llc=False) == (384 << 10) // row - 3
    assert m.band_rows(2 * row, 3, limit // (2 * row), False, in_llc=False) == limit // (2 * row)
    assert m.band_rows(row, 3, 4, True) == 4  # a small image is one band
    assert m.band_rows(row * 100, 3, h_cl, True) == h_cl  # a row above the budget: whole image
    h_whole = limit // (2 * row)  # an NCHW image (x + gradient) just within the limit
    assert m.band_rows(2 * row, 3, h_whole, False) == h_whole
    h_big = limit // (2 * row) + 200  # above it: bands of 2 MiB
    assert m.band_rows(2 * row, 3, h_big, False) == (2 << 20) // (2 * row) - 3
    m.set_band_bytes_nchw(0)
    try:
        assert m.band_rows(2 * row, 3, h_big, False) == h_big  # 0: whole images
    finally:
        m.set_band_bytes_nchw(2 << 20)
    m.set_band_rows(5)
    try:
        assert m.band_rows(2 * row, 3, 104, False) == 5 and m.band_rows(row, 3, 104, True) == 5
    finally:
        m.set_band_rows(0)
    # NCHW bands hold at least 4 KiB of each channel row (runs per channel), beyond the budget
    # if need be; a band of the whole image where that takes every row
    budget_rows = (2 << 20) // (2 * row) - 3  # 16 rows of 104 float32 pixels: 6.6 KB runs
    assert m.band_rows(2 * row, 3, h_big, False, 104 * 4) == budget_rows
    row_many = 1024 * 52 * 4  # 1024 channels x 52 pixels: the budget gives 1 row, 208 B runs
    assert (2 << 20) // (2 * row_many) - 3 == 1
    assert m.band_rows(2 * row_many, 3, 52, False, 52 * 4) == 20  # ceil(4096 / 208)
    assert m.band_rows(2 * row_many, 3, 52, True, 52 * 4) == 52  # channels_last: no runs per channel
    row_26 = 2048 * 26 * 4
    assert m.band_rows(2 * row_26, 3, 26, False, 26 * 4) == 26  # 40 rows wanted: whole image
    assert m.band_rows(2 * row_26, 3, 26, False) == 1  # without the channel row's size: the budget
    m.set_min_run_bytes(0)
    try:
        assert m.band_rows(2 * row_many, 3, 52, False, 52 * 4) == 1
    finally:
        m.set_min_run_bytes(-1)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("threads", [1, 2])
def test_automatic_nchw_bands_match_reference(cpp_module, layout, threads):
    # The automatic rule with a lowered whole-image limit and band budget (the real ones need
    # images of megabytes): NCHW images then go in bands of a few rows, channels_last as
    # always; forward and backward must give the reference's numbers.
    m = cpp_module
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    m.set_whole_image_bytes(1 << 10)
    m.set_band_bytes_nchw(8 * 20 * 8 * 2 * 5)  # 5 rows of x + gradient (float64): bands of 2 rows + lag 3
    m.set_min_run_bytes(320)  # 2 rows of 20 float64 pixels
    try:
        assert m.band_rows(8 * 20 * 8 * 2, 3, 17, False, 20 * 8) == 2
        x = make_x((3, 8, 17, 20), layout, torch.float64, seed=3).requires_grad_()
        g = torch.Generator().manual_seed(1)
        wt = torch.randn(1, 2, 7, 7, dtype=torch.float64, generator=g).requires_grad_()
        gy = torch.randn(x.shape, dtype=torch.float64, generator=g)
        y = ops.spatial_attention_fused(x, wt)
        y_ref, _ = ref_sam(x, wt, None, ("max", "mean"), 1, None)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        got = torch.autograd.grad(y, (x, wt), gy)
        want = torch.autograd.grad(y_ref, (x, wt), gy)
        for gg, rr in zip(got, want):
            torch.testing.assert_close(gg, rr, rtol=1e-10, atol=1e-10)
    finally:
        torch.set_num_threads(old)
        m.set_whole_image_bytes(-1)
        m.set_band_bytes_nchw(2 << 20)
        m.set_min_run_bytes(-1)


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal values (NaN where the other has NaN; a NaN's sign and payload may differ: the
    vector and scalar conversions to bfloat16 disagree on them)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_forward_bits_do_not_depend_on_threads_or_row_split(cpp_module, layout, dtype):
    # Fewer images than threads (batch-1 inference) run in one parallel region with the rows
    # split into one share per thread (a share may span two images); whole images go in bands
    # of rows. The 7x7 conv sums its taps in one order for every row block, so every split
    # (threads 1-4, shares of any size, band heights) must give the same bits, and the
    # reference's numbers. Orders with a missing kind and a repeated kind, a channel scale, an
    # affine norm, dilation 1 and 2, NaN in one pixel.
    m = cpp_module
    old = torch.get_num_threads()
    cases = [((1, 40, 13, 11), ("max", "mean"), 1), ((2, 24, 9, 10), ("mean",), 1),
             ((3, 16, 5, 19), ("max", "mean", "max"), 2), ((1, 20, 23, 8), ("max",), 1)]
    try:
        for shape, order, dil in cases:
            g = torch.Generator().manual_seed(shape[2])
            x = make_x(shape, layout, torch.float32, seed=shape[1]).to(dtype)
            x[0, 3, 2, 4] = float("nan")
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            s = torch.rand(shape[0], shape[1], 1, 1, generator=g).to(dtype)
            wt = torch.randn(1, len(order), 7, 7, generator=g).to(acc)
            b, ns, nsh = torch.randn(1, generator=g).to(acc), torch.rand(1).to(acc) + 0.5, torch.randn(1).to(acc)
            kinds = [lib.KIND[k] for k in order]
            # also 3N - 1 images: whole images per thread and leftovers
            x3, s3 = torch.cat([x, x, x])[: 3 * shape[0] - 1], torch.cat([s, s, s])[: 3 * shape[0] - 1]
            runs = []
            for threads, shared, band in [(1, -1, 0), (2, 0, 0), (3, 0, 0), (4, 0, 0), (2, -1, 0), (4, 0, 3),
                                          (3, 0, 1)]:
                torch.set_num_threads(threads)
                m.set_shared_bytes(shared)
                m.set_band_rows(band)
                for xx, ss in ((x, s), (x3, s3)):
                    runs.append(m.sam_forward(xx, wt, b, ss, ns, nsh, kinds, dil, None))
            for got in runs[2::2]:
                for a, r in zip(got, runs[0]):
                    _same(a, r)
            for got in runs[3::2]:
                for a, r in zip(got, runs[1]):
                    _same(a, r)
            y_ref, a_ref = ref_sam(x, wt, b, order, dil, s, ns, nsh)
            tol = TOL.get(dtype, dict(rtol=1.6e-2, atol=1e-2))
            torch.testing.assert_close(runs[0][0], y_ref, equal_nan=True, **tol)
            torch.testing.assert_close(runs[0][1], a_ref, equal_nan=True, **tol)
    finally:
        torch.set_num_threads(old)
        m.set_shared_bytes(-1)
        m.set_band_rows(0)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_backward_parameter_grads_do_not_depend_on_threads(cpp_module, layout):
    # The images left over by whole_images (fewer images than threads): where their x and
    # gradient exceed the LLC (set_shared_backward_bytes(0): always) their rows are cut into
    # units of eight and each thread streams one run of units (pass A, d logits, pass B of the
    # units whose neighbourhood is complete; those at the ends of a run after a barrier), every
    # unit's share of the conv weight, bias, norm and channel-scale gradients summed in unit
    # order; below it the phases run over the whole images, their small maps in bands of eight
    # rows summed in band order. Either way all gradients have the same bits for any thread
    # count above the batch (the batch then decides the path), any share size
    # (set_shared_bytes(0): every thread however small the input) and any group of units per
    # pass (set_band_rows), including a conv reach of 6 and 9 rows (dilation 2, 3: 9 > the unit
    # height); the two paths agree bit for bit except the channel-scale gradient (summed per
    # unit vs. per channel row / pixel block: close). Fewer threads give whole images per
    # thread, banded differently: close, not equal. The training-mode BatchNorm's small-map
    # backward runs in bands of eight rows too: the same bits for any thread count. And the
    # reference's numbers.
    from spatialattn.nn import SpatialAttention

    m = cpp_module
    old = torch.get_num_threads()
    try:
        for shape, dil in [((1, 12, 37, 23), 1), ((3, 8, 19, 30), 1), ((1, 8, 70, 12), 2), ((2, 6, 45, 9), 3)]:
            n = shape[0]
            g = torch.Generator().manual_seed(shape[2])
            x0 = make_x(shape, layout, torch.float32, seed=shape[3])
            s0 = torch.rand(n, shape[1], 1, 1, generator=g)
            w0, b0 = torch.randn(1, 2, 7, 7, generator=g), torch.randn(1, generator=g)
            ns0, nsh0 = torch.rand(1, generator=g) + 0.5, torch.randn(1, generator=g)
            gy = torch.randn(shape, generator=g)
            runs = {}
            for path in (-1, 0):  # the phases (these inputs are far below the LLC), the streamed units
                m.set_shared_backward_bytes(path)
                for threads, shared, band in [(1, -1, 0), (n + 1, -1, 0), (n + 1, 0, 0), (n + 2, 0, 0),
                                              (n + 3, 0, 0), (n + 2, 0, 16), (n + 3, 0, 24), (n + 2, -1, 8)]:
                    torch.set_num_threads(threads)
                    m.set_shared_bytes(shared)
                    m.set_band_rows(band)
                    x, s, w, b, ns, nsh = (t.clone().requires_grad_() for t in (x0, s0, w0, b0, ns0, nsh0))
                    y = ops.spatial_attention_fused(x, w, b, dilation=dil, channel_scale=s, norm_scale=ns,
                                                    norm_shift=nsh)
                    runs[path, threads, shared, band] = torch.autograd.grad(y, (x, s, w, b, ns, nsh), gy)
            m.set_shared_backward_bytes(-1)
            base = runs[0, n + 1, -1, 0]
            for key, got in runs.items():
                if key[1] > n:
                    ref = runs[key[0], n + 1, -1, 0]
                    for i, (a, r) in enumerate(zip(got, ref)):
                        _same(a, r)
                        if i != 1:
                            _same(a, base[i])
                    torch.testing.assert_close(got[1], base[1], rtol=1e-5, atol=1e-5)
            for a, r in zip(runs[0, 1, -1, 0], base):
                torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
            x, s, w, b, ns, nsh = (t.double().requires_grad_() for t in (x0, s0, w0, b0, ns0, nsh0))
            y_ref, _ = ref_sam(x, w, b, ("max", "mean"), dil, s, ns, nsh)
            want = torch.autograd.grad(y_ref, (x, s, w, b, ns, nsh), gy.double())
            for name, got, ref in zip(("x", "scale", "weight", "bias", "norm_scale", "norm_shift"), base, want):
                torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=2e-5 * max(1.0, float(ref.abs().max())),
                                           msg=lambda msg: f"grad {name}: {msg}")
            if dil == 1:
                m.set_shared_bytes(-1)
                m.set_band_rows(0)
                mod = SpatialAttention(shape[1], norm="bn").train()
                bn_runs = {}
                for threads in (1, n + 1, n + 2, n + 3):
                    torch.set_num_threads(threads)
                    mb = copy.deepcopy(mod)
                    xb = x0.clone().requires_grad_()
                    bn_runs[threads] = torch.autograd.grad(mb(xb), [xb] + list(mb.parameters()), gy)
                for threads in (n + 1, n + 2, n + 3):
                    for a, r in zip(bn_runs[threads], bn_runs[1]):
                        _same(a, r)
    finally:
        torch.set_num_threads(old)
        m.set_shared_bytes(-1)
        m.set_shared_backward_bytes(-1)
        m.set_band_rows(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_nchw_max_bits_match_the_compare(cpp_module, dtype):
    # NCHW backward (AVX-512 and AVX2 builds): pass A, which compares every x' with the max for the tie
    # count, stores the comparison as one bit per element, and pass B takes the max channels
    # from the bits instead of reading x (not with the channel-scale gradient, which reads x).
    # Whole images per thread: pass A's pixel ranges then start at multiples of the vector
    # width, so with rows of W pixels (W not a multiple of it) a band's end falls mid-vector;
    # the leftover images' phases (fewer images than threads) and the training-mode BatchNorm
    # write the bits by pixel chunks of their threads (by default only for inputs of 2 MiB and
    # more; here for any size). Against pass B's own compare
    # (set_max_bits(False)): the same bits of every output, for whole images and bands of 1, 2
    # and 5 rows, 1-3 threads, channel counts with 1-3 channels past the last four (bits stored
    # one by one), an image smaller than a vector (scalar rows), a repeated max slot, ties and
    # NaN, dense and broadcast gradients, with and without the returned attention's gradient.
    # And the reference's numbers.
    from spatialattn.nn import SpatialAttention

    m = cpp_module
    if not m.has_max_bits():
        pytest.skip("this build has no max bits (the baseline build, without AVX2): pass B compares")
    old = torch.get_num_threads()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    cases = [((2, 6, 9, 7), ("max", "mean")), ((3, 13, 11, 21), ("mean", "max")), ((2, 8, 3, 4), ("max",)),
             ((2, 7, 17, 37), ("max", "mean", "max")), ((1, 9, 10, 13), ("max", "mean"))]
    m.set_max_bits_phase_bytes(0)
    try:
        for (shape, order), nan in itertools.product(cases, (False, True)):
            g = torch.Generator().manual_seed(shape[1])
            x = (torch.randn(shape, generator=g) * 2).round().to(dtype)  # integers: many tied maxima
            if nan:
                x[0, 1, 1, 2] = float("nan")
            w = torch.randn(1, len(order), 7, 7, generator=g).to(acc)
            b = torch.randn(1, generator=g).to(acc)
            kinds = [lib.KIND[k] for k in order]
            y, attn, logits, pooled = m.sam_forward(x, w, b, None, None, None, kinds, 1, None)
            gy = torch.randn(shape, generator=g).to(dtype)
            ga = torch.randn(shape[0], 1, shape[2], shape[3], generator=g).to(acc)
            for grad, gextra in ((gy, None), (gy, ga), (torch.full((), 0.5, dtype=dtype).expand(shape), None)):
                runs = []
                for threads, band in [(1, 0), (2, 0), (1, 1), (2, 2), (2, 5), (3, 0)]:
                    torch.set_num_threads(threads)
                    m.set_band_rows(band)
                    for bits in (True, False):
                        m.set_max_bits(bits)
                        runs.append(m.sam_backward(grad, gextra, x, None, w, None, attn, logits, pooled, kinds, 1,
                                                   False, True, True, False))
                for i in range(0, len(runs), 2):
                    for a, r in zip(runs[i], runs[i + 1]):
                        if r is not None:
                            _same(a, r)
                if dtype != torch.float64 or nan:
                    continue
                xr = x.clone().requires_grad_()
                wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
                y_ref, a_ref = ref_sam(xr, wr, br, order, 1, None)
                loss = (y_ref * grad).sum() + (0 if gextra is None else (a_ref * gextra).sum())
                want = torch.autograd.grad(loss, (xr, wr, br))
                for got, ref in zip(runs[0][:1] + runs[0][2:4], want):
                    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
            if dtype == torch.bfloat16 or len(order) != 2:
                continue
            m.set_band_rows(0)
            mod = SpatialAttention(shape[1], norm="bn").train().to(dtype)
            for threads in (1, 2, 3):  # the training BatchNorm: one phase at a time over the batch
                torch.set_num_threads(threads)
                bn_runs = []
                for bits in (True, False):
                    m.set_max_bits(bits)
                    mb = copy.deepcopy(mod)
                    xb = x.clone().requires_grad_()
                    bn_runs.append(torch.autograd.grad(mb(xb), [xb] + list(mb.parameters()), gy))
                for a, r in zip(*bn_runs):
                    _same(a, r)
    finally:
        torch.set_num_threads(old)
        m.set_band_rows(0)
        m.set_max_bits(True)
        m.set_max_bits_phase_bytes(-1)


def test_one_stream_reduce_rule(cpp_module):
    # Pass A reads one channel row per sweep (instead of four) where its rows are one
    # contiguous run (len == HW), short (at most 4 KiB) and the image's x exceeds the L2, in
    # AVX-512 builds (reduce.h, one_stream_reduce); set_one_stream_reduce forces it either way.
    m = cpp_module
    l2 = m.l2_bytes()
    assert 64 << 10 <= l2 <= 1 << 30
    c_big = l2 // (676 * 4) + 1  # 26x26 rows, an image just past the L2
    try:
        m.set_one_stream_reduce(1)
        assert m.one_stream_reduce(2, 9, 9, 4) and not m.one_stream_reduce(2, 9, 3, 4)
        m.set_one_stream_reduce(-1)
        if _cpp._capability() != "AVX512":  # measured faster only in the AVX-512 build
            assert not m.one_stream_reduce(c_big, 676, 676, 4)
            return
        assert m.one_stream_reduce(c_big, 676, 676, 4)
        assert not m.one_stream_reduce(c_big - 1, 676, 676, 4)  # fits the L2
        assert not m.one_stream_reduce(c_big, 676, 338, 4)  # a band of rows: not one run
        assert not m.one_stream_reduce(c_big, 2704, 2704, 4)  # 52x52 rows: longer than 4 KiB
        assert m.one_stream_reduce(2 * c_big, 1024, 1024, 2)  # half rows of 2 KiB
        assert m.one_stream_reduce(4 * c_big, 1024, 1024, 4)  # rows of exactly 4 KiB
        assert not m.one_stream_reduce(4 * c_big, 1025, 1025, 4)
        m.set_one_stream_reduce(0)
        assert not m.one_stream_reduce(c_big, 676, 676, 4)
    finally:
        m.set_one_stream_reduce(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_one_stream_reduce_gives_the_same_bits(cpp_module, dtype):
    # Pass A one channel row per sweep (set_one_stream_reduce(1), wherever a run is a whole
    # image) against four rows per sweep (0): the same operations in the same order, so the same
    # bits of every gradient. Through the fused op (orders with one or two maps, a repeated
    # slot, a channel scale and its gradient, dense, broadcast and returned-attention
    # gradients), the two-op path (channel pooling, gate multiply), the training-BatchNorm SAM
    # and CBAM; channel counts with 1-3 rows past the last four, NCHW whole images (one and two
    # threads) and the leftover images' phases (three threads), the flat blocks of short rows
    # (40x7x7), integer inputs (tied maxima) and a NaN.
    from spatialattn.nn import CBAM, SpatialAttention

    m = cpp_module
    old = torch.get_num_threads()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    cases = [((2, 13, 9, 7), ("max", "mean"), False), ((2, 6, 10, 10), ("mean", "max", "max"), True),
             ((2, 40, 7, 7), ("max",), False), ((3, 11, 5, 16), ("mean",), True), ((2, 9, 6, 6), ("max", "mean"), True)]

    def run(shape, order, nan):
        g = torch.Generator().manual_seed(shape[1])
        x0 = (torch.randn(shape, generator=g) * 2).round().to(dtype)  # integers: tied maxima
        if nan:
            x0[0, 1, 1, 2] = float("nan")
        w0 = torch.randn(1, len(order), 7, 7, generator=g).to(acc)
        s0 = (torch.rand(shape[0], shape[1], 1, 1, generator=g) + 0.5).to(dtype)
        gy = torch.randn(shape, generator=g).to(dtype)
        ga = torch.randn(shape[0], 1, shape[2], shape[3], generator=g).to(acc)
        out = []
        for scaled in (False, True):
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            s = s0.clone().requires_grad_() if scaled else None
            y, a = ops.spatial_attention_fused(x, w, order=order, channel_scale=s, return_attention=True)
            ins = (x, w) + ((s,) if scaled else ())
            out += torch.autograd.grad(y, ins, gy, retain_graph=True)
            out += torch.autograd.grad(y.sum() * 3, ins, retain_graph=True)
            out += torch.autograd.grad((y * gy).sum() + (a * ga).sum(), ins)
        x = x0.clone().requires_grad_()
        gate = torch.sigmoid(ga).to(dtype).requires_grad_()
        pooled = ops.channel_pool(x, order, dtype=acc)
        out += torch.autograd.grad(pooled, x, torch.randn(pooled.shape, generator=g).to(pooled.dtype))
        out += torch.autograd.grad(ops.gate_multiply(x, gate), (x, gate), gy)
        if dtype != torch.bfloat16:
            for mod in (SpatialAttention(shape[1], norm="bn"), CBAM(shape[1], reduction=2)):
                mod = mod.train().to(dtype)
                x = x0.clone().requires_grad_()
                out += torch.autograd.grad(mod(x), [x] + list(mod.parameters()), gy)
        return out

    try:
        for (shape, order, nan), threads in itertools.product(cases, (1, 2, 3)):
            torch.set_num_threads(threads)
            runs = []
            for mode in (0, 1):
                m.set_one_stream_reduce(mode)
                torch.manual_seed(0)
                runs.append(run(shape, order, nan))
            assert len(runs[0]) == len(runs[1])
            for a, b in zip(*runs):
                _same(a, b)
    finally:
        torch.set_num_threads(old)
        m.set_one_stream_reduce(-1)


def test_row_prefetch_rule(cpp_module):
    # The NCHW pooling and pass A prefetch the channel rows of a later group where x exceeds a
    # quarter of the last-level cache (rows.h, row_prefetch_bytes: the bytes of work ahead, 0
    # for none); set_row_prefetch forces it either way (pass B follows the stream stores).
    m = cpp_module
    quarter = m.llc_bytes() // 4 // 4  # float32 elements in a quarter of the LLC
    try:
        assert m.row_prefetch_bytes(quarter) == 0
        ahead = m.row_prefetch_bytes(quarter + 1)
        assert 4096 <= ahead <= 1 << 16
        m.set_row_prefetch(1)
        assert m.row_prefetch_bytes(1) == ahead
        m.set_row_prefetch(0)
        assert m.row_prefetch_bytes(1 << 40) == 0
    finally:
        m.set_row_prefetch(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_row_prefetch_gives_the_same_bits(cpp_module, dtype):
    # The prefetches change no arithmetic, but the loops they sit in were split into a
    # prefetching and a plain version (the channel groups of the pooling and pass A, the rows
    # of pass B): every output and gradient, prefetch forced on against off, bit for bit, and
    # against the reference. Enough channels that groups with and without a group ahead both
    # occur (short rows look many rows ahead), four-row and eight-row pooling, pass A's groups
    # and its one-row sweeps (flat blocks off), bands of rows and whole images, the leftover images'
    # streamed backward (batch 1 and 2 with three threads), the phases' pass B by channel rows
    # (the gate multiply's and the training BatchNorm's backward), one to three threads.
    from spatialattn.nn import SpatialAttention

    m = cpp_module
    old = torch.get_num_threads()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    cases = [(2, 97, 9, 7), (1, 70, 12, 11), (3, 45, 5, 6), (2, 130, 4, 4)]

    def run(shape):
        g, x0, w0, s0, gy = _tied_sam_inputs(shape, dtype, acc, seed=shape[1])
        out = []
        for scaled in (False, True):
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            s = s0.clone().requires_grad_() if scaled else None
            y = ops.spatial_attention_fused(x, w, channel_scale=s)
            out += [y] + list(torch.autograd.grad(y, (x, w) + ((s,) if scaled else ()), gy))
        x = x0.clone().requires_grad_()
        pooled = ops.channel_pool(x, ("max", "mean"), dtype=acc)
        out += [pooled] + list(torch.autograd.grad(pooled, x, torch.randn(pooled.shape, generator=g).to(acc)))
        x, s = x0.clone().requires_grad_(), s0.clone().requires_grad_()
        a = torch.rand(shape[0], 1, *shape[2:], generator=g).to(dtype).requires_grad_()
        y = ops.gate_multiply(x, a, s)  # its backward: the phases' pass B (k_gradx) rows
        out += [y] + list(torch.autograd.grad(y, (x, a, s), gy))
        if dtype != torch.bfloat16:  # the training BatchNorm's fused op: pass B by rows too
            mod = SpatialAttention(shape[1], norm="bn").train().to(dtype)
            for scaled in (False, True):
                x, s = x0.clone().requires_grad_(), s0.clone().requires_grad_()
                y, _ = mod.attend(x, s if scaled else None)
                out += [y] + list(torch.autograd.grad(y, [x] + list(mod.parameters()) + ([s] if scaled else []), gy))
        return out, x0, w0, gy

    try:
        m.set_flat_backward_max_block(0)
        m.set_stream_bytes(0)  # pass B's prefetch follows the stream stores
        for shape, threads, wide, band, shared, one_stream in itertools.product(
                cases, (1, 2, 3), (False, True), (0, 2), (False, True), (0, 1)):
            torch.set_num_threads(threads)
            m.set_one_stream_reduce(one_stream)  # pass A one row per sweep (whole images)
            m.set_pool_wide_bytes(0 if wide else -1)
            m.set_band_rows(band)
            m.set_shared_backward_bytes(0 if shared else -1)  # the leftover images streamed in units
            runs = []
            for mode in (0, 1):
                m.set_row_prefetch(mode)
                torch.manual_seed(0)  # the module's initial weights
                runs.append(run(shape))
            assert len(runs[0][0]) == len(runs[1][0])
            for a, b in zip(runs[0][0], runs[1][0]):
                _same(a, b)
        # and the prefetching build against the reference (one case per dtype)
        torch.set_num_threads(2)
        m.set_row_prefetch(1)
        x = (torch.randn(2, 97, 9, 7) * 2).to(dtype).requires_grad_()
        w = torch.randn(1, 2, 7, 7).to(acc)
        want_x = x.detach().to(acc).requires_grad_()
        y = ops.spatial_attention_fused(x, w)
        want, _ = ref_sam(want_x, w, None, ("max", "mean"), 1, None)
        tol = {torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float32: dict(rtol=1e-4, atol=1e-4),
               torch.float64: dict(rtol=1e-10, atol=1e-10)}[dtype]
        torch.testing.assert_close(y.to(acc), want, **tol)
        gy = torch.randn(y.shape).to(dtype)
        (gx,) = torch.autograd.grad(y, x, gy)
        (want_gx,) = torch.autograd.grad(want, want_x, gy.to(acc))
        torch.testing.assert_close(gx.to(acc), want_gx, **tol)
    finally:
        torch.set_num_threads(old)
        for knob in ("set_row_prefetch", "set_one_stream_reduce", "set_flat_backward_max_block", "set_stream_bytes",
                     "set_pool_wide_bytes", "set_shared_backward_bytes"):
            getattr(m, knob)(-1)
        m.set_band_rows(0)


@contextlib.contextmanager
def _unfused():
    """functional.spatial_attention without the fused training-BatchNorm op (the module path)."""
    from spatialattn import functional as SF

    orig = SF._fused_batchnorm_ok
    SF._fused_batchnorm_ok = lambda *a: False
    try:
        yield
    finally:
        SF._fused_batchnorm_ok = orig


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
@pytest.mark.parametrize("variant", ["default", "momentum_none", "no_affine", "no_running_stats", "scale_bias"])
@pytest.mark.parametrize("impl", ["cpp", "generic"])
def test_training_batchnorm_fused_matches_module(layout, variant, impl, monkeypatch):
    # A training-mode BatchNorm2d(1) on the logits (the official CBAM's default) runs as one
    # fused op with the batch statistics: same output, gradients (x, channel scale, conv,
    # BatchNorm affine) and running statistics as the unfused module path. "generic": the
    # op CUDA runs (Triton passes there; its PyTorch passes here) in place of the C++ one.
    import copy

    from spatialattn import functional as SF

    if impl == "generic":
        monkeypatch.setattr(lib, "CppSamBatchNorm", lib.GenericSamBatchNorm)
    calls = []
    real = ops.spatial_attention_fused_batchnorm
    monkeypatch.setattr(ops, "spatial_attention_fused_batchnorm", lambda *a, **k: calls.append(1) or real(*a, **k))
    bn = torch.nn.BatchNorm2d(1, momentum=None if variant == "momentum_none" else 0.1,
                              affine=variant != "no_affine", track_running_stats=variant != "no_running_stats")
    if bn.affine:
        with torch.no_grad():
            bn.weight.fill_(1.4), bn.bias.fill_(-0.3)
    bn = bn.double().train()
    if variant == "no_running_stats":
        bn.eval()  # no running statistics: batch statistics in eval mode too
    bn_ref = copy.deepcopy(bn)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1, 2, 7, 7, dtype=torch.float64, generator=g).requires_grad_()
    b = torch.randn(1, dtype=torch.float64, generator=g).requires_grad_() if variant == "scale_bias" else None
    s = torch.rand(3, 10, 1, 1, dtype=torch.float64, generator=g).requires_grad_() if variant == "scale_bias" else None
    gy = torch.randn(3, 10, 6, 7, dtype=torch.float64, generator=g)
    ga = torch.randn(3, 1, 6, 7, dtype=torch.float64, generator=g)
    results = []
    for norm, fused in ((bn, True), (bn_ref, False)):
        x = make_x((3, 10, 6, 7), layout, torch.float64).requires_grad_()
        params = [t for t in (x, w, b, s) if t is not None] + list(norm.parameters())
        for step in range(2):  # two steps: the running statistics accumulate
            if fused:
                y, a = SF.spatial_attention(x, w, b, order=("mean", "max"), norm=norm, channel_scale=s,
                                            return_attention=True)
            else:
                with _unfused():
                    y, a = SF.spatial_attention(x, w, b, order=("mean", "max"), norm=norm, channel_scale=s,
                                                return_attention=True)
            grads = torch.autograd.grad((y * gy).sum() + (a * ga).sum(), params)
        results.append((y, a, grads, norm.state_dict()))
    assert len(calls) == 2
    (y1, a1, g1, sd1), (y2, a2, g2, sd2) = results
    torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a1, a2, rtol=1e-10, atol=1e-12)
    for got, want in zip(g1, g2):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        torch.testing.assert_close(sd1[k], sd2[k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["cpp", "generic"])
def test_training_batchnorm_fused_gradcheck_and_fallbacks(impl):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 4, 5, dtype=torch.float64, generator=g).requires_grad_()
    s = torch.rand(2, 5, 1, 1, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(1, 2, 3, 3, dtype=torch.float64, generator=g).requires_grad_()
    b = torch.randn(1, dtype=torch.float64, generator=g).requires_grad_()
    gamma = (torch.rand(1, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    beta = torch.randn(1, dtype=torch.float64, generator=g).requires_grad_()

    fn = lib.CppSamBatchNorm if impl == "cpp" else lib.GenericSamBatchNorm

    def f(x, s, w, b, gamma, beta):
        y, a, _ = fn.apply(x, w, b, s, gamma, beta, 1e-5, [0, 1], 1)
        return y, a

    assert torch.autograd.gradcheck(f, (x, s, w, b, gamma, beta), fast_mode=True)
    bn = torch.nn.BatchNorm2d(1).train()
    xs = torch.randn(1, 4, 1, 1)
    assert not ops.batchnorm_train_fusable(xs, bn)  # one logit: BatchNorm itself refuses it
    assert not ops.batchnorm_train_fusable(torch.randn(2, 4, 3, 3), bn.eval())  # running stats: affine path
    # half x fuses with float32 BatchNorm parameters (autocast training) and with parameters in
    # its own half dtype (a model.half()), not with those of another
    assert ops.batchnorm_train_fusable(torch.randn(2, 4, 3, 3, dtype=torch.float16), bn.train())
    assert ops.batchnorm_train_fusable(torch.randn(2, 4, 3, 3), bn.train())
    assert ops.batchnorm_train_fusable(torch.randn(2, 4, 3, 3, dtype=torch.bfloat16), bn.bfloat16())
    assert not ops.batchnorm_train_fusable(torch.randn(2, 4, 3, 3, dtype=torch.float16), bn.bfloat16())
    assert not ops.batchnorm_train_fusable(torch.randn(2, 4, 3, 3), bn.bfloat16())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_training_batchnorm_with_half_parameters_fuses(dtype, layout, monkeypatch):
    # a model.half() / .bfloat16() in training: its SAM with a training BatchNorm took the layered
    # path (torch's conv and a half-precision BatchNorm: 2.3-2.7x the time of the fused op in a
    # training step). Its parameters now go to the fused op converted to float32 (exactly): the
    # same bits as a float32 copy of the module, the parameter gradients those rounded to the
    # half dtype by autograd's conversion, the running statistics the update rounded once more
    from spatialattn import SpatialAttention
    from spatialattn import functional as SF

    def unfused(*a, **k):
        raise AssertionError("the layered (unfused) SAM path was taken")

    monkeypatch.setattr(SF, "spatial_attention_map", unfused)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for i, (bias, momentum) in enumerate([(False, 0.1), (True, None)]):
        torch.manual_seed(i)
        half = SpatialAttention(10, 7, bias=bias, bn_momentum=momentum).to(dtype).train()
        with torch.no_grad():
            for p in half.parameters():
                p.copy_(torch.randn(p.shape).to(dtype) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
        full = copy.deepcopy(half).float()
        x = torch.randn(3, 10, 9, 8).to(dtype).contiguous(memory_format=fmt)
        xh, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        yh, yf = half(xh), full(xf)
        assert yh.dtype == dtype and torch.equal(yh, yf)
        g = torch.randn(yh.shape).to(dtype)
        yh.backward(g)
        yf.backward(g)
        assert torch.equal(xh.grad, xf.grad)
        for (name, ph), pf in zip(half.named_parameters(), full.parameters()):
            assert ph.grad.dtype == dtype and torch.equal(ph.grad, pf.grad.to(dtype)), name
        assert int(half.bn.num_batches_tracked) == int(full.bn.num_batches_tracked) == 1
        for name in ("running_mean", "running_var"):
            got, want = getattr(half.bn, name), getattr(full.bn, name)
            assert got.dtype == dtype and torch.equal(got, want.to(dtype)), name


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_training_batchnorm_running_statistics_like_batchnorm(momentum, dtype):
    # the fused op's running statistics (one C++ update, in double as ATen's batch norm)
    # follow BatchNorm2d's own over several steps, and a later eval call sees them
    from spatialattn import SpatialAttention

    torch.manual_seed(3)
    m = SpatialAttention(6, bn_momentum=momentum).to(dtype).train()
    ref_bn = torch.nn.BatchNorm2d(1, momentum=momentum).to(dtype).train()
    w = m.conv.weight.detach()
    for step in range(4):
        x = torch.randn(3, 6, 5, 4, dtype=dtype) * (step + 1) + step
        with torch.no_grad():
            m(x)
            pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], 1)
            ref_bn(torch.nn.functional.conv2d(pooled, w, padding=3))
        assert int(m.bn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == step + 1
        torch.testing.assert_close(m.bn.running_mean, ref_bn.running_mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(m.bn.running_var, ref_bn.running_var, rtol=1e-6, atol=1e-7)
        m.eval()  # the eval-mode affine pair (cached between steps) follows the new statistics
        with torch.no_grad():
            y = m(x)
            y_ref = x * torch.sigmoid(ref_bn.eval()(torch.nn.functional.conv2d(pooled, w, padding=3)))
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        m.train()
        ref_bn.train()


def test_running_statistics_update_same_bits_in_cpp_and_torch_ops(cpp_module):
    # the CPU op updates in C++, the others (CUDA) with torch ops: the same formula, the same bits
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        dtype = (torch.float32, torch.float64)[trial % 2]
        stats = torch.rand(2, dtype=torch.float64, generator=g) * 10
        rm, rv = torch.randn(1, dtype=dtype, generator=g), torch.rand(1, dtype=dtype, generator=g) * 3
        count, factor = 2 + trial * 7, float(torch.rand(1, generator=g))
        a_m, a_v = rm.clone(), rv.clone()
        cpp_module.bn_update_running(a_m, a_v, None, stats, count, factor)
        unbiased = stats[1] * count / (count - 1)
        torch.testing.assert_close(a_m, (factor * stats[0] + (1.0 - factor) * rm.double()).to(dtype), rtol=0, atol=0)
        torch.testing.assert_close(a_v, (factor * unbiased + (1.0 - factor) * rv.double()).to(dtype), rtol=0, atol=0)


def test_training_batchnorm_fusable_on_the_triton_path(monkeypatch):
    # CUDA with Triton (emulated: the backend choice patched): half inputs with float32
    # BatchNorm parameters (autocast training) fuse, and with half ones of their own dtype.
    monkeypatch.setattr(ops, "_fast_device", lambda x: "triton")
    bn = torch.nn.BatchNorm2d(1).train()
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert ops.batchnorm_train_fusable(torch.randn(2, 4, 3, 3, dtype=dtype), bn)
    assert ops.batchnorm_train_fusable(torch.randn(2, 4, 3, 3, dtype=torch.float16), copy.deepcopy(bn).half())
    assert not ops.batchnorm_train_fusable(torch.randn(2, 4, 3, 3, dtype=torch.bfloat16), copy.deepcopy(bn).half())
    # and the op it then runs: GenericSamBatchNorm (PyTorch passes on CPU tensors)
    calls = []
    real = lib.GenericSamBatchNorm.apply
    monkeypatch.setattr(lib.GenericSamBatchNorm, "apply", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 3, 3, generator=g)
    w = torch.randn(1, 2, 7, 7, generator=g)
    bn = torch.nn.BatchNorm2d(1).train()
    y = ops.spatial_attention_fused_batchnorm(x, w, None, bn)
    assert calls == [1] and int(bn.num_batches_tracked) == 1
    logits = torch.nn.functional.conv2d(torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], 1), w, padding=3)
    ref_bn = torch.nn.BatchNorm2d(1).train()
    torch.testing.assert_close(y, x * torch.sigmoid(ref_bn(logits)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
@pytest.mark.parametrize("shape", [(2, 70, 9, 11), (3, 5, 1, 1), (2, 40, 3, 17), (1, 33, 5, 7), (1, 33, 1, 2)])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("from_memory", [False, True])
def test_global_pool_backward_matches_reference(layout, shape, threads, from_memory):
    # the C++ backward of the channel-gate pooling: amax semantics (ties share evenly); with
    # fewer images than threads, channels_last splits each image's pixels into blocks.
    # from_memory: as if x did not fit in the cache (non-temporal stores in the backward)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    if from_memory:
        _cpp.get().set_stream_bytes(0)
    try:
        _global_pool_backward_cases(layout, shape)
    finally:
        torch.set_num_threads(old)
        _cpp.get().set_stream_bytes(-1)


def _short_rows_x(shape, dtype, seed):
    # values with many ties, signed zeros at the max and a NaN row: what the order of a max
    # or of a count could change
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 1, shape, generator=g).to(dtype)  # maxima 0, often tied
    flat = x.view(-1)
    flat[1::5] = -0.0
    flat[2::9] = 0.5 * torch.randn(flat[2::9].shape, generator=g).to(dtype)
    x[0, 1, 0, 0] = float("nan")
    return x


@pytest.mark.skipif(_cpp.get() is None, reason="C++ extension not available")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("hw", [(3, 3), (4, 4), (5, 5), (7, 7), (9, 11), (10, 10), (11, 11), (26, 26)])
@pytest.mark.parametrize("threads", [1, 3])
def test_global_pool_nchw_rows_grouped_and_counted(dtype, hw, threads):
    # the forward's NCHW rows of at most 100 pixels have their lane reductions done sixteen
    # rows at a time: the same bits as one row at a time (each channel alone: fewer than 16
    # rows); the backward counts the ties of a block of rows first (bits of the compare
    # masks), then writes their gradient: against a float64 reference, alone and added in
    # place into another gradient, where rows that are not a whole number of vectors go in
    # lane blocks (AVX-512 builds) with the bits of the rows
    ext = _cpp.get()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = _short_rows_x((3, 45, *hw), dtype, seed=hw[0])
        for kinds in ([1, 0], [0], [0, 1, 0]):
            got = ext.global_pool(x, kinds)
            alone = torch.cat([ext.global_pool(x[:, c : c + 1].contiguous(), kinds) for c in range(x.shape[1])], dim=2)
            ints = {torch.float32: torch.int32, torch.float64: torch.int64}[got.dtype]
            assert torch.equal(got.view(ints), alone.view(ints))  # bits: NaN, and the -0 / +0 of a max
            xd = x.double()
            want = torch.stack([xd.amax(dim=(2, 3)) if k == 0 else xd.mean(dim=(2, 3)) for k in kinds])
            torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6, equal_nan=True)
        x = _short_rows_x((3, 45, *hw), dtype, seed=1)
        x[0, 1, 0, 0] = 0.0  # no NaN: its gradient is not amax's
        kinds = [1, 0]
        pooled = ext.global_pool(x, kinds)
        g = torch.randn(2, 3, 45, generator=torch.Generator().manual_seed(3), dtype=pooled.dtype)
        xd = x.double().requires_grad_()
        ref = torch.stack([xd.mean(dim=(2, 3)), xd.amax(dim=(2, 3))])
        want = torch.autograd.grad(ref, xd, g.double())[0]
        got = ext.global_pool_backward(g, x, pooled, kinds, None, None)
        tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got.double(), want, **tol)
        base = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
        into = ext.global_pool_backward(g, x, pooled, kinds, base.clone(), None)
        torch.testing.assert_close(into.double(), base.double() + want, **tol)
        for kinds_b in ([1, 0], [0], [1]):  # both shares, the max alone, the mean alone
            pooled_b = ext.global_pool(x, kinds_b)
            g_b = g[: len(kinds_b)]
            ext.set_gp_lane_block_max_hw(0)
            rows = ext.global_pool_backward(g_b, x, pooled_b, kinds_b, base.clone(), None)
            ext.set_gp_lane_block_max_hw(-1)
            lanes = ext.global_pool_backward(g_b, x, pooled_b, kinds_b, base.clone(), None)
            assert torch.equal(lanes, rows)
    finally:
        ext.set_gp_lane_block_max_hw(-1)
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype,channels", [(torch.float32, 213), (torch.float32, 1100), (torch.float64, 37),
                                            (torch.bfloat16, 150)])
@pytest.mark.parametrize("threads", [1, 3])
def test_global_pool_channels_last_tiles(dtype, channels, threads):
    # channels_last: pixels in tiles, swept once per block of 8 / 4 / 1 channel vectors
    # (8 only where a pixel is shorter than 4 KiB), then a scalar tail; the tile size must not
    # change a bit of the maxima, means or tie counts (the sum adds pixels in order either
    # way). One image with 3 threads: its pixels split into blocks as well (partials, then
    # the combine); at least as many images as threads: each image's accumulators finished
    # straight into the outputs. The 40x40 image (over 512 KiB of x per thread in float32)
    # takes the software prefetches.
    gen = torch.Generator().manual_seed(11)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, h, w in ((1, 7, 9), (2, 5, 13), (1, 40, 40), (4, 3, 6)):
            x = torch.randn(n, channels, h, w, generator=gen).to(dtype)
            x[:, :, 1:3] = x[:, :, 1:3].round()  # tied maxima, some in a tile of their own
            x[0, 3, 2, 2] = float("nan")
            x = x.contiguous(memory_format=torch.channels_last)
            item = x.element_size()
            results = []
            for tile_bytes in (0, 3 * channels * item, 5 * channels * item, -1):
                _cpp.get().set_gp_tile_bytes(tile_bytes)
                results.append(_cpp.get().global_pool_counted(x, [lib.KIND["max"], lib.KIND["mean"]], True))
            for pooled, counts in results[1:]:
                assert torch.equal(pooled.nan_to_num(7.0), results[0][0].nan_to_num(7.0))
                assert torch.equal(counts, results[0][1])
            pooled, counts = results[-1]
            acc = lib._acc(x)
            want_max = x.to(acc).amax(dim=(2, 3))
            torch.testing.assert_close(pooled[1], x.to(acc).mean(dim=(2, 3)), equal_nan=True)
            torch.testing.assert_close(pooled[0], want_max, rtol=0, atol=0, equal_nan=True)
            ok = ~want_max.isnan()
            want_counts = (x.to(acc) == want_max[:, :, None, None]).sum(dim=(2, 3)).to(acc)
            assert torch.equal(counts[ok], want_counts[ok])
    finally:
        _cpp.get().set_gp_tile_bytes(-1)
        torch.set_num_threads(old)


def _global_pool_backward_cases(layout, shape):
    for ties in (False, True):
        x = make_x(shape, layout, torch.float64)
        if ties:
            x = x.round()  # many tied maxima
        for order in (("mean", "max"), ("max",), ("mean",), ("max", "mean", "max")):
            xa = x.clone().requires_grad_()
            xb = x.clone().requires_grad_()
            out = ops.global_pool(xa, order)
            ref = torch.stack([xb.amax(dim=(2, 3)) if k == "max" else xb.mean(dim=(2, 3)) for k in order])
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
            g = torch.randn_like(ref)
            torch.testing.assert_close(torch.autograd.grad(out, xa, g)[0], torch.autograd.grad(ref, xb, g)[0],
                                       rtol=1e-12, atol=1e-12)
            # the tie counts of the forward (channels_last) against the backward's own count
            xd = lib._dense(x)
            kinds = [lib.KIND[k] for k in order]
            pooled, counts = _cpp.get().global_pool_counted(xd, kinds, True)
            assert (counts is not None) == (not xd.is_contiguous() and "max" in order)  # C++ channels_last
            if counts is not None:
                want = (xd == pooled[order.index("max")][:, :, None, None]).sum(dim=(2, 3)).to(xd.dtype)
                assert torch.equal(counts, want)
                assert torch.equal(_cpp.get().global_pool_backward(g, xd, pooled, kinds, None, counts),
                                   _cpp.get().global_pool_backward(g, xd, pooled, kinds))
    x = make_x((2, 6, 3, 4), layout, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.global_pool(t, ("mean", "max")), (x,), fast_mode=True)


def test_training_batchnorm_under_torch_compile_uses_unfused_path():
    # torch.compile sees the unfused ops (fused pooling / multiply custom ops + conv + BN)
    from spatialattn.nn import SpatialAttention

    m = SpatialAttention(6).train()
    x = torch.randn(2, 6, 5, 7)
    y_eager = m(x)
    mean_eager = m.bn.running_mean.clone()
    m.bn.reset_running_stats()
    y_comp = torch.compile(m, fullgraph=True)(x)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.bn.running_mean, mean_eager, rtol=1e-5, atol=1e-7)


def test_training_batchnorm_with_half_parameters_under_torch_compile():
    # the conversion of a model.half()'s parameters is traced with the fused custom op: the
    # compiled step gives the eager step's bits, gradients and running statistics
    from spatialattn.nn import SpatialAttention

    torch.manual_seed(0)
    m = SpatialAttention(16).to(torch.bfloat16).train()
    mc = copy.deepcopy(m)
    x = torch.randn(2, 16, 9, 9).to(torch.bfloat16)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = m(xa), torch.compile(mc, fullgraph=True)(xb)
    g = torch.randn(ya.shape).to(torch.bfloat16)
    ya.backward(g)
    yb.backward(g)
    got = [yb, xb.grad] + [p.grad for p in mc.parameters()] + [mc.bn.running_mean, mc.bn.running_var]
    want = [ya, xa.grad] + [p.grad for p in m.parameters()] + [m.bn.running_mean, m.bn.running_var]
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("band_rows", [0, 2])
def test_backward_max_mask_from_index_map(cpp_module, layout, dtype, threads, band_rows):
    # Pass B takes the max channel from pass A's index map (x is not read) wherever no pixel
    # of the rows / image has tied maxima and no channel-scale gradient is wanted; elsewhere
    # it compares x with the max. Mixed batches: one image with a tie in its last row, one
    # without ties, one with a tie at a channel of the vector tail (C = 37); the max at the
    # first, a middle and the last channel.
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    cpp_module.set_band_rows(band_rows)
    try:
        g = torch.Generator().manual_seed(7)
        x0 = torch.randn(3, 37, 7, 6, generator=g, dtype=torch.float64)
        x0[0, 3, 6, 2] = x0[0, 20, 6, 2] = 9.0  # tie, last row
        x0[1, 0, 0, 0], x0[1, 36, 3, 3], x0[1, 17, 5, 1] = 8.0, 8.0, 8.0  # unique maxima
        x0[2, 33, 2, 4] = x0[2, 36, 2, 4] = 7.0  # tie in the channel tail
        x0 = x0.to(dtype)
        if layout == "channels_last":
            x0 = x0.contiguous(memory_format=torch.channels_last)
        w = torch.randn(1, 2, 3, 3, generator=g, dtype=dtype)
        s = (torch.rand(3, 37, 1, 1, generator=g, dtype=torch.float64) + 0.5).to(dtype)
        gy = torch.randn(3, 37, 7, 6, generator=g, dtype=dtype)
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-5)  # fp32: sums in another order
        for scale, scale_grad in ((None, False), (s, False), (s, True)):
            for n in (3, 1):  # n = 1 < threads: the phase-by-phase path
                x = x0[:n].clone().requires_grad_()
                xr = x0[:n].clone().requires_grad_()
                sc = None if scale is None else scale[:n].clone().requires_grad_(scale_grad)
                scr = None if scale is None else scale[:n].clone().requires_grad_(scale_grad)
                y = ops.spatial_attention_fused(x, w, order=("max", "mean"), channel_scale=sc)
                y_ref, _ = ref_sam(xr, w, None, ("max", "mean"), 1, scr)
                ins, ins_ref = ([x, sc], [xr, scr]) if scale_grad else ([x], [xr])
                got = torch.autograd.grad(y, ins, gy[:n])
                want = torch.autograd.grad(y_ref, ins_ref, gy[:n])
                for a, b in zip(got, want):
                    torch.testing.assert_close(a, b, **tol)
                y = ops.spatial_attention_fused(x, w, order=("max", "mean"), channel_scale=sc)
                y_ref, _ = ref_sam(xr, w, None, ("max", "mean"), 1, scr)
                # a broadcast upstream gradient (the gradient of a sum)
                got = torch.autograd.grad(y.sum() * 3, ins)
                want = torch.autograd.grad(y_ref.sum() * 3, ins_ref)
                for a, b in zip(got, want):
                    torch.testing.assert_close(a, b, **tol)
        # the channel pooling's own backward and the fused training-BatchNorm backward
        x = x0.clone().requires_grad_()
        xr = x0.clone().requires_grad_()
        gp = torch.randn(3, 2, 7, 6, generator=g, dtype=dtype)
        torch.testing.assert_close(torch.autograd.grad(ops.channel_pool(x, ("max", "mean")), x, gp)[0],
                                   torch.autograd.grad(reference.channel_pool(xr, ("max", "mean")), xr, gp)[0], **tol)
        bn = torch.nn.BatchNorm2d(1).to(dtype).train()
        y, _, _ = lib.CppSamBatchNorm.apply(x, w, None, None, bn.weight, bn.bias, 1e-5, [0, 1], 1)
        with _unfused():
            from spatialattn import functional as SF

            y_ref = SF.spatial_attention(xr, w, order=("max", "mean"), norm=torch.nn.BatchNorm2d(1).to(dtype).train())
        torch.testing.assert_close(y, y_ref, **tol)
        torch.testing.assert_close(torch.autograd.grad(y, x, gy)[0], torch.autograd.grad(y_ref, xr, gy)[0], **tol)
    finally:
        torch.set_num_threads(old)
        cpp_module.set_band_rows(0)


# ---------------------------------------------------------------- with_global_pool (CBAM)
def _cbam_separate(m, x):
    """CBAM channel_spatial as two separate ops (the path before with_global_pool)."""
    cg = m.channel.channel_gate(x)
    return m.spatial.attend(x, channel_scale=cg.to(x.dtype))[0]


@pytest.fixture
def pool_backward_spy(monkeypatch):
    """Records, per call of the pooling backward, whether it added into a given gradient."""
    calls = []
    orig = lib._global_pool_backward

    def spy(*args, into=None, **kwargs):
        calls.append(into is not None)
        return orig(*args, into=into, **kwargs)

    monkeypatch.setattr(lib, "_global_pool_backward", spy)
    return calls


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("preset", ["paper", "mmyolo", "ultralytics"])
def test_cbam_pool_gradient_in_place_equals_separate_ops(layout, dtype, preset, pool_backward_spy):
    # the pooling's gradient added in place into the SAM's grad_x: the same single addition
    # per element as autograd's, so bit-identical values and gradients
    import copy

    from spatialattn.nn import CBAM

    torch.manual_seed(0)
    m1 = CBAM(24, preset=preset).to(dtype).train()
    m2 = copy.deepcopy(m1)
    x1, x2 = make_x((3, 24, 7, 9), layout, dtype), make_x((3, 24, 7, 9), layout, dtype)
    for t in (x1, x2):
        t[1, 2, 3, 4] = t[1, 2].amax()  # a tied max
        t.requires_grad_()
    y1 = m1(x1)
    gy = torch.randn_like(y1)
    y1.backward(gy)
    assert pool_backward_spy == [True]  # the in-place path ran
    y2 = _cbam_separate(m2, x2)
    y2.backward(gy)
    assert torch.equal(y1, y2)
    assert torch.equal(x1.grad, x2.grad)
    for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p1.grad, p2.grad), name
    for b1, b2 in zip(m1.buffers(), m2.buffers()):
        assert torch.equal(b1, b2)


def test_cbam_pool_gradient_in_place_gradcheck():
    from spatialattn.nn import CBAM

    torch.manual_seed(0)
    m = CBAM(8, reduction=2).double().train()
    for layout in ("nchw", "channels_last"):
        x = make_x((2, 8, 5, 6), layout, torch.float64).requires_grad_()
        assert torch.autograd.gradcheck(m, (x,), fast_mode=True)
        params = tuple(m.parameters())
        assert torch.autograd.gradcheck(lambda *p: torch.func.functional_call(m, dict(zip(
            [n for n, _ in m.named_parameters()], p)), (x.detach(),)), params, fast_mode=True)


def test_with_global_pool_graph_cases(pool_backward_spy):
    from spatialattn.nn import CBAM

    torch.manual_seed(0)
    m = CBAM(16).train()
    x = torch.randn(2, 16, 6, 5)
    gy = torch.randn_like(x)

    def grads(fn, retain=False, **kw):
        xx = x.clone().requires_grad_()
        out = fn(xx)
        out.backward(gy, retain_graph=retain)
        if retain:
            out.backward(gy)
        return xx.grad, [p.grad.clone() for p in m.parameters()]

    def zero():
        for p in m.parameters():
            p.grad = None

    for fn, sep in (
        (lambda t: t + m(t), lambda t: t + _cbam_separate(m, t)),  # x also read elsewhere (residual)
        (lambda t: m(t) * m(t), lambda t: _cbam_separate(m, t) * _cbam_separate(m, t)),
    ):
        m.eval()  # no BN statistics updates between the two paths
        zero()
        got = grads(fn)
        zero()
        want = grads(sep)
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
        for a, b in zip(got[1], want[1]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # a backward run twice over a retained graph
    zero()
    got = grads(m, retain=True)
    zero()
    want = grads(lambda t: _cbam_separate(m, t), retain=True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    # gradients of the parameters only (the pooling / tap nodes are not run)
    xx = x.clone().requires_grad_()
    g1 = torch.autograd.grad((m(xx) * gy).sum(), list(m.parameters()))
    g2 = torch.autograd.grad((_cbam_separate(m, xx) * gy).sum(), list(m.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # a body that does not use the pooled maps: the tap sends zeros on, the pooling node
    # still runs and hands the body's gradient to x
    pool_backward_spy.clear()
    xx = x.clone().requires_grad_()
    (y,) = ops.with_global_pool(xx, lambda t, p: (t * 3.0,))
    y.backward(gy)
    assert pool_backward_spy == [True]
    torch.testing.assert_close(xx.grad, gy * 3.0)
    # without autograd, or for an x that needs no gradient: the plain composition
    for ctx in (torch.no_grad(), contextlib.nullcontext()):
        with ctx:
            y = m(x)
        torch.testing.assert_close(y, _cbam_separate(m, x))
        assert "GradTapBackward" not in node_names(y)
    xx = x.clone().requires_grad_()
    assert {"GradTapBackward", "GlobalPoolBackward"} <= node_names(m(xx))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stream", [False, True])
def test_nchw_short_rows_in_blocks_match_row_by_row(cpp_module, dtype, stream):
    # NCHW products of short whole rows (at most 100 pixels, not a multiple of 16: 7x7, 9x11,
    # 10x10) go through mul_row in blocks of rows against the tiled attention (mul_rows_flat): the
    # same bits as row by row (set_flat_rows_max_hw(0)), in the fused forward (whole images and
    # bands), the gate multiply op and the training-BatchNorm forward (k_mul, several threads:
    # ranges of rows that start and end inside images), with a channel scale (since the
    # thirty-eighth session in blocks too, each row's scale repeated over its pixels: CBAM on
    # RoI features; since the fortieth in AVX-512 builds each lane's scale permuted from the
    # block's, cached and streamed), streamed and cached stores; and the reference's values. Channel counts below,
    # at and past a block (16 rows at 7x7 and 9x11, 4 at 10x10) and with leftover rows; 13x13
    # and 8x8 take the rows anyway.
    torch.manual_seed(5)
    shapes = [(3, 70, 7, 7), (2, 64, 7, 7), (2, 37, 10, 10), (1, 19, 9, 11), (2, 10, 7, 7), (2, 33, 13, 13),
              (2, 40, 8, 8)]
    try:
        cpp_module.set_stream_bytes(0 if stream else -1)
        for shape in shapes:
            x = make_x(shape, "nchw", torch.float32, seed=4).to(dtype)
            n, c, h, w_ = shape
            w = torch.randn(1, 2, 7, 7).to(ops._lib._acc(x))
            attn = torch.rand(n, 1, h, w_, dtype=ops._lib._acc(x))
            s = (torch.rand(n, c, 1, 1) + 0.5).to(dtype)
            outs = {}
            for name, limit in (("blocks", -1), ("rows", 0)):
                cpp_module.set_flat_rows_max_hw(limit)
                got = [cpp_module.gate_forward(x, attn, None, None), cpp_module.gate_forward(x, attn, s, None),
                       *cpp_module.sam_forward(x, w, None, None, None, None, [1, 0], 1, None),
                       cpp_module.sam_forward(x, w, None, s, None, None, [1, 0], 1, None)[0]]
                old = torch.get_num_threads()
                try:
                    for threads in (1, 2, 3):
                        torch.set_num_threads(threads)
                        got.append(cpp_module.sam_forward_bn(x, w, None, None, torch.ones(1), torch.zeros(1), 1e-5,
                                                             [1, 0], 1)[0])
                        got.append(cpp_module.sam_forward_bn(x, w, None, s, torch.ones(1), torch.zeros(1), 1e-5,
                                                             [1, 0], 1)[0])
                        got.append(cpp_module.gate_forward(x, attn, s, None))
                finally:
                    torch.set_num_threads(old)
                cpp_module.set_band_rows(2)
                try:
                    got.append(cpp_module.sam_forward(x, w, None, None, None, None, [1, 0], 1, None)[0])
                finally:
                    cpp_module.set_band_rows(0)
                outs[name] = got
            for i, (a, b) in enumerate(zip(outs["blocks"], outs["rows"])):
                assert torch.equal(a, b), (shape, dtype, stream, i)
            acc = ops._lib._acc(x)
            want = (x.to(acc) * attn).to(dtype)
            torch.testing.assert_close(outs["blocks"][0], want, rtol=0, atol=0)
            want = ((x.to(acc) * s.to(acc)) * attn).to(dtype)
            torch.testing.assert_close(outs["blocks"][1], want, rtol=0, atol=0)
    finally:
        cpp_module.set_flat_rows_max_hw(-1)
        cpp_module.set_stream_bytes(-1)


@pytest.fixture
def short_rows_knobs(cpp_module):
    """Puts the thread count and the knobs the short-row backward tests turn (blocks, max
    bits, streaming) back to their defaults after the test."""
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)
    cpp_module.set_flat_backward_max_block(-1)
    cpp_module.set_max_bits(True)
    cpp_module.set_max_bits_phase_bytes(-1)
    cpp_module.set_stream_bytes(-1)


def _short_rows_tol(dtype):
    """blocks against rows (and the reference) in the short-row backward tests"""
    return {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-11, atol=1e-11)}.get(
        dtype, dict(rtol=2e-2, atol=2e-2))


def _short_rows_maps(shapes, dtype):
    """``(shape, order, x, g)`` per shape for the short-row backward tests: the pooling orders in
    turn; ``x`` with tied maxima in image 0's channel 3 and last channel (a first block's and the
    rows left's); ``g`` a generator for the rest."""
    orders = itertools.cycle([("max", "mean"), ("max",), ("mean", "max", "max"), ("mean",)])
    for shape, order in zip(shapes, orders):
        n, c, h, w_ = shape
        x0 = make_x(shape, "nchw", torch.float32, seed=c).to(dtype)
        x0[0, 3, 2, 1] = x0[0, c - 1, 2, 1] = x0[0, :, 2, 1].max() + 1
        yield shape, order, x0, torch.Generator().manual_seed(h * w_)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.usefixtures("short_rows_knobs")
def test_nchw_short_rows_backward_in_blocks(cpp_module, dtype, stream):
    # The fused backward of whole NCHW images with short rows (HW not a multiple of 16, blocks
    # of 16 / gcd(HW, 16) rows of at most 1600 elements) and no channel scale runs both passes
    # in blocks against the tiled maps (reduce_rows_flat, gradx_rows_flat): the gate's gradient
    # sums its channels in another order than row by row (set_flat_backward_max_block(0)), so close, not
    # equal; the max channels from the flat max bits give the same bits as the compare
    # (set_max_bits(False)); and the reference's gradients. Channel counts at and past a block
    # with leftover rows (70 = 4 x 16 + 6, 37 = 9 x 4 + 1, 13 = 3 x 4 + 1 at 14x14), a 3x3 map,
    # 9x11 (a block of 1584 elements), tied maxima in a block
    # and in the leftover rows; an upstream gradient, a broadcast one (y.sum()) and one on the
    # returned attention; one and two threads (whole images per thread) and four and five
    # (more threads than images: the leftover images' phases, k_reduce_blocks_impl /
    # k_gradx_blocks_impl, whose units do not depend on the thread count: equal bits); streamed
    # and cached stores. Fewer channels than a block, 13x13 (blocks of 2704) and 8x8 take the
    # rows (equal bits).
    torch.manual_seed(6)
    shapes = [(3, 70, 7, 7), (2, 37, 10, 10), (2, 19, 9, 11), (2, 48, 3, 3), (2, 13, 14, 14), (2, 10, 7, 7),
              (2, 33, 13, 13), (2, 40, 8, 8)]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tol = _short_rows_tol(dtype)
    differs = []
    cpp_module.set_stream_bytes(0 if stream else -1)
    for shape, order, x0, g in _short_rows_maps(shapes, dtype):
        n, c, h, w_ = shape
        w0 = torch.randn(1, len(order), 7, 7, generator=g).to(acc)
        gy = torch.randn(shape, generator=g).to(dtype)
        ga = torch.randn(n, 1, h, w_, generator=g).to(acc)
        x, w = x0.double().requires_grad_(), w0.double().requires_grad_()
        y, a = ref_sam(x, w, None, order, 1, None)
        want = [torch.autograd.grad(y, (x, w), gy.double(), retain_graph=True),
                torch.autograd.grad(y.sum() * 3, (x, w), retain_graph=True),
                torch.autograd.grad((y * gy.double()).sum() + (a * ga.double()).sum(), (x, w))]
        runs = {}
        for name, limit, bits in (("blocks", -1, True), ("compare", -1, False), ("rows", 0, True)):
            cpp_module.set_flat_backward_max_block(limit)
            cpp_module.set_max_bits(bits)
            for threads in (1, 2, 4, 5):
                torch.set_num_threads(threads)
                x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
                got = []
                y, a = ops.spatial_attention_fused(x, w, order=order, return_attention=True)
                got.append(torch.autograd.grad(y, (x, w), gy, retain_graph=True))
                got.append(torch.autograd.grad(y.sum() * 3, (x, w), retain_graph=True))
                got.append(torch.autograd.grad((y * gy).sum() + (a * ga).sum(), (x, w)))
                runs[name, threads] = got
        cpp_module.set_flat_backward_max_block(-1)
        cpp_module.set_max_bits(True)
        rows = 16 // math.gcd(h * w_, 16)
        blocked = rows > 1 and c >= rows and rows * h * w_ <= 1600
        for a, b in zip(runs["blocks", 4], runs["blocks", 5]):
            for k in range(2):
                assert torch.equal(a[k], b[k]), shape
        for threads in (1, 2, 4):
            for i, (gb, gc, gr, wt) in enumerate(zip(runs["blocks", threads], runs["compare", threads],
                                                     runs["rows", threads], want)):
                for k in range(2):
                    assert torch.equal(gb[k], gc[k]), (shape, threads, i, k)
                    if blocked:
                        torch.testing.assert_close(gb[k], gr[k], **tol)
                        differs.append(not torch.equal(gb[k], gr[k]))
                    else:
                        assert torch.equal(gb[k], gr[k]), (shape, threads, i, k)
                    scale = max(1.0, float(wt[k].abs().max()))  # the weight's sums over all pixels
                    torch.testing.assert_close(gb[k].double(), wt[k], rtol=tol["rtol"], atol=tol["atol"] * scale)
    if dtype != torch.bfloat16:
        assert any(differs)  # the blocks ran (their sums in another order)


def _short_rows_bn_batches(dtype):
    """``(shape, order, x)`` for the training-BatchNorm backward tests of short rows: 70 channels
    at 7x7, batch 3; 600 at 5x5, batch 2; 9 at 10x10, batch 3; ``x`` with tied maxima in image
    1's first and last channels (the last in the rows left after the blocks). Seeds the global
    generator per case."""
    for shape, order in (((3, 70, 7, 7), ("max", "mean")), ((2, 600, 5, 5), ("mean", "max")),
                         ((3, 9, 10, 10), ("max",))):
        n, c, h, w_ = shape
        torch.manual_seed(c)
        x0 = make_x(shape, "nchw", dtype, seed=c)
        x0[1, c - 1, 3, 2] = x0[1, 0, 3, 2] = x0[1, :, 3, 2].max() + 1
        yield shape, order, x0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.usefixtures("short_rows_knobs")
def test_nchw_short_rows_batchnorm_backward_in_blocks(cpp_module, dtype):
    # The training-BatchNorm backward (phases over the batch) of NCHW images with short rows
    # and no channel scale runs its passes in the blocks of the test above, in units set by
    # the batch and the shape (k_reduce_blocks_impl, k_gradx_blocks_impl; about 8 units in all,
    # each of at least 16 blocks or an image's): the same bits for 1-3 threads, with and
    # without the flat max bits (set_max_bits_phase_bytes(0) / set_max_bits(False)); close to
    # row by row (set_flat_backward_max_block(0)) and to the unfused module path. 70 channels
    # at 7x7, batch 3: one unit of 4 blocks of 16 rows, and 6 rows left; 600 at 5x5, batch 2:
    # units of 16, 16 and 5 blocks, and 8 rows left; 9 at 10x10: one unit of two blocks of 4
    # rows and 1 row left; a tie in the leftover rows.
    from spatialattn.nn import SpatialAttention

    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for shape, order, x0 in _short_rows_bn_batches(dtype):
        c = shape[1]
        mod = SpatialAttention(c, order=order, norm="bn").to(dtype).train()
        gy = torch.randn(shape, dtype=dtype)

        def grads(unfused=False):
            m = copy.deepcopy(mod)
            x = x0.clone().requires_grad_()
            with _unfused() if unfused else contextlib.nullcontext():
                y = m(x)
            return torch.autograd.grad(y, [x] + list(m.parameters()), gy)

        runs = {}
        for name, block, bit_bytes, bits in (("blocks", -1, 0, True), ("compare", -1, 0, False),
                                             ("small", -1, -1, True), ("rows", 0, 0, True)):
            cpp_module.set_flat_backward_max_block(block)
            cpp_module.set_max_bits_phase_bytes(bit_bytes)
            cpp_module.set_max_bits(bits)
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                runs[name, threads] = grads()
        cpp_module.set_flat_backward_max_block(-1)
        cpp_module.set_max_bits_phase_bytes(-1)
        cpp_module.set_max_bits(True)
        want = grads(unfused=True)
        for key, got in runs.items():
            for i, (a, b, r) in enumerate(zip(got, runs["blocks", 1], want)):
                if key[0] == "rows":
                    torch.testing.assert_close(a, b, **tol)
                    if key[1] == 1:
                        torch.testing.assert_close(a, r, **tol)
                else:
                    assert torch.equal(a, b), (shape, key, i)
                scale = max(1.0, float(r.abs().max()))
                torch.testing.assert_close(a, r, rtol=tol["rtol"], atol=tol["atol"] * scale)
        if dtype == torch.float32:
            assert any(not torch.equal(a, b) for a, b in zip(runs["blocks", 1], runs["rows", 1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.usefixtures("short_rows_knobs")
def test_nchw_short_rows_scaled_backward_in_blocks(cpp_module, dtype, stream):
    # With a channel scale (CBAM) and its gradient, the NCHW backward of short rows (HW up to
    # 100 and not a multiple of 16) runs in the blocks of the test above too, each lane of a
    # block scaled by its row's scale (reduce_blocks_scaled, gradx_blocks_scaled); the scale's
    # gradient sums each row in the block's lanes, so close to row by row
    # (set_flat_backward_max_block(0)), not equal. Where an image has one whole block (C below
    # two blocks: 20 at 7x7, 5 at 10x10, 22 at 5x5, 16 at 9x11, with rows left over but for
    # 16), the gate's gradient sums the channels in order as the rows do, so grad_x and the
    # weight's gradient are the rows' bits. More blocks (70 at 7x7, 37 at 10x10, 48 at 3x3):
    # all close. 14x14 (HW above 100) and 8x8 keep the rows: equal bits. One and two threads
    # (whole images) give the same bits, and so do four and five (more threads than images:
    # the phases).
    # Tied maxima in a block and in the rows left; an upstream gradient, a broadcast one
    # (y.sum()) and one on the returned attention; streamed and cached stores; and the
    # reference's gradients.
    shapes = [(3, 70, 7, 7), (2, 37, 10, 10), (2, 48, 3, 3), (2, 20, 7, 7), (2, 5, 10, 10), (2, 22, 5, 5),
              (2, 16, 9, 11), (2, 13, 14, 14), (2, 40, 8, 8)]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tol = _short_rows_tol(dtype)
    differs = []
    cpp_module.set_stream_bytes(0 if stream else -1)
    for shape, order, x0, g in _short_rows_maps(shapes, dtype):
        n, c, h, w_ = shape
        s0 = (torch.rand(n, c, 1, 1, generator=g) + 0.5).to(dtype)
        s0[0, 3] = s0[0, c - 1] = 1.0  # (keeps the tie)
        w0 = torch.randn(1, len(order), 7, 7, generator=g).to(acc)
        gy = torch.randn(shape, generator=g).to(dtype)
        ga = torch.randn(n, 1, h, w_, generator=g).to(acc)
        x, s, w = x0.double().requires_grad_(), s0.double().requires_grad_(), w0.double().requires_grad_()
        y, a = ref_sam(x, w, None, order, 1, s)
        want = [torch.autograd.grad(y, (x, w, s), gy.double(), retain_graph=True),
                torch.autograd.grad(y.sum() * 3, (x, w, s), retain_graph=True),
                torch.autograd.grad((y * gy.double()).sum() + (a * ga.double()).sum(), (x, w, s))]
        runs = {}
        for name, limit in (("blocks", -1), ("rows", 0)):
            cpp_module.set_flat_backward_max_block(limit)
            for threads in (1, 2, 4, 5):
                torch.set_num_threads(threads)
                x, s, w = x0.clone().requires_grad_(), s0.clone().requires_grad_(), w0.clone().requires_grad_()
                y, a = ops.spatial_attention_fused(x, w, order=order, channel_scale=s, return_attention=True)
                runs[name, threads] = [torch.autograd.grad(y, (x, w, s), gy, retain_graph=True),
                                       torch.autograd.grad(y.sum() * 3, (x, w, s), retain_graph=True),
                                       torch.autograd.grad((y * gy).sum() + (a * ga).sum(), (x, w, s))]
        cpp_module.set_flat_backward_max_block(-1)
        rows = cpp_module.backward_block_rows(False, True, c, h * w_)
        one_block = rows > 0 and c < 2 * rows
        for threads in (1, 2, 4, 5):
            for i, (gb, gr, wt) in enumerate(zip(runs["blocks", threads], runs["rows", threads], want)):
                for k in range(3):
                    same = runs["blocks", 1 if threads < 4 else 4][i][k]  # (the weight's sums: per path)
                    assert torch.equal(gb[k], same), (shape, threads, i, k)
                    if rows == 0 or (one_block and k < 2):
                        assert torch.equal(gb[k], gr[k]), (shape, threads, i, k)
                    else:
                        torch.testing.assert_close(gb[k], gr[k], **tol)
                        differs.append(not torch.equal(gb[k], gr[k]))
                    scale = max(1.0, float(wt[k].abs().max()))  # sums over all pixels
                    torch.testing.assert_close(gb[k].double(), wt[k], rtol=tol["rtol"], atol=tol["atol"] * scale)
    if cpp_module.backward_block_rows(False, True, 70, 49) > 0 and dtype != torch.bfloat16:
        assert any(differs)  # the blocks ran (the scale's gradient summed in another order)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.usefixtures("short_rows_knobs")
def test_nchw_short_rows_scaled_batchnorm_backward_in_blocks(cpp_module, dtype):
    # CBAM's training step: the training-BatchNorm backward (phases over the batch) with a
    # channel scale and its gradient, in blocks of rows as above (units of at least 16
    # blocks or a whole image's: 600 channels at 5x5, batch 2, in units of 16, 16 and 5 blocks
    # and 8 rows left; 70 at 7x7, batch 3, one unit of 4 blocks and 6 rows left): the same
    # bits for 1-3 threads; close to row by row and to the unfused module path.
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for shape, order, x0 in _short_rows_bn_batches(dtype):
        n, c, h, w_ = shape
        norm = torch.nn.BatchNorm2d(1).to(dtype).train()
        norm.weight.data.fill_(1.3)
        w0 = torch.randn(1, len(order), 7, 7, dtype=dtype) * 0.2
        s0 = torch.rand(n, c, 1, 1, dtype=dtype) + 0.5
        s0[1, 0] = s0[1, c - 1] = 1.0
        gy = torch.randn(shape, dtype=dtype)

        def grads(fused=True):
            x, s, w = x0.clone().requires_grad_(), s0.clone().requires_grad_(), w0.clone().requires_grad_()
            m = copy.deepcopy(norm)
            if fused:
                y = ops.spatial_attention_fused_batchnorm(x, w, None, m, order=order, channel_scale=s)
            else:
                y, _ = ref_sam(x, w, None, order, 1, s, bn=(m.weight, m.bias))
            return torch.autograd.grad(y, [x, s, w] + list(m.parameters()), gy)

        runs = {}
        for name, block in (("blocks", -1), ("rows", 0)):
            cpp_module.set_flat_backward_max_block(block)
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                runs[name, threads] = grads()
        cpp_module.set_flat_backward_max_block(-1)
        want = grads(fused=False)
        for key, got in runs.items():
            for i, (a, b, r) in enumerate(zip(got, runs[key[0], 1], want)):
                assert torch.equal(a, b), (shape, key, i)
                torch.testing.assert_close(a, runs["rows", key[1]][i], **tol)
                scale = max(1.0, float(r.abs().max()))
                torch.testing.assert_close(a, r, rtol=tol["rtol"], atol=tol["atol"] * scale)
        if cpp_module.backward_block_rows(False, True, c, h * w_) > 0:
            assert any(not torch.equal(a, b) for a, b in zip(runs["blocks", 1], runs["rows", 1])), shape


def test_kernels_release_the_gil(cpp_module):
    """Another Python thread runs while a kernel runs (the bindings release the GIL, as torch's
    operators do). Thread B waits for an event set just before four ~40 ms calls in a row and
    time-stamps once. With the switch interval at 1 s, longer than the four calls, a thread
    waiting for the GIL cannot force it away from a caller that holds it, so calls holding the
    GIL would keep B's stamp after their end ``t1`` (checked with ``sorted`` of a long list,
    which holds the GIL: never before ``t1``); calls that release it let B in as soon as B gets
    a core, which on a busy machine (the suite's background interpreter runs, a host that steals
    the VM's cores) may take some milliseconds: hence the four calls as the window (160 ms;
    three 20 ms calls had failed twice in full runs, never alone), and ten tries."""
    import os
    import sys
    import threading
    import time

    old, old_switch = torch.get_num_threads(), sys.getswitchinterval()
    torch.set_num_threads(1)  # one core for the kernel, one for thread B
    x = torch.randn(4, 256, 128, 128)
    w = torch.randn(1, 2, 7, 7)
    try:
        cpp_module.sam_forward(x, w, None, None, None, None, [0, 1], 1, None)  # warm: pages, code
        sys.setswitchinterval(1.0)
        early = []
        for _ in range(10):  # a held GIL never lets B in early; a busy or unlucky schedule might not
            go, stamps = threading.Event(), []
            thread = threading.Thread(target=lambda: (go.wait(), stamps.append(time.perf_counter())))
            thread.start()
            go.set()
            t0 = time.perf_counter()
            for _ in range(4):
                cpp_module.sam_forward(x, w, None, None, None, None, [0, 1], 1, None)
            t1 = time.perf_counter()
            thread.join()
            early.append((stamps[0] < t1, round((t1 - t0) * 1e3, 1)))
            if early[-1][0]:
                break
        if not any(e for e, _ in early):  # name what else might hold the GIL: another thread of this process?
            frames = sys._current_frames()
            others = [(t.name, t.daemon, getattr(frames.get(t.ident), "f_code", None))
                      for t in threading.enumerate() if t is not threading.current_thread()]
            raise AssertionError(f"thread B only ran after the kernels returned: the GIL was held (tries: (early, "
                                 f"ms) {early}; threads: {others}; load: {os.getloadavg()})")
    finally:
        sys.setswitchinterval(old_switch)
        torch.set_num_threads(old)


def test_concurrent_calls_from_threads_give_the_same_bits():
    """Two Python threads calling the kernels at once (each its own OpenMP team) get the
    results of the same calls made one after the other: no shared scratch state."""
    from concurrent.futures import ThreadPoolExecutor

    def work(seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(3, 40, 19, 17, generator=g)
        if seed % 2:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        w = torch.randn(1, 2, 7, 7, generator=g, requires_grad=True)
        s = torch.rand(3, 40, 1, 1, generator=g, requires_grad=True)
        y = ops.spatial_attention_fused(x, w, channel_scale=s)
        grads = torch.autograd.grad(y, (x, w, s), torch.randn(y.shape, generator=g))
        with torch.no_grad():
            pooled = ops.global_pool(x)
        return [y.detach(), pooled, *grads]

    seeds = list(range(8))
    want = [work(seed) for seed in seeds]
    with ThreadPoolExecutor(max_workers=2) as pool:
        got = list(pool.map(work, seeds * 4))
    for i, results in enumerate(got):
        for a, b in zip(results, want[i % len(seeds)]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def _lane_order_sum(values):
    """The sum ``lane_sums`` (sam_batchnorm.h) forms: eight lanes over the whole blocks of
    eight (lane l takes the elements k = l mod 8, in order), the lanes added in order, then the
    last ``len(values) % 8`` elements."""
    lanes = [0.0] * 8
    whole = len(values) // 8 * 8
    for k in range(whole):
        lanes[k % 8] += values[k]
    total = 0.0
    for v in lanes:
        total += v
    for k in range(whole, len(values)):
        total += values[k]
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batchnorm_attention_same_function_for_every_logit(cpp_module, dtype):
    # a batch of identical images has identical logits in every image, so the training-
    # BatchNorm op's attention must be identical too: the sigmoid runs over the flat batch in
    # whole vectors, and the logits past the last whole vector (the end of the last image)
    # must take the same sigmoid as the vectors (std::exp there differed by an ulp in about
    # one configuration in five)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        h, w_ = (int(v) for v in torch.randint(3, 20, (2,), generator=g))
        x = (torch.randn(1, 6, h, w_, generator=g, dtype=dtype) * 3).expand(3, -1, -1, -1).contiguous()
        w = torch.randn(1, 2, 7, 7, generator=g, dtype=dtype) * 0.5
        one = torch.ones(1, dtype=dtype)
        y, attn, logits, _, _ = cpp_module.sam_forward_bn(x, w, None, None, one * 2, one * 0.5, 1e-5, [0, 1], 1)
        assert torch.equal(logits[2], logits[0])
        assert torch.equal(attn[1], attn[0]) and torch.equal(attn[2], attn[0]), (h, w_)
        assert torch.equal(y[2], y[0])


@pytest.mark.parametrize("shape", [(1, 3, 1, 2), (1, 2, 1, 7), (1, 2, 3, 3), (2, 4, 5, 5), (3, 2, 6, 7),
                                   (3, 2, 60, 61)])
def test_batchnorm_statistics_in_fixed_lanes(cpp_module, shape):
    # the training-BatchNorm op's batch mean and biased variance of the logits (float64): the
    # same bits for any thread count, exactly the documented lane order (sizes below, at and
    # above one block of eight; tails of 1-7), and within 1e-12 of torch's float64 statistics;
    # every output (y, attn: the sigmoid pass in parallel blocks of whole vectors, 10980 logits
    # of the last shape taking two blocks and a 4-element tail) the same bits for 1-3 threads
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g)
    w = torch.randn(1, 2, 7, 7, generator=g) * 0.3
    old = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(cpp_module.sam_forward_bn(x, w, None, None, torch.ones(1), torch.zeros(1), 1e-5, [0, 1], 1))
    finally:
        torch.set_num_threads(old)
    for got in outs[1:]:
        for a, b in zip(outs[0], got):
            assert torch.equal(a, b)
    stats, logits = [o[4] for o in outs], outs[0][2]
    v = logits.double().flatten().tolist()
    mean = _lane_order_sum(v) / len(v)
    var = _lane_order_sum([(t - mean) * (t - mean) for t in v]) / len(v)
    assert stats[0].tolist() == [mean, var]
    ld = logits.double()
    torch.testing.assert_close(stats[0], torch.stack([ld.mean(), ld.var(unbiased=False)]), rtol=1e-12, atol=1e-15)


def test_batchnorm_affine_in_a_wider_dtype():
    # a half-precision BatchNorm's pair computed in float32 from its converted statistics and
    # parameters (as torch's BatchNorm computes internally), cached apart from its own dtype's
    bn = torch.nn.BatchNorm2d(1).eval()
    with torch.no_grad():
        bn.running_mean.fill_(0.3)
        bn.running_var.fill_(1.7)
        bn.weight.fill_(1.3)
        bn.bias.fill_(-0.2)
    full = copy.deepcopy(bn)
    bn = bn.half()
    full.load_state_dict({k: v.float() for k, v in bn.state_dict().items()})
    with torch.no_grad():  # (the pair is cached without autograd)
        ns, nsh = ops.batchnorm_affine(bn, torch.float32)
        assert ns.dtype == nsh.dtype == torch.float32
        want = ops.batchnorm_affine(full)
        torch.testing.assert_close((ns, nsh), want, rtol=0, atol=0)
        assert ops.batchnorm_affine(bn, torch.float32)[0] is ns  # cached
        own = ops.batchnorm_affine(bn)
        assert own[0].dtype == torch.float16  # the other dtype's pair, not the cached one
        assert ops.batchnorm_affine(bn, torch.float32)[0].dtype == torch.float32
    # differentiable in gamma / beta through the conversion
    ns, nsh = ops.batchnorm_affine(bn.requires_grad_(True), torch.float32)
    (ns * 2 + nsh).sum().backward()
    assert bn.weight.grad.dtype == torch.float16 and bn.bias.grad is not None
