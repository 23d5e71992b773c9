"""Run by tests/ops/test_triton_interp.py in a subprocess with TRITON_INTERPRET=1.

Exits non-zero (AssertionError) on the first mismatch. Every output buffer the
kernels allocate is pre-filled with NaN, so an element a kernel fails to write
shows up in the comparison.
"""
from __future__ import annotations

import itertools
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before importing triton"

import torch  # noqa: E402

from spatialattn.ops import _library as lib  # noqa: E402
from spatialattn.ops import _triton, reference  # noqa: E402

from _autograd_graph import node_names  # noqa: E402  (this script's folder is on sys.path)
from _launch_counter import CountLaunches  # noqa: E402
from _sam_reference import ref_sam  # noqa: E402


class _NaNTorch:
    """``torch`` for the kernel module, with empty/empty_like returning NaN-filled tensors."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*a, **k):
        t = torch.empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    @staticmethod
    def empty_like(*a, **k):
        t = torch.empty_like(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t


_triton.torch = _NaNTorch()
assert _triton.available()

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def make(shape, layout, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if layout == "noncontig":
        n, c, h, w = shape
        return torch.randn(n, c, h, 2 * w, generator=g)[..., ::2].to(dtype)
    x = torch.randn(shape, generator=g).to(dtype)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


def check(got, want, dtype, what, loose=1.0, scaled=False):
    """``loose``: tolerance factor for sums over many half-precision-rounded terms; ``scaled``:
    the absolute tolerance times the largest ``|want|`` (for sums whose rounding error follows
    the size of their terms, not of the result)."""
    assert not torch.isnan(got).any() or torch.isnan(want).any(), f"{what}: unwritten (NaN) elements"
    tol = {k: v * (loose if dtype != torch.float32 else 1.0) for k, v in TOL[dtype].items()}
    if scaled:
        tol["atol"] *= max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got, want, **tol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def check_primitives(shape, dtypes, layouts) -> int:
    """Channel pooling, gate multiply and their backward passes against the reference."""
    n, c, h, w = shape
    count = 0
    for dtype in dtypes:
        acc = torch.float32
        for layout in layouts:
            for with_scale in (False, True):
                x = make(shape, layout, dtype, 0)
                # powers of two: x * s is exact, so the interpreter's round-toward-zero
                # downcast (hardware rounds to nearest) cannot move the max / its ties
                s = (2.0 ** torch.randint(-2, 3, (n, c, 1, 1))).to(dtype) if with_scale else None
                a = torch.rand(n, 1, h, w)
                for order in (("max", "mean"), ("mean", "max"), ("max",)):
                    kinds = [lib.KIND[k] for k in order]
                    check(_triton.pool_forward(x, s, kinds, acc), reference.channel_pool(x, order, s, acc), dtype,
                          f"pool {dtype} {layout} {order} scale={with_scale}")
                    count += 1
                check(_triton.gate_forward(x, a, s), reference.gate_multiply(x, a, s), dtype, f"gate {dtype} {layout}")
                # backward of both primitives against autograd through the reference
                xr = x.detach().float().requires_grad_()
                sr = None if s is None else s.detach().float().requires_grad_()
                ar = a.clone().requires_grad_()
                gy = torch.randn(shape).to(dtype)
                y = reference.gate_multiply(xr, ar, sr)
                want = torch.autograd.grad(y, [t for t in (xr, ar, sr) if t is not None], gy.float())
                gx, ga, gs = _triton.gate_backward(gy, x, a, s)
                check(gx, want[0].to(dtype), dtype, f"gate bwd x {dtype} {layout}")
                check(ga, want[1], dtype, f"gate bwd attn {dtype} {layout}", loose=4)
                if s is not None:
                    check(gs, want[2], dtype, f"gate bwd scale {dtype} {layout}", loose=4)
                pooled = _triton.pool_forward(x, s, [0, 1], acc)
                gp = torch.randn(n, 2, h, w)
                xr = x.detach().requires_grad_()
                sr = None if s is None else s.detach().requires_grad_()
                want = torch.autograd.grad(reference.channel_pool(xr, ("max", "mean"), sr, acc),
                                           [t for t in (xr, sr) if t is not None], gp)
                gx, gs = _triton.pool_backward(gp, x, s, pooled, [0, 1])
                check(gx, want[0], dtype, f"pool bwd x {dtype} {layout}")
                if s is not None:
                    check(gs.to(dtype), want[1], dtype, f"pool bwd scale {dtype} {layout}", loose=4, scaled=True)
                count += 6
    return count


def check_band_forward() -> int:
    """The SAM forward in one launch (``_sam_band_kernel``) against the three launches, bit for
    bit (the same tiles and order of operations; the reference's channel loop unsplit), and
    ``y`` / the attention against float64: band heights from one row (every row's halo pooled
    by its neighbours too) to the whole map and the automatic one, halos wider than the map
    (dilation 3, k = 7 on 4 rows), kernel sizes 1-7 and not square, every pooling order with
    a repeated slot, scale, bias and affine norm, three dtypes and layouts, NaN in a halo row;
    every output buffer starts as NaN (``_NaNTorch``), so an element the kernel skips shows."""
    count = 0
    saved = (_triton._BAND_FORWARD, _triton._BAND_ROWS, _triton._PROGRAMS_PER_SM)
    _triton._PROGRAMS_PER_SM = 0
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    every = list(itertools.product(ALL_DTYPES, ALL_LAYOUTS))
    # shape, pooling kinds, kernel, dilation, scale, norm, bias, band heights (0: automatic), (dtype, layout)s
    # (the interpreter runs a program's 49-98 unrolled taps in Python: one-row bands cost most)
    cases = [((2, 19, 9, 11), [0, 1], (7, 7), 1, True, False, True, (4,), every),
             ((2, 19, 9, 11), [0, 1], (7, 7), 1, True, False, True, (1, 0), [(f32, "nchw")]),
             ((2, 19, 9, 11), [1, 0], (7, 7), 1, False, True, False, (2, 9), [(f32, "nchw"), (f16, "channels_last")]),
             ((1, 40, 13, 5), [1], (5, 5), 3, False, True, False, (5,), [(bf16, "channels_last")]),
             ((2, 20, 4, 16), [0, 1, 0], (7, 3), 3, True, True, True, (1, 3), [(f32, "nchw"), (f32, "noncontig")]),
             ((3, 5, 6, 17), [0], (1, 1), 1, True, False, True, (2,), [(f16, "nchw")]),
             ((1, 17, 7, 1), [1, 0], (3, 5), 2, False, False, True, (2,), [(f32, "channels_last")])]
    runs = [(case[:-1], dtype, layout) for case in cases for dtype, layout in case[-1]]
    for (shape, kinds, (kh, kw), dil, scale, norm, bias, heights), dtype, layout in runs:
        n, c, h, w = shape
        g = torch.Generator().manual_seed(h * 100 + c)
        x = make(shape, layout, dtype, h)
        if (h, c) == (9, 19):  # NaN in the first image's row 3: in the halo of every band within 3 rows
            x[0, 7, 3, 2] = float("nan")
        s = (2.0 ** torch.randint(-2, 3, (n, c, 1, 1), generator=g)).to(dtype) if scale else None
        wt = torch.randn(1, len(kinds), kh, kw, generator=g) * 0.3
        b = torch.randn(1, generator=g) if bias else None
        ns, nsh = (torch.rand(1, generator=g) + 0.5, torch.randn(1, generator=g)) if norm else (None, None)
        _triton._BAND_FORWARD = False
        want = _triton.sam_forward(x, wt, b, s, ns, nsh, kinds, dil)
        names = ["max" if k == 0 else "mean" for k in kinds]
        y64, attn64 = ref_sam(*(None if t is None else t.double() for t in (x, wt, b)), names, dil,
                              *(None if t is None else t.double() for t in (s, ns, nsh)))
        _triton._BAND_FORWARD = True
        for rows in heights:
            _triton._BAND_ROWS = rows
            got = _triton.sam_forward(x, wt, b, s, ns, nsh, kinds, dil)
            what = f"band forward {shape} {layout} {dtype} {kinds} k={kh}x{kw} dilation={dil} rows={rows}"
            for name, a, e in zip(("y", "attention", "logits", "pooled"), got, want):
                assert a.stride() == e.stride(), (what, name)
                torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True,
                                           msg=lambda m: f"{what}: {name} differs from the three launches: {m}")
            check(got[1].double(), attn64, torch.float32, f"{what} attention vs float64")
            check(got[0].double(), y64, dtype, f"{what} y vs float64")
            count += 1
    _triton._BAND_FORWARD, _triton._BAND_ROWS, _triton._PROGRAMS_PER_SM = saved
    return count


def _backward_inputs(shape, layout, dtype, seed, x_seed, ties, scale, kinds, kh, kw):
    """``(generator, x, scale or None, weight, bias)`` of a backward check (``scale``: None for
    none, else a power-of-two channel scale; ``ties``: ``x`` rounded to integers)."""
    n, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    x = make(shape, layout, dtype, x_seed)
    if ties:
        x = x.float().round().to(dtype)
    s = None if scale is None else (2.0 ** torch.randint(-2, 3, (n, c, 1, 1), generator=g)).to(dtype)
    return g, x, s, torch.randn(1, len(kinds), kh, kw, generator=g) * 0.3, torch.randn(1, generator=g)


def _reference_grads(tensors, kinds, dil, gy, ga, bn=False, eps=1e-5):
    """Float64 autograd through ``ref_sam``: ``{name: gradient}`` for each tensor of ``tensors``
    that is not None (names ``x``, ``weight``, ``bias``, ``scale`` and ``norm scale`` / ``norm
    shift``, or with ``bn`` the training BatchNorm's ``bn weight`` / ``bn bias``), for the
    upstream gradients ``gy`` of ``y`` and ``ga`` (or None) of the attention."""
    t64 = {k: None if t is None else t.double().requires_grad_() for k, t in tensors.items()}
    if bn:
        extra = dict(bn=(1.0 if t64["bn weight"] is None else t64["bn weight"],
                         0.0 if t64["bn bias"] is None else t64["bn bias"]), eps=eps)
    else:
        extra = dict(ns=t64["norm scale"], nsh=t64["norm shift"])
    names = ["max" if k == 0 else "mean" for k in kinds]
    y64, attn64 = ref_sam(t64["x"], t64["weight"], t64["bias"], names, dil, t64["scale"], **extra)
    outs, grads = [y64], [gy.double()]
    if ga is not None:
        outs.append(attn64)
        grads.append(ga.double())
    leaves = {k: t for k, t in t64.items() if t is not None}
    return dict(zip(leaves, torch.autograd.grad(outs, list(leaves.values()), grads)))


def _check_vs_float64(what, got, ref, dtype, skip=()):
    """``got`` (``{name: gradient}``) against ``_reference_grads``'s ``ref``: ``grad_x`` within
    the dtype's tolerance, the sums over every pixel (terms rounded to the input's dtype)
    against their largest term."""
    check(got["x"].double(), ref["x"], dtype, f"{what} grad x vs float64", loose=2)
    tol = 1e-4 if dtype == torch.float32 else 4e-2
    for name, e in ref.items():
        if name != "x" and name not in skip:
            torch.testing.assert_close(got[name].double().reshape(e.shape), e, rtol=tol,
                                       atol=tol * max(1.0, float(e.abs().max())),
                                       msg=lambda m: f"{what}: {name} vs float64: {m}")


def check_band_backward() -> int:
    """The SAM backward in one launch (``_sam_band_backward_kernel``) against the five launches:
    ``grad_x`` bit for bit (the same formulas per element; their pass A unsplit), the parameter
    and scale gradients (partial sums grouped by band instead of by tile) within float32
    rounding, and against float64 autograd through the reference: band heights of one row to
    the whole map and the automatic one, halos wider than the map, kernel sizes 1-7 and not
    square, dilations 1-3, every pooling order with a repeated slot, scale with and without its
    gradient, affine norm, the gradient of the returned attention, no upstream gradient for
    ``y``, tied maxima, three dtypes and layouts."""
    count = 0
    saved = (_triton._BAND_BACKWARD, _triton._BAND_ROWS, _triton._PROGRAMS_PER_SM)
    _triton._PROGRAMS_PER_SM = 0
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    # shape, kinds, kernel, dilation, scale (None: none; else need its gradient), norm, grad of
    # attention, grad of y (else zeros), band heights, ties, (dtype, layout)
    cases = [((2, 19, 9, 11), [0, 1], (7, 7), 1, True, False, False, True, (4, 1), False, [(f32, "nchw")]),
             ((2, 19, 9, 11), [1, 0], (7, 7), 1, False, True, True, True, (2, 0), True, [(f32, "channels_last")]),
             ((2, 19, 9, 11), [0, 1, 0], (3, 3), 2, True, True, False, True, (3,), False,
              [(f16, "nchw"), (bf16, "noncontig")]),
             ((1, 40, 13, 5), [1], (5, 5), 3, None, True, True, True, (5,), False, [(bf16, "channels_last")]),
             ((2, 20, 4, 16), [0], (7, 3), 3, False, False, True, False, (1,), True, [(f32, "nchw")]),
             ((3, 5, 6, 17), [0, 1], (1, 1), 1, True, False, False, True, (2,), False, [(f16, "channels_last")])]
    runs = [(case[:-1], dtype, layout) for case in cases for dtype, layout in case[-1]]
    for (shape, kinds, (kh, kw), dil, scale, norm, gattn, gy_, heights, ties), dtype, layout in runs:
        n, c, h, w = shape
        g, x, s, wt, b = _backward_inputs(shape, layout, dtype, h * 10 + c, c, ties, scale, kinds, kh, kw)
        need_gs = bool(scale)
        ns, nsh = (torch.rand(1, generator=g) + 0.5, torch.randn(1, generator=g)) if norm else (None, None)
        _triton._BAND_BACKWARD = False
        y, attn, logits, pooled = _triton.sam_forward(x, wt, b, s, ns, nsh, kinds, dil)
        # (no gradient for y reaches the backward as zeros: EagerSam makes them)
        gy = torch.randn(shape, generator=g).to(dtype) if gy_ else torch.zeros(shape, dtype=dtype)
        ga = torch.randn(n, 1, h, w, generator=g) if gattn else None
        args = (gy, ga, x, s, wt, ns, attn, logits, pooled, kinds, dil)
        want = _triton.sam_backward(*args, need_gs=need_gs)
        ref = _reference_grads({"x": x, "weight": wt, "bias": b, "scale": s, "norm scale": ns, "norm shift": nsh},
                               kinds, dil, gy, ga)
        _triton._BAND_BACKWARD = True
        for rows in heights:
            _triton._BAND_ROWS = rows
            got = _triton.sam_backward(*args, need_gs=need_gs)
            what = f"band backward {shape} {layout} {dtype} {kinds} k={kh}x{kw} dilation={dil} rows={rows}"
            assert torch.equal(got[0], want[0]) and got[0].stride() == want[0].stride(), f"{what}: grad x"
            for name, a, e in zip(("scale", "weight", "bias", "norm scale", "norm shift"), got[1:], want[1:]):
                assert (a is None) == (e is None), (what, name)
                if a is not None:
                    torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * max(1.0, float(e.abs().max())),
                                               msg=lambda m: f"{what}: {name} against the five launches: {m}")
            mine = dict(zip(("x", "scale", "weight", "bias", "norm scale", "norm shift"), got))
            _check_vs_float64(what, mine, ref, dtype, skip=() if need_gs else ("scale",))
            count += 1
    _triton._BAND_BACKWARD, _triton._BAND_ROWS, _triton._PROGRAMS_PER_SM = saved
    return count



def _bn_forward(band, *args):
    """``_triton.sam_forward_batchnorm(*args)`` in the default launches or (``band``) in two."""
    with _triton.band_launches(band, False):
        return _triton.sam_forward_batchnorm(*args)


def check_band_forward_batchnorm() -> int:
    """The training-BatchNorm SAM forward in two launches (``_sam_band_kernel`` with
    ``BN_STATS``, then ``_sam_band_bn_kernel``) against the default launches: the pooled maps
    and the logits bit for bit, the batch statistics within float64 rounding (partials per band
    instead of per tile), the attention and ``y`` within float32 / the dtype's rounding, and
    ``y`` / the attention / the statistics against float64; band heights of one row to the whole
    map and the automatic one, with and without the BatchNorm's weight and bias, scale, conv
    bias, three dtypes and layouts, a halo wider than the map."""
    count = 0
    saved = (_triton._BAND_ROWS, _triton._PROGRAMS_PER_SM)
    _triton._PROGRAMS_PER_SM = 0
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    # shape, kinds, kernel, dilation, scale, conv bias, BatchNorm affine, band heights, (dtype, layout)s
    cases = [((2, 19, 9, 11), [0, 1], (7, 7), 1, True, True, True, (4, 1, 0), [(f32, "nchw")]),
             ((2, 19, 9, 11), [1, 0], (3, 3), 2, False, False, False, (2, 9), [(f32, "channels_last"),
                                                                               (bf16, "noncontig")]),
             ((3, 20, 4, 16), [0, 1, 0], (7, 3), 3, True, True, True, (1,), [(f16, "nchw")]),
             ((1, 17, 7, 1), [1], (5, 5), 1, False, True, True, (3,), [(f32, "channels_last")])]
    runs = [(case[:-1], dtype, layout) for case in cases for dtype, layout in case[-1]]
    for (shape, kinds, (kh, kw), dil, scale, bias, affine, heights), dtype, layout in runs:
        n, c, h, w = shape
        g = torch.Generator().manual_seed(h * 1000 + c)
        x = make(shape, layout, dtype, h + 7)
        s = (2.0 ** torch.randint(-2, 3, (n, c, 1, 1), generator=g)).to(dtype) if scale else None
        wt = torch.randn(1, len(kinds), kh, kw, generator=g) * 0.3
        b = torch.randn(1, generator=g) if bias else None
        gamma, beta = (torch.rand(1, generator=g) + 0.5, torch.randn(1, generator=g)) if affine else (None, None)
        eps = 1e-5
        want = _bn_forward(False, x, wt, b, s, gamma, beta, eps, kinds, dil)
        names = ["max" if k == 0 else "mean" for k in kinds]
        bn64 = (1.0 if gamma is None else gamma.double(), 0.0 if beta is None else beta.double())
        y64, attn64 = ref_sam(*(None if t is None else t.double() for t in (x, wt, b)), names, dil,
                              None if s is None else s.double(), bn=bn64, eps=eps)
        for rows in heights:
            _triton._BAND_ROWS = rows
            got = _bn_forward(True, x, wt, b, s, gamma, beta, eps, kinds, dil)
            what = f"band BatchNorm forward {shape} {layout} {dtype} {kinds} k={kh}x{kw} dilation={dil} rows={rows}"
            for name in range(5):
                assert got[name].stride() == want[name].stride(), (what, name)
            for name, i in (("pooled", 3), ("logits", 2)):
                torch.testing.assert_close(got[i], want[i], rtol=0, atol=0, equal_nan=True,
                                           msg=lambda m: f"{what}: {name} differs from the default launches: {m}")
            torch.testing.assert_close(got[4], want[4], rtol=1e-12, atol=1e-12,
                                       msg=lambda m: f"{what}: statistics against the default launches: {m}")
            torch.testing.assert_close(got[1], want[1], rtol=0, atol=2e-7,
                                       msg=lambda m: f"{what}: attention against the default launches: {m}")
            check(got[0], want[0], dtype, f"{what} y against the default launches")
            check(got[1].double(), attn64, torch.float32, f"{what} attention vs float64")
            check(got[0].double(), y64, dtype, f"{what} y vs float64")
            count += 1
    _triton._BAND_ROWS, _triton._PROGRAMS_PER_SM = saved
    return count


def check_band_backward_batchnorm() -> int:
    """The training-BatchNorm SAM backward in two launches (``_sam_band_backward_kernel`` with
    ``BN_PHASE`` 1 and 2) against the default launches and against float64 autograd through the
    reference: ``grad_x`` and every parameter gradient (conv weight and bias, the BatchNorm's
    weight and bias, the scale) within rounding (the batch sums are combined from partials per
    band instead of per tile); band heights of one row to the whole map and the automatic one, a
    halo wider than the map, with and without the BatchNorm's weight, scale and its gradient,
    the gradient of the returned attention, tied maxima, three dtypes and layouts."""
    count = 0
    saved = (_triton._BAND_BACKWARD, _triton._BAND_ROWS, _triton._PROGRAMS_PER_SM)
    _triton._PROGRAMS_PER_SM = 0
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    # shape, kinds, kernel, dilation, scale (None: none; else need its gradient), BatchNorm
    # weight, grad of attention, band heights, ties, (dtype, layout)s
    cases = [((2, 19, 9, 11), [0, 1], (7, 7), 1, True, True, False, (4, 1, 0), False, [(f32, "nchw")]),
             ((2, 19, 9, 11), [1, 0], (3, 3), 2, False, False, True, (2, 9), True, [(f32, "channels_last"),
                                                                                   (bf16, "noncontig")]),
             ((3, 20, 4, 16), [0, 1, 0], (7, 3), 3, None, True, True, (1,), False, [(f16, "nchw")])]
    runs = [(case[:-1], dtype, layout) for case in cases for dtype, layout in case[-1]]
    for (shape, kinds, (kh, kw), dil, scale, affine, gattn, heights, ties), dtype, layout in runs:
        n, c, h, w = shape
        g, x, s, wt, b = _backward_inputs(shape, layout, dtype, h * 100 + c + 1, c + 3, ties, scale, kinds, kh, kw)
        need_gs = bool(scale)
        gamma, beta = (torch.rand(1, generator=g) + 0.5, torch.randn(1, generator=g)) if affine else (None, None)
        eps = 1e-5
        y, attn, logits, pooled, stats = _bn_forward(False, x, wt, b, s, gamma, beta, eps, kinds, dil)
        gy = torch.randn(shape, generator=g).to(dtype)
        ga = torch.randn(n, 1, h, w, generator=g) if gattn else None
        args = (gy, ga, x, s, wt, None, attn, logits, pooled, kinds, dil)
        bn = dict(need_gs=need_gs, bn_stats=stats, bn_weight=gamma, bn_eps=eps)
        _triton._BAND_BACKWARD = False
        want = _triton.sam_backward(*args, **bn)
        ref = _reference_grads({"x": x, "weight": wt, "bias": b, "scale": s, "bn weight": gamma, "bn bias": beta},
                               kinds, dil, gy, ga, bn=True, eps=eps)
        _triton._BAND_BACKWARD = True
        for rows in heights:
            _triton._BAND_ROWS = rows
            got = _triton.sam_backward(*args, **bn)
            what = f"band BatchNorm backward {shape} {layout} {dtype} {kinds} k={kh}x{kw} dilation={dil} rows={rows}"
            assert got[0].stride() == want[0].stride(), what
            check(got[0], want[0], dtype, f"{what} grad x against the default launches")
            names = ("x", "scale", "weight", "bias", "bn weight", "bn bias")  # sam_backward's returns
            mine, theirs = dict(zip(names, got)), dict(zip(names, want))
            for name in names[1:]:
                a, e = mine[name], theirs[name]
                assert (a is None) == (e is None), (what, name)
                if a is not None:
                    torch.testing.assert_close(a.double(), e.double(), rtol=1e-5,
                                               atol=1e-5 * max(1.0, float(e.abs().max())),
                                               msg=lambda m: f"{what}: {name} against the default launches: {m}")
            _check_vs_float64(what, mine, ref, dtype, skip=() if need_gs else ("scale",))
            count += 1
    _triton._BAND_BACKWARD, _triton._BAND_ROWS, _triton._PROGRAMS_PER_SM = saved
    return count

def check_batchnorm_fold() -> int:
    """The training-BatchNorm SAM with its partial rows folded by one program first
    (``_fold_kernel``, forced with ``_FOLD_ROWS = 0``) against the same launches without the
    fold: every output of the forward and the backward the same bits, default and band
    launches, two folds a step (forward and backward) and none without. Then the fold of more
    rows than its lanes (300 > 128; a whole SAM with that many tiles takes a minute in the
    interpreter): the statistics' fold against float64 and, read by ``_bn_attn_kernel``, the
    same bits as the 300 rows; the backward sums' fold (strided columns of a partial-sums
    buffer) against float64."""
    count = 0
    saved = (_triton._BAND_ROWS, _triton._PROGRAMS_PER_SM, _triton._fold_kernel)
    _triton._PROGRAMS_PER_SM = 0
    _triton._BAND_ROWS = 4
    shape, kinds, dil, dtype = (2, 19, 9, 11), [0, 1], 1, torch.float32
    n, c, h, w = shape
    g, x, s, wt, b = _backward_inputs(shape, "channels_last", dtype, 5, 6, False, True, kinds, 7, 7)
    gamma, beta = torch.rand(1, generator=g) + 0.5, torch.randn(1, generator=g)
    gy, ga = torch.randn(shape, generator=g).to(dtype), torch.randn(n, 1, h, w, generator=g)
    for band in (False, True):
        outs = {}
        for fold in (False, True):
            _triton._fold_kernel = counter = CountLaunches(saved[2])
            with _triton.band_launches(band, band), _triton.fold_rows(0 if fold else 1 << 30):
                fwd = _triton.sam_forward_batchnorm(x, wt, b, s, gamma, beta, 1e-5, kinds, dil)
                y, attn, logits, pooled, stats = fwd
                bwd = _triton.sam_backward(gy, ga, x, s, wt, None, attn, logits, pooled, kinds, dil, need_gs=True,
                                           bn_stats=stats, bn_weight=gamma, bn_eps=1e-5)
            assert counter.grids == ([(1,)] * 2 if fold else []), (band, fold, counter.grids)
            outs[fold] = [t for t in (*fwd, *bwd) if t is not None]
        what = f"BatchNorm fold band={band}"
        assert len(outs[True]) == len(outs[False]) == 11, what
        for i, (a, e) in enumerate(zip(outs[True], outs[False])):
            assert not torch.isnan(a).any(), f"{what}: output {i} unwritten (NaN)"
            torch.testing.assert_close(a, e, rtol=0, atol=0,
                                       msg=lambda m: f"{what}: output {i} differs from the unfolded rows: {m}")
        count += 1
    _triton._BAND_ROWS, _triton._PROGRAMS_PER_SM, _triton._fold_kernel = saved
    # 300 partial rows of (count, sum, M2), as 300 tiles of logits would leave them
    rows = 300
    tiles = torch.randn(rows, 128, generator=g, dtype=torch.float64) * 3 + 1
    counts = torch.randint(1, 129, (rows,), generator=g)
    counts[-1] = 128  # the last row ends on the fold's lanes' last column
    mask = torch.arange(128) < counts[:, None]
    sums = (tiles * mask).sum(1)
    m2 = (((tiles - (sums / counts)[:, None]) ** 2) * mask).sum(1)
    part = torch.stack([counts.double(), sums, m2], 1).contiguous()
    with _triton.fold_rows(0):
        folded, one = _triton._folded(part, rows, 3, stats=True)
    assert one == 1 and folded.shape == (3,)
    every = tiles[mask]
    want = torch.stack([torch.tensor(float(every.numel()), dtype=torch.float64), every.sum(),
                        ((every - every.mean()) ** 2).sum()])
    torch.testing.assert_close(folded, want, rtol=1e-12, atol=0, msg=lambda m: f"fold of {rows} rows: {m}")
    logits = torch.randn(1, 1, 8, 16, generator=g)
    got = {}
    for src, r in ((part, rows), (folded, 1)):
        attn, st = torch.full_like(logits, float("nan")), torch.full((2,), float("nan"), dtype=torch.float64)
        run_args, run_meta = _triton._running_args(None, 128, st)
        _triton._bn_attn_kernel[(1,)](logits, src, r, gamma, beta, 1e-5, attn, st, *run_args, 128, HAS_G=True,
                                      HAS_BETA=True, **run_meta, BP=_triton._BP_SMALL, BR=_triton._BP_SMALL)
        got[r] = (attn, st)
    for a, e in zip(got[1], got[rows]):
        torch.testing.assert_close(a, e, rtol=0, atol=0, msg=lambda m: f"attention from the fold of {rows} rows: {m}")
    # the backward's sums: columns 5 and 6 of [rows, 8] partial rows, as sam_backward folds them
    sums = torch.randn(rows, 8, generator=g, dtype=torch.float64)
    with _triton.fold_rows(0):
        folded, one = _triton._folded(sums.view(-1)[5:], rows, 8, stats=False)
    assert one == 1 and folded.shape == (2,)
    torch.testing.assert_close(folded, sums[:, 5:7].sum(0), rtol=1e-12, atol=1e-12,
                               msg=lambda m: f"fold of {rows} rows of sums: {m}")
    return count + 3


ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ALL_LAYOUTS = ("nchw", "channels_last", "noncontig")
# (shape, dtypes, layouts, programs per SM): C and HW not multiples of the tiles, the channel
# loops split (C = 19: two chunks of 16); C and HW multiples of 8 / 4 (the kernels' C_DIV /
# HW_DIV), more than one pixel tile, no split and split (pixel loops of the gradient pass too);
# one tile of multiples of 16; the other tile sizes that benchmarks/triton_report.py sweeps
CASES = [((2, 19, 5, 7), ALL_DTYPES, ALL_LAYOUTS, 8, {}),
         ((2, 24, 9, 12), (torch.float32, torch.bfloat16), ("nchw", "channels_last"), 0, {}),
         ((2, 24, 9, 12), (torch.float32,), ("nchw", "channels_last"), 8, {}),
         ((1, 16, 8, 8), (torch.float16,), ("nchw", "channels_last"), 8, {}),
         ((2, 24, 9, 12), (torch.float32,), ("nchw",), 8,
          {"_BC": 8, "_BP": 32, "_MUL_TILE": {False: (2, 512), True: (128, 8)}}),
         ((2, 40, 9, 12), (torch.float32,), ("channels_last",), 8,
          {"_BC": 32, "_BP": 128, "_MUL_TILE": {False: (8, 128), True: (32, 32)}})]


def main() -> None:
    # the same inputs every run (another seed: SPATIALATTN_TEST_SEED; the tolerances hold for any)
    torch.manual_seed(int(os.environ.get("SPATIALATTN_TEST_SEED", "0")))
    count = 0
    defaults = {k: getattr(_triton, k) for k in ("_BC", "_BP", "_MUL_TILE", "_PROGRAMS_PER_SM")}
    for shape, dtypes, layouts, programs_per_sm, settings in CASES:
        for k, v in dict(defaults, _PROGRAMS_PER_SM=programs_per_sm, **settings).items():
            setattr(_triton, k, v)
        count += check_primitives(shape, dtypes, layouts)
    for k, v in defaults.items():
        setattr(_triton, k, v)
    count += check_band_forward()
    count += check_band_backward()
    count += check_band_forward_batchnorm()
    count += check_band_backward_batchnorm()
    count += check_batchnorm_fold()
    shape = (2, 19, 5, 7)
    n, c, h, w = shape
    # NaN propagates through the max (tl.max alone would drop it)
    x = torch.randn(1, 20, 3, 3)
    x[0, 17, 1, 2] = float("nan")
    p = _triton.pool_forward(x, None, [0, 1], torch.float32)
    assert torch.isnan(p[0, :, 1, 2]).all() and not torch.isnan(p[0, :, 0, 0]).any(), "NaN lost in max pooling"
    # the gate on the small maps (conv + bias, affine norm, sigmoid in one kernel) against
    # torch in float64: kernel sizes, dilations, one or two maps, with and without bias / norm;
    # 130 pixels: two programs of _BP_SMALL, the second part-empty
    for p_, k_, dil, has_b, has_norm in [(2, 7, 1, True, False), (1, 3, 2, False, True), (2, 5, 3, True, True),
                                         (2, 1, 1, False, False)]:
        g = torch.Generator().manual_seed(k_ * 10 + dil)
        pooled = torch.randn(2, p_, 10, 13, generator=g)
        wt = torch.randn(1, p_, k_, k_, generator=g)
        b = torch.randn(1, generator=g) if has_b else None
        ns, nsh = (torch.rand(1, generator=g) + 0.5, torch.randn(1, generator=g)) if has_norm else (None, None)
        logits, attn = _triton.gate(pooled, wt, b, ns, nsh, dil)
        want = torch.nn.functional.conv2d(pooled.double(), wt.double(), None if b is None else b.double(),
                                          padding=dil * (k_ // 2), dilation=dil)
        check(logits.double(), want, torch.float32, f"gate logits k={k_} dilation={dil}")
        z = want if ns is None else want * ns.double() + nsh.double()
        check(attn.double(), torch.sigmoid(z), torch.float32, f"gate attention k={k_} dilation={dil}")
        count += 2
    # the whole SAM custom op on its generic (Triton) path, forward and backward
    lib._cpp_ok = lambda x: False
    lib._triton_ok = lambda x: True
    x = make(shape, "channels_last", torch.float32, 1).requires_grad_()
    s = torch.rand(n, c, 1, 1, requires_grad=True)
    wt = torch.randn(1, 2, 7, 7, requires_grad=True)
    b = torch.randn(1, requires_grad=True)
    y, attn, _, _ = lib.sam_op(x, wt, b, s, None, None, [1, 0], 1)
    pooled = reference.channel_pool(x, ("mean", "max"), s)
    attn_ref = torch.sigmoid(torch.nn.functional.conv2d(pooled, wt, b, padding=3))
    y_ref = reference.gate_multiply(x, attn_ref, s)
    check(y, y_ref, torch.float32, "sam forward")
    gy = torch.randn(shape)
    got = torch.autograd.grad(y, (x, s, wt, b), gy)
    want = torch.autograd.grad(y_ref, (x, s, wt, b), gy)
    for gg, ww, name in zip(got, want, ("x", "scale", "weight", "bias")):
        check(gg, ww, torch.float32, f"sam backward {name}")
    # the backward's small-map kernels: affine norm, other kernel sizes and dilations, one
    # pooled map, a gradient through the returned attention, pixel counts over two programs
    for order, k_, dil, layout in [([0], 5, 2, "nchw"), ([1], 3, 1, "channels_last"), ([0, 1, 1], 3, 3, "nchw")]:
        shape2 = (2, 19, 9, 17)
        x = make(shape2, layout, torch.float32, 7).requires_grad_()
        g = torch.Generator().manual_seed(k_)
        wt = torch.randn(1, len(order), k_, k_, generator=g).requires_grad_()
        ns = (torch.rand(1, generator=g) + 0.5).requires_grad_()
        nsh = torch.randn(1, generator=g).requires_grad_()
        y, attn, _, _ = lib.sam_op(x, wt, None, None, ns, nsh, order, dil)
        names = ["max" if k == 0 else "mean" for k in order]
        xd, wd, nsd, nshd = (t.detach().double().requires_grad_() for t in (x, wt, ns, nsh))
        pooled = reference.channel_pool(xd, names, None, torch.float64)
        z = torch.nn.functional.conv2d(pooled, wd, padding=dil * (k_ // 2), dilation=dil) * nsd + nshd
        attn_ref = torch.sigmoid(z)
        y_ref = xd * attn_ref
        gy, ga = torch.randn(shape2, generator=g), torch.randn(2, 1, 9, 17, generator=g)
        got = torch.autograd.grad((y, attn), (x, wt, ns, nsh), (gy, ga))
        want = torch.autograd.grad((y_ref, attn_ref), (xd, wd, nsd, nshd), (gy.double(), ga.double()))
        check(y.double(), y_ref, torch.float32, f"sam forward {order} k={k_} dilation={dil}")
        for gg, ww, name in zip(got, want, ("x", "weight", "norm scale", "norm shift")):
            scale_ = max(1.0, float(ww.abs().max()))
            torch.testing.assert_close(gg.double(), ww, rtol=1e-5, atol=1e-5 * scale_,
                                       msg=lambda m: f"sam backward {name} {order} k={k_} dilation={dil}: {m}")
    # SAM with a training-mode BatchNorm on the logits (GenericSamBatchNorm, Triton passes)
    for layout in ("nchw", "channels_last"):
        for dtype in (torch.float32, torch.float16):
            x = make(shape, layout, dtype, 2).requires_grad_()
            s = (2.0 ** torch.randint(-2, 3, (n, c, 1, 1))).float().requires_grad_()
            wt = (torch.randn(1, 2, 7, 7) * 0.3).requires_grad_()
            b = torch.randn(1, requires_grad=True)
            gamma = torch.tensor([1.3], requires_grad=True)
            beta = torch.tensor([-0.2], requires_grad=True)
            y, attn, stats = lib.GenericSamBatchNorm.apply(x, wt, b, s.to(dtype), gamma, beta, 1e-5, [0, 1], 1)
            xr = x.detach().float().requires_grad_()
            pooled = reference.channel_pool(xr, ("max", "mean"), s)
            logits = torch.nn.functional.conv2d(pooled, wt, b, padding=3)
            z = torch.nn.functional.batch_norm(logits, None, None, gamma, beta, training=True, eps=1e-5)
            attn_ref = torch.sigmoid(z)
            y_ref = reference.gate_multiply(xr, attn_ref, s)
            check(y.float(), y_ref.to(dtype).float(), dtype, f"sam-bn forward {dtype} {layout}", loose=2)
            check(attn, attn_ref, dtype, f"sam-bn attention {dtype} {layout}")
            torch.testing.assert_close(stats.float(), torch.stack([logits.mean(), logits.var(unbiased=False)]),
                                       rtol=1e-5, atol=1e-5)
            gy = torch.randn(shape).to(dtype)
            got = torch.autograd.grad(y, (x, s, wt, b, gamma, beta), gy)
            want = torch.autograd.grad(y_ref, (xr, s, wt, b, gamma, beta), gy.float())
            for gg, ww, name in zip(got, want, ("x", "scale", "weight", "bias", "gamma", "beta")):
                what = f"sam-bn backward {name} {dtype} {layout}"
                if dtype == torch.float32:
                    check(gg, ww, dtype, what, loose=4)
                else:  # x' and the products round to half before the sums: error relative to the largest term
                    assert not torch.isnan(gg).any(), what
                    torch.testing.assert_close(gg.float(), ww.float(), rtol=1e-2,
                                               atol=1e-2 * max(1.0, float(ww.abs().max())), msg=what)
            count += 1
    # BatchNorm2d's running-statistics update by program 0 of the launch that forms the batch
    # statistics (_bn_attn_kernel; _sam_band_bn_kernel in the band launches): bit for bit the
    # float64 formula of BatchNorm2d.forward from the statistics it returns (the momentum passed
    # as its float64 bits), cumulative average too; checked after every update. The logits
    # are shifted by 9 in one case, whose mean then cancels against a running mean of 9 to
    # about 1e-16 in its first update (a momentum rounded to float32 would leave 1.5e-8).
    xb = torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(9))
    wb = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(10)) * 0.3
    for (shift, rm0), momentum, tracked, band in itertools.product(((0.0, 0.5), (9.0, 9.0)), (0.1, 0.3, None),
                                                                   (True, False), (False, True)):
        rm, rv = torch.tensor([rm0]), torch.tensor([1.7])
        nbt = torch.tensor(3) if tracked else None
        want_rm, want_rv, want_nbt = rm.clone(), rv.clone(), None if nbt is None else nbt.clone()
        for step in range(2):
            with _triton.band_launches(band, False):
                *_, stats = _triton.sam_forward_batchnorm(xb, wb, torch.tensor([shift]), None, None, None, 1e-5,
                                                          [0, 1], 1, running=(rm, rv, nbt, momentum))
            factor = 0.0 if momentum is None else momentum
            if want_nbt is not None:
                want_nbt.add_(1)
                factor = 1.0 / float(want_nbt) if momentum is None else momentum
            unbiased = stats[1] * 24 / (24 - 1)
            want_rm.copy_(factor * stats[0] + (1.0 - factor) * want_rm.double())
            want_rv.copy_(factor * unbiased + (1.0 - factor) * want_rv.double())
            what = f"running statistics momentum={momentum} tracked={tracked} band={band} step {step}"
            assert torch.equal(rm, want_rm) and torch.equal(rv, want_rv), (what, rm, want_rm, rv, want_rv)
            assert nbt is None or torch.equal(nbt, want_nbt), what
        count += 1
    # CBAM channel-gate pooling (max / mean over H, W) and its backward, through ops.global_pool
    from spatialattn import ops

    ops_fast = ops._fast_device
    ops._fast_device = lambda x: "triton"
    try:
        # the pixel loops split in two (HW = 90) and, for float32, not split
        for dtype, programs_per_sm in [(torch.float32, 8), (torch.float16, 8), (torch.bfloat16, 8),
                                       (torch.float32, 0)]:
            _triton._PROGRAMS_PER_SM = programs_per_sm
            for layout in ("nchw", "channels_last", "noncontig"):
                for ties in (False, True):
                    x = make((2, 19, 9, 10), layout, dtype, 3)  # HW = 90: more than one pixel tile
                    if ties:
                        x = x.float().round().to(dtype)  # many tied maxima
                    for order in (("mean", "max"), ("max",), ("mean",), ("max", "mean", "max")):
                        for acc in {dtype, torch.float32}:
                            xa = x.detach().requires_grad_()
                            xb = x.detach().float().requires_grad_()
                            out = ops.global_pool(xa, order, dtype=acc)
                            ref = torch.stack([xb.amax(dim=(2, 3)) if k == "max" else xb.mean(dim=(2, 3))
                                               for k in order])
                            what = f"global pool {dtype} {layout} ties={ties} {order} -> {acc}"
                            assert out.dtype == acc, what
                            check(out.float(), ref.to(acc).float(), dtype, what)
                            g = torch.randn(ref.shape)
                            gx = torch.autograd.grad(out, xa, g.to(acc))[0]
                            want = torch.autograd.grad(ref, xb, g.to(acc).float())[0]
                            check(gx.float(), want.to(dtype).float(), dtype, f"{what} backward")
                            count += 2
        # CBAM in training: the pooling's gradient added in place into the SAM's (GradTap and
        # the GlobalPool slot, ACC kernel), against the two ops run separately
        import copy

        from spatialattn.nn import CBAM

        for dtype in (torch.float32, torch.float16):
            for layout in ("nchw", "channels_last"):
                torch.manual_seed(1)
                m1 = CBAM(19, reduction=4).train()
                m2 = copy.deepcopy(m1)
                x = make((2, 19, 9, 10), layout, dtype, 5)
                x1, x2 = x.detach().requires_grad_(), x.detach().requires_grad_()
                y1 = m1(x1)
                gy = torch.randn(y1.shape).to(dtype)
                y1.backward(gy)
                what = f"CBAM pooling gradient in place {dtype} {layout}"
                want_nodes = {"GradTapBackward", "GlobalPoolBackward", "GenericSamBatchNormBackward"}
                assert want_nodes <= node_names(y1), what
                cg = m2.channel.channel_gate(x2)
                y2 = m2.spatial.attend(x2, channel_scale=cg.to(dtype))[0]
                y2.backward(gy)
                check(y1.float(), y2.float(), dtype, what)
                # fp32: the same single addition per element; half: one rounding instead of two
                check(x1.grad.float(), x2.grad.float(), dtype, f"{what} grad_x", loose=2)
                for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
                    check(p1.grad, p2.grad, torch.float32 if dtype == torch.float32 else dtype,
                          f"{what} grad {name}", loose=4)
                count += 1
        # CBAM's channel MLP gate (one launch forward, two backward) against float64 torch:
        # one to three pools, hidden widths below / at / across a power of two, C across tiles
        # (BC = 2048 / BR), with and without biases, each gradient asked alone and all together
        for p_, n_, c_, r_, bias in [(2, 3, 37, 5, True), (1, 2, 64, 16, False), (3, 1, 20, 3, True),
                                     (2, 4, 300, 40, True)]:
            g = torch.Generator().manual_seed(c_)
            args = [torch.randn(p_, n_, c_, generator=g), torch.randn(r_, c_, generator=g) / c_ ** 0.5,
                    torch.randn(r_, generator=g) if bias else None, torch.randn(c_, r_, generator=g) / r_ ** 0.5,
                    torch.randn(c_, generator=g) if bias else None]
            gy = torch.randn(n_, c_, generator=g)
            exact = [None if t is None else t.double().requires_grad_() for t in args]
            want = reference.channel_mlp_gate(*exact)
            wgrads = torch.autograd.grad(want, [t for t in exact if t is not None], gy.double())
            what = f"channel MLP gate P={p_} N={n_} C={c_} R={r_} bias={bias}"
            with torch.no_grad():
                check(ops.channel_mlp_gate(*args).double(), want, torch.float32, what)
            for asked in [i for i, t in enumerate(args) if t is not None] + ["all"]:
                leaves = [None if t is None else t.clone().requires_grad_(asked in ("all", i))
                          for i, t in enumerate(args)]
                got = ops.channel_mlp_gate(*leaves)
                assert "ChannelMlpGateBackward" in node_names(got), what
                got.backward(gy)
                for i, (t, e) in enumerate(zip(leaves, [e for e in exact])):
                    if t is None:
                        continue
                    assert (t.grad is not None) == (asked in ("all", i)), (what, asked, i)
                    if t.grad is not None:
                        ww = wgrads[[j for j, u in enumerate(exact) if u is not None].index(i)]
                        torch.testing.assert_close(t.grad.double(), ww, rtol=1e-5,
                                                   atol=1e-6 * max(1.0, float(ww.abs().max())),
                                                   msg=lambda m: f"{what} grad {i} (asked {asked}): {m}")
            count += 1
        _triton._PROGRAMS_PER_SM = defaults["_PROGRAMS_PER_SM"]
        for hw in ((3, 3), (9, 10)):  # one pixel chunk; two (the NaN in the host's combine)
            x = torch.randn(1, 20, *hw)
            x[0, 17, 1, 2] = float("nan")
            p = ops.global_pool(x, ("max", "mean"))
            assert torch.isnan(p[:, 0, 17]).all() and not torch.isnan(p[:, 0, 16]).any(), f"NaN lost in global pool {hw}"
        # the tie counts the forward takes (autograd), and the backward without them (it counts
        # them itself) against autograd through amax / mean, on input with many ties
        for layout in ("nchw", "channels_last"):
            x = make((2, 19, 9, 10), layout, torch.float32, 6).round()
            out, counts = _triton.global_pool_forward(x, [0, 1], torch.float32, count=True)
            want = (x == x.amax(dim=(2, 3), keepdim=True)).sum(dim=(2, 3)).float()
            assert torch.equal(counts, want), f"global pool tie counts {layout}"
            g = torch.randn(2, 2, 19)
            xb = x.detach().requires_grad_()
            ref = torch.stack([xb.amax(dim=(2, 3)), xb.mean(dim=(2, 3))])
            check(_triton.global_pool_backward(g, x, out, [0, 1]), torch.autograd.grad(ref, xb, g)[0],
                  torch.float32, f"global pool backward counting its ties {layout}")
            count += 2
    finally:
        ops._fast_device = ops_fast
    print(f"triton interpreter checks passed ({count} comparisons + NaN + SAM)")


if __name__ == "__main__":
    main()
    sys.exit(0)
