"""The CUDA (Triton) path through the public API, against float64 references.

Runs on a CUDA device. Without one, the same tests run on CPU tensors through Triton's
interpreter when ``TRITON_INTERPRET=1`` and ``SPATIALATTN_TRITON_ON_CPU=1`` are set (the
dispatch is then pointed at the Triton kernels): ``tests/ops/test_triton_interp.py`` does
that in a subprocess, so this module's own code is exercised by the CPU suite too. Tests
that need real hardware (CUDA grid limits, tensors over 2**31 elements, the benchmark) run
on CUDA only.

On CUDA, PyTorch's convs may use TF32 (``torch.backends.cudnn.allow_tf32``, on by default);
the fused ops run their small-map conv through PyTorch and follow that setting as eager
code does. These tests turn TF32 off to compare float32 at float32 precision.
"""
from __future__ import annotations

import copy
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spatialattn import ops
from spatialattn.nn import CBAM, SpatialAttention
from spatialattn.ops import reference

from ._autograd_graph import node_names
from ._launch_counter import CountLaunches
from ._fake_layouts import LAYOUTS as FAKE_LAYOUTS
from ._fake_layouts import check_custom_op_layouts, check_saved_maps_in_any_layout
from ._sam_reference import max_rel_error, ref_sam

pytest.importorskip("triton")

if torch.cuda.is_available():
    MODE = "cuda"
elif os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("SPATIALATTN_TRITON_ON_CPU") == "1":
    MODE = "interp"
else:
    MODE = None
pytestmark = pytest.mark.skipif(
    MODE is None, reason="needs CUDA (or TRITON_INTERPRET=1 and SPATIALATTN_TRITON_ON_CPU=1)"
)
cuda_only = pytest.mark.skipif(MODE != "cuda", reason="needs a CUDA device")

DEV = torch.device("cuda" if MODE == "cuda" else "cpu")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPES = list(TRITON_DTYPES)
LAYOUTS = ["nchw", "channels_last", "noncontig"]
# float64 reference: one rounding of the output on top of the inputs' (shared) rounding
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(scope="module", autouse=True)
def triton_backend():
    """TF32 off (CUDA); on CPU, the dispatch pointed at the Triton kernels (interpreter)."""
    if MODE == "interp":
        from spatialattn.ops._triton_aot import triton_dispatch_on_cpu

        with triton_dispatch_on_cpu():
            yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.backends.cudnn, "allow_tf32", False)
        mp.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        yield


