"""Random configurations of the C++ kernels against float64 autograd.

The kernels split their work by sizes and knobs (whole images or shared rows, bands, units of
rows, flat small-map rows, streamed stores, max bits, global-pooling tiles) and by the thread
count; the other tests pin those one at a time. Here each case draws a shape, layout, dtype,
pooling order, kernel (square or not), dilation, optional parts (bias, channel scale, affine
norm, training BatchNorm, ``out=``), a thread count and a random subset of the knobs, and
compares values and every gradient with a float64 reference. Seeds are fixed: a failure names
its case, and ``fused_case`` / ``cbam_case`` / ``module_case(case, ...)`` replays it.

float32 cases compare the output, the gate and the gradient w.r.t. ``x`` (per element, within
a few ulps of the largest value; float16 / bfloat16 inputs, computed in float32 and rounded
once, within a few of their ulps); parameter gradients are sums over every pixel whose float32
rounding can cancel (torch's own float32 path is as far from float64 there), so they are
compared in the float64 cases, which run the same kernels (templates) at 1e-10.
"""
from __future__ import annotations

import copy
import random
from typing import Dict, Optional

import pytest
import torch

from spatialattn import ops
from spatialattn.nn import CBAM, SpatialAttention
from spatialattn.ops import _cpp, reference

from ._sam_reference import max_rel_error, ref_sam

# knob -> (default, values drawn); defaults as in sam_cpu.cpp (-1: the built-in rule)
KNOBS = {
    "set_stream_bytes": (-1, [0, 1 << 12, 1 << 16, 1 << 20]),
    "set_band_bytes": (384 << 10, [1, 1 << 10, 8 << 10, 64 << 10]),
    "set_band_bytes_nchw": (2 << 20, [1, 1 << 10, 16 << 10, 256 << 10]),
    "set_band_rows": (0, [1, 2, 3, 5, 8, 13]),
    "set_whole_image_bytes": (-1, [0, 1 << 10, 64 << 10, 1 << 30]),
    "set_shared_bytes": (-1, [0, 1 << 8, 4 << 10, 1 << 30]),
    "set_shared_backward_bytes": (-1, [0, 1 << 10, 1 << 40]),
    "set_max_bits": (True, [False]),
    "set_max_bits_phase_bytes": (-1, [0, 1 << 10, 1 << 40]),
    "set_pool_wide_bytes": (-1, [0, 1 << 8, 1 << 30]),
    "set_flat_rows_max_hw": (-1, [0, 4, 16, 49, 100]),
    "set_flat_backward_max_block": (-1, [0, 1, 8, 64, 1 << 20]),
    "set_gp_tile_bytes": (-1, [0, 64, 4096]),
    "set_gp_backward_block_bytes": (-1, [0, 64, 4096, 1 << 30]),
    "set_gp_lane_block_max_hw": (-1, [0, 9, 49]),
    "set_min_run_bytes": (-1, [0, 64, 1 << 12]),
    "set_one_stream_reduce": (-1, [0, 1]),
    "set_row_prefetch": (-1, [0, 1]),
}
ORDERS = [("max", "mean"), ("mean", "max"), ("max",), ("mean",)]
HALF = (torch.float16, torch.bfloat16)
CASES_PER_BLOCK = 40


@pytest.fixture(autouse=True)
def restore(cpp_module):
    threads = torch.get_num_threads()
    yield
    _reset(cpp_module)
    torch.set_num_threads(threads)


def _reset(mod) -> None:
    for name, (default, _) in KNOBS.items():
        getattr(mod, name)(default)


def _draw_knobs(rng: random.Random, mod) -> Dict[str, int]:
    """A random subset of the knobs set to random values, the others to their defaults (so a
    case does not inherit the previous case's knobs and replays alone)."""
    _reset(mod)
    chosen = {}
    for name, (_, values) in KNOBS.items():
        if rng.random() < 0.3:
            chosen[name] = rng.choice(values)
            getattr(mod, name)(chosen[name])
    return chosen


