"""The C++ kernels on float16 / bfloat16 tensors.

They read and write the full-size tensors (x, the upstream gradient, y, grad_x) in the half
format and compute in float32 (the build has no floating-point contraction). So each
full-size result must equal the float32 kernel's result on the same values rounded once to
the half format, and every small output (pooled maps, logits, gates, parameter gradients)
must equal the float32 kernel's exactly. On top of that, the public ops must match the
float64 reference within the format's tolerance.
"""
from __future__ import annotations

import pytest
import torch

from spatialattn import ops
from spatialattn.nn import CBAM, SpatialAttention
from spatialattn.ops import reference
from spatialattn.ops import _library as lib

from ._autograd_graph import node_names

HALF = [torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last"]
# channels below / across the 16-lane vectors with tails; pixel counts with tails
SHAPES = [(2, 19, 5, 7), (3, 40, 9, 11), (2, 70, 3, 33)]
# float64 reference vs half kernels: one rounding of the output, plus the input's rounding
# already shared by both
TOL = {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


@pytest.fixture(scope="module")
def m(cpp_module):
    return cpp_module


@pytest.fixture(params=["cached", "streamed"])
def stores(request, m):
    """Run once with ordinary stores and once with non-temporal ones (threshold 0)."""
    m.set_stream_bytes(0 if request.param == "streamed" else -1)
    yield request.param
    m.set_stream_bytes(-1)


def make(shape, layout, dtype, seed=0, ties=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    if ties:  # tied maxima across channels (channel pooling) and within a plane (global pooling)
        x[0, 3] = x[0, 5]
        x[0, 3, 1, 1] = x[0, 3].max() + 1
        x[0, 3, 2, 2] = x[0, 3, 1, 1]
        x[-1, :, 0, 0] = 2.0
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x.contiguous()


def assert_rounded_once(half, full, dtype):
    assert half.dtype == dtype
    torch.testing.assert_close(half, full.to(dtype), rtol=0, atol=0, equal_nan=True)


def assert_equal(a, b):
    if a is None or b is None:
        assert a is None and b is None
        return
    assert a.dtype == b.dtype
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kinds", [[0, 1], [1, 0, 1]])
@pytest.mark.parametrize("with_scale", [False, True])
def test_sam_equals_float32_rounded_once(m, stores, dtype, layout, shape, kinds, with_scale):
    x = make(shape, layout, dtype)
    w = torch.randn(1, len(kinds), 7, 7)
    b = torch.randn(1)
    s = torch.rand(shape[0], shape[1], 1, 1).to(dtype) if with_scale else None
    sf = None if s is None else s.float()
    y, a, lg, p = m.sam_forward(x, w, b, s, None, None, kinds, 1, None)
    yf, af, lgf, pf = m.sam_forward(x.float(), w, b, sf, None, None, kinds, 1, None)
    assert a.dtype == lg.dtype == p.dtype == torch.float32
    for u, v in ((a, af), (lg, lgf), (p, pf)):
        assert_equal(u, v)
    assert_rounded_once(y, yf, dtype)
    assert y.stride() == x.stride()
    g = torch.randn_like(x)  # x's dtype and layout
    ga = torch.randn(shape[0], 1, shape[2], shape[3])
    for extra in (None, ga):
        r = m.sam_backward(g, extra, x, s, w, None, a, lg, p, kinds, 1, with_scale, True, True, False)
        rf = m.sam_backward(g.float(), extra, x.float(), sf, w, None, af, lgf, pf, kinds, 1, with_scale, True, True,
                            False)
        assert_rounded_once(r[0], rf[0], dtype)
        assert r[0].stride() == x.stride()
        for u, v in zip(r[1:4], rf[1:4]):
            assert_equal(u, v)
    # a gradient that is one value broadcast everywhere (from y.sum()) is read as one value
    gc = torch.full((1,), 0.75, dtype=dtype).expand(shape)
    r = m.sam_backward(gc, None, x, s, w, None, a, lg, p, kinds, 1, with_scale, True, True, False)
    rf = m.sam_backward(gc.float(), None, x.float(), sf, w, None, af, lgf, pf, kinds, 1, with_scale, True, True, False)
    assert_rounded_once(r[0], rf[0], dtype)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_pool_and_gate_equal_float32_rounded_once(m, stores, dtype, layout, shape):
    x = make(shape, layout, dtype, seed=1)
    s = torch.rand(shape[0], shape[1], 1, 1).to(dtype)
    p = m.pool_forward(x, s, [0, 1])
    pf = m.pool_forward(x.float(), s.float(), [0, 1])
    assert_equal(p, pf)
    gp = torch.randn_like(p)
    gx, gs = m.pool_backward(gp, x, s, p, [0, 1], True)
    gxf, gsf = m.pool_backward(gp, x.float(), s.float(), pf, [0, 1], True)
    assert_rounded_once(gx, gxf, dtype)
    assert_equal(gs, gsf)
    attn = torch.rand(shape[0], 1, shape[2], shape[3])
    assert_rounded_once(m.gate_forward(x, attn, s, None), m.gate_forward(x.float(), attn, s.float(), None), dtype)
    g = torch.randn_like(x)  # x's dtype and layout
    got = m.gate_backward(g, x, attn, s, True, True, True)
    want = m.gate_backward(g.float(), x.float(), attn, s.float(), True, True, True)
    assert_rounded_once(got[0], want[0], dtype)
    assert_equal(got[1], want[1])
    assert_equal(got[2], want[2])


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES + [(1, 48, 6, 6)])
def test_global_pool_equals_float32_rounded_once(m, stores, dtype, layout, shape):
    x = make(shape, layout, dtype, seed=2)
    out, counts = m.global_pool_counted(x, [1, 0], True)
    outf, countsf = m.global_pool_counted(x.float(), [1, 0], True)
    assert out.dtype == torch.float32
    assert_equal(out, outf)
    assert_equal(counts, countsf)
    grad = torch.randn(2, shape[0], shape[1])
    assert_rounded_once(m.global_pool_backward(grad, x, out, [1, 0]),
                        m.global_pool_backward(grad, x.float(), outf, [1, 0]), dtype)
    # added in place into a gradient of x's dtype and strides: one rounding of the sum
    into = torch.randn_like(x)  # x's dtype and layout
    intof = into.float()
    got = m.global_pool_backward(grad, x, out, [1, 0], into, counts)
    assert got.data_ptr() == into.data_ptr()
    assert_rounded_once(got, m.global_pool_backward(grad, x.float(), outf, [1, 0], intof, countsf), dtype)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_batchnorm_equals_float32_rounded_once(m, dtype, layout):
    shape = (3, 40, 9, 11)
    x = make(shape, layout, dtype, seed=3)
    s = torch.rand(shape[0], shape[1], 1, 1).to(dtype)
    w, b, gamma, beta = torch.randn(1, 2, 7, 7), torch.randn(1), torch.rand(1) + 0.5, torch.randn(1)
    out = m.sam_forward_bn(x, w, b, s, gamma, beta, 1e-5, [0, 1], 1)
    outf = m.sam_forward_bn(x.float(), w, b, s.float(), gamma, beta, 1e-5, [0, 1], 1)
    assert_rounded_once(out[0], outf[0], dtype)
    for u, v in zip(out[1:], outf[1:]):
        assert_equal(u, v)
    g = torch.randn_like(x)  # x's dtype and layout
    r = m.sam_backward_bn(g, None, x, s, w, gamma, *out[1:], 1e-5, [0, 1], 1, True, True, True, True)
    rf = m.sam_backward_bn(g.float(), None, x.float(), s.float(), w, gamma, *outf[1:], 1e-5, [0, 1], 1, True, True,
                           True, True)
    assert_rounded_once(r[0], rf[0], dtype)
    for u, v in zip(r[1:], rf[1:]):
        assert_equal(u, v)


def _all_values(dtype):
    """Every bit pattern of the 16-bit format (NaN, inf, subnormals, +-0), plus five more
    so that the rows end in a scalar tail."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    return torch.cat([bits, bits[:5]]).view(dtype)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("gate", [1.0, 0.3, 1.7, 2.0 ** -10])
def test_conversions_round_like_torch(m, stores, dtype, layout, gate):
    # y = x * gate for every value of the format, against torch's own float32 -> half
    # rounding (round to nearest even, overflow to inf, subnormals, NaN stays NaN)
    v = _all_values(dtype)
    if layout == "nchw":
        x = v.reshape(1, 1, 7, 9363)
    else:
        x = v.reshape(1, 9363, 1, 7).contiguous(memory_format=torch.channels_last)
    attn = torch.full((1, 1, x.shape[2], x.shape[3]), gate)
    y = m.gate_forward(x, attn, None, None)
    want = (x.float() * gate).to(dtype)
    assert torch.equal(y.isnan(), want.isnan())
    keep = ~want.isnan()
    assert torch.equal(y[keep].view(torch.int16), want[keep].view(torch.int16))  # bitwise, -0.0 included
    if gate == 1.0:
        assert torch.equal(y[keep].view(torch.int16), x[keep].view(torch.int16))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_public_ops_match_float64_reference(dtype, layout):
    shape = (2, 24, 7, 9)
    x = make(shape, layout, dtype, seed=4, ties=False)
    assert ops.backend(x) == "cpp"
    s = torch.rand(shape[0], shape[1], 1, 1).to(dtype)
    w = torch.randn(1, 2, 7, 7)
    b = torch.randn(1)
    xr = x.clone().requires_grad_()
    sr = s.clone().requires_grad_()
    wr = w.clone().requires_grad_()
    y, attn = ops.spatial_attention_fused(xr, wr, b, channel_scale=sr, return_attention=True)
    assert y.dtype == dtype and attn.dtype == torch.float32
    assert "EagerSamBackward" in node_names(y)
    g = torch.randn(shape).to(dtype)
    y.backward(g)
    # the float64 reference on the same (half) values
    x64, s64, w64 = (t.detach().double().requires_grad_() for t in (x, s, w))
    pooled = reference.channel_pool(x64, ("max", "mean"), s64)
    a64 = torch.sigmoid(torch.nn.functional.conv2d(pooled, w64, b.double(), padding=3))
    y64 = reference.gate_multiply(x64, a64, s64)
    y64.backward(g.double())
    torch.testing.assert_close(attn.double(), a64.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.double(), y64.detach(), **TOL[dtype])
    torch.testing.assert_close(xr.grad.double(), x64.grad, **TOL[dtype])
    assert xr.grad.dtype == dtype and xr.grad.stride() == x.stride()
    assert sr.grad.dtype == dtype  # the scale's gradient comes back in its dtype: one rounding
    torch.testing.assert_close(sr.grad.double(), s64.grad, **TOL[dtype])
    torch.testing.assert_close(wr.grad.double(), w64.grad, rtol=1e-4, atol=1e-4)
    # pooling and product on their own; the pooled maps in float32, or rounded to x's dtype
    torch.testing.assert_close(ops.channel_pool(x, ("max", "mean"), dtype=torch.float32),
                               reference.channel_pool(x, ("max", "mean"), None, torch.float32), rtol=1e-6, atol=1e-6)
    assert ops.channel_pool(x, ("max", "mean")).dtype == dtype
    torch.testing.assert_close(ops.gate_multiply(x, attn, s).double(),
                               reference.gate_multiply(x.double(), attn.double(), s.double()), **TOL[dtype])


@pytest.mark.parametrize("dtype", HALF)
def test_nan_propagates(dtype):
    x = torch.randn(2, 20, 4, 5).to(dtype)
    x[0, 7, 1, 2] = float("nan")
    w = torch.randn(1, 2, 3, 3)
    y, attn = ops.spatial_attention_fused(x, w, return_attention=True)
    assert attn[0, 0, 1, 2].isnan() and y[0, :, 1, 2].isnan().all() and not y[1].isnan().any()
    gp = ops.global_pool(x, ("max", "mean"), dtype=torch.float32)
    assert gp[:, 0, 7].isnan().all() and not gp[:, 1].isnan().any()


@pytest.mark.parametrize("dtype", HALF)
def test_modules_under_autocast_run_the_kernels(dtype):
    # a SAM / CBAM model under CPU autocast: half feature maps, float32 parameters
    torch.manual_seed(0)
    x = torch.randn(4, 32, 10, 12)
    for mod in (SpatialAttention(32), CBAM(32, preset="official")):
        xh = x.to(dtype).requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            y = mod(xh)
        assert y.dtype == dtype
        names = node_names(y)
        assert any(n.startswith(("EagerSam", "CppSam", "CppCbam")) for n in names), names
        y.float().square().sum().backward()
        grads_half = [p.grad.clone() for p in mod.parameters() if p.grad is not None]
        gx_half = xh.grad.clone()
        mod.zero_grad()
        xf = xh.detach().float().requires_grad_()
        yf = mod(xf)
        torch.testing.assert_close(y.float(), yf, **TOL[dtype])
        yf.square().sum().backward()
        torch.testing.assert_close(gx_half.float(), xf.grad, rtol=TOL[dtype]["rtol"] * 4, atol=TOL[dtype]["atol"] * 4)
        grads_f = [p.grad for p in mod.parameters() if p.grad is not None]
        assert len(grads_half) == len(grads_f) > 0
        for gh, gf in zip(grads_half, grads_f):
            assert gh.dtype == torch.float32
            torch.testing.assert_close(gh, gf, rtol=5e-2, atol=5e-2 * float(gf.abs().max()))
        mod.zero_grad()


@pytest.mark.parametrize("dtype", HALF)
def test_torch_compile_uses_the_same_kernels(dtype):
    torch._dynamo.reset()
    x = torch.randn(2, 24, 6, 7).to(dtype)
    w = torch.randn(1, 2, 7, 7)

    def f(x, w):
        return ops.spatial_attention_fused(x, w, return_attention=True)

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w)
    want = f(x, w)
    assert got[0].dtype == dtype
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    # the custom op's fake implementation agrees with the kernel's dtypes
    torch.library.opcheck(lib.sam_op, (x, w, None, None, None, None, [0, 1], 1), test_utils=("test_schema",
                                                                                            "test_faketensor"))


@pytest.mark.parametrize("dtype", HALF)
def test_empty_batch(dtype):
    x = torch.randn(0, 16, 5, 5).to(dtype).requires_grad_()
    w = torch.randn(1, 2, 7, 7, requires_grad=True)
    y = ops.spatial_attention_fused(x, w)
    assert y.shape == x.shape and y.dtype == dtype
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))