def make_x(shape, layout, dtype, seed=0):
    """``x`` on the test device, drawn on the CPU (the same values in both modes)."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    if layout == "noncontig":
        x = torch.randn(n, c, h, 2 * w, generator=g).to(dtype).to(DEV)[..., ::2]
        assert not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
        return x
    x = torch.randn(shape, generator=g).to(dtype).to(DEV)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def pow2_scale(n, c, dtype, seed=1):
    """A channel scale of powers of two: ``x * s`` is exact in every dtype, so no rounding
    (the interpreter's downcast truncates) can move a maximum or its ties."""
    g = torch.Generator().manual_seed(seed)
    return (2.0 ** torch.randint(-2, 3, (n, c, 1, 1), generator=g)).to(dtype).to(DEV)


def f64(t):
    return None if t is None else t.detach().cpu().double().requires_grad_(t.requires_grad)


def close(got, want, dtype, what, scale_atol=False):
    """``got`` (any device / dtype) against the float64 ``want``; ``scale_atol``: the error of a
    sum over many terms, taken relative to the largest value of ``want``."""
    assert got is not None and want is not None, what
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    tol = TOL[dtype]
    atol = tol * max(1.0, float(want.abs().max())) if scale_atol and want.numel() else tol
    torch.testing.assert_close(got, want, rtol=tol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def test_backend_is_triton():
    for dtype in TRITON_DTYPES:
        assert ops.backend(torch.zeros(1, 2, 3, 3, device=DEV, dtype=dtype)) == "triton"
    assert ops.backend(torch.zeros(1, 2, 3, 3, device=DEV, dtype=torch.float64)) == "torch"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("order", [("max", "mean"), ("mean",)])
def test_fused_sam_matches_float64_reference(dtype, layout, with_scale, order):
    shape = (2, 19, 9, 11)  # C and H*W not multiples of the tiles
    x = make_x(shape, layout, dtype).requires_grad_()
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(1, len(order), 7, 7, generator=g) * 0.3).to(DEV).requires_grad_()
    b = torch.randn(1, generator=g).to(DEV).requires_grad_()
    s = pow2_scale(2, 19, dtype).requires_grad_() if with_scale else None
    y, attn = ops.spatial_attention_fused(x, w, b, order=order, channel_scale=s, return_attention=True)
    assert y.dtype == dtype and y.device.type == DEV.type and attn.dtype == torch.float32
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    gy = torch.randn(shape, generator=g).to(dtype).to(DEV)
    inputs = [t for t in (x, w, b, s) if t is not None]
    got = torch.autograd.grad(y, inputs, gy)

    ref_in = [f64(t) for t in inputs]
    x64, w64, b64 = ref_in[:3]
    s64 = ref_in[3] if with_scale else None
    y_ref, attn_ref = ref_sam(x64, w64, b64, order, 1, s64)
    want = torch.autograd.grad(y_ref, ref_in, f64(gy))
    what = f"{dtype} {layout} scale={with_scale} {order}"
    close(y, y_ref, dtype, f"y {what}")
    close(attn, attn_ref, dtype, f"attention {what}")
    for name, gg, ww in zip(("x", "weight", "bias", "scale"), got, want):
        close(gg, ww, dtype, f"grad {name} {what}", scale_atol=name != "x")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_spatial_attention_training_batchnorm(dtype, layout):
    """``SpatialAttention`` in training mode (BatchNorm with batch statistics: the fused
    ``GenericSamBatchNorm`` op) against a float64 copy: output, running statistics, grads."""
    torch.manual_seed(3)
    m = SpatialAttention(19).to(DEV).train()
    m64 = copy.deepcopy(m).cpu().double()
    x = make_x((3, 19, 8, 9), layout, dtype).requires_grad_()
    assert ops.batchnorm_train_fusable(x, m.bn)
    y = m(x)
    assert "GenericSamBatchNormBackward" in node_names(y)
    gy = torch.randn(y.shape).to(dtype).to(DEV)
    y.backward(gy)
    x64 = f64(x)
    y64 = m64(x64)
    y64.backward(f64(gy))
    what = f"SpatialAttention train {dtype} {layout}"
    close(y, y64, dtype, what)
    close(m.bn.running_mean, m64.bn.running_mean, torch.float32, f"{what} running mean")
    close(m.bn.running_var, m64.bn.running_var, torch.float32, f"{what} running var")
    close(x.grad, x64.grad, dtype, f"{what} grad x")
    for (name, p), p64 in zip(m.named_parameters(), m64.parameters()):
        close(p.grad, p64.grad, dtype, f"{what} grad {name}", scale_atol=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cbam_training_step(dtype, layout):
    """CBAM in training: the channel gate's pooling gradient is added in place into the
    SAM's (GradTap, the GlobalPool slot, the Triton ACC kernel). float32 against a float64
    copy; half formats against the two ops run separately on the same device (both round
    ``x * gate`` to the half format before the SAM pools it, which can move a maximum
    against float64)."""
    torch.manual_seed(4)
    m = CBAM(19, reduction=4).to(DEV).train()
    m_ref = copy.deepcopy(m)
    x = make_x((2, 19, 9, 10), layout, dtype, seed=5).requires_grad_()
    y = m(x)
    assert {"GradTapBackward", "GlobalPoolBackward", "GenericSamBatchNormBackward"} <= node_names(y)
    gy = torch.randn(y.shape).to(dtype).to(DEV)
    y.backward(gy)
    what = f"CBAM train {dtype} {layout}"
    if dtype == torch.float32:
        m_ref = m_ref.cpu().double()
        x_ref = f64(x)
        y_ref = m_ref(x_ref)
        y_ref.backward(f64(gy))
        loose = 1.0
    else:
        x_ref = x.detach().requires_grad_()
        cg = m_ref.channel.channel_gate(x_ref)
        y_ref = m_ref.spatial.attend(x_ref, channel_scale=cg.to(dtype))[0]
        assert "GradTapBackward" not in node_names(y_ref)
        y_ref.backward(gy)
        loose = 2.0  # grad x: one rounding in place of two
    close(y, y_ref, dtype, what)
    torch.testing.assert_close(x.grad.cpu().double(), x_ref.grad.cpu().double(), rtol=TOL[dtype] * loose,
                               atol=TOL[dtype] * loose, msg=lambda m_: f"{what} grad x: {m_}")
    for (name, p), p_ref in zip(m.named_parameters(), m_ref.parameters()):
        close(p.grad, p_ref.grad, dtype, f"{what} grad {name}", scale_atol=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_modules_under_autocast(dtype):
    """A conv + SpatialAttention + CBAM model under autocast: half feature maps, float32
    parameters; the attention runs on the Triton path and the gradients follow float32's."""
    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), SpatialAttention(16), CBAM(16, reduction=4))
    model = model.to(DEV).train()
    model32 = copy.deepcopy(model)
    x = torch.randn(2, 3, 12, 12).to(DEV)
    with torch.autocast(DEV.type, dtype=dtype):
        y = model(x)
    assert y.dtype == dtype
    assert "GenericSamBatchNormBackward" in node_names(y)
    y.float().square().mean().backward()
    model32(x).square().mean().backward()
    for (name, p), p32 in zip(model.named_parameters(), model32.parameters()):
        assert torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, p32.grad, rtol=0.1, atol=0.1 * float(p32.grad.abs().max()) + 1e-6,
                                   msg=lambda m_: f"{dtype} grad {name}: {m_}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_model_inference_fuses(dtype, monkeypatch):
    """A ``model.half()`` (how detectors are deployed on a GPU): SAM and CBAM take the fused
    Triton path with their parameters converted to float32, the same bits as a float32 copy
    of the modules, never the layered SAM (torch's conv and a half BatchNorm)."""
    from spatialattn import functional as SF

    monkeypatch.setattr(SF, "spatial_attention_map", lambda *a, **k: pytest.fail("layered SAM path taken"))
    torch.manual_seed(7)
    model = torch.nn.Sequential(SpatialAttention(16), CBAM(16, reduction=4)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    half = copy.deepcopy(model).to(DEV).to(dtype)
    full = copy.deepcopy(half).float()
    x = make_x((2, 16, 9, 10), "channels_last", dtype, seed=7)
    with torch.no_grad():
        y, y32 = half(x), full(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, y32, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_model_training_batchnorm_fuses(dtype, monkeypatch):
    """Training a ``model.half()``: the SAM's training BatchNorm takes the fused op with its
    parameters converted to float32 (autograd rounds their gradients back): the same bits as a
    float32 copy (output, grad x; parameter gradients rounded); the running statistics, half
    buffers updated by torch ops (the Triton launch updates only float32 ones), within rounding."""
    from spatialattn import functional as SF

    monkeypatch.setattr(SF, "spatial_attention_map", lambda *a, **k: pytest.fail("layered SAM path taken"))
    torch.manual_seed(8)
    half = SpatialAttention(16).to(DEV).to(dtype).train()
    full = copy.deepcopy(half).float()
    x = make_x((2, 16, 9, 10), "channels_last", dtype, seed=8)
    xh, xf = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    yh, yf = half(xh), full(xf)
    assert yh.dtype == dtype and "GenericSamBatchNormBackward" in node_names(yh)
    gy = torch.randn(yh.shape).to(dtype).to(DEV)
    yh.backward(gy)
    yf.backward(gy)
    torch.testing.assert_close(yh, yf, rtol=0, atol=0)
    torch.testing.assert_close(xh.grad, xf.grad, rtol=0, atol=0)
    for (name, p), q in zip(half.named_parameters(), full.parameters()):
        assert p.grad.dtype == dtype, name
        torch.testing.assert_close(p.grad, q.grad.to(dtype), rtol=0, atol=0, msg=lambda m_: f"grad {name}: {m_}")
    assert int(half.bn.num_batches_tracked) == int(full.bn.num_batches_tracked) == 1
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(half.bn, name).float(), getattr(full.bn, name), rtol=TOL[dtype], atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch(dtype):
    x = torch.zeros(0, 8, 5, 5, dtype=dtype, device=DEV, requires_grad=True)
    w = torch.randn(1, 2, 7, 7, device=DEV, requires_grad=True)
    y = ops.spatial_attention_fused(x, w)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and float(w.grad.abs().sum()) == 0.0
    assert ops.global_pool(x, ("mean", "max"), dtype=torch.float32).shape == (2, 0, 8)


def _random_sam_case(case: int) -> dict:
    """One random fused-SAM call on the test device (shape, layout, dtype, pooling order, kernel
    square or not, dilation, bias, a power-of-two channel scale, an affine norm or a training
    BatchNorm, with or without autograd) against float64 autograd; returns the relative
    errors above tolerance (empty: pass)."""
    rng = random.Random(case)
    g = torch.Generator().manual_seed(case)
    dtype = rng.choice(DTYPES)
    n, c, h, w = rng.choice([0, 1, 2, 3]), rng.choice([1, 2, 5, 16, 33]), rng.choice([1, 2, 3, 5, 8, 11]), \
        rng.choice([1, 2, 3, 5, 7, 13, 17])
    kh = rng.choice([1, 3, 5, 7])
    kw = kh if rng.random() < 0.7 else rng.choice([1, 3, 5, 7])
    dilation = rng.choice([1, 1, 2, 3])
    order = rng.choice([("max", "mean"), ("mean", "max"), ("max",), ("mean",)])
    mode = rng.choice(["plain", "norm", "batchnorm"])
    if mode == "batchnorm" and n * h * w < 8:  # (a BatchNorm over a few logits is ill-conditioned)
        mode = "plain"
    grad = mode == "batchnorm" or rng.random() < 0.7
    layout = rng.choice(LAYOUTS if n and w > 1 else LAYOUTS[:2])  # (a slice of an empty or 1-wide map is contiguous)
    x = make_x((n, c, h, w), layout, dtype, seed=case).requires_grad_(grad)
    weight = (torch.randn(1, len(order), kh, kw, generator=g) * 0.3).to(DEV).requires_grad_(grad)
    bias = torch.randn(1, generator=g).to(DEV).requires_grad_(grad) if rng.random() < 0.7 else None
    scale = pow2_scale(n, c, dtype, seed=case).requires_grad_(grad) if rng.random() < 0.4 else None
    ns = (torch.rand(1, generator=g) + 0.5).to(DEV) if mode == "norm" else None
    nsh = torch.randn(1, generator=g).to(DEV) if mode == "norm" else None
    if mode == "batchnorm":
        norm = torch.nn.BatchNorm2d(1).to(DEV)
        y, attn = ops.spatial_attention_fused_batchnorm(x, weight, bias, norm, order=order, dilation=dilation,
                                                        channel_scale=scale, return_attention=True)
    else:
        y, attn = ops.spatial_attention_fused(x, weight, bias, order=order, dilation=dilation, channel_scale=scale,
                                              norm_scale=ns, norm_shift=nsh, return_attention=True)
    leaves = [t for t in (x, weight, bias, scale) if t is not None]
    refs = [f64(t) for t in leaves]
    one = torch.ones(1, dtype=torch.float64)
    y64, attn64 = ref_sam(refs[0], refs[1], refs[2] if bias is not None else None, order, dilation,
                          refs[-1] if scale is not None else None, f64(ns), f64(nsh),
                          bn=(one, 0 * one) if mode == "batchnorm" else None)
    tol = TOL[dtype]
    errors = {"y": (max_rel_error(y, y64), tol), "attn": (max_rel_error(attn, attn64), tol)}
    if grad and y.numel():
        gy = torch.randn(y.shape, generator=g).to(dtype).to(DEV)
        got = torch.autograd.grad(y, leaves, gy)
        want = torch.autograd.grad(y64, refs, f64(gy))
        names = ["x", "weight"] + (["bias"] if bias is not None else []) + (["scale"] if scale is not None else [])
        # parameter gradients: sums over every pixel whose terms can cancel; behind a BatchNorm
        # over few logits, ill-conditioned as well (torch's own float32 composition was 2.3e-3
        # from float64 on one such case here)
        ptol = tol * (1000 if mode == "batchnorm" else 20)
        for name, a, b in zip(names, got, want):
            if name == "bias" and mode == "batchnorm":  # 0 in exact arithmetic: against the weight's scale
                errors[name] = (float((a.cpu().double() - b).abs().max() / (want[1].abs().max() + 1e-30)), ptol)
            else:
                errors[name] = (max_rel_error(a, b), tol if name == "x" else ptol)
    return {k: e for k, (e, t) in errors.items() if not e <= t}


@pytest.mark.parametrize("block", range(1 if MODE == "cuda" else 3))
def test_random_configurations(block):
    """Ten random configurations per block (see ``_random_sam_case``), fixed seeds. On a GPU one
    block: each new kernel size, dilation and dtype compiles Triton variants (about a second
    each), and a lent GPU's time is short."""
    failures = {case: bad for case in range(block * 10, block * 10 + 10) if (bad := _random_sam_case(case))}
    assert not failures, failures


@pytest.mark.parametrize("args, message", [
    (dict(weight=(1, 2, 4, 4)), r"kernel size must be odd to keep the map size, got 4x4"),
    (dict(weight=(1, 3, 7, 7)), r"weight must be \(1, 2, kh, kw\), got \(1, 3, 7, 7\)"),
    (dict(bias=(2,)), r"bias must have shape \(1,\), got \(2,\)"),
    (dict(dilation=0), r"dilation must be >= 1, got 0"),
])
def test_bad_small_map_arguments_are_refused(args, message):
    # as the C++ kernels: checked on the host before the gate's launch, in both fused ops
    x = make_x((2, 8, 5, 5), "nchw", torch.float32).requires_grad_()
    w = torch.randn(args.get("weight", (1, 2, 7, 7)), device=DEV)
    b = torch.randn(args["bias"], device=DEV) if "bias" in args else None
    dilation = args.get("dilation", 1)
    with pytest.raises(ValueError, match=message):
        ops.spatial_attention_fused(x, w, b, dilation=dilation)
    norm = torch.nn.BatchNorm2d(1).to(DEV)
    with pytest.raises(ValueError, match=message):
        ops.spatial_attention_fused_batchnorm(x, w, b, norm, dilation=dilation)


def test_max_ties_and_nan():
    """Tied maxima share the max-pool gradient evenly (``amax``); NaN propagates through the max."""
    x = torch.randint(-2, 3, (2, 19, 6, 7)).float().to(DEV).requires_grad_()  # many ties
    gp = torch.randn(2, 2, 6, 7).to(DEV)
    (gx,) = torch.autograd.grad(ops.channel_pool(x, ("max", "mean")), x, gp)
    x64 = f64(x)
    (want,) = torch.autograd.grad(reference.channel_pool(x64, ("max", "mean")), x64, f64(gp))
    close(gx, want, torch.float32, "channel pool gradient at ties")
    gg = torch.randn(2, 2, 19).to(DEV)
    (gx,) = torch.autograd.grad(ops.global_pool(x, ("max", "mean")), x, gg)
    (want,) = torch.autograd.grad(torch.stack([x64.amax(dim=(2, 3)), x64.mean(dim=(2, 3))]), x64, f64(gg))
    close(gx, want, torch.float32, "global pool gradient at ties")
    xn = torch.randn(1, 20, 3, 3).to(DEV)
    xn[0, 17, 1, 2] = float("nan")
    p = ops.channel_pool(xn, ("max", "mean"))
    assert torch.isnan(p[0, :, 1, 2]).all() and not torch.isnan(p[0, :, 0, 0]).any()
    g = ops.global_pool(xn, ("max", "mean"))
    assert torch.isnan(g[:, 0, 17]).all() and not torch.isnan(g[:, 0, 16]).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cbam_channel_mlp_gate_on_triton(dtype):
    """CBAM (its channel MLP on the Triton kernels: one launch forward, two backward) against
    its float64 copy on the CPU: output and every gradient, float32 and float16 input.
    (bfloat16: ``x * gate`` rounded to 8 bits moves the channel max at near-ties among 40
    channels, so whole entries of the pooling gradient go elsewhere than in float64; the
    bfloat16 kernels are checked against references that round the same way.)"""
    import copy

    from spatialattn import CBAM

    torch.manual_seed(0)
    m = CBAM(40, reduction=4, preset="official").to(DEV).train()
    m64 = copy.deepcopy(m).cpu().double()
    x = make_x((3, 40, 7, 9), "channels_last", dtype).requires_grad_()
    with torch.autocast(DEV.type, dtype=dtype, enabled=dtype != torch.float32):
        y = m(x)
    x64 = f64(x)
    y64 = m64(x64)
    close(y, y64, dtype, "CBAM forward", scale_atol=True)
    gy = torch.randn(y.shape).to(DEV).to(y.dtype)
    (y * gy).sum().backward()
    (y64 * f64(gy)).sum().backward()
    close(x.grad, x64.grad, dtype, "CBAM grad x", scale_atol=True)
    for (name, p), p64 in zip(m.named_parameters(), m64.parameters()):
        close(p.grad, p64.grad, dtype if dtype != torch.float32 else torch.float32, f"CBAM grad {name}",
              scale_atol=True)


def test_cbam_bfloat16_on_triton_against_float64():
    """bfloat16 CBAM (Triton channel MLP, pooling and SAM kernels) against its float64 copy:
    output and every gradient, on an input without near-ties. Each pixel has one dominant
    channel (6 + k / 32, distinct within a channel, exact in bfloat16), the other channels lie
    in [-1, 1], and the MLP's weights are small (gates near 0.5), so ``x * gate`` rounded to 8
    bits cannot move a maximum, neither the channel max of each pixel nor the spatial max of
    each channel (see the float32 / float16 test above for why random inputs cannot do this)."""
    from spatialattn import CBAM

    torch.manual_seed(0)
    n, c, h, w = 3, 40, 7, 9
    m = CBAM(c, reduction=4, preset="official").to(DEV).train()
    with torch.no_grad():
        m.channel.fc1.weight.mul_(0.05)
        m.channel.fc2.weight.mul_(0.05)
    m64 = copy.deepcopy(m).cpu().double()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(n, c, h * w, generator=g) * 2 - 1
    for i in range(n):
        dominant = torch.randperm(h * w, generator=g) % c  # every channel leads one or two pixels
        for ch in range(c):
            at = (dominant == ch).nonzero().flatten()
            x[i, ch, at] = 6 + (torch.arange(at.numel()) + 2 * i).float() / 32  # distinct in the channel
    x = x.view(n, c, h, w).to(torch.bfloat16).to(DEV).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        y = m(x)
    x64 = f64(x)
    y64 = m64(x64)
    close(y, y64, torch.bfloat16, "CBAM forward", scale_atol=True)
    gy = torch.randn(y.shape, generator=g).to(DEV).to(y.dtype)
    (y * gy).sum().backward()
    (y64 * f64(gy)).sum().backward()
    close(x.grad, x64.grad, torch.bfloat16, "CBAM grad x", scale_atol=True)
    for (name, p), p64 in zip(m.named_parameters(), m64.parameters()):
        close(p.grad, p64.grad, torch.bfloat16, f"CBAM grad {name}", scale_atol=True)


@pytest.mark.parametrize("layout", FAKE_LAYOUTS)
def test_custom_ops_outputs_match_their_fakes(layout):
    """The Triton path returns what the fakes say, in every layout of x and its gradient."""
    check_custom_op_layouts(layout, torch.float32, DEV)


def test_custom_ops_fakes_with_channels_last_weights():
    """The Triton path's gradients of a channels_last weight, scale and attention map are
    contiguous, as the fakes say (a ``model.to(memory_format=torch.channels_last)``)."""
    check_custom_op_layouts("channels_last", torch.float32, DEV, small_layout="channels_last")


def test_backward_ops_take_saved_maps_in_any_layout():
    check_saved_maps_in_any_layout(torch.float32, DEV)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_torch_compile_fullgraph(layout):
    """One graph with the custom ops; equal to eager, forward and backward."""
    torch._dynamo.reset()
    x = make_x((2, 19, 9, 11), layout, torch.float32).requires_grad_()
    w = (torch.randn(1, 2, 7, 7) * 0.3).to(DEV).requires_grad_()
    s = pow2_scale(2, 19, torch.float32)

    def f(x, w):
        return ops.spatial_attention_fused(x, w, order=("mean", "max"), channel_scale=s)

    y = torch.compile(f, fullgraph=True)(x, w)
    y_eager = f(x, w)
    close(y, y_eager, torch.float32, "compiled forward")
    gy = torch.randn(y.shape).to(DEV)
    got = torch.autograd.grad(y, (x, w), gy)
    want = torch.autograd.grad(y_eager, (x, w), gy)
    for name, gg, ww in zip(("x", "weight"), got, want):
        close(gg, ww, torch.float32, f"compiled grad {name}", scale_atol=True)


@cuda_only
def test_torch_compile_reduce_overhead_training_step():
    """``torch.compile(mode="reduce-overhead")`` (inductor's CUDA graphs around the custom
    ops: what modules.md recommends for launch-bound small maps on a GPU): a CBAM + SAM
    training step, compiled and replayed on new inputs, equal to eager."""
    torch._dynamo.reset()
    torch.manual_seed(7)
    cbam, sam = CBAM(24).to(DEV).train(), SpatialAttention(24).to(DEV).train()
    ref_cbam, ref_sam = copy.deepcopy(cbam), copy.deepcopy(sam)

    def step(x, gy, a, b):
        y = b(a(x))
        (gx,) = torch.autograd.grad(y, (x,), gy)
        return y, gx

    compiled = torch.compile(step, mode="reduce-overhead")
    for seed in range(4):  # warm-up, recording, then replays
        x = make_x((2, 24, 13, 13), "nchw", torch.float32, seed=seed).requires_grad_()
        gy = torch.randn(2, 24, 13, 13, device=DEV)
        y, gx = compiled(x, gy, cbam, sam)
        y, gx = y.clone(), gx.clone()  # outputs of a graph replay are overwritten by the next
        ry, rgx = step(x, gy, ref_cbam, ref_sam)
        close(y, ry, torch.float32, f"reduce-overhead forward {seed}")
        close(gx, rgx, torch.float32, f"reduce-overhead grad x {seed}", scale_atol=True)
    torch._dynamo.reset()


@cuda_only
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cuda_graph_capture_of_a_training_step(layout):
    """The Triton path makes no host synchronisation and no host-to-device copy, so a SAM
    training step (forward and backward of a ``SpatialAttention`` module with its training
    BatchNorm, and of the fused op with a channel scale) can be captured in a CUDA graph: the
    cure for launch-bound small maps. Replayed on new data, equal to eager."""
    torch.manual_seed(3)
    mod = SpatialAttention(19).to(DEV).train()
    ref = copy.deepcopy(mod)
    w = (torch.randn(1, 2, 7, 7) * 0.3).to(DEV).requires_grad_()
    s = pow2_scale(2, 19, torch.float32)
    static_x = make_x((2, 19, 9, 11), layout, torch.float32).requires_grad_()
    static_gy = torch.randn(2, 19, 9, 11, device=DEV)

    def step():
        y1 = mod(static_x)
        y2 = ops.spatial_attention_fused(static_x, w, order=("mean", "max"), channel_scale=s)
        torch.autograd.backward((y1, y2), (static_gy, static_gy))
        return y1, y2

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream (compiles the kernels)
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    static_x.grad = w.grad = None
    mod.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y1, y2 = step()
    for seed in (5, 6):
        x_new = make_x((2, 19, 9, 11), layout, torch.float32, seed=seed)
        with torch.no_grad():
            static_x.copy_(x_new)
            static_gy.normal_()
        graph.replay()
        torch.cuda.synchronize()
        xr = x_new.clone().requires_grad_()
        wr = w.detach().clone().requires_grad_()
        r1 = ref(xr)
        r2 = ops.spatial_attention_fused(xr, wr, order=("mean", "max"), channel_scale=s)
        torch.autograd.backward((r1, r2), (static_gy, static_gy))
        close(y1, r1, torch.float32, f"graph module forward {seed}")
        close(y2, r2, torch.float32, f"graph op forward {seed}")
        close(static_x.grad, xr.grad, torch.float32, f"graph grad x {seed}", scale_atol=True)
        close(w.grad, wr.grad, torch.float32, f"graph grad weight {seed}", scale_atol=True)
        ref.zero_grad(set_to_none=True)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_band_forward_and_backward_in_one_launch(layout, monkeypatch):
    """The SAM forward and backward in one launch each (``_triton._BAND_FORWARD`` /
    ``_BAND_BACKWARD``, off by default until timed on a GPU): ``y``, the attention and
    ``grad_x`` as the default launches give them (bit for bit through the interpreter; on a GPU
    within a float32 rounding), the parameter and scale gradients (partial sums grouped
    otherwise) within 1e-5; band heights of one row, four and automatic (large grids:
    ``test_many_pixel_tiles_and_images``)."""
    from spatialattn.ops import _triton

    monkeypatch.setattr(_triton, "_PROGRAMS_PER_SM", 0)  # the default launches' channel loops unsplit
    g = torch.Generator().manual_seed(3)
    x = make_x((2, 19, 9, 11), layout, torch.float32).requires_grad_()
    w = (torch.randn(1, 2, 7, 7, generator=g) * 0.3).to(DEV).requires_grad_()
    b = torch.randn(1, generator=g).to(DEV).requires_grad_()
    s = pow2_scale(2, 19, torch.float32).requires_grad_()
    gy = torch.randn(x.shape, generator=g).to(DEV)

    def run():
        y, attn = ops.spatial_attention_fused(x, w, b, channel_scale=s, return_attention=True)
        return (y, attn) + torch.autograd.grad(y, (x, w, b, s), gy)

    want = run()
    monkeypatch.setattr(_triton, "_BAND_FORWARD", True)
    monkeypatch.setattr(_triton, "_BAND_BACKWARD", True)
    names = ("y", "attention", "grad x", "grad weight", "grad bias", "grad scale")
    for rows in (1, 4, 0):
        monkeypatch.setattr(_triton, "_BAND_ROWS", rows)
        for name, got, ref in zip(names, run(), want):
            if MODE == "interp" and name in names[:3]:
                assert torch.equal(got, ref), f"{name} rows={rows}"
            else:
                tol = 1e-6 if name in names[:3] else 1e-5
                torch.testing.assert_close(got, ref, rtol=tol, atol=tol * max(1.0, float(ref.abs().max())),
                                           msg=lambda m: f"{name} rows={rows}: {m}")



@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_band_batchnorm_training_step(layout, monkeypatch):
    """A ``SpatialAttention`` with its BatchNorm in training mode (the official CBAM's default)
    with ``_BAND_FORWARD`` / ``_BAND_BACKWARD``: the forward in two launches and the backward in
    two (the batch statistics, and the batch sums of the BatchNorm's backward, need every band
    first). Output, attention, ``grad_x``, every parameter gradient and the running statistics
    against the default launches within 1e-5 (the statistics' partial sums are grouped by band
    instead of by tile), band heights of one row and automatic (four rows here; the interpreter
    checks in ``_triton_interp_checks.py`` go through more)."""
    from spatialattn.ops import _triton

    monkeypatch.setattr(_triton, "_PROGRAMS_PER_SM", 0)
    torch.manual_seed(5)
    module = SpatialAttention(19).to(DEV).train()
    with torch.no_grad():
        module.bn.weight.fill_(1.3)
        module.bn.bias.fill_(-0.2)
    x = make_x((2, 19, 9, 11), layout, torch.float32, seed=5).requires_grad_()
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(6)).to(DEV)

    def run():
        m = copy.deepcopy(module)
        y, attn = m(x, return_attention=True)
        grads = torch.autograd.grad(y, (x,) + tuple(m.parameters()), gy)
        return (y, attn) + grads + (m.bn.running_mean, m.bn.running_var)

    want = run()
    monkeypatch.setattr(_triton, "_BAND_FORWARD", True)
    monkeypatch.setattr(_triton, "_BAND_BACKWARD", True)
    names = ["y", "attention", "grad x"] + [f"grad {n}" for n, _ in module.named_parameters()] + ["running mean",
                                                                                                 "running var"]
    for rows in (1, 0):
        monkeypatch.setattr(_triton, "_BAND_ROWS", rows)
        got = run()
        assert len(got) == len(names)
        for name, a, e in zip(names, got, want):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * max(1.0, float(e.detach().abs().max())),
                                       msg=lambda m: f"{name} rows={rows}: {m}")


@pytest.mark.parametrize("band", [False, True])
def test_running_statistics_updated_in_the_kernels(band, monkeypatch):
    """On the Triton path the launch that forms the BatchNorm's batch statistics also updates
    its running statistics (``_bn_attn_kernel`` / ``_sam_band_bn_kernel``): two training steps
    with the momentum at 0.3 and None (the cumulative average), against the same module in
    plain PyTorch (``ops.decomposed()``): running mean, running var and ``num_batches_tracked``;
    a BatchNorm without running statistics keeps none."""
    from spatialattn.ops import _triton

    monkeypatch.setattr(_triton, "_BAND_FORWARD", band)
    for momentum in (0.3, None):
        torch.manual_seed(11)
        module = SpatialAttention(12).to(DEV).train()
        module.bn.momentum = momentum
        plain = copy.deepcopy(module)
        for step in range(2):
            x = make_x((2, 12, 7, 9), "channels_last", torch.float32, seed=20 + step)
            module(x)
            with ops.decomposed():
                plain(x)
            what = f"momentum={momentum} step {step}"
            assert int(module.bn.num_batches_tracked) == int(plain.bn.num_batches_tracked) == step + 1, what
            torch.testing.assert_close(module.bn.running_mean, plain.bn.running_mean, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"running mean {what}: {m}")
            torch.testing.assert_close(module.bn.running_var, plain.bn.running_var, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"running var {what}: {m}")
    module = SpatialAttention(12).to(DEV).train()
    module.bn.track_running_stats = False
    module.bn.running_mean = module.bn.running_var = module.bn.num_batches_tracked = None
    x = make_x((2, 12, 7, 9), "nchw", torch.float32, seed=30)
    y = module(x)
    with ops.decomposed():
        want = module(x)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert module.bn.running_mean is None and module.bn.num_batches_tracked is None


@pytest.mark.parametrize("band", [False, True])
def test_batchnorm_fold_of_partial_rows(band, monkeypatch):
    """Above ``_FOLD_ROWS`` partial rows (tiles or bands of the maps, large maps on a GPU) one
    program folds a training BatchNorm's partial statistics, and in the backward its partial
    sums, before the launch whose every program reads them: output, attention, every gradient
    and the running statistics are the same bits as without the fold (forced here at a small
    map), in the default launches and the band ones."""
    from spatialattn.ops import _triton

    monkeypatch.setattr(_triton, "_BAND_FORWARD", band)
    monkeypatch.setattr(_triton, "_BAND_BACKWARD", band)
    torch.manual_seed(7)
    module = CBAM(16, reduction=4, preset="official").to(DEV).train()
    x = make_x((2, 16, 9, 11), "channels_last", torch.float32, seed=7).requires_grad_()
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(8)).to(DEV)

    def run():
        m = copy.deepcopy(module)
        y = m(x)
        grads = torch.autograd.grad(y, (x,) + tuple(m.parameters()), gy)
        return (y,) + grads + tuple(m.buffers())

    want = run()
    monkeypatch.setattr(_triton, "_FOLD_ROWS", 0)
    counter = CountLaunches(_triton._fold_kernel)
    monkeypatch.setattr(_triton, "_fold_kernel", counter)
    got = run()
    assert counter.grids == [(1,), (1,)]  # forward and backward
    assert len(got) == len(want) > 3
    for i, (a, e) in enumerate(zip(got, want)):
        assert torch.equal(a, e), f"output {i} of {len(got)}: {(a - e).abs().max()}"