def _input(g, shape, layout, dtype, ties=False):
    n, c, h, w = shape
    x = torch.randn(n, c, h, w + 3, generator=g, dtype=torch.float64)
    if ties:  # a few values only: max ties, whose gradient is shared evenly
        x = torch.round(x * 2) / 2
    x = x[..., 1:1 + w] if layout == "noncontig" else x[..., :w].contiguous()
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _given(tensors, bias, scale):
    """``(x, weight, bias, scale)`` from the list of those of them that are not None (``bias`` /
    ``scale``: whether they were)."""
    it = iter(tensors)
    return next(it), next(it), None if bias is None else next(it), None if scale is None else next(it)


def fused_case(case: int, mod) -> Optional[dict]:
    """One random fused-SAM call (forward, backward or ``out=``); the errors above tolerance."""
    rng = random.Random(case)
    g = torch.Generator().manual_seed(case)
    dtype = rng.choice([torch.float32, torch.float64, torch.float32, torch.float64, torch.float16, torch.bfloat16])
    ties = dtype == torch.float64 and rng.random() < 0.4
    pdtype = torch.float32 if dtype in HALF else dtype  # parameters and norm (the gate's compute type)
    shape = (rng.choice([0, 1, 1, 2, 3, 5, 8]), rng.choice([1, 2, 7, 16, 17, 33, 64, 100]),
             rng.choice([1, 2, 3, 5, 7, 9, 13, 16, 26, 31]), rng.choice([1, 2, 3, 5, 8, 13, 17, 31, 40, 57]))
    kh = rng.choice([1, 3, 5, 7, 7, 7])
    kw = kh if rng.random() < 0.8 else rng.choice([1, 3, 5, 7])
    dilation = rng.choice([1, 1, 1, 2, 3])
    order = rng.choice(ORDERS)
    layout = rng.choice(["contiguous", "channels_last", "channels_last", "noncontig"])
    x = _input(g, shape, layout, dtype, ties)
    n, c = shape[:2]
    w = (torch.randn(1, len(order), kh, kw, generator=g, dtype=torch.float64) * 0.3).to(pdtype)
    b = torch.randn(1, generator=g, dtype=torch.float64).to(pdtype) if rng.random() < 0.7 else None
    s = None
    if rng.random() < 0.4:
        s = torch.rand(n, c, 1, 1, generator=g, dtype=torch.float64) + 0.25
        s = (torch.round(s * 4) / 4 if ties else s).to(dtype)
    ns = nsh = None
    if rng.random() < 0.3:
        ns = (torch.rand(1, generator=g, dtype=torch.float64) + 0.5).to(pdtype)
        nsh = torch.randn(1, generator=g, dtype=torch.float64).to(pdtype)
    gy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
    mode = rng.choice(["grad", "grad", "grad", "plain", "out", "in_place"])
    knobs = _draw_knobs(rng, mod)
    torch.set_num_threads(rng.choice([1, 2, 3, 4]))
    kwargs = dict(order=order, dilation=dilation, norm_scale=ns, norm_shift=nsh, return_attention=True)

    leaves = [t for t in (x, w, b, s) if t is not None]
    if mode == "grad":
        leaves = [t.detach().requires_grad_() for t in leaves]
        xg, wg, bg, sg = _given(leaves, b, s)
        y, attn = ops.spatial_attention_fused(xg, wg, bg, channel_scale=sg, **kwargs)
        grads = torch.autograd.grad(y, leaves, gy) if y.numel() else [torch.zeros_like(t) for t in leaves]
    else:
        with torch.no_grad():
            out = {"out": torch.empty_like(x), "in_place": x.clone()}.get(mode)
            src = out if mode == "in_place" else x
            y, attn = ops.spatial_attention_fused(src, w, b, channel_scale=s, out=out, **kwargs)
            if out is not None and y.numel():
                assert y.data_ptr() == out.data_ptr()
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, w, b, s) if t is not None]
    xr, wr, br, sr = _given(ref_leaves, b, s)
    yr, attn_r = ref_sam(xr, wr, br, order, dilation, sr, None if ns is None else ns.double(),
                         None if nsh is None else nsh.double())
    errors = {"y": max_rel_error(y, yr), "attn": max_rel_error(attn, attn_r)}
    if mode == "grad" and yr.numel():
        rgrads = torch.autograd.grad(yr, ref_leaves, gy.double())
        names = ["x", "weight"] + (["bias"] if b is not None else []) + (["scale"] if s is not None else [])
        for name, got, want in zip(names, grads, rgrads):
            if dtype == torch.float64 or name == "x":
                errors["grad_" + name] = max_rel_error(got, want)
    tol = {torch.float64: 1e-10, torch.float32: 5e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    bad = {k: v for k, v in errors.items() if not v <= tol}
    if bad:
        return dict(case=case, errors=bad, dtype=dtype, shape=shape, kernel=(kh, kw), dilation=dilation,
                    order=order, layout=layout, ties=ties, mode=mode, knobs=knobs,
                    threads=torch.get_num_threads(), bias=b is not None, scale=s is not None, norm=ns is not None)
    return None


def cbam_case(case: int, mod) -> Optional[dict]:
    """CBAM's training composition in float64: global pooling -> channel MLP -> fused SAM with a
    channel scale (and a training BatchNorm or not), the pooling's gradient added into the SAM's
    (``with_global_pool``); every gradient against float64 torch ops."""
    rng = random.Random(case)
    g = torch.Generator().manual_seed(case)
    dtype = torch.float64
    shape = (rng.choice([1, 2, 3, 5]), rng.choice([1, 3, 8, 17, 48, 64]), rng.choice([2, 3, 5, 7, 9, 13, 26]),
             rng.choice([1, 2, 3, 5, 7, 9, 16, 33]))
    n, c = shape[:2]
    k = rng.choice([3, 7])
    dilation = rng.choice([1, 1, 2])
    order = rng.choice(ORDERS)
    gorder = rng.choice([("mean", "max"), ("max", "mean"), ("mean",)])
    layout = rng.choice(["contiguous", "channels_last", "noncontig"])
    use_bn = rng.random() < 0.5
    hidden = max(1, c // rng.choice([1, 2, 4, 16]))
    two = rng.random() < 0.8
    x = _input(g, shape, layout, dtype)
    params = [torch.randn(hidden if two else c, c, generator=g, dtype=dtype) * 0.3]
    params.append(torch.randn(params[0].shape[0], generator=g, dtype=dtype) * 0.1)
    params += [torch.randn(c, hidden, generator=g, dtype=dtype) * 0.3, torch.randn(c, generator=g, dtype=dtype) * 0.1] \
        if two else [None, None]
    params += [torch.randn(1, len(order), k, k, generator=g, dtype=dtype) * 0.3, torch.randn(1, generator=g, dtype=dtype)]
    gamma, beta = torch.rand(1, generator=g, dtype=dtype) + 0.5, torch.randn(1, generator=g, dtype=dtype)
    gy = torch.randn(x.shape, generator=g, dtype=dtype)
    knobs = _draw_knobs(rng, mod)
    torch.set_num_threads(rng.choice([1, 2, 3, 4]))

    def fused(x, w1, b1, w2, b2, w, b):
        def body(xt, pooled):
            scale = ops.channel_mlp_gate(pooled, w1, b1, w2, b2).view(n, c, 1, 1)
            if not use_bn:
                return (ops.spatial_attention_fused(xt, w, b, order=order, dilation=dilation, channel_scale=scale),)
            norm = torch.nn.BatchNorm2d(1).to(dtype)
            with torch.no_grad():
                norm.weight.copy_(gamma)
                norm.bias.copy_(beta)
            assert ops.batchnorm_train_fusable(xt, norm)
            y = ops.spatial_attention_fused_batchnorm(xt, w, b, norm, order=order, dilation=dilation,
                                                      channel_scale=scale)
            return y, norm.weight, norm.bias
        return ops.with_global_pool(x, body, order=gorder)

    def plain(x, w1, b1, w2, b2, w, b, gm, bt):
        pooled = torch.stack([x.amax(dim=(2, 3)) if kind == "max" else x.mean(dim=(2, 3)) for kind in gorder])
        scale = reference.channel_mlp_gate(pooled, w1, b1, w2, b2).view(n, c, 1, 1)
        return ref_sam(x, w, b, order, dilation, scale, bn=(gm, bt) if use_bn else None)[0]

    leaves = [x.detach().requires_grad_()] + [p if p is None else p.clone().requires_grad_() for p in params]
    outs = fused(*leaves)
    got_leaves = [t for t in leaves if t is not None] + list(outs[1:])
    grads = torch.autograd.grad(outs[0], got_leaves, gy)
    ref = [t if t is None else t.detach().clone().requires_grad_() for t in leaves]
    gm, bt = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
    yr = plain(*ref, gm, bt)
    ref_leaves = [t for t in ref if t is not None] + ([gm, bt] if use_bn else [])
    rgrads = torch.autograd.grad(yr, ref_leaves, gy)
    errors = {"y": max_rel_error(outs[0], yr)}
    wscale = rgrads[-4 if use_bn else -2].abs().max().item()  # the conv weight's gradient
    for i, (got, want) in enumerate(zip(grads, rgrads)):
        if use_bn and i == len(grads) - 3:  # conv bias before a batch norm: 0 in exact arithmetic
            errors[f"grad{i}"] = (got - want).abs().max().item() / wscale
        else:
            errors[f"grad{i}"] = max_rel_error(got, want)
    bad = {k: v for k, v in errors.items() if not v <= 1e-9}
    if bad:
        return dict(case=case, errors=bad, shape=shape, k=k, dilation=dilation, order=order, gorder=gorder,
                    layout=layout, bn=use_bn, two_layers=two, hidden=hidden, knobs=knobs,
                    threads=torch.get_num_threads())
    return None


def _plain_module_run(module, x, gy, monkeypatch):
    """``module``'s plain PyTorch path (the C++ extension hidden): output, gradients of x and
    the parameters."""
    with monkeypatch.context() as m:
        m.setattr(_cpp, "_module", None)
        x = x.detach().requires_grad_()
        module.zero_grad(set_to_none=True)
        y = module(x)
        if gy is None:
            return y.detach(), None, None
        y.backward(gy)
        return y.detach(), x.grad, {name: p.grad for name, p in module.named_parameters()}


def module_case(case: int, mod, monkeypatch) -> Optional[dict]:
    """A ``SpatialAttention`` / ``CBAM`` in float64 (random options, train or eval) against its
    own plain PyTorch path: a training step (output, gradients, running statistics), then two
    calls without autograd with the parameters changed in place between them (the eval plan
    must see the change)."""
    rng = random.Random(case)
    g = torch.Generator().manual_seed(case)
    torch.manual_seed(case)
    c = rng.choice([16, 32, 48, 64])
    if rng.random() < 0.5:
        cfg = dict(kernel_size=rng.choice([3, 5, 7]), order=rng.choice(ORDERS), norm=rng.choice(["bn", None]),
                   bias=rng.random() < 0.5, dilation=rng.choice([1, 1, 2]))
        module = SpatialAttention(c, **cfg)
    else:
        cfg = dict(preset=rng.choice(["paper", "timm", "ultralytics", "mmyolo"]),
                   arrangement=rng.choice(["channel_spatial", "channel_spatial", "spatial_channel", "parallel"]),
                   reduction=rng.choice([4, 16]), kernel_size=rng.choice([3, 7]))
        module = CBAM(c, **cfg)
    module = module.double().train(rng.random() < 0.6)
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(generator=g)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0, generator=g)
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    shape = (rng.choice([1, 2, 3, 4]), c, rng.choice([2, 3, 5, 7, 13, 14]), rng.choice([1, 3, 5, 7, 13, 31]))
    layout = rng.choice(["contiguous", "channels_last", "noncontig"])
    x = _input(g, shape, layout, torch.float64)
    gy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    knobs = _draw_knobs(rng, mod)
    torch.set_num_threads(rng.choice([1, 2, 3, 4]))
    plain = copy.deepcopy(module)

    xg = x.clone().requires_grad_()
    y = module(xg)
    y.backward(gy)
    yr, gxr, gpr = _plain_module_run(plain, x, gy, monkeypatch)
    errors = {"y": max_rel_error(y.detach(), yr), "grad_x": max_rel_error(xg.grad, gxr)}
    scale = max(t.abs().max().item() for t in gpr.values())
    for name, p in module.named_parameters():  # (a conv bias before a batch norm has gradient ~0)
        errors["grad_" + name] = (p.grad - gpr[name]).abs().max().item() / max(gpr[name].abs().max().item(), 1e-3 * scale)
    for (name, buf), (_, want) in zip(module.named_buffers(), plain.named_buffers()):
        errors["buffer_" + name] = max_rel_error(buf, want) if buf.is_floating_point() else float(not torch.equal(buf, want))
    for call in range(2):
        with torch.no_grad():
            got = module(x)
        plain.load_state_dict(module.state_dict())
        errors[f"no_grad_{call}"] = max_rel_error(got, _plain_module_run(plain, x, None, monkeypatch)[0])
        with torch.no_grad():
            for p in module.parameters():
                p.mul_(0.7)
    bad = {k: v for k, v in errors.items() if not v <= 1e-9}
    if bad:
        return dict(case=case, errors=bad, cfg=cfg, training=module.training, shape=shape, layout=layout,
                    knobs=knobs, threads=torch.get_num_threads())
    return None


@pytest.mark.parametrize("block", range(8))
def test_fused_sam_random_configs(cpp_module, block):
    failures = [f for case in range(block * CASES_PER_BLOCK, (block + 1) * CASES_PER_BLOCK)
                if (f := fused_case(case, cpp_module)) is not None]
    assert not failures, failures


@pytest.mark.parametrize("block", range(3))
def test_cbam_composition_random_configs(cpp_module, block):
    failures = [f for case in range(block * CASES_PER_BLOCK, (block + 1) * CASES_PER_BLOCK)
                if (f := cbam_case(10_000 + case, cpp_module)) is not None]
    assert not failures, failures


@pytest.mark.parametrize("block", range(2))
def test_modules_random_configs(cpp_module, block, monkeypatch):
    failures = [f for case in range(block * CASES_PER_BLOCK, (block + 1) * CASES_PER_BLOCK)
                if (f := module_case(20_000 + case, cpp_module, monkeypatch)) is not None]
    assert not failures, failures


def test_a_wrong_output_is_caught(cpp_module, monkeypatch):
    """The comparison can fail: a fused op whose first output element is off by 5 % of the
    output's largest value is reported, for every non-empty case."""
    real = ops.spatial_attention_fused

    def off(*args, **kwargs):
        y, attn = real(*args, **kwargs)
        if y.numel():
            with torch.no_grad():
                y[0, 0, 0, 0] += 0.05 * (y.abs().max() + 1)
        return y, attn

    monkeypatch.setattr(ops, "spatial_attention_fused", off)
    results = [fused_case(case, cpp_module) for case in range(30)]
    assert sum(r is not None for r in results) >= 20
    assert all("y" in r["errors"] for r in results if r is not None)