@cuda_only
@pytest.mark.parametrize("band", [False, True])
def test_many_pixel_tiles_and_images(band, monkeypatch):
    """More than 65535 pixel tiles (CUDA caps grid axes 1 and 2 there) and many small images
    (a batch of RoI features); with ``band``, through the one-launch forward and backward."""
    from spatialattn.ops import _triton

    monkeypatch.setattr(_triton, "_BAND_FORWARD", band)
    monkeypatch.setattr(_triton, "_BAND_BACKWARD", band)
    for shape in [(1, 3, 2050, 2050), (70000, 3, 2, 2)]:
        x = torch.randn(shape, device=DEV, requires_grad=True)
        w = torch.randn(1, 2, 3, 3, device=DEV) * 0.3
        y = ops.spatial_attention_fused(x, w)
        gy = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, gy)
        x64 = x.detach().double().requires_grad_()
        y64, _ = ref_sam(x64, w.double(), None, ("max", "mean"), 1, None)
        (want,) = torch.autograd.grad(y64, x64, gy.double())
        torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx.double(), want, rtol=1e-5, atol=1e-5)


@cuda_only
def test_tensor_over_2_31_elements():
    """Offsets past 2**31 elements (int64 image offsets in the Triton kernels): the last
    image of a 2.7e9-element bfloat16 tensor, forward and backward."""
    free, _ = torch.cuda.mem_get_info()
    if free < 30 * 2**30:
        pytest.skip(f"needs 30 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    n, c, h, w = 5, 512, 1024, 1024
    assert n * c * h * w > 2**31
    x = torch.empty(n, c, h, w, dtype=torch.bfloat16, device=DEV)
    torch.manual_seed(7)
    x[-1].normal_()
    x[:-1].fill_(1.0)
    x.requires_grad_()
    wt = torch.randn(1, 2, 7, 7, device=DEV) * 0.1
    y = ops.spatial_attention_fused(x, wt)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    last = x.detach()[-1:].float().requires_grad_()
    y_ref, _ = ref_sam(last, wt, None, ("max", "mean"), 1, None)
    (g_ref,) = torch.autograd.grad(y_ref, last, torch.ones_like(y_ref))
    torch.testing.assert_close(y[-1:].float(), y_ref, rtol=1.6e-2, atol=1.6e-2)
    torch.testing.assert_close(gx[-1:].float(), g_ref, rtol=1.6e-2, atol=1.6e-2 * float(g_ref.abs().max()))


@cuda_only
def test_benchmark_runs_on_cuda(tmp_path):
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_sam.py"
    cmd = [sys.executable, str(script), "--device", "cuda", "--quick", "--no-compile", "--no-mem",
           "--shapes", "2x32x16x16", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "## fwd" in proc.stdout and list(tmp_path.glob("sam_cuda*.csv"))
