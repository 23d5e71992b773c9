"""Triton kernels for the SAM primitives (CUDA; float16 / bfloat16 / float32).

Layouts: ``x`` is dense NCHW or channels_last (other layouts are made NCHW-contiguous
first) and addressed as ``[N, C, HW]``; the layout is a compile-time flag (``CL``), so the
unit stride is a constant. Products ``x * scale`` are rounded to ``x.dtype`` exactly as the
reference does; reductions accumulate in float32.

* :func:`pool_forward` -- max / mean over channels (NaN propagates: ``tl.max`` drops NaN,
  so a NaN flag is reduced alongside and restores it);
* :func:`gate_forward` -- ``(x * scale) * attn``;
* :func:`sam_forward` -- the whole SAM forward: the pooling, :func:`gate` and
  :func:`gate_forward` (three or four launches), or with ``_BAND_FORWARD`` one launch
  (``_sam_band_kernel``, a program per band of rows; off by default until timed on a GPU);
  :func:`sam_backward` likewise, five or six launches or with ``_BAND_BACKWARD`` two or three;
  with a training-mode BatchNorm on the logits, :func:`sam_forward_batchnorm` and the
  backward's ``BN_PHASE`` launches take two each (the batch statistics need every band first);
* :func:`reduce` -- backward pass A: ``sum_c grad * x'``, the max-tie counts and the max channel;
* :func:`gradx` -- backward pass B: ``grad_x`` and ``grad_scale`` (without reading ``x`` where
  no maxima tie and no scale gradient is wanted);
* :func:`pool_backward` / :func:`gate_backward` -- built from the two passes;
* :func:`global_pool_forward` / :func:`global_pool_backward` -- CBAM's channel-gate
  pooling (max / mean over ``H, W``, and in autograd the number of pixels at the max) in one
  read, and its gradient (one pass, from those counts);
* :func:`mlp_gate_forward` / :func:`mlp_gate_backward` -- CBAM's channel MLP gate from the
  pooled maps (float32, two layers): one launch forward, two backward.

Two things the kernels do for a GPU's sake, checked on the compiled code without one
(``tests/ops/test_triton_compile.py``, ``benchmarks/triton_report.py``):

* **Vector loads where the shapes allow them.** Triton proves alignment only from what it
  knows of the arguments: pointers and integers that are multiples of 16. A 26 x 26 map
  (676 pixels, a multiple of 4) gave scalar loads and stores along its rows. The host passes
  the largest power of two (up to 16) dividing ``C`` and ``HW`` as compile-time constants and
  the kernels rewrite ``C`` and ``HW`` as multiples of them (:func:`_dims`), so the offsets
  carry that divisibility and the accesses along the contiguous axis become 8- or 16-byte
  vectors where the data pointers are aligned.
* **Enough programs.** The reductions over channels (pooling, pass A) ran one program per
  image and pixel tile, and the global pooling one per image and channel tile: 88 programs
  for 8 x 512 x 26 x 26 and 64 for the global pooling of 8 x 128 x 104 x 104, against 132
  streaming multiprocessors on an H100, each looping over the whole reduction. Where the
  grid has fewer than ``_PROGRAMS_PER_SM`` programs per SM, they split their loop into
  chunks, write float32 partial results (max, sum, counts) and the host combines them with
  torch (a few small-map ops). Results are deterministic (fixed chunks, no atomics: the
  channel-scale gradient of :func:`gradx` is summed the same way); sums are added in a
  different order than without the split (float32, tested against float64).

Launch configurations are fixed (no autotune), so the kernels also run under Triton's CPU
interpreter (``TRITON_INTERPRET=1``), which the test-suite uses; the tile sizes, warps and
the programs-per-SM target are module constants that ``benchmarks/triton_report.py``
sweeps on a GPU.
"""
from __future__ import annotations

import contextlib
import os
import struct
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # pragma: no cover
    triton = None
    tl = None
    _HAVE_TRITON = False


def available() -> bool:
    return _HAVE_TRITON


_BP = 64  # pixels per tile (reductions and the gradient pass)
_BC = 16  # channels per tile
# gate multiply: (channels, pixels) per program, the contiguous axis long: 1024 elements
_MUL_TILE = {False: (4, 256), True: (64, 16)}  # keyed by channels_last
_NUM_WARPS = 4
_BP_SMALL = 128  # pixels per program on the [N, 1 or P, H, W] maps (one per lane at 4 warps)
# reductions split their loop until the grid has this many programs per streaming
# multiprocessor (0: never split)
_PROGRAMS_PER_SM = 8
_DEFAULT_SMS = 132  # CPU tensors (Triton's interpreter): an H100's count, so the tests split as a GPU would
_SMS: Dict[int, int] = {}
# The SAM forward in one launch (sam_forward, _sam_band_kernel): off by default until timed on
# a GPU; SPATIALATTN_TRITON_BAND_FORWARD=1 turns it on. Its grid aims at this many programs
# (bands of rows) per SM; _BAND_ROWS > 0 forces the band height (tests).
_BAND_FORWARD = os.environ.get("SPATIALATTN_TRITON_BAND_FORWARD", "0") == "1"
# the backward likewise (sam_backward, _sam_band_backward_kernel; not with a training BatchNorm)
_BAND_BACKWARD = os.environ.get("SPATIALATTN_TRITON_BAND_BACKWARD", "0") == "1"
_BAND_PROGRAMS_PER_SM = 4
_BAND_ROWS = 0
# A training BatchNorm's partial rows (statistics in the forward, sums in the backward) are
# combined by every program of the launch after them; above this many rows a one-program
# launch folds them first (_folded), as their reads grow with rows x programs. Not timed on a
# GPU: a guess between a launch's cost and 25 MB of L2 reads (1024 rows x 1024 programs).
_FOLD_ROWS = 1024


@contextlib.contextmanager
def band_launches(forward: bool = True, backward: bool = True) -> Iterator[None]:
    """The one-launch forward / backward (``_BAND_FORWARD`` / ``_BAND_BACKWARD``) set as given
    inside the block, and restored after it (benchmarks and the compile workload)."""
    saved = _BAND_FORWARD, _BAND_BACKWARD
    globals().update(_BAND_FORWARD=forward, _BAND_BACKWARD=backward)
    try:
        yield
    finally:
        globals().update(_BAND_FORWARD=saved[0], _BAND_BACKWARD=saved[1])


@contextlib.contextmanager
def fold_rows(rows: int) -> Iterator[None]:
    """``_FOLD_ROWS`` set to ``rows`` inside the block (0: every training BatchNorm's partial
    rows folded first; a huge value: never), restored after it (tests, the compile workload,
    ``profile_cuda.py``)."""
    global _FOLD_ROWS
    saved, _FOLD_ROWS = _FOLD_ROWS, rows
    try:
        yield
    finally:
        _FOLD_ROWS = saved


def _layout(x: Tensor) -> Tuple[Tensor, bool]:
    """``(x, channels_last)`` with ``x`` made dense in one of the two layouts."""
    if x.is_contiguous():
        return x, False
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, True
    return x.contiguous(), False


def _cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host code: ``triton.cdiv`` is a constexpr function in recent Triton
    (about 3 us of argument unwrapping per call, five calls per SAM forward)."""
    return -(-a // b)


def _pow2_div(v: int) -> int:
    """The largest power of two dividing ``v``, at most 16 (16 for 0)."""
    return min(v & -v, 16) if v > 0 else 16


def _meta(c: int, hw: int, cl: bool) -> dict:
    """Compile-time layout arguments shared by the kernels."""
    return dict(CL=cl, C_DIV=_pow2_div(c), HW_DIV=_pow2_div(hw), num_warps=_NUM_WARPS)


def _sm_count(x: Tensor) -> int:
    """Streaming multiprocessors of ``x``'s device (``_DEFAULT_SMS`` for CPU tensors)."""
    if not x.is_cuda:
        return _DEFAULT_SMS
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    sms = _SMS.get(index)
    if sms is None:
        sms = _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return sms


def _target_programs(x: Tensor) -> int:
    """Programs a launch should have: ``_PROGRAMS_PER_SM`` per SM of ``x``'s device."""
    if _PROGRAMS_PER_SM <= 0:
        return 0
    return _PROGRAMS_PER_SM * _sm_count(x)


def _split(extent: int, block: int, programs: int, target: int) -> Tuple[int, int]:
    """``(per, chunks)``: ``extent`` cut into ``chunks`` runs of ``per`` elements (whole
    blocks), enough that ``programs * chunks`` reaches ``target`` where the blocks allow it
    (one chunk when ``programs`` alone does)."""
    blocks = _cdiv(extent, block)
    if blocks <= 1 or programs >= target:
        return max(blocks, 1) * block, 1
    per = max(1, blocks // _cdiv(target, programs)) * block
    return per, _cdiv(extent, per)


if _HAVE_TRITON:

    @triton.jit
    def _scaled(xv, sv, dt):
        """``x * s`` rounded to the input dtype (exact product in float32, one rounding), as float32."""
        return (xv.to(tl.float32) * sv.to(tl.float32)).to(dt, fp_downcast_rounding="rtne").to(tl.float32)

    @triton.jit
    def _dims(C, HW, C_DIV: tl.constexpr, HW_DIV: tl.constexpr):
        """``C`` and ``HW`` unchanged (the host checked they are multiples of ``C_DIV`` /
        ``HW_DIV``), written so that Triton can prove it: offsets built from them then carry
        that divisibility, and loads along the contiguous axis become vectors."""
        return C // C_DIV * C_DIV, HW // HW_DIV * HW_DIV

    @triton.jit
    def _x_offsets(n, c, p, C, HW, CL: tl.constexpr):
        """Element offsets of the ``[BC, BP]`` tile ``x[n, c, p]`` (``n`` int64: ``n * C * HW``
        can pass 2**31 elements)."""
        if CL:
            off = p[None, :] * C + c[:, None]
        else:
            off = c[:, None] * HW + p[None, :]
        return n * C * HW + off

    @triton.jit
    def _image_and_pixels(HW, BP: tl.constexpr):
        """Image ``n`` (int64) and pixels ``p`` of this program, on a grid axis 0 of
        ``N * cdiv(HW, BP)`` (CUDA caps grid axes 1 and 2 at 65535, which the pixel tiles of a
        2048 x 2048 map, or a batch of many RoIs, reach)."""
        tiles = tl.cdiv(HW, BP)
        pid = tl.program_id(0).to(tl.int64)
        return pid // tiles, (pid % tiles).to(tl.int32) * BP + tl.arange(0, BP)

    @triton.jit
    def _max_sum_nan(mx, sm, nan, v, m2):
        """Element-wise running max, sum and NaN flag of tiles ``v`` (valid where ``m2``). The
        loops accumulate whole tiles and reduce them once at the end: a reduction across the
        tile in every iteration would exchange values between threads (shared memory and a
        barrier on GPUs) once per tile instead of once per program."""
        mx = tl.maximum(mx, tl.where(m2, v, float("-inf")))
        sm += tl.where(m2, v, 0.0)
        nan = tl.maximum(nan, tl.where(m2 & (v != v), 1, 0))
        return mx, sm, nan

    @triton.jit
    def _pool_channels(x_ptr, s_ptr, n, p, pm, c_lo, c_hi, C, HW, HAS_S: tl.constexpr, CL: tl.constexpr,
                       BC: tl.constexpr, BP: tl.constexpr):
        """``(max, sum)`` over channels ``[c_lo, c_hi)`` of ``x'`` at pixels ``p`` of image ``n``
        (valid where ``pm``), float32 ``[BP]``, the max NaN where any value is: tiles of ``BC``
        channels accumulated element-wise, then reduced once."""
        mx = tl.full([BC, BP], float("-inf"), tl.float32)
        sm = tl.zeros([BC, BP], tl.float32)
        nan = tl.zeros([BC, BP], tl.int32)
        for c0 in range(c_lo, c_hi, BC):
            c = c0 + tl.arange(0, BC)
            cm = c < C
            m2 = cm[:, None] & pm[None, :]
            xv = tl.load(x_ptr + _x_offsets(n, c, p, C, HW, CL), mask=m2, other=0.0)
            if HAS_S:
                sv = tl.load(s_ptr + n * C + c, mask=cm, other=0.0)
                v = _scaled(xv, sv[:, None], x_ptr.dtype.element_ty)
            else:
                v = xv.to(tl.float32)
            mx, sm, nan = _max_sum_nan(mx, sm, nan, v, m2)
        return tl.where(tl.max(nan, axis=0) > 0, float("nan"), tl.max(mx, axis=0)), tl.sum(sm, axis=0)

    @triton.jit
    def _pool_kernel(x_ptr, s_ptr, out_ptr, C, HW, P, C_PER, I_MAX: tl.constexpr, I_MEAN: tl.constexpr,
                     HAS_S: tl.constexpr, PARTIAL: tl.constexpr, CL: tl.constexpr, C_DIV: tl.constexpr,
                     HW_DIV: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):
        # channels [s * C_PER, (s + 1) * C_PER) of one pixel tile, s = program_id(1); C_PER is a
        # multiple of BC, so a channel tile never straddles two chunks. out: the [N, P, HW]
        # maps, or with PARTIAL float32 [N, S, 2, HW] (max with NaN restored, sum) to combine
        C, HW = _dims(C, HW, C_DIV, HW_DIV)
        n, p = _image_and_pixels(HW, BP)
        pm = p < HW
        c_lo = tl.program_id(1) * C_PER
        mx, sm = _pool_channels(x_ptr, s_ptr, n, p, pm, c_lo, tl.minimum(c_lo + C_PER, C), C, HW, HAS_S, CL, BC, BP)
        if PARTIAL:
            base = out_ptr + (n * tl.num_programs(1) + tl.program_id(1)) * 2 * HW + p
            tl.store(base, mx, mask=pm)
            tl.store(base + HW, sm, mask=pm)
        else:
            _store_pooled(out_ptr, n, p, pm, mx, sm, C, HW, P, I_MAX, I_MEAN)

    @triton.jit
    def _store_pooled(out_ptr, n, p, pm, mx, sm, C, HW, P, I_MAX: tl.constexpr, I_MEAN: tl.constexpr):
        """The max ``mx`` and the mean ``sm / C`` of pixels ``p`` of image ``n`` into their slots of
        the ``[N, P, HW]`` maps, rounded once to the maps' dtype."""
        base = out_ptr + n * P * HW + p
        if I_MAX >= 0:
            tl.store(base + I_MAX * HW, mx.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=pm)
        if I_MEAN >= 0:
            tl.store(base + I_MEAN * HW, (sm / C).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=pm)

    @triton.jit
    def _pool_combine_kernel(part_ptr, out_ptr, C, HW, P, S, I_MAX: tl.constexpr, I_MEAN: tl.constexpr,
                             BP: tl.constexpr):
        # the S partial results [N, S, 2, HW] of a split channel pooling (max with NaN restored,
        # sum) into the [N, P, HW] maps, added in a fixed order: one launch where torch took five
        n, p = _image_and_pixels(HW, BP)
        pm = p < HW
        mx = tl.full([BP], float("-inf"), tl.float32)
        sm = tl.zeros([BP], tl.float32)
        nan = tl.zeros([BP], tl.int32)
        for s in range(S):
            base = part_ptr + (n * S + s) * 2 * HW + p
            m = tl.load(base, mask=pm, other=float("-inf"))
            nan = tl.maximum(nan, tl.where(m != m, 1, 0))
            mx = tl.maximum(mx, m)
            sm += tl.load(base + HW, mask=pm, other=0.0)
        _store_pooled(out_ptr, n, p, pm, tl.where(nan > 0, float("nan"), mx), sm, C, HW, P, I_MAX, I_MEAN)

    @triton.jit
    def _conv_logits(map_ptr, SLOT, BY_KIND: tl.constexpr, row0, p, pm, H, W, w_ptr, b_ptr, P: tl.constexpr,
                     KH: tl.constexpr, KW: tl.constexpr, DIL: tl.constexpr, HAS_B: tl.constexpr,
                     MEAN_SLOTS: tl.constexpr, BP: tl.constexpr):
        """``conv(maps, w) + b`` at pixels ``p`` (valid where ``pm``) of an ``H x W`` map, zero
        padding ``DIL * (K // 2)``: slot ``i``'s map at ``map_ptr + i * SLOT`` (with ``BY_KIND``:
        at ``((MEAN_SLOTS >> i) & 1) * SLOT``, a map per kind), its rows from ``row0``; float32, the
        taps unrolled and added in slot, row, column order."""
        h = p // W
        w = p % W
        acc = tl.zeros([BP], tl.float32)
        for i in tl.static_range(P):
            if BY_KIND:
                base = map_ptr + ((MEAN_SLOTS >> i) & 1) * SLOT
            else:
                base = map_ptr + i * SLOT
            for kh in tl.static_range(KH):
                hh = h + (kh - KH // 2) * DIL
                hm = pm & (hh >= 0) & (hh < H)
                for kw in tl.static_range(KW):
                    ww = w + (kw - KW // 2) * DIL
                    m = hm & (ww >= 0) & (ww < W)
                    v = tl.load(base + (hh - row0) * W + ww, mask=m, other=0.0)
                    acc += v.to(tl.float32) * tl.load(w_ptr + (i * KH + kh) * KW + kw).to(tl.float32)
        if HAS_B:
            acc += tl.load(b_ptr).to(tl.float32)
        return acc

    @triton.jit
    def _attention(logits, ns_ptr, nsh_ptr, HAS_NORM: tl.constexpr):
        """``sigmoid(logits * ns + nsh)`` (the affine norm with ``HAS_NORM``), float32."""
        z = logits
        if HAS_NORM:
            z = logits * tl.load(ns_ptr).to(tl.float32) + tl.load(nsh_ptr).to(tl.float32)
        return 1.0 / (1.0 + tl.exp(-z))

    @triton.jit
    def _gate_kernel(pooled_ptr, w_ptr, b_ptr, ns_ptr, nsh_ptr, logits_ptr, attn_ptr, H, W, P: tl.constexpr,
                     KH: tl.constexpr, KW: tl.constexpr, DIL: tl.constexpr, HAS_B: tl.constexpr,
                     HAS_NORM: tl.constexpr, STATS: tl.constexpr, BP: tl.constexpr):
        # the gate on the small maps, one launch for what torch ran as conv2d, the affine norm
        # and sigmoid: logits = conv(pooled, w) + b (zero padding DIL * (K // 2), K odd),
        # attn = sigmoid(logits * ns + nsh); float32, one pixel per lane, the taps unrolled.
        # STATS (a BatchNorm with batch statistics follows): no attention; instead this
        # program's (count, sum, sum of squared deviations from its own mean) of the logits,
        # float64, at attn_ptr[3 * program], for _bn_attn_kernel to combine
        HW = H * W
        n, p = _image_and_pixels(HW, BP)
        pm = p < HW
        acc = _conv_logits(pooled_ptr + n * P * HW, HW, 0, 0, p, pm, H, W, w_ptr, b_ptr, P, KH, KW, DIL, HAS_B, 0,
                           BP)
        tl.store(logits_ptr + n * HW + p, acc, mask=pm)
        if STATS:
            l64 = acc.to(tl.float64)
            cnt = tl.sum(tl.where(pm, 1.0, 0.0).to(tl.float64), axis=0)
            tot = tl.sum(tl.where(pm, l64, 0.0), axis=0)
            dev = tl.where(pm, l64 - tot / cnt, 0.0)
            row = attn_ptr + tl.program_id(0).to(tl.int64) * 3
            tl.store(row, cnt)
            tl.store(row + 1, tot)
            tl.store(row + 2, tl.sum(dev * dev, axis=0))
        else:
            tl.store(attn_ptr + n * HW + p, _attention(acc, ns_ptr, nsh_ptr, HAS_NORM), mask=pm)

    @triton.jit
    def _batch_sums(stat_ptr, R, BR: tl.constexpr):
        """``(count, sum, M2)`` (float64) of the logits from the ``R`` partial ``(count, sum, M2)``
        rows at ``stat_ptr``, combined in a fixed order (Chan et al.'s pairwise update: M2 = sum
        M2_i + n_i (mean_i - mean)^2); every caller gets the same bits. One row in gives that
        row back, so a fold of the rows (``_fold_kernel``) leaves every consumer's bits as they
        were."""
        acc_n = tl.zeros([BR], tl.float64)
        acc_s = tl.zeros([BR], tl.float64)
        for r0 in range(0, R, BR):
            r = r0 + tl.arange(0, BR)
            rm = r < R
            acc_n += tl.load(stat_ptr + r.to(tl.int64) * 3, mask=rm, other=0.0)
            acc_s += tl.load(stat_ptr + r.to(tl.int64) * 3 + 1, mask=rm, other=0.0)
        m = tl.sum(acc_n, axis=0)
        s = tl.sum(acc_s, axis=0)
        mean = s / m
        acc_m2 = tl.zeros([BR], tl.float64)
        for r0 in range(0, R, BR):
            r = r0 + tl.arange(0, BR)
            rm = r < R
            ni = tl.load(stat_ptr + r.to(tl.int64) * 3, mask=rm, other=1.0)
            si = tl.load(stat_ptr + r.to(tl.int64) * 3 + 1, mask=rm, other=0.0)
            d = si / ni - mean
            acc_m2 += tl.where(rm, tl.load(stat_ptr + r.to(tl.int64) * 3 + 2, mask=rm, other=0.0) + ni * d * d, 0.0)
        return m, s, tl.sum(acc_m2, axis=0)

    @triton.jit
    def _batch_stats(stat_ptr, R, BR: tl.constexpr):
        """``(count, mean, biased variance)`` (float64) of the logits from the ``R`` partial rows
        at ``stat_ptr`` (:func:`_batch_sums`)."""
        m, s, m2 = _batch_sums(stat_ptr, R, BR)
        return m, s / m, m2 / m

    @triton.jit
    def _bn_sums(sum_ptr, STRIDE, R, BR: tl.constexpr):
        """The sums (float64) of the ``R`` values at ``sum_ptr[r * STRIDE]`` and of those at
        ``sum_ptr[r * STRIDE + 1]`` (a training BatchNorm backward's partial sums of dz and dz *
        xhat), added in a fixed order."""
        acc1 = tl.zeros([BR], tl.float64)
        acc2 = tl.zeros([BR], tl.float64)
        for r0 in range(0, R, BR):
            r = r0 + tl.arange(0, BR)
            acc1 += tl.load(sum_ptr + r.to(tl.int64) * STRIDE, mask=r < R, other=0.0)
            acc2 += tl.load(sum_ptr + r.to(tl.int64) * STRIDE + 1, mask=r < R, other=0.0)
        return tl.sum(acc1, axis=0), tl.sum(acc2, axis=0)

    @triton.jit
    def _fold_kernel(src_ptr, STRIDE, R, dst_ptr, STATS: tl.constexpr, BR: tl.constexpr):
        # one program: the R partial rows a training BatchNorm's kernels combine, folded into
        # the one row dst_ptr (STATS: the forward's (count, sum, M2) rows, _batch_sums; else
        # the backward's two sums, _bn_sums), so that every program of the next launch reads
        # one row instead of R (R * programs reads, quadratic in the grid, otherwise)
        if STATS:
            m, s, m2 = _batch_sums(src_ptr, R, BR)
            tl.store(dst_ptr, m)
            tl.store(dst_ptr + 1, s)
            tl.store(dst_ptr + 2, m2)
        else:
            s1, s2 = _bn_sums(src_ptr, STRIDE, R, BR)
            tl.store(dst_ptr, s1)
            tl.store(dst_ptr + 1, s2)

    @triton.jit
    def _bn_coefficients(stat_ptr, R, g_ptr, b_ptr, eps, HAS_G: tl.constexpr, HAS_BETA: tl.constexpr,
                         BR: tl.constexpr):
        """``(k, shift, mean, var)`` (float64) of a BatchNorm with the batch statistics of the
        ``R`` partial rows at ``stat_ptr`` (:func:`_batch_stats`): ``k = gamma / sqrt(var +
        eps)``, ``shift = beta - mean * k`` (torch's formula)."""
        _, mean, var = _batch_stats(stat_ptr, R, BR)
        k = 1.0 / tl.sqrt(var + eps)
        if HAS_G:
            k = k * tl.load(g_ptr).to(tl.float64)
        shift = -mean * k
        if HAS_BETA:
            shift = tl.load(b_ptr).to(tl.float64) - mean * k
        return k, shift, mean, var

    @triton.jit
    def _bn_attention(logits, k, shift):
        """The gate of the training-BatchNorm SAM from float32 logits: ``sigmoid(logits * k +
        shift)``, the coefficients applied in float32."""
        z = logits * k.to(tl.float32) + shift.to(tl.float32)
        return 1.0 / (1.0 + tl.exp(-z))

    @triton.jit
    def _bn_attn_kernel(logits_ptr, stat_ptr, R, g_ptr, b_ptr, eps, attn_ptr, stats_ptr, rm_ptr, rv_ptr, nbt_ptr,
                        count, m_hi, m_lo, HW, HAS_G: tl.constexpr, HAS_BETA: tl.constexpr, RUNNING: tl.constexpr,
                        HAS_NBT: tl.constexpr, CUMULATIVE: tl.constexpr, BP: tl.constexpr, BR: tl.constexpr):
        # attn = sigmoid(logits * k + shift) with the batch statistics of all logits: every
        # program combines the partial statistics itself (a few hundred values), program 0
        # stores [mean, var] (float64) and (RUNNING) updates the running statistics;
        # k = gamma / sqrt(var + eps), shift = beta - mean * k in float64, applied in float32
        # (as torch's formula)
        n, p = _image_and_pixels(HW, BP)
        pm = p < HW
        k, shift, mean, var = _bn_coefficients(stat_ptr, R, g_ptr, b_ptr, eps, HAS_G, HAS_BETA, BR)
        lg = tl.load(logits_ptr + n * HW + p, mask=pm, other=0.0)
        tl.store(attn_ptr + n * HW + p, _bn_attention(lg, k, shift), mask=pm)
        if tl.program_id(0) == 0:
            tl.store(stats_ptr, mean)
            tl.store(stats_ptr + 1, var)
            if RUNNING:
                _bn_update_running(mean, var, rm_ptr, rv_ptr, nbt_ptr, count, m_hi, m_lo, HAS_NBT, CUMULATIVE)

    @triton.jit
    def _gate_backward_kernel(ga_ptr, cnt_ptr, ix_ptr, gattn_ptr, attn_ptr, logits_ptr, ns_ptr, dz_ptr, cnt_out_ptr,
                              ix_out_ptr, part_ptr, stats_ptr, eps, HW, S, NPART, COL, HAS_GATTN: tl.constexpr,
                              HAS_MAX: tl.constexpr, HAS_IX: tl.constexpr, HAS_NORM: tl.constexpr, BN: tl.constexpr,
                              BP: tl.constexpr):
        # backward of the sigmoid and the affine norm, per pixel: pass A's S partial results
        # [N, S, HW] combined in a fixed order (sum_c grad * x', tie counts, max channel), plus
        # the gradient of the returned attention; writes d logits' (dz) and the combined counts
        # and channels, and this program's partial sums of the bias / norm-shift / norm-scale
        # gradients into its row of part [programs, NPART] at columns COL, COL + 1, COL + 2
        n, p = _image_and_pixels(HW, BP)
        pm = p < HW
        ga = tl.zeros([BP], tl.float32)
        cnt = tl.zeros([BP], tl.float32)
        ix = tl.full([BP], -1, tl.int32)
        for s in range(S):
            off = (n * S + s) * HW + p
            ga += tl.load(ga_ptr + off, mask=pm, other=0.0)
            if HAS_MAX:
                cnt += tl.load(cnt_ptr + off, mask=pm, other=0.0)
            if HAS_IX:
                ix = tl.maximum(ix, tl.load(ix_ptr + off, mask=pm, other=-1))
        if HAS_MAX:
            tl.store(cnt_out_ptr + n * HW + p, cnt, mask=pm)
        if HAS_IX:
            tl.store(ix_out_ptr + n * HW + p, ix, mask=pm)
        if HAS_GATTN:
            ga += tl.load(gattn_ptr + n * HW + p, mask=pm, other=0.0).to(tl.float32)
        a = tl.load(attn_ptr + n * HW + p, mask=pm, other=0.0)
        dz = ga * ((1.0 - a) * a)
        row = part_ptr + tl.program_id(0).to(tl.int64) * NPART + COL
        if BN:
            # BatchNorm with batch statistics: this program's sums of dz and dz * xhat (float64);
            # the conv backward combines them into d logits (column COL is its)
            invstd = 1.0 / tl.sqrt(tl.load(stats_ptr + 1) + eps)
            xhat = (tl.load(logits_ptr + n * HW + p, mask=pm, other=0.0).to(tl.float64) - tl.load(stats_ptr)) * invstd
            dz64 = tl.where(pm, dz.to(tl.float64), 0.0)
            tl.store(row + 1, tl.sum(dz64, axis=0))
            tl.store(row + 2, tl.sum(dz64 * xhat, axis=0))
        else:
            if HAS_NORM:
                lg = tl.load(logits_ptr + n * HW + p, mask=pm, other=0.0)
                tl.store(row + 1, tl.sum(tl.where(pm, dz, 0.0), axis=0))
                tl.store(row + 2, tl.sum(tl.where(pm, dz * lg, 0.0), axis=0))
                dz = dz * tl.load(ns_ptr).to(tl.float32)
            else:
                tl.store(row + 1, 0.0)
                tl.store(row + 2, 0.0)
            tl.store(row, tl.sum(tl.where(pm, dz, 0.0), axis=0))
        tl.store(dz_ptr + n * HW + p, dz, mask=pm)

    @triton.jit
    def _bn_backward_coefficients(sum_ptr, STRIDE, R, m, stats_ptr, g_ptr, eps, HAS_G: tl.constexpr,
                                  BR: tl.constexpr):
        """``(c1, a0, a1, mean, invstd)`` (float64) of a training BatchNorm's backward over ``m``
        logits: the ``R`` partial sums of dz and of dz * xhat at ``sum_ptr[r * STRIDE]`` and
        ``[r * STRIDE + 1]`` combined in a fixed order (``a0``, ``a1``: their means), the
        forward's ``[mean, var]`` at ``stats_ptr``, ``c1 = gamma * invstd``."""
        s1, s2 = _bn_sums(sum_ptr, STRIDE, R, BR)
        mean = tl.load(stats_ptr)
        invstd = 1.0 / tl.sqrt(tl.load(stats_ptr + 1) + eps)
        c1 = invstd
        if HAS_G:
            c1 = tl.load(g_ptr).to(tl.float64) * invstd
        return c1, s1 / m, s2 / m, mean, invstd

    @triton.jit
    def _bn_dlogits(dz, logits, c1, a0, a1, mean, invstd):
        """d logits (float64) from ``dz`` (d of the normalised logits, float32) and the float32
        ``logits``: ``c1 * (dz - a0 - (logits - mean) * invstd * a1)``, torch's formula."""
        return c1 * (dz.to(tl.float64) - a0 - (logits.to(tl.float64) - mean) * invstd * a1)

    @triton.jit
    def _conv_backward_taps(dz_map, dz_row0, pooled_map, logits_map, HW, p, pm, dzv, row, H, W, w_ptr, c1, a0, a1,
                            mean, invstd, P: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, DIL: tl.constexpr,
                            MEAN_SLOTS: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr):
        """The conv's backward at pixels ``p`` (valid where ``pm``) of an ``H x W`` map:
        ``(gmax, gmean)``, the transposed conv of d logits' (``dz_map``, its rows from
        ``dz_row0``) summed over the max slots and over the mean slots (bit i of MEAN_SLOTS:
        slot i is a mean); and the weight gradient's partial sums over these pixels (``pooled *
        dzv`` per tap, ``pooled_map``: the P maps of the image) stored at ``row[tap]``. BN: the
        taps' d logits from dz and the batch coefficients (``c1 * (dz - a0 - (logit - mean) *
        invstd * a1)``, float64, the logits at ``logits_map``)."""
        h = p // W
        w = p % W
        gmax = tl.zeros([BP], tl.float32)
        gmean = tl.zeros([BP], tl.float32)
        for i in tl.static_range(P):
            gp = tl.zeros([BP], tl.float32)
            for kh in range(KH):  # a loop, not unrolled: 2 x 49 taps of loads held at once needed 255 registers
                dh = (kh - KH // 2) * DIL
                hi = h - dh  # dz position this tap brings to (h, w)
                ho = h + dh  # pooled position this tap reads for output (h, w)
                him = pm & (hi >= 0) & (hi < H)
                hom = pm & (ho >= 0) & (ho < H)
                for kw in tl.static_range(KW):
                    dw = (kw - KW // 2) * DIL
                    wt = tl.load(w_ptr + (i * KH + kh) * KW + kw).to(tl.float32)
                    wi = w - dw
                    mi = him & (wi >= 0) & (wi < W)
                    dzn = tl.load(dz_map + (hi - dz_row0) * W + wi, mask=mi, other=0.0)
                    if BN:
                        ln = tl.load(logits_map + hi * W + wi, mask=mi, other=0.0)
                        dzn = tl.where(mi, _bn_dlogits(dzn, ln, c1, a0, a1, mean, invstd).to(tl.float32), 0.0)
                    gp += dzn * wt
                    wo = w + dw
                    mo = hom & (wo >= 0) & (wo < W)
                    pv = tl.load(pooled_map + i * HW + ho * W + wo, mask=mo, other=0.0).to(tl.float32)
                    tl.store(row + (i * KH + kh) * KW + kw, tl.sum(pv * dzv, axis=0))
            if (MEAN_SLOTS >> i) & 1:
                gmean += gp
            else:
                gmax += gp
        return gmax, gmean

    @triton.jit
    def _conv_backward_kernel(dz_ptr, pooled_ptr, w_ptr, cnt_ptr, fmax_ptr, fmean_ptr, part_ptr, logits_ptr,
                              stats_ptr, g_ptr, eps, bs_ptr, BS_STRIDE, R, C, H, W, NPART, P: tl.constexpr,
                              KH: tl.constexpr, KW: tl.constexpr, DIL: tl.constexpr, MEAN_SLOTS: tl.constexpr,
                              HAS_MAX: tl.constexpr, HAS_MEAN: tl.constexpr, BN: tl.constexpr, HAS_G: tl.constexpr,
                              BP: tl.constexpr):
        # the conv's backward on the small maps, per pixel: the gradient of each pooled map
        # (transposed conv of dz), summed over the max slots and over the mean slots (bit i of
        # MEAN_SLOTS: slot i is a mean) into what the gradient pass reads, the max's share per
        # tied channel (/ tie count) and the mean's (/ C); and this program's partial sums of
        # the weight gradient (pooled * dz per tap) into columns [0, P * KH * KW) of its row
        # BN: d logits from dz and the batch sums of dz and dz * xhat over the R rows at bs_ptr
        # (part's columns NTAPS + 1 and + 2, or their fold; each program adds them up itself,
        # in the same order), at every tap (dl of the neighbours), and this program's partial
        # sum of dl (the conv bias' gradient) at NTAPS
        HW = H * W
        n, p = _image_and_pixels(HW, BP)
        pm = p < HW
        row = part_ptr + tl.program_id(0).to(tl.int64) * NPART
        NTAPS: tl.constexpr = P * KH * KW
        if BN:
            m = (tl.num_programs(0) // tl.cdiv(HW, BP) * HW).to(tl.float64)
            c1, a0, a1, mean, invstd = _bn_backward_coefficients(bs_ptr, BS_STRIDE, R, m, stats_ptr, g_ptr, eps,
                                                                 HAS_G, BP)
            dl64 = _bn_dlogits(tl.load(dz_ptr + n * HW + p, mask=pm, other=0.0),
                               tl.load(logits_ptr + n * HW + p, mask=pm, other=0.0), c1, a0, a1, mean, invstd)
            tl.store(row + NTAPS, tl.sum(tl.where(pm, dl64, 0.0), axis=0))
            dzv = tl.where(pm, dl64.to(tl.float32), 0.0)
        else:
            dzv = tl.load(dz_ptr + n * HW + p, mask=pm, other=0.0)
            c1, a0, a1, mean, invstd = 0.0, 0.0, 0.0, 0.0, 0.0  # (no BatchNorm: unused)
        gmax, gmean = _conv_backward_taps(dz_ptr + n * HW, 0, pooled_ptr + n * P * HW, logits_ptr + n * HW, HW, p, pm,
                                          dzv, row, H, W, w_ptr, c1, a0, a1, mean, invstd, P, KH, KW, DIL, MEAN_SLOTS,
                                          BN, BP)
        if HAS_MAX:
            tl.store(fmax_ptr + n * HW + p, gmax / tl.load(cnt_ptr + n * HW + p, mask=pm, other=1.0), mask=pm)
        if HAS_MEAN:
            tl.store(fmean_ptr + n * HW + p, gmean / C, mask=pm)

    @triton.jit
    def _column_sums_kernel(part_ptr, gw_ptr, gb_ptr, gnsh_ptr, gns_ptr, R, NPART, NTAPS, BR: tl.constexpr):
        # column j of part [R, NPART] summed over its rows (per-program partial sums), in a fixed
        # order, into the parameter gradient it belongs to: the weight's taps, then bias,
        # norm shift and norm scale (separate tensors: outputs of a custom op must not alias)
        j = tl.program_id(0)
        acc = tl.zeros([BR], part_ptr.dtype.element_ty)  # float64 partials for the BatchNorm
        for r0 in range(0, R, BR):
            r = r0 + tl.arange(0, BR)
            acc += tl.load(part_ptr + r.to(tl.int64) * NPART + j, mask=r < R, other=0.0)
        tot = tl.sum(acc, axis=0)
        if j < NTAPS:
            tl.store(gw_ptr + j, tot)
        elif j == NTAPS:
            tl.store(gb_ptr, tot)
        elif j == NTAPS + 1:
            tl.store(gnsh_ptr, tot)
        else:
            tl.store(gns_ptr, tot)

    @triton.jit
    def _sum_rows_kernel(part_ptr, out_ptr, R, M, BM: tl.constexpr):
        # out[j] = sum of part[:, j] ([R, M] float32 partial rows), rows added in order
        j = tl.program_id(0) * BM + tl.arange(0, BM)
        jm = j < M
        acc = tl.zeros([BM], tl.float32)
        for r in range(R):
            acc += tl.load(part_ptr + r * M + j, mask=jm, other=0.0)
        tl.store(out_ptr + j, acc, mask=jm)

    @triton.jit
    def _bn_update_running(mean, var, rm_ptr, rv_ptr, nbt_ptr, count, m_hi, m_lo, HAS_NBT: tl.constexpr,
                           CUMULATIVE: tl.constexpr):
        """BatchNorm2d's running-statistics update from the batch mean and biased variance
        (float64) of ``count`` logits, by the one program that holds them: running = factor *
        stat + (1 - factor) * running in float64, rounded once; factor = the momentum, or 1 /
        num_batches_tracked (after the increment) where the momentum is None -- read here, not
        synchronised to the host as float(tensor) would be. The momentum, a Python float,
        arrives as the two 32-bit halves of its float64 bits (a float argument would be
        rounded to float32, and 0.1 is not 0.1 there)."""
        bits = (m_hi.to(tl.int64) << 32) | (m_lo.to(tl.int64) & 0xFFFFFFFF)
        factor = bits.to(tl.float64, bitcast=True)
        if HAS_NBT:
            t = tl.load(nbt_ptr) + 1
            tl.store(nbt_ptr, t)
            if CUMULATIVE:
                factor = 1.0 / t.to(tl.float64)
        cnt = count.to(tl.float64)
        unbiased = var * cnt / (cnt - 1.0)
        rm = tl.load(rm_ptr).to(tl.float64)
        tl.store(rm_ptr, (factor * mean + (1.0 - factor) * rm).to(rm_ptr.dtype.element_ty))
        rv = tl.load(rv_ptr).to(tl.float64)
        tl.store(rv_ptr, (factor * unbiased + (1.0 - factor) * rv).to(rv_ptr.dtype.element_ty))

    @triton.jit
    def _gpool_combine_kernel(part_ptr, out_ptr, cnt_ptr, NC, S, HW, I_MAX: tl.constexpr, I_MEAN: tl.constexpr,
                              COUNT: tl.constexpr, BLOCK: tl.constexpr):
        # the S partial results [S, 3, N * C] of a split global pooling (max with NaN restored,
        # sum, tie count at the chunk's max) into the [P, N * C] output and the [N * C] tie
        # counts, in a fixed order: one launch where torch took five to seven
        e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        em = e < NC
        top = tl.full([BLOCK], float("-inf"), tl.float32)
        sm = tl.zeros([BLOCK], tl.float32)
        k = tl.zeros([BLOCK], tl.float32)
        nan = tl.zeros([BLOCK], tl.int32)
        for s in range(S):
            base = part_ptr + s * 3 * NC + e
            m = tl.load(base, mask=em, other=float("-inf"))
            nan = tl.maximum(nan, tl.where(m != m, 1, 0))
            sm += tl.load(base + NC, mask=em, other=0.0)
            if COUNT:
                ks = tl.load(base + 2 * NC, mask=em, other=0.0)
                k = tl.where(m > top, ks, tl.where(m == top, k + ks, k))
            top = tl.maximum(top, m)
        if I_MAX >= 0:
            mx = tl.where(nan > 0, float("nan"), top)
            tl.store(out_ptr + I_MAX * NC + e, mx.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=em)
        if I_MEAN >= 0:
            tl.store(out_ptr + I_MEAN * NC + e, (sm / HW).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
                     mask=em)
        if COUNT:
            tl.store(cnt_ptr + e, tl.where(nan > 0, 0.0, k), mask=em)

    @triton.jit
    def _mul_kernel(x_ptr, s_ptr, a_ptr, y_ptr, C, HW, HAS_S: tl.constexpr, CL: tl.constexpr, C_DIV: tl.constexpr,
                    HW_DIV: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):
        # one [BC, BP] tile of (channels, pixels) of image n: the attention is loaded once per
        # pixel and the scale once per channel, with no per-element integer division (64-bit
        # division is a long instruction sequence on GPUs, in a kernel that should only move
        # memory); BC / BP are chosen per layout so that the contiguous axis is the long one
        C, HW = _dims(C, HW, C_DIV, HW_DIV)
        n, p = _image_and_pixels(HW, BP)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        pm = p < HW
        cm = c < C
        av = tl.load(a_ptr + n * HW + p, mask=pm, other=0.0).to(y_ptr.dtype.element_ty).to(tl.float32)
        _mul_tile(x_ptr, s_ptr, y_ptr, n, c, p, cm, pm, av, C, HW, HAS_S, CL)

    @triton.jit
    def _mul_tile(x_ptr, s_ptr, y_ptr, n, c, p, cm, pm, av, C, HW, HAS_S: tl.constexpr, CL: tl.constexpr):
        """``y = (x * s) * attn`` on the tile of channels ``c`` and pixels ``p`` of image ``n``
        (valid where ``cm`` / ``pm``); ``av``: the attention of the pixels, rounded to ``y``'s
        dtype. Products of two half-precision values are exact in float32, so computing in
        float32 and rounding once equals the native half-precision product."""
        m2 = cm[:, None] & pm[None, :]
        off = _x_offsets(n, c, p, C, HW, CL)
        dt = y_ptr.dtype.element_ty
        xv = tl.load(x_ptr + off, mask=m2, other=0.0).to(tl.float32)
        if HAS_S:
            sv = tl.load(s_ptr + n * C + c, mask=cm, other=0.0).to(tl.float32)
            xv = (xv * sv[:, None]).to(dt, fp_downcast_rounding="rtne").to(tl.float32)
        tl.store(y_ptr + off, (xv * av[None, :]).to(dt, fp_downcast_rounding="rtne"), mask=m2)

    @triton.jit
    def _program_band(C, H, W, TH, TW, NB, KH: tl.constexpr, DIL: tl.constexpr, C_DIV: tl.constexpr,
                      HW_DIV: tl.constexpr, W_DIV: tl.constexpr, TW_DIV: tl.constexpr):
        """The band of the one-launch kernels' program: ``(C, H * W, W, TW)`` rewritten with the
        divisibility the host passed (see :func:`_dims`; ``TW = TH * W``, a band's pixels), then
        ``pid`` (int64), its image ``n``, its band, the band's rows ``[h0, h1)`` and those
        within the conv's reach ``[hs, he)`` (``DIL * (KH // 2)`` more each side, in the map)."""
        C, HW = _dims(C, H * W, C_DIV, HW_DIV)
        W = W // W_DIV * W_DIV
        TW = TW // TW_DIV * TW_DIV
        pid = tl.program_id(0).to(tl.int64)
        band = (pid % NB).to(tl.int32)
        h0 = band * TH
        h1 = tl.minimum(H, h0 + TH)
        hs = tl.maximum(0, h0 - DIL * (KH // 2))
        he = tl.minimum(H, h1 + DIL * (KH // 2))
        return C, HW, W, TW, pid, pid // NB, band, h0, h1, hs, he

    @triton.jit
    def _sam_band_kernel(x_ptr, s_ptr, w_ptr, b_ptr, ns_ptr, nsh_ptr, pooled_ptr, logits_ptr, attn_ptr, y_ptr,
                         scr_ptr, stat_ptr, C, H, W, TH, TW, NB, SR, P: tl.constexpr, MEAN_SLOTS: tl.constexpr,
                         KH: tl.constexpr, KW: tl.constexpr, DIL: tl.constexpr, HAS_S: tl.constexpr,
                         HAS_B: tl.constexpr, HAS_NORM: tl.constexpr, BN_STATS: tl.constexpr, CL: tl.constexpr,
                         C_DIV: tl.constexpr, HW_DIV: tl.constexpr, W_DIV: tl.constexpr, TW_DIV: tl.constexpr,
                         BC: tl.constexpr, BP: tl.constexpr, BPG: tl.constexpr, MBC: tl.constexpr,
                         MBP: tl.constexpr):
        # The whole SAM forward of one band of TH rows of image n in one program (sam_forward
        # with _BAND_FORWARD): the pooling, the gate and the product in one launch instead of
        # three or four. The program pools its rows and the rows within the conv's reach above
        # and below (the halo: DIL * (KH // 2) rows each side, pooled again by the neighbouring
        # bands) into its own float32 scratch [2, SR, W] (max, mean), waits for its threads,
        # runs the conv and the sigmoid on its own rows (the maps' P slots read the scratch row
        # of their kind: bit MEAN_SLOTS >> i set = mean), waits again, and multiplies its rows of
        # x, whose second read comes soon after the first. Per element the helpers of _pool_kernel
        # (unsplit), _gate_kernel and _mul_kernel (_pool_channels, _conv_logits, _attention,
        # _mul_tile), so the same numbers as the three launches.
        # BN_STATS (a training-mode BatchNorm on the logits, whose batch statistics need every
        # band's logits first): step 2 stores the logits and this band's (count, sum, M2) of
        # them (float64) at stat_ptr[3 * pid], as _gate_kernel's STATS does per tile, and the
        # product is left to _sam_band_bn_kernel's second launch.
        C, HW, W, TW, pid, n, band, h0, h1, hs, he = _program_band(C, H, W, TH, TW, NB, KH, DIL, C_DIV, HW_DIV,
                                                                   W_DIV, TW_DIV)
        scr = scr_ptr + pid * 2 * SR * W
        # 1. pooling of rows [hs, he) into the scratch, and of rows [h0, h1) into the maps
        # (tiles from a multiple of BP and loads masked at HW only, so that they are as aligned
        # as the three launches' are: the halo of a band of a 26 x 26 map starts on a multiple
        # of 2 pixels; the few pixels read beyond the halo are pooled and not stored)
        for q0 in range(hs * W // BP * BP, he * W, BP):
            p = q0 + tl.arange(0, BP)
            pm = (p >= hs * W) & (p < he * W)
            mxr, sm = _pool_channels(x_ptr, s_ptr, n, p, p < HW, 0, C, C, HW, HAS_S, CL, BC, BP)
            mean = sm / C
            tl.store(scr + (p - hs * W), mxr, mask=pm)
            tl.store(scr + SR * W + (p - hs * W), mean, mask=pm)
            own = pm & (p >= h0 * W) & (p < h1 * W)
            for i in tl.static_range(P):
                if (MEAN_SLOTS >> i) & 1:
                    tl.store(pooled_ptr + (n * P + i) * HW + p, mean, mask=own)
                else:
                    tl.store(pooled_ptr + (n * P + i) * HW + p, mxr, mask=own)
        tl.debug_barrier()  # the scratch rows of every thread of the program written
        # 2. the gate on rows [h0, h1): conv (zero padding), bias, affine norm, sigmoid (or with
        # BN_STATS the logits' count and sum)
        acc_n = tl.zeros([BPG], tl.float64)
        acc_s = tl.zeros([BPG], tl.float64)
        for q0 in range(h0 * W, h1 * W, BPG):
            p = q0 + tl.arange(0, BPG)
            pm = p < h1 * W
            acc = _conv_logits(scr, SR * W, 1, hs, p, pm, H, W, w_ptr, b_ptr, P, KH, KW, DIL, HAS_B, MEAN_SLOTS, BPG)
            tl.store(logits_ptr + n * HW + p, acc, mask=pm)
            if BN_STATS:
                acc_n += tl.where(pm, 1.0, 0.0).to(tl.float64)
                acc_s += tl.where(pm, acc.to(tl.float64), 0.0)
            else:
                tl.store(attn_ptr + n * HW + p, _attention(acc, ns_ptr, nsh_ptr, HAS_NORM), mask=pm)
        tl.debug_barrier()  # the logits / the attention of every row written
        if BN_STATS:  # the squared deviations from the band's own mean, then its partial row
            cnt = tl.sum(acc_n, axis=0)
            tot = tl.sum(acc_s, axis=0)
            acc_m2 = tl.zeros([BPG], tl.float64)
            for q0 in range(h0 * W, h1 * W, BPG):
                p = q0 + tl.arange(0, BPG)
                pm = p < h1 * W
                dev = tl.where(pm, tl.load(logits_ptr + n * HW + p, mask=pm, other=0.0).to(tl.float64) - tot / cnt, 0.0)
                acc_m2 += dev * dev
            tl.store(stat_ptr + pid * 3, cnt)
            tl.store(stat_ptr + pid * 3 + 1, tot)
            tl.store(stat_ptr + pid * 3 + 2, tl.sum(acc_m2, axis=0))
        else:
            # 3. the product of rows [h0, h1)
            _band_product(x_ptr, s_ptr, attn_ptr, y_ptr, n, band, C, HW, TW, HAS_S, CL, MBC, MBP)

    @triton.jit
    def _band_product(x_ptr, s_ptr, attn_ptr, y_ptr, n, band, C, HW, TW, HAS_S: tl.constexpr, CL: tl.constexpr,
                      MBC: tl.constexpr, MBP: tl.constexpr):
        """``y = (x * s) * attn`` on the pixels ``[band * TW, band * TW + TW)`` of image ``n``
        (``TW = TH * W``: whole 16-byte vectors where the host could round the band so), tiles
        of ``MBC`` channels x ``MBP`` pixels (:func:`_mul_tile`, as ``_mul_kernel``)."""
        lo = band * TW
        hi = tl.minimum(HW, lo + TW)
        for q0 in range(lo, hi, MBP):
            p = q0 + tl.arange(0, MBP)
            pm = p < hi
            av = tl.load(attn_ptr + n * HW + p, mask=pm, other=0.0).to(y_ptr.dtype.element_ty).to(tl.float32)
            for c0 in range(0, C, MBC):
                c = c0 + tl.arange(0, MBC)
                _mul_tile(x_ptr, s_ptr, y_ptr, n, c, p, c < C, pm, av, C, HW, HAS_S, CL)

    @triton.jit
    def _sam_band_bn_kernel(x_ptr, s_ptr, logits_ptr, stat_ptr, R, g_ptr, b_ptr, eps, attn_ptr, stats_ptr, rm_ptr,
                            rv_ptr, nbt_ptr, count, m_hi, m_lo, y_ptr, C, H, W, TH, TW, NB, HAS_S: tl.constexpr,
                            HAS_G: tl.constexpr, HAS_BETA: tl.constexpr, RUNNING: tl.constexpr,
                            HAS_NBT: tl.constexpr, CUMULATIVE: tl.constexpr, CL: tl.constexpr, C_DIV: tl.constexpr,
                            HW_DIV: tl.constexpr, W_DIV: tl.constexpr, TW_DIV: tl.constexpr, BPG: tl.constexpr,
                            BR: tl.constexpr, MBC: tl.constexpr, MBP: tl.constexpr):
        # The second launch of the training-BatchNorm SAM forward in bands (after
        # _sam_band_kernel with BN_STATS): every program combines the R bands' partial
        # statistics itself (_bn_coefficients, a fixed order), writes the attention of its rows
        # (program 0 also [mean, var], float64, and with RUNNING the running statistics'
        # update) and multiplies them, as _bn_attn_kernel and _mul_kernel do per element; x's
        # second read follows the first by one launch.
        C, HW, W, TW, pid, n, band, h0, h1, hs, he = _program_band(C, H, W, TH, TW, NB, 1, 0, C_DIV, HW_DIV, W_DIV,
                                                                   TW_DIV)
        k, shift, mean, var = _bn_coefficients(stat_ptr, R, g_ptr, b_ptr, eps, HAS_G, HAS_BETA, BR)
        for q0 in range(h0 * W, h1 * W, BPG):
            p = q0 + tl.arange(0, BPG)
            pm = p < h1 * W
            lg = tl.load(logits_ptr + n * HW + p, mask=pm, other=0.0)
            tl.store(attn_ptr + n * HW + p, _bn_attention(lg, k, shift), mask=pm)
        if pid == 0:
            tl.store(stats_ptr, mean)
            tl.store(stats_ptr + 1, var)
            if RUNNING:
                _bn_update_running(mean, var, rm_ptr, rv_ptr, nbt_ptr, count, m_hi, m_lo, HAS_NBT, CUMULATIVE)
        tl.debug_barrier()  # the attention of every row written
        _band_product(x_ptr, s_ptr, attn_ptr, y_ptr, n, band, C, HW, TW, HAS_S, CL, MBC, MBP)

    @triton.jit
    def _band_pass_a(x_ptr, s_ptr, g_ptr, gattn_ptr, attn_ptr, pooled_ptr, n, p, ld, pm, C, HW, P: tl.constexpr,
                     I_MAX: tl.constexpr, HAS_S: tl.constexpr, HAS_G: tl.constexpr, HAS_GATTN: tl.constexpr,
                     CL: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):
        """Pass A of the band backward at pixels ``p`` (loads masked at ``ld``, the maps at
        ``pm``): ``(dz, count)``, the gradient of the logits through the sigmoid (``sum_c grad *
        x'`` plus the attention's own gradient, times ``a (1 - a)``) and the max's tie count
        (slot ``I_MAX`` of the pooled maps; none where it is -1)."""
        mxv = tl.zeros([BP], tl.float32)
        if I_MAX >= 0:
            mxv = tl.load(pooled_ptr + (n * P + I_MAX) * HW + p, mask=ld, other=0.0)
        ga, cnt, _ = _reduce_channels(x_ptr, s_ptr, g_ptr, n, p, ld, mxv, 0, C, C, HW, HAS_S, HAS_G, I_MAX >= 0, False,
                                      CL, BC, BP)
        gsum = tl.zeros([BP], tl.float32) + ga
        if HAS_GATTN:
            gsum += tl.load(gattn_ptr + n * HW + p, mask=pm, other=0.0).to(tl.float32)
        a = tl.load(attn_ptr + n * HW + p, mask=pm, other=0.0)
        return gsum * ((1.0 - a) * a), cnt

    @triton.jit
    def _sam_band_backward_kernel(x_ptr, s_ptr, g_ptr, gattn_ptr, attn_ptr, logits_ptr, pooled_ptr, w_ptr, ns_ptr,
                                  gx_ptr, gs_ptr, part_ptr, scr_ptr, dzg_ptr, cntg_ptr, stats_ptr, bnw_ptr, bns_ptr, eps,
                                  R, C,
                                  H, W, TH, TW, NB, SR, NPART, TPB, P: tl.constexpr, MEAN_SLOTS: tl.constexpr,
                                  I_MAX: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, DIL: tl.constexpr,
                                  HAS_S: tl.constexpr, HAS_G: tl.constexpr, HAS_GATTN: tl.constexpr,
                                  HAS_NORM: tl.constexpr, NEED_GS: tl.constexpr, BN_PHASE: tl.constexpr,
                                  HAS_BNW: tl.constexpr, CL: tl.constexpr, C_DIV: tl.constexpr,
                                  HW_DIV: tl.constexpr, W_DIV: tl.constexpr, TW_DIV: tl.constexpr, BC: tl.constexpr,
                                  BP: tl.constexpr, BPG: tl.constexpr):
        # The SAM backward of one band of TH rows of image n in one program (sam_backward with
        # _BAND_BACKWARD; BN_PHASE 0, an affine norm or none):
        # pass A (sum_c grad * x', the max's tie count) over its rows and the conv's halo, the
        # sigmoid / norm backward there (d logits', into its scratch [4, SR, W]: dz, count,
        # then the max's and the mean's per-pixel gradients), the conv backward on its rows
        # from the scratch, and the gradient pass over its rows, whose reads of x and the
        # gradient come soon after pass A's. Per element the helpers and formulas of
        # _reduce_kernel (unsplit), _gate_backward_kernel, _conv_backward_kernel and
        # _gradx_kernel (_reduce_channels, _conv_backward_taps, _grad_x_out), so grad_x is
        # theirs; the parameter gradients' partial sums go into TPB rows of part per program
        # (one per tile of its rows; the bias / norm sums in the first) and the scale
        # gradient's into gs [NB, N, C], summed in a fixed order by the host's launches, in
        # groups other than theirs. A training-mode BatchNorm on the logits (its weight at
        # bnw_ptr, the forward's [mean, var] at stats_ptr) needs the batch sums of dz and dz *
        # xhat before any d logits: two launches, BN_PHASE 1 (pass A on the band's own rows,
        # its dz into the map at dzg_ptr and its two sums into part's columns and into row pid
        # of bns [R, 2]) and BN_PHASE 2 (the R bands' sums combined, the conv backward from
        # dzg_ptr's rows, the gradient pass).
        C, HW, W, TW, pid, n, band, h0, h1, hs, he = _program_band(C, H, W, TH, TW, NB, KH, DIL, C_DIV, HW_DIV,
                                                                   W_DIV, TW_DIV)
        scr = scr_ptr + pid * 4 * SR * W
        HAS_MAX: tl.constexpr = I_MAX >= 0
        NTAPS: tl.constexpr = P * KH * KW
        if BN_PHASE == 1:
            # the training BatchNorm's first launch: pass A and the sigmoid's backward on rows
            # [h0, h1) only (no halo), dz and the tie counts into the maps at dzg_ptr / cntg_ptr,
            # and this band's sums of dz and dz * xhat (float64, as _gate_backward_kernel's BN)
            # into columns NTAPS + 1, NTAPS + 2 of its first row of part (0 in the others)
            mean = tl.load(stats_ptr)
            invstd = 1.0 / tl.sqrt(tl.load(stats_ptr + 1) + eps)
            acc1 = tl.zeros([BP], tl.float64)
            acc2 = tl.zeros([BP], tl.float64)
            for q0 in range(h0 * W // BP * BP, h1 * W, BP):
                p = q0 + tl.arange(0, BP)
                ld = p < HW
                own = (p >= h0 * W) & (p < h1 * W)
                dz, cnt = _band_pass_a(x_ptr, s_ptr, g_ptr, gattn_ptr, attn_ptr, pooled_ptr, n, p, ld, own, C, HW,
                                       P, I_MAX, HAS_S, HAS_G, HAS_GATTN, CL, BC, BP)
                tl.store(dzg_ptr + n * HW + p, dz, mask=own)
                if HAS_MAX:
                    tl.store(cntg_ptr + n * HW + p, cnt, mask=own)
                xhat = (tl.load(logits_ptr + n * HW + p, mask=own, other=0.0).to(tl.float64) - mean) * invstd
                dz64 = tl.where(own, dz.to(tl.float64), 0.0)
                acc1 += dz64
                acc2 += dz64 * xhat
            s1 = tl.sum(acc1, axis=0)
            s2 = tl.sum(acc2, axis=0)
            tl.store(bns_ptr + pid * 2, s1)  # (compact: the second launch's every program reads them all)
            tl.store(bns_ptr + pid * 2 + 1, s2)
            for t in range(0, TPB):
                row = part_ptr + (pid * TPB + t) * NPART
                tl.store(row + NTAPS + 1, tl.where(t == 0, s1, 0.0))
                tl.store(row + NTAPS + 2, tl.where(t == 0, s2, 0.0))
        else:
            if BN_PHASE == 2:
                # the second launch: d logits from dz and the batch sums of the R bands' (a fixed
                # order; the formulas of _conv_backward_kernel's BN), the conv's backward on rows
                # [h0, h1) reading dz of the halo from dzg_ptr, then step 3
                m = ((tl.num_programs(0) // NB) * HW).to(tl.float64)
                c1, a0, a1, mean, invstd = _bn_backward_coefficients(bns_ptr, 2, R, m, stats_ptr, bnw_ptr, eps,
                                                                     HAS_BNW, BPG)
                for t in range(0, TPB):
                    p = h0 * W + t * BPG + tl.arange(0, BPG)
                    pm = p < h1 * W
                    row = part_ptr + (pid * TPB + t) * NPART
                    dl64 = _bn_dlogits(tl.load(dzg_ptr + n * HW + p, mask=pm, other=0.0),
                                       tl.load(logits_ptr + n * HW + p, mask=pm, other=0.0), c1, a0, a1, mean, invstd)
                    tl.store(row + NTAPS, tl.sum(tl.where(pm, dl64, 0.0), axis=0))
                    dzv = tl.where(pm, dl64.to(tl.float32), 0.0)
                    gmax, gmean = _conv_backward_taps(dzg_ptr + n * HW, 0, pooled_ptr + n * P * HW, logits_ptr + n * HW,
                                                      HW, p, pm, dzv, row, H, W, w_ptr, c1, a0, a1, mean, invstd, P, KH,
                                                      KW, DIL, MEAN_SLOTS, True, BPG)
                    if HAS_MAX:
                        cv = tl.load(cntg_ptr + n * HW + p, mask=pm, other=1.0)
                        tl.store(scr + 2 * SR * W + (p - hs * W), gmax / cv, mask=pm)
                    if MEAN_SLOTS != 0:
                        tl.store(scr + 3 * SR * W + (p - hs * W), gmean / C, mask=pm)
                tl.debug_barrier()  # the pooled maps' gradients of every row written
            else:
                # 1. pass A and the gate's backward on rows [hs, he)
                acc_b = tl.zeros([BP], tl.float32)
                acc_nsh = tl.zeros([BP], tl.float32)
                acc_ns = tl.zeros([BP], tl.float32)
                for q0 in range(hs * W // BP * BP, he * W, BP):
                    p = q0 + tl.arange(0, BP)
                    ld = p < HW
                    pm = (p >= hs * W) & (p < he * W)
                    own = pm & (p >= h0 * W) & (p < h1 * W)
                    dz, cnt = _band_pass_a(x_ptr, s_ptr, g_ptr, gattn_ptr, attn_ptr, pooled_ptr, n, p, ld, pm, C, HW,
                                           P, I_MAX, HAS_S, HAS_G, HAS_GATTN, CL, BC, BP)
                    if HAS_NORM:
                        lg = tl.load(logits_ptr + n * HW + p, mask=pm, other=0.0)
                        acc_nsh += tl.where(own, dz, 0.0)
                        acc_ns += tl.where(own, dz * lg, 0.0)
                        dz = dz * tl.load(ns_ptr).to(tl.float32)
                    acc_b += tl.where(own, dz, 0.0)
                    tl.store(scr + (p - hs * W), dz, mask=pm)
                    if HAS_MAX:
                        tl.store(scr + SR * W + (p - hs * W), cnt, mask=pm)
                sum_b = tl.sum(acc_b, axis=0)
                sum_nsh = tl.sum(acc_nsh, axis=0)
                sum_ns = tl.sum(acc_ns, axis=0)
                tl.debug_barrier()  # the scratch rows of every thread of the program written
                # 2. the conv's backward on rows [h0, h1): the pooled maps' gradients, and the weight
                # gradient's partial sums, one row of part per tile (TPB tiles of BPG pixels; the bias /
                # norm sums in the first)
                for t in range(0, TPB):
                    p = h0 * W + t * BPG + tl.arange(0, BPG)
                    pm = p < h1 * W
                    row = part_ptr + (pid * TPB + t) * NPART
                    dzv = tl.load(scr + (p - hs * W), mask=pm, other=0.0)
                    gmax, gmean = _conv_backward_taps(scr, hs, pooled_ptr + n * P * HW, logits_ptr, HW, p, pm, dzv, row, H, W,
                                                      w_ptr, 0.0, 0.0, 0.0, 0.0, 0.0, P, KH, KW, DIL, MEAN_SLOTS, False, BPG)
                    first = t == 0
                    tl.store(row + NTAPS, tl.where(first, sum_b, 0.0))
                    tl.store(row + NTAPS + 1, tl.where(first, sum_nsh, 0.0))
                    tl.store(row + NTAPS + 2, tl.where(first, sum_ns, 0.0))
                    if HAS_MAX:
                        cv = tl.load(scr + SR * W + (p - hs * W), mask=pm, other=1.0)
                        tl.store(scr + 2 * SR * W + (p - hs * W), gmax / cv, mask=pm)
                    if MEAN_SLOTS != 0:
                        tl.store(scr + 3 * SR * W + (p - hs * W), gmean / C, mask=pm)
                tl.debug_barrier()  # the pooled maps' gradients of every row written
            # 3. the gradient pass on rows [h0, h1) (from band * TW: whole 16-byte vectors where the
            # host could round TH so), a channel block at a time (the scale gradient's sums)
            lo = band * TW
            hi_ = tl.minimum(HW, lo + TW)
            dt = x_ptr.dtype.element_ty
            for c0 in range(0, C, BC):
                c = c0 + tl.arange(0, BC)
                cm = c < C
                if HAS_S:
                    sv = tl.load(s_ptr + n * C + c, mask=cm, other=0.0)
                else:
                    sv = tl.full([BC], 1.0, tl.float32)  # unused
                gs = tl.zeros([BC, BP], tl.float32)
                for q0 in range(lo, hi_, BP):
                    p = q0 + tl.arange(0, BP)
                    pm = p < hi_
                    m2 = cm[:, None] & pm[None, :]
                    off = _x_offsets(n, c, p, C, HW, CL)
                    xv, gv, av, hit, fm, fa = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0  # (what the flags leave unused)
                    if NEED_GS or HAS_MAX:
                        xv = tl.load(x_ptr + off, mask=m2, other=0.0)
                    if HAS_G:
                        gv = tl.load(g_ptr + off, mask=m2, other=0.0)
                        av = tl.load(attn_ptr + n * HW + p, mask=pm, other=0.0)
                    if HAS_MAX:
                        mxv = tl.load(pooled_ptr + (n * P + I_MAX) * HW + p, mask=pm, other=0.0)
                        fm = tl.load(scr + 2 * SR * W + (p - hs * W), mask=pm, other=0.0)
                        hit = _is_max(xv, sv, mxv, HAS_S)
                    if MEAN_SLOTS != 0:
                        fa = tl.load(scr + 3 * SR * W + (p - hs * W), mask=pm, other=0.0)
                    gs = _grad_x_out(gx_ptr, off, m2, gv, av, hit, fm, fa, xv, sv, gs, HAS_G, HAS_MAX, MEAN_SLOTS != 0,
                                     HAS_S, NEED_GS, BC, BP)
                if NEED_GS:
                    row_n = band.to(tl.int64) * (tl.num_programs(0) // NB) + n  # gs[band, n]: [NB, N, C]
                    tl.store(gs_ptr + row_n * C + c, tl.sum(gs, axis=1), mask=cm)

    @triton.jit
    def _reduce_kernel(x_ptr, s_ptr, g_ptr, mx_ptr, ga_ptr, cnt_ptr, ix_ptr, C, HW, C_PER, MXS, HAS_S: tl.constexpr,
                       HAS_G: tl.constexpr, HAS_MAX: tl.constexpr, HAS_IX: tl.constexpr, CL: tl.constexpr,
                       C_DIV: tl.constexpr, HW_DIV: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):
        # channels [s * C_PER, (s + 1) * C_PER) of one pixel tile, s = program_id(1); outputs
        # [N, S, HW] (the host combines the S partial results: sums, and the max of the index)
        C, HW = _dims(C, HW, C_DIV, HW_DIV)
        n, p = _image_and_pixels(HW, BP)
        pm = p < HW
        c_lo = tl.program_id(1) * C_PER
        mxv = tl.zeros([BP], tl.float32)
        if HAS_MAX:
            mxv = tl.load(mx_ptr + n * MXS + p, mask=pm, other=0.0)  # MXS: the max map's image stride
        ga, cnt, ix = _reduce_channels(x_ptr, s_ptr, g_ptr, n, p, pm, mxv, c_lo, tl.minimum(c_lo + C_PER, C), C, HW,
                                       HAS_S, HAS_G, HAS_MAX, HAS_IX, CL, BC, BP)
        out = (n * tl.num_programs(1) + tl.program_id(1)) * HW + p
        if HAS_G:
            tl.store(ga_ptr + out, ga, mask=pm)
        if HAS_MAX:
            tl.store(cnt_ptr + out, cnt, mask=pm)
        if HAS_IX:
            tl.store(ix_ptr + out, ix, mask=pm)

    @triton.jit
    def _reduce_channels(x_ptr, s_ptr, g_ptr, n, p, pm, mxv, c_lo, c_hi, C, HW, HAS_S: tl.constexpr,
                         HAS_G: tl.constexpr, HAS_MAX: tl.constexpr, HAS_IX: tl.constexpr, CL: tl.constexpr,
                         BC: tl.constexpr, BP: tl.constexpr):
        """Pass A over channels ``[c_lo, c_hi)`` at pixels ``p`` of image ``n`` (valid where
        ``pm``): ``(sum_c grad * x', the number of channels where x' equals the max mxv, the
        last such channel or -1)``, float32 / float32 / int32 ``[BP]`` (what is not asked for
        comes back as zeros / -1); tiles accumulated element-wise, reduced once."""
        ga = tl.zeros([BC, BP], tl.float32)
        cnt = tl.zeros([BC, BP], tl.float32)
        ix = tl.full([BC, BP], -1, tl.int32)
        for c0 in range(c_lo, c_hi, BC):
            c = c0 + tl.arange(0, BC)
            cm = c < C
            m2 = cm[:, None] & pm[None, :]
            off = _x_offsets(n, c, p, C, HW, CL)
            xv = tl.load(x_ptr + off, mask=m2, other=0.0)
            if HAS_S:
                v = _scaled(xv, tl.load(s_ptr + n * C + c, mask=cm, other=0.0)[:, None], x_ptr.dtype.element_ty)
            else:
                v = xv.to(tl.float32)
            if HAS_G:
                gv = tl.load(g_ptr + off, mask=m2, other=0.0).to(tl.float32)
                ga += gv * v
            if HAS_MAX:
                hit = m2 & (v == mxv[None, :])
                cnt += tl.where(hit, 1.0, 0.0)
                if HAS_IX:
                    ix = tl.maximum(ix, tl.where(hit, c[:, None], -1))
        return tl.sum(ga, axis=0), tl.sum(cnt, axis=0), tl.max(ix, axis=0)

    @triton.jit
    def _is_max(xv, sv, mxv, HAS_S: tl.constexpr):
        """Where ``x'`` (``x * s`` rounded as the pooling rounded it) equals the pooled max ``mxv``."""
        if HAS_S:
            v = _scaled(xv, sv[:, None], xv.dtype)
        else:
            v = xv.to(tl.float32)
        return v == mxv[None, :]

    @triton.jit
    def _grad_x_out(gx_ptr, off, m2, gv, av, hit, fm, fa, xv, sv, gs, HAS_G: tl.constexpr, HAS_MAX: tl.constexpr,
                    HAS_MEAN: tl.constexpr, HAS_S: tl.constexpr, NEED_GS: tl.constexpr, BC: tl.constexpr,
                    BP: tl.constexpr):
        """``grad_x`` of a tile (``off``, valid where ``m2``) stored, and the scale gradient's
        running sums ``gs`` returned: ``grad_x' = g * attn + [x' is the max] * fm + fa``
        (upstream gradient ``gv``, the attention ``av`` of the pixels; the max's and the mean's
        per-pixel shares ``fm``, ``fa``), rounded to x's dtype as the reference rounds it, then
        times the scale ``sv``; ``gs += grad_x' * x``."""
        dt = gx_ptr.dtype.element_ty
        gxs = tl.zeros([BC, BP], tl.float32)
        if HAS_G:
            gxs += gv.to(tl.float32) * av.to(dt, fp_downcast_rounding="rtne").to(tl.float32)[None, :]
        if HAS_MAX:
            gxs += tl.where(hit, 1.0, 0.0) * fm[None, :]
        if HAS_MEAN:
            gxs += fa[None, :]
        gxs = gxs.to(dt, fp_downcast_rounding="rtne").to(tl.float32)
        if NEED_GS:
            gs += tl.where(m2, gxs * xv.to(tl.float32), 0.0)
        if HAS_S:
            gx = gxs * sv[:, None].to(tl.float32)
        else:
            gx = gxs
        tl.store(gx_ptr + off, gx.to(dt, fp_downcast_rounding="rtne"), mask=m2)
        return gs

    @triton.jit
    def _gradx_kernel(x_ptr, s_ptr, g_ptr, a_ptr, mx_ptr, fmax_ptr, fmean_ptr, gx_ptr, gs_ptr, cnt_ptr, ix_ptr, C,
                      HW, P_PER_PROG, MXS, HAS_S: tl.constexpr, HAS_G: tl.constexpr, HAS_MAX: tl.constexpr,
                      HAS_MEAN: tl.constexpr, NEED_GS: tl.constexpr, USE_IX: tl.constexpr, CL: tl.constexpr,
                      C_DIV: tl.constexpr, HW_DIV: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):
        # USE_IX (no scale gradient): pixels without tied maxima take the max channel from pass
        # A's index map, and x is read only at pixels with ties, to compare x' with the max
        # (amax semantics: tied channels share the gradient). A predicated load per pixel, not
        # a branch per tile: the branch needed a reduction across the tile (shared memory and
        # a barrier on a GPU) in every iteration
        C, HW = _dims(C, HW, C_DIV, HW_DIV)
        n = tl.program_id(0).to(tl.int64)  # n * C * HW can pass 2**31 elements
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        cm = c < C
        if HAS_S:
            sv = tl.load(s_ptr + n * C + c, mask=cm, other=0.0)
        else:
            sv = tl.full([BC], 1.0, tl.float32)  # unused
        gs = tl.zeros([BC, BP], tl.float32)  # reduced over the pixels after the loop
        p_start = tl.program_id(2) * P_PER_PROG
        for p0 in range(0, P_PER_PROG, BP):
            p = p_start + p0 + tl.arange(0, BP)
            pm = p < HW
            m2 = cm[:, None] & pm[None, :]
            off = _x_offsets(n, c, p, C, HW, CL)
            xv, gv, av, hit, fm, fa = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0  # (what the flags leave unused)
            if NEED_GS or (HAS_MAX and not USE_IX):
                xv = tl.load(x_ptr + off, mask=m2, other=0.0)
            if HAS_G:
                gv = tl.load(g_ptr + off, mask=m2, other=0.0)
                av = tl.load(a_ptr + n * HW + p, mask=pm, other=0.0)
            if HAS_MAX:
                mxv = tl.load(mx_ptr + n * MXS + p, mask=pm, other=0.0)
                fm = tl.load(fmax_ptr + n * HW + p, mask=pm, other=0.0)
                if USE_IX:
                    # per pixel: x is loaded (predicated) only where maxima tie
                    tie = tl.load(cnt_ptr + n * HW + p, mask=pm, other=0.0) > 1.0
                    ixv = tl.load(ix_ptr + n * HW + p, mask=pm, other=-1)
                    xt = tl.load(x_ptr + off, mask=m2 & tie[None, :], other=0.0)
                    hit = tl.where(tie[None, :], _is_max(xt, sv, mxv, HAS_S), c[:, None] == ixv[None, :])
                else:
                    hit = _is_max(xv, sv, mxv, HAS_S)
            if HAS_MEAN:
                fa = tl.load(fmean_ptr + n * HW + p, mask=pm, other=0.0)
            gs = _grad_x_out(gx_ptr, off, m2, gv, av, hit, fm, fa, xv, sv, gs, HAS_G, HAS_MAX, HAS_MEAN, HAS_S, NEED_GS,
                             BC, BP)
        if NEED_GS:
            # one row of partial sums per pixel chunk, [chunks, N, C], summed by the host in a
            # fixed order: deterministic, where an atomic add would not be
            part = tl.program_id(2).to(tl.int64) * tl.num_programs(0) * C
            tl.store(gs_ptr + part + n * C + c, tl.sum(gs, axis=1), mask=cm)

    @triton.jit
    def _gpool_kernel(x_ptr, out_ptr, cnt_ptr, NC, C, HW, P_PER, I_MAX: tl.constexpr, I_MEAN: tl.constexpr,
                      COUNT: tl.constexpr, PARTIAL: tl.constexpr, CL: tl.constexpr, C_DIV: tl.constexpr,
                      HW_DIV: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):
        # max / mean over pixels [s * P_PER, (s + 1) * P_PER) of BC channels of image n,
        # s = program_id(2); COUNT: also the number of pixels equal to the max (each element of
        # the accumulator tile counts the values equal to its own running max, restarting at a
        # larger one; the slots holding the overall max add up). out: [P, N, C] in out's dtype
        # and cnt [N, C] float32, or with PARTIAL float32 [S, 3, N, C] (max with NaN restored,
        # sum, count) for the host to combine
        C, HW = _dims(C, HW, C_DIV, HW_DIV)
        n = tl.program_id(0).to(tl.int64)  # n * C * HW can pass 2**31 elements
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        cm = c < C
        p_lo = tl.program_id(2) * P_PER
        mx = tl.full([BC, BP], float("-inf"), tl.float32)
        sm = tl.zeros([BC, BP], tl.float32)
        nan = tl.zeros([BC, BP], tl.int32)
        k = tl.zeros([BC, BP], tl.float32)
        for p0 in range(p_lo, tl.minimum(p_lo + P_PER, HW), BP):
            p = p0 + tl.arange(0, BP)
            m2 = cm[:, None] & (p < HW)[None, :]
            v = tl.load(x_ptr + _x_offsets(n, c, p, C, HW, CL), mask=m2, other=0.0).to(tl.float32)
            if COUNT:
                k = tl.where(m2 & (v > mx), 1.0, tl.where(m2 & (v == mx), k + 1.0, k))
            mx, sm, nan = _max_sum_nan(mx, sm, nan, v, m2)
        top = tl.max(mx, axis=1)
        if COUNT:
            kt = tl.sum(tl.where(mx == top[:, None], k, 0.0), axis=1)
        top = tl.where(tl.max(nan, axis=1) > 0, float("nan"), top)
        sm = tl.sum(sm, axis=1)
        if PARTIAL:
            base = out_ptr + tl.program_id(2).to(tl.int64) * 3 * NC + n * C + c
            tl.store(base, top, mask=cm)
            tl.store(base + NC, sm, mask=cm)
            if COUNT:
                tl.store(base + 2 * NC, kt, mask=cm)
        else:
            if I_MAX >= 0:
                tl.store(out_ptr + I_MAX * NC + n * C + c,
                         top.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=cm)
            if I_MEAN >= 0:
                tl.store(out_ptr + I_MEAN * NC + n * C + c,
                         (sm / HW).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=cm)
            if COUNT:
                tl.store(cnt_ptr + n * C + c, kt, mask=cm)

    @triton.jit
    def _gpool_backward_kernel(x_ptr, mx_ptr, g_ptr, cnt_ptr, gx_ptr, N, C, HW, P_PER, I_MAX: tl.constexpr,
                               I_MEAN: tl.constexpr, ACC: tl.constexpr, CL: tl.constexpr, C_DIV: tl.constexpr,
                               HW_DIV: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):
        # gx = g_mean / HW + [x == max] * g_max / count over pixels [s * P_PER, (s + 1) * P_PER)
        # of BC channels of image n; g: the pooled maps' gradient [slots, N, C] (float32),
        # I_MAX / I_MEAN its max / mean slot (-1: none), count: the tie count of the max;
        # ACC: added to what gx holds (one read-modify-write, rounded once)
        C, HW = _dims(C, HW, C_DIV, HW_DIV)
        n = tl.program_id(0).to(tl.int64)  # n * C * HW can pass 2**31 elements
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        cm = c < C
        fa = tl.zeros([BC], tl.float32)
        if I_MEAN >= 0:
            fa = tl.load(g_ptr + (I_MEAN * N + n) * C + c, mask=cm, other=0.0) / HW
        m = tl.zeros([BC], tl.float32)
        fm = tl.zeros([BC], tl.float32)
        if I_MAX >= 0:
            m = tl.load(mx_ptr + n * C + c, mask=cm, other=0.0)
            fm = tl.load(g_ptr + (I_MAX * N + n) * C + c, mask=cm, other=0.0) / tl.load(cnt_ptr + n * C + c,
                                                                                         mask=cm, other=1.0)
        p_lo = tl.program_id(2) * P_PER
        for p0 in range(p_lo, tl.minimum(p_lo + P_PER, HW), BP):
            p = p0 + tl.arange(0, BP)
            m2 = cm[:, None] & (p < HW)[None, :]
            off = _x_offsets(n, c, p, C, HW, CL)
            g = tl.zeros([BC, BP], tl.float32) + fa[:, None]
            if I_MAX >= 0:
                v = tl.load(x_ptr + off, mask=m2, other=0.0).to(tl.float32)
                g = tl.where(v == m[:, None], g + fm[:, None], g)
            if ACC:
                g += tl.load(gx_ptr + off, mask=m2, other=0.0).to(tl.float32)
            tl.store(gx_ptr + off, g.to(gx_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=m2)

    # CBAM's channel MLP gate (float32): pooled [P, N, C], w1 [R, C], w2 [C, R], hidden [P, N, R]
    # (after the relu), gate [N, C]; R <= BR. Tiles [BR, BC] of a weight; the sums over C
    # accumulate whole tiles and reduce once per program (see _max_sum_nan).

    @triton.jit
    def _mlp_gate_kernel(v_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, h_ptr, g_ptr, P, N, C, R, HAS_B1: tl.constexpr,
                         HAS_B2: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
        # one image n: h_p = relu(w1 v_p + b1) for each pool p (stored: the backward reads
        # them, and so does this program's second loop), then gate = sigmoid(sum_p (w2 h_p + b2)),
        # the pools added in order
        n = tl.program_id(0)
        r = tl.arange(0, BR)
        rm = r < R
        for p in range(P):
            acc = tl.zeros([BR, BC], tl.float32)
            for c0 in range(0, C, BC):
                c = c0 + tl.arange(0, BC)
                cm = c < C
                v = tl.load(v_ptr + (p * N + n) * C + c, mask=cm, other=0.0)
                w = tl.load(w1_ptr + r[:, None] * C + c[None, :], mask=rm[:, None] & cm[None, :], other=0.0)
                acc += w * v[None, :]
            a = tl.sum(acc, axis=1)
            if HAS_B1:
                a += tl.load(b1_ptr + r, mask=rm, other=0.0)
            h = tl.where(a > 0.0, a, tl.where(a != a, a, 0.0))  # relu, NaN kept
            tl.store(h_ptr + (p * N + n) * R + r, h, mask=rm)
        tl.debug_barrier()  # the hidden vectors, stored by other threads of this program
        for c0 in range(0, C, BC):
            c = c0 + tl.arange(0, BC)
            cm = c < C
            w = tl.load(w2_ptr + c[None, :] * R + r[:, None], mask=rm[:, None] & cm[None, :], other=0.0)
            b = tl.zeros([BC], tl.float32)
            if HAS_B2:
                b = tl.load(b2_ptr + c, mask=cm, other=0.0)
            s = tl.zeros([BC], tl.float32)
            for p in range(P):
                h = tl.load(h_ptr + (p * N + n) * R + r, mask=rm, other=0.0)
                s += tl.sum(w * h[:, None], axis=0) + b
            tl.store(g_ptr + n * C + c, 1.0 / (1.0 + tl.exp(-s)), mask=cm)

    @triton.jit
    def _mlp_gate_backward_kernel(gy_ptr, g_ptr, v_ptr, w1_ptr, w2_ptr, h_ptr, dh_ptr, gv_ptr, P, N, C, R,
                                  NEED_GV: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
        # one image n: dl = gy * (1 - g) * g; dhs = sum_c dl[c] w2[c, :]; dh_p = dhs where
        # h_p > 0 (stored for the weight gradients); grad_pooled[p] = sum_r dh_p[r] w1[r, :]
        n = tl.program_id(0)
        r = tl.arange(0, BR)
        rm = r < R
        acc = tl.zeros([BR, BC], tl.float32)
        for c0 in range(0, C, BC):
            c = c0 + tl.arange(0, BC)
            cm = c < C
            g = tl.load(g_ptr + n * C + c, mask=cm, other=0.0)
            dl = tl.load(gy_ptr + n * C + c, mask=cm, other=0.0) * (1.0 - g) * g
            w = tl.load(w2_ptr + c[None, :] * R + r[:, None], mask=rm[:, None] & cm[None, :], other=0.0)
            acc += w * dl[None, :]
        dhs = tl.sum(acc, axis=1)
        for p in range(P):
            h = tl.load(h_ptr + (p * N + n) * R + r, mask=rm, other=0.0)
            tl.store(dh_ptr + (p * N + n) * R + r, tl.where(h > 0.0, dhs, 0.0), mask=rm)
        if NEED_GV:
            tl.debug_barrier()
            for c0 in range(0, C, BC):
                c = c0 + tl.arange(0, BC)
                cm = c < C
                w = tl.load(w1_ptr + r[:, None] * C + c[None, :], mask=rm[:, None] & cm[None, :], other=0.0)
                for p in range(P):
                    dh = tl.load(dh_ptr + (p * N + n) * R + r, mask=rm, other=0.0)
                    tl.store(gv_ptr + (p * N + n) * C + c, tl.sum(w * dh[:, None], axis=0), mask=cm)

    @triton.jit
    def _mlp_weight_grads_kernel(gy_ptr, g_ptr, v_ptr, h_ptr, dh_ptr, gw1_ptr, gb1_ptr, gw2_ptr, gb2_ptr, P, N, C,
                                 R, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, BR: tl.constexpr,
                                 BC: tl.constexpr):
        # channels c of this program: gw2[c, :] = sum_n dl[n, c] sum_p h[p, n, :],
        # gb2[c] = P sum_n dl[n, c], gw1[:, c] = sum_{n, p} dh[p, n, :] v[p, n, c]; program 0
        # also gb1 = sum_{p, n} dh[p, n, :]. Sums over the batch in order, no atomics.
        c = tl.program_id(0) * BC + tl.arange(0, BC)
        cm = c < C
        r = tl.arange(0, BR)
        rm = r < R
        gw2 = tl.zeros([BR, BC], tl.float32)
        gw1 = tl.zeros([BR, BC], tl.float32)
        gb2 = tl.zeros([BC], tl.float32)
        gb1 = tl.zeros([BR], tl.float32)
        for n in range(N):
            g = tl.load(g_ptr + n * C + c, mask=cm, other=0.0)
            dl = tl.load(gy_ptr + n * C + c, mask=cm, other=0.0) * (1.0 - g) * g
            hs = tl.zeros([BR], tl.float32)
            for p in range(P):
                q = p * N + n
                hs += tl.load(h_ptr + q * R + r, mask=rm, other=0.0)
                dh = tl.load(dh_ptr + q * R + r, mask=rm, other=0.0)
                gw1 += dh[:, None] * tl.load(v_ptr + q * C + c, mask=cm, other=0.0)[None, :]
                gb1 += dh
            gw2 += hs[:, None] * dl[None, :]
            gb2 += dl
        m2 = rm[:, None] & cm[None, :]
        tl.store(gw2_ptr + c[None, :] * R + r[:, None], gw2, mask=m2)
        tl.store(gw1_ptr + r[:, None] * C + c[None, :], gw1, mask=m2)
        if HAS_B2:
            tl.store(gb2_ptr + c, gb2 * P, mask=cm)
        if HAS_B1:
            tl.store(gb1_ptr + r, gb1, mask=rm & (tl.program_id(0) == 0))


def _flat_scale(scale: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    return None if scale is None else scale.to(x.dtype).reshape(x.shape[0], x.shape[1]).contiguous()


def pool_forward(x: Tensor, scale: Optional[Tensor], kinds: Sequence[int], dtype: torch.dtype) -> Tensor:
    x, cl = _layout(x)
    n, c, h, w = x.shape
    hw = h * w
    kinds = list(kinds)
    out = torch.empty((n, len(kinds), h, w), dtype=dtype, device=x.device)
    if out.numel() == 0:
        return out
    s = _flat_scale(scale, x)
    i_max = kinds.index(0) if 0 in kinds else -1
    i_mean = kinds.index(1) if 1 in kinds else -1
    tiles = n * _cdiv(hw, _BP)
    c_per, chunks = _split(c, _BC, tiles, _target_programs(x))
    part = torch.empty((n, chunks, 2, hw), dtype=torch.float32, device=x.device) if chunks > 1 else None
    _pool_kernel[(tiles, chunks)](x, s if s is not None else x, out if part is None else part, c, hw, len(kinds),
                                  c_per, I_MAX=i_max, I_MEAN=i_mean, HAS_S=s is not None, PARTIAL=part is not None,
                                  BC=_BC, BP=_BP, **_meta(c, hw, cl))
    if part is not None:
        _pool_combine_kernel[(n * _cdiv(hw, _BP_SMALL),)](part, out, c, hw, len(kinds), chunks, I_MAX=i_max,
                                                          I_MEAN=i_mean, BP=_BP_SMALL, num_warps=_NUM_WARPS)
    for i, k in enumerate(kinds):
        src = i_max if k == 0 else i_mean
        if src != i:
            out[:, i].copy_(out[:, src])
    return out


def _check_gate_args(weight: Tensor, p: int, bias: Optional[Tensor], dilation: int) -> None:
    """Refuse small-map arguments the gate kernel cannot take, as the C++ kernels do
    (``check_gate_args``)."""
    if weight.dim() != 4 or weight.shape[:2] != (1, p):
        raise ValueError(f"spatialattn: weight must be (1, {p}, kh, kw), got {tuple(weight.shape)}")
    if not (weight.shape[2] % 2 and weight.shape[3] % 2):
        raise ValueError("spatialattn: weight: kernel size must be odd to keep the map size, got "
                         f"{weight.shape[2]}x{weight.shape[3]}")
    if dilation < 1:
        raise ValueError(f"spatialattn: dilation must be >= 1, got {dilation}")
    if bias is not None and bias.shape != (1,):
        raise ValueError(f"spatialattn: bias must have shape (1,), got {tuple(bias.shape)}")


def _conv_gate(pooled: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int, out: Tensor,
               norm_scale: Optional[Tensor] = None, norm_shift: Optional[Tensor] = None, stats: bool = False
               ) -> Tensor:
    """The logits ``conv2d(pooled, weight) + bias`` (float32 ``[N, 1, H, W]``, returned) and, in
    the same launch, into ``out`` either the attention (``sigmoid(logits * norm_scale +
    norm_shift)``, ``[N, 1, H, W]``) or with ``stats`` each program's partial statistics of
    the logits (float64 ``[programs, 3]``)."""
    n, p, h, w = pooled.shape
    _check_gate_args(weight, p, bias, dilation)
    kh, kw = weight.shape[-2:]
    logits = torch.empty((n, 1, h, w), dtype=torch.float32, device=pooled.device)
    programs = n * _cdiv(h * w, _BP_SMALL)
    if programs == 0:
        return logits
    wt = weight.to(torch.float32).contiguous()
    has_norm = norm_scale is not None
    _gate_kernel[(programs,)](pooled.contiguous(), wt, bias if bias is not None else wt,
                              norm_scale if has_norm else wt, norm_shift if has_norm else wt, logits, out, h, w, P=p,
                              KH=kh, KW=kw, DIL=dilation, HAS_B=bias is not None, HAS_NORM=has_norm, STATS=stats,
                              BP=_BP_SMALL, num_warps=_NUM_WARPS)
    return logits


def gate(pooled: Tensor, weight: Tensor, bias: Optional[Tensor], norm_scale: Optional[Tensor],
         norm_shift: Optional[Tensor], dilation: int) -> Tuple[Tensor, Tensor]:
    """``(logits, attn)``, float32 ``[N, 1, H, W]``: ``logits = conv2d(pooled, weight) + bias``
    (zero padding ``dilation * (k // 2)``, odd ``k``), ``attn = sigmoid(logits * norm_scale +
    norm_shift)``; ``pooled``: float32 ``[N, P, H, W]``, ``weight``: ``[1, P, kh, kw]``."""
    n, _, h, w = pooled.shape
    attn = torch.empty((n, 1, h, w), dtype=torch.float32, device=pooled.device)
    return _conv_gate(pooled, weight, bias, dilation, attn, norm_scale, norm_shift), attn


# A BatchNorm2d's running statistics for the training-BatchNorm launches to update:
# (running_mean, running_var, num_batches_tracked or None, momentum or None)
Running = Tuple[Tensor, Tensor, Optional[Tensor], Optional[float]]


def _running_args(running: Optional[Running], count: int, dummy: Tensor) -> Tuple[tuple, dict]:
    """The kernel arguments ``(rm, rv, nbt, count, m_hi, m_lo)`` and constants (``RUNNING``,
    ``HAS_NBT``, ``CUMULATIVE``) of the running statistics' update that program 0 of the
    BatchNorm attention launch makes from the batch statistics of ``count`` logits (``dummy``
    stands in for absent tensors)."""
    if running is None:
        return (dummy, dummy, dummy, 2, 0, 0), dict(RUNNING=False, HAS_NBT=False, CUMULATIVE=False)
    rm, rv, nbt, momentum = running
    bits = struct.unpack("<q", struct.pack("<d", 0.0 if momentum is None else float(momentum)))[0]
    hi, lo = bits >> 32, bits & 0xFFFFFFFF
    lo = lo - (1 << 32) if lo >= 1 << 31 else lo  # both halves as signed 32-bit integers
    return ((rm, rv, nbt if nbt is not None else dummy, int(count), hi, lo),
            dict(RUNNING=True, HAS_NBT=nbt is not None, CUMULATIVE=momentum is None))


def _folded(part: Tensor, rows: int, stride: int, stats: bool) -> Tuple[Tensor, int]:
    """``(part, rows)``, or where ``rows > _FOLD_ROWS`` ``(one row, 1)``: a training BatchNorm's
    partial rows (``stats``: the forward's ``(count, sum, M2)`` rows ``[rows, 3]``; else the
    backward's two sums at ``part[r * stride]`` and ``[r * stride + 1]``) folded by one
    program (``_fold_kernel``). The consumers' combine of one row gives it back unchanged, so
    their results are the same bits either way."""
    if rows <= _FOLD_ROWS:
        return part, rows
    out = torch.empty(3 if stats else 2, dtype=torch.float64, device=part.device)
    _fold_kernel[(1,)](part, stride, rows, out, STATS=stats, BR=_BP_SMALL, num_warps=_NUM_WARPS)
    return out, 1


def gate_batchnorm(pooled: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                   bn_bias: Optional[Tensor], eps: float, dilation: int, running: Optional[Running] = None
                   ) -> Tuple[Tensor, Tensor, Tensor]:
    """``(logits, attn, stats)``: the gate with a training-mode ``BatchNorm2d(1)`` on the logits,
    ``attn = sigmoid(bn(conv2d(pooled, weight) + bias))`` with the batch statistics ``stats =
    [mean, biased var]`` (float64) of all ``N * H * W`` logits; two launches (the conv with
    per-program partial statistics, then the attention, which also updates ``running`` as
    ``BatchNorm2d.forward`` does; three above ``_FOLD_ROWS`` tiles). Without logits (an empty
    map) ``stats`` is NaN and ``running`` is left as it is."""
    n, _, h, w = pooled.shape
    dev = pooled.device
    attn = torch.empty((n, 1, h, w), dtype=torch.float32, device=dev)
    stats = torch.empty(2, dtype=torch.float64, device=dev)
    programs = n * _cdiv(h * w, _BP_SMALL)
    part = torch.empty((programs, 3), dtype=torch.float64, device=dev)
    logits = _conv_gate(pooled, weight, bias, dilation, part, stats=True)
    if programs == 0:
        return logits, attn, stats.fill_(float("nan"))
    dummy = part
    stat, rows = _folded(part, programs, 3, stats=True)
    run_args, run_meta = _running_args(running, n * h * w, dummy)
    _bn_attn_kernel[(programs,)](logits, stat, rows, bn_weight if bn_weight is not None else dummy,
                                 bn_bias if bn_bias is not None else dummy, float(eps), attn, stats, *run_args, h * w,
                                 HAS_G=bn_weight is not None, HAS_BETA=bn_bias is not None, **run_meta, BP=_BP_SMALL,
                                 BR=_BP_SMALL, num_warps=_NUM_WARPS)
    return logits, attn, stats


def gate_forward(x: Tensor, attn: Tensor, scale: Optional[Tensor]) -> Tensor:
    x, cl = _layout(x)
    n, c, h, w = x.shape
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    s = _flat_scale(scale, x)
    a = attn.expand(n, 1, h, w).contiguous()
    hw = h * w
    bc, bp = _MUL_TILE[cl]
    grid = (n * _cdiv(hw, bp), _cdiv(c, bc))
    _mul_kernel[grid](x, s if s is not None else x, a, y, c, hw, HAS_S=s is not None, BC=bc, BP=bp,
                      **_meta(c, hw, cl))
    return y


def _mean_slots(kinds: Sequence[int]) -> int:
    """The pooled maps' slots that are means (kind 1), as a bit mask (bit ``i``: slot ``i``)."""
    return sum(1 << i for i, k in enumerate(kinds) if k == 1)


def _band_geometry(n: int, h: int, w: int, halo: int, x: Tensor) -> Tuple[int, int, int, int]:
    """``(rows, bands, rows * w, scratch rows)`` per image of the one-launch forward and
    backward: enough bands that the grid has ``_BAND_PROGRAMS_PER_SM`` programs per SM where the
    rows allow, the height then rounded up so that a band is whole 16-byte vectors where the
    width allows (aligned accesses; ``_BAND_ROWS`` > 0 forces a height); the scratch holds a
    band and its ``halo`` rows above and below, at most the map."""
    if _BAND_ROWS > 0:
        th = min(_BAND_ROWS, h)
    else:
        bands = min(h, max(1, _cdiv(_BAND_PROGRAMS_PER_SM * _sm_count(x), max(n, 1))))
        vec = max(1, 16 // x.element_size())
        m = vec // min(vec, _pow2_div(w))
        th = min(h, _cdiv(_cdiv(h, bands), m) * m)
    return th, _cdiv(h, th), th * w, min(h, th + 2 * halo)


def sam_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                norm_scale: Optional[Tensor], norm_shift: Optional[Tensor], kinds: Sequence[int],
                dilation: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, attn, logits, pooled)`` of the fused SAM with a sigmoid gate: ``pooled`` the
    float32 ``[N, P, H, W]`` maps of ``x * scale`` (``kinds``: 0 max, 1 mean), ``logits =
    conv2d(pooled, weight) + bias``, ``attn = sigmoid(logits * norm_scale + norm_shift)``
    (float32 ``[N, 1, H, W]``), ``y = (x * scale) * attn``.

    Three or four launches (:func:`pool_forward`, :func:`gate`, :func:`gate_forward`), or with
    ``_BAND_FORWARD`` one (``_sam_band_kernel``: each program a band of rows, its conv's
    halo rows pooled again; the same numbers). The one launch is not the default until it is
    timed on a GPU (``benchmarks/profile_cuda.py`` times both); ``SPATIALATTN_TRITON_BAND_FORWARD=1``
    turns it on."""
    kinds = list(kinds)
    if not _BAND_FORWARD or x.numel() == 0:
        pooled = pool_forward(x, scale, kinds, torch.float32)
        logits, attn = gate(pooled, weight, bias, norm_scale, norm_shift, dilation)
        return gate_forward(x, attn, scale), attn, logits, pooled
    return _band_forward_launch(x, weight, bias, scale, norm_scale, norm_shift, kinds, dilation, False)[:4]


def _band_forward_launch(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                         norm_scale: Optional[Tensor], norm_shift: Optional[Tensor], kinds: List[int], dilation: int,
                         bn_stats: bool):
    """``_sam_band_kernel`` over ``x`` (made dense in one of the two layouts): ``(y, attn,
    logits, pooled, x, scale flat or None, channels_last, (th, bands, th * w), partial
    statistics or None)``. With ``bn_stats`` the kernel stores the logits' partial statistics
    (float64 ``[N * bands, 3]``) instead of the attention and the product (``BN_STATS``)."""
    x, cl = _layout(x)
    n, c, h, w = x.shape
    p = len(kinds)
    _check_gate_args(weight, p, bias, dilation)
    kh, kw = weight.shape[-2:]
    th, nb, tw, sr = _band_geometry(n, h, w, dilation * (kh // 2), x)
    dev = x.device
    pooled = torch.empty((n, p, h, w), dtype=torch.float32, device=dev)
    logits = torch.empty((n, 1, h, w), dtype=torch.float32, device=dev)
    attn = torch.empty((n, 1, h, w), dtype=torch.float32, device=dev)
    scratch = torch.empty(n * nb * 2 * sr * w, dtype=torch.float32, device=dev)
    part = torch.empty((n * nb, 3), dtype=torch.float64, device=dev) if bn_stats else None
    y = torch.empty_like(x)
    s = _flat_scale(scale, x)
    wt = weight.to(torch.float32).contiguous()
    has_norm = norm_scale is not None
    mbc, mbp = _MUL_TILE[cl]
    _sam_band_kernel[(n * nb,)](
        x, s if s is not None else x, wt, bias if bias is not None else wt, norm_scale if has_norm else wt,
        norm_shift if has_norm else wt, pooled, logits, attn, y, scratch, part if bn_stats else scratch, c, h, w, th,
        tw, nb, sr, P=p, TW_DIV=_pow2_div(tw), MEAN_SLOTS=_mean_slots(kinds), KH=kh, KW=kw, DIL=dilation,
        HAS_S=s is not None, HAS_B=bias is not None, HAS_NORM=has_norm, BN_STATS=bn_stats, W_DIV=_pow2_div(w),
        BC=_BC, BP=_BP, BPG=_BP_SMALL, MBC=mbc, MBP=mbp, **_meta(c, h * w, cl))
    return y, attn, logits, pooled, x, s, cl, (th, nb, tw), part


def sam_forward_batchnorm(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                          bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], eps: float, kinds: Sequence[int],
                          dilation: int, running: Optional[Running] = None):
    """``(y, attn, logits, pooled, stats)`` of the SAM with a training-mode ``BatchNorm2d(1)`` on
    the logits (``stats``: float64 ``[mean, biased var]`` of all the logits): four or five
    launches (:func:`pool_forward`, :func:`gate_batchnorm`, :func:`gate_forward`), or with
    ``_BAND_FORWARD`` two: ``_sam_band_kernel`` with ``BN_STATS`` (pooling, conv and each band's
    partial statistics of the logits), then ``_sam_band_bn_kernel`` (the batch statistics, the
    attention and the product). The two combine the statistics from partials per band instead of
    per 128-pixel tile, so they (and through them the attention and ``y``) may differ from the
    default launches' in the last bits; ``pooled`` and ``logits`` are the same. ``running``: the
    BatchNorm's running statistics, updated from ``stats`` in the launch that forms them (as
    ``BatchNorm2d.forward``; not where ``x`` is empty)."""
    kinds = list(kinds)
    if not _BAND_FORWARD or x.numel() == 0:
        pooled = pool_forward(x, scale, kinds, torch.float32)
        logits, attn, stats = gate_batchnorm(pooled, weight, bias, bn_weight, bn_bias, eps, dilation, running)
        return gate_forward(x, attn, scale), attn, logits, pooled, stats
    y, attn, logits, pooled, x, s, cl, (th, nb, tw), part = _band_forward_launch(
        x, weight, bias, scale, None, None, kinds, dilation, True)
    n, c, h, w = x.shape
    stats = torch.empty(2, dtype=torch.float64, device=x.device)
    mbc, mbp = _MUL_TILE[cl]
    stat, rows = _folded(part, n * nb, 3, stats=True)
    run_args, run_meta = _running_args(running, n * h * w, part)
    _sam_band_bn_kernel[(n * nb,)](
        x, s if s is not None else x, logits, stat, rows, bn_weight if bn_weight is not None else part,
        bn_bias if bn_bias is not None else part, float(eps), attn, stats, *run_args, y, c, h, w, th, tw, nb,
        HAS_S=s is not None, HAS_G=bn_weight is not None, HAS_BETA=bn_bias is not None, **run_meta, W_DIV=_pow2_div(w),
        TW_DIV=_pow2_div(tw), BPG=_BP_SMALL, BR=_BP_SMALL, MBC=mbc, MBP=mbp, **_meta(c, h * w, cl))
    return y, attn, logits, pooled, stats


def _grad_like(grad: Tensor, x: Tensor, cl: bool) -> Tensor:
    return grad.to(x.dtype).contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


def _reduce_partials(grad: Optional[Tensor], x: Tensor, scale: Optional[Tensor], mx: Optional[Tensor],
                     max_index: bool) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], int]:
    """Pass A's kernel: ``(ga, cnt, ix, chunks)``, each ``[N, chunks, H, W]`` (partial results
    over ``chunks`` runs of channels; see :func:`reduce`). ``mx``: ``[N, 1, H, W]`` float32, any
    image stride (a slot of the pooled maps)."""
    x, cl = _layout(x)
    n, c, h, w = x.shape
    hw = h * w
    s = _flat_scale(scale, x)
    g = None if grad is None else _grad_like(grad, x, cl)
    tiles = n * _cdiv(hw, _BP)
    c_per, chunks = _split(c, _BC, tiles, _target_programs(x)) if n * hw > 0 else (_BC, 1)

    def buf(want: bool, dtype: torch.dtype) -> Optional[Tensor]:
        return torch.empty((n, chunks, h, w), dtype=dtype, device=x.device) if want else None

    ga = buf(g is not None, torch.float32)
    cnt = buf(mx is not None, torch.float32)
    ix = buf(mx is not None and max_index, torch.int32)
    mxc, mxs = _image_map(mx)
    if n * hw > 0:
        _reduce_kernel[(tiles, chunks)](x, s if s is not None else x, g if g is not None else x,
                                        mxc if mxc is not None else x, ga if ga is not None else x,
                                        cnt if cnt is not None else x, ix if ix is not None else x, c, hw, c_per,
                                        mxs, HAS_S=s is not None, HAS_G=g is not None, HAS_MAX=mx is not None,
                                        HAS_IX=ix is not None, BC=_BC, BP=_BP, **_meta(c, hw, cl))
    elif ga is not None:
        ga.zero_()
    return ga, cnt, ix, chunks


def _image_map(m: Optional[Tensor]) -> Tuple[Optional[Tensor], int]:
    """``(m, image stride)`` for a ``[N, 1, H, W]`` float32 map read as ``m[n * stride + p]``:
    a slot of ``[N, P, H, W]`` maps is used in place (no copy) when its pixels are dense."""
    if m is None:
        return None, 0
    m = m.to(torch.float32)
    n, _, h, w = m.shape
    if not (m.stride(3) == 1 and (m.stride(2) == w or h == 1)):
        m = m.contiguous()
    return m, (m.stride(0) if n > 1 else h * w)


def reduce(grad: Optional[Tensor], x: Tensor, scale: Optional[Tensor], mx: Optional[Tensor], max_index: bool = False):
    """``(sum_c grad * x'  [N, 1, H, W] float32 or None, tie counts [N, 1, H, W] or None, max
    channel [N, 1, H, W] int32 or None)``; the max channel (the last one where ``x' == mx``,
    -1 if none) with ``max_index`` and ``mx``, for :func:`gradx` to skip reading ``x``."""
    ga, cnt, ix, chunks = _reduce_partials(grad, x, scale, mx, max_index)
    if chunks > 1:
        ga = None if ga is None else ga.sum(dim=1, keepdim=True)
        cnt = None if cnt is None else cnt.sum(dim=1, keepdim=True)
        ix = None if ix is None else ix.amax(dim=1, keepdim=True)
    return ga, cnt, ix


def _kind_sum(t: Tensor, kinds: Sequence[int], kind: int) -> Optional[Tensor]:
    out = None
    for i, k in enumerate(kinds):
        if k == kind:
            out = t[:, i : i + 1] if out is None else out + t[:, i : i + 1]
    return out


def _sum_rows(part: Tensor) -> Tensor:
    """``part.sum(dim=0)`` of float32 partial rows ``[R, ...]``, the rows added in order (one launch)."""
    part = part.contiguous()
    m = part[0].numel()
    out = torch.empty(part.shape[1:], device=part.device, dtype=torch.float32)
    _sum_rows_kernel[(_cdiv(m, _BP_SMALL),)](part, out, part.shape[0], m, BM=_BP_SMALL,
                                             num_warps=_NUM_WARPS)
    return out


def gradx(grad: Optional[Tensor], x: Tensor, scale: Optional[Tensor], attn: Optional[Tensor],
          pooled: Optional[Tensor], gpooled: Optional[Tensor], kinds: Sequence[int], cnt: Optional[Tensor],
          need_gs: bool = True, max_index: Optional[Tensor] = None):
    """``(grad_x, grad_scale [N, C, 1, 1] float32 or None)``; ``gpooled`` is the gradient of the pooled maps;
    ``max_index``: :func:`reduce`'s max channels (then ``x`` is read only where maxima tie, unless
    the scale gradient needs it)."""
    c = x.shape[1]
    mx = fmax = fmean = None
    if gpooled is not None:
        gmax, gmean = _kind_sum(gpooled, kinds, 0), _kind_sum(gpooled, kinds, 1)
        if gmax is not None:
            mx = pooled[:, kinds.index(0) : kinds.index(0) + 1]
            fmax = (gmax.to(torch.float32) / cnt).contiguous()
        if gmean is not None:
            fmean = (gmean.to(torch.float32) / c).contiguous()
    return _gradx_run(grad, x, scale, attn, mx, fmax, fmean, cnt, max_index, need_gs)


def _gradx_run(grad: Optional[Tensor], x: Tensor, scale: Optional[Tensor], attn: Optional[Tensor],
               mx: Optional[Tensor], fmax: Optional[Tensor], fmean: Optional[Tensor], cnt: Optional[Tensor],
               max_index: Optional[Tensor], need_gs: bool):
    """The gradient pass given the per-pixel maps ``[N, 1, H, W]`` float32: ``mx`` (the pooled
    max, any image stride), ``fmax`` (its gradient over the tie count), ``fmean`` (the mean's
    gradient over C); see :func:`gradx`."""
    x, cl = _layout(x)
    n, c, h, w = x.shape
    hw = h * w
    s = _flat_scale(scale, x)
    g = None if grad is None else _grad_like(grad, x, cl)
    a = None if attn is None else attn.expand(n, 1, h, w).contiguous()
    mx, mxs = _image_map(mx)
    gx = torch.empty_like(x)
    need_gs = need_gs and s is not None
    gs = None
    use_ix = max_index is not None and mx is not None and not need_gs
    if x.numel() > 0:
        cblocks = _cdiv(c, _BC)
        per_prog, chunks = _split(hw, _BP, n * cblocks, _target_programs(x))
        if need_gs:
            gs = torch.empty((chunks, n, c), dtype=torch.float32, device=x.device)
        dummy = x
        _gradx_kernel[(n, cblocks, chunks)](
            x, s if s is not None else dummy, g if g is not None else dummy, a if a is not None else dummy,
            mx if mx is not None else dummy, fmax if fmax is not None else dummy,
            fmean if fmean is not None else dummy, gx, gs if gs is not None else dummy,
            cnt if use_ix else dummy, max_index if use_ix else dummy, c, hw, per_prog, mxs,
            HAS_S=s is not None, HAS_G=g is not None, HAS_MAX=mx is not None, HAS_MEAN=fmean is not None,
            NEED_GS=need_gs, USE_IX=use_ix, BC=_BC, BP=_BP, **_meta(c, hw, cl))
    if need_gs:
        if gs is None:  # nothing to sum: no pixels or no images
            gs = torch.zeros((n, c), dtype=torch.float32, device=x.device)
        else:
            gs = gs[0] if gs.shape[0] == 1 else _sum_rows(gs)
    return gx, (None if gs is None else gs.reshape(n, c, 1, 1))


def sam_backward(grad_y: Optional[Tensor], grad_attn: Optional[Tensor], x: Tensor, scale: Optional[Tensor],
                 weight: Tensor, norm_scale: Optional[Tensor], attn: Tensor, logits: Tensor, pooled: Tensor,
                 kinds: Sequence[int], dilation: int, need_gs: bool = True, bn_stats: Optional[Tensor] = None,
                 bn_weight: Optional[Tensor] = None, bn_eps: float = 0.0):
    """Backward of the sigmoid-gated SAM (:func:`pool_forward`, :func:`gate`,
    :func:`gate_forward`) in four kernels and one sum: pass A over ``x``, the sigmoid / norm
    backward and the conv backward on the small maps, the gradient pass over ``x``, and the
    sum of the per-program partial parameter gradients.

    Returns ``(grad_x, grad_scale [N, C, 1, 1] float32 or None, grad_weight [1, P, kh, kw],
    grad_bias [1], grad_norm_scale [1] or None, grad_norm_shift [1] or None)``, the small ones
    in float32. ``grad_y``: like ``x``; ``grad_attn``: ``[N, 1, H, W]`` or None; ``attn``,
    ``logits``: float32 ``[N, 1, H, W]``; ``pooled``: float32 ``[N, P, H, W]``.

    With ``bn_stats`` (:func:`gate_batchnorm`'s ``[mean, var]``) the norm is a training-mode
    BatchNorm (weight ``bn_weight``, ``bn_eps``) instead of the affine ``norm_scale``; the last
    two gradients are then those of the BatchNorm's weight and bias (float64 sums, as the
    PyTorch formula).
    """
    kinds = list(kinds)
    if _BAND_BACKWARD and x.numel() > 0:
        return _sam_band_backward(grad_y, grad_attn, x, scale, weight, norm_scale, attn, logits, pooled, kinds,
                                  dilation, need_gs, bn_stats, bn_weight, bn_eps)
    n, c, h, w = x.shape
    hw = h * w
    np_, kh, kw = len(kinds), weight.shape[-2], weight.shape[-1]
    i_max = kinds.index(0) if 0 in kinds else -1
    mx = pooled[:, i_max : i_max + 1] if i_max >= 0 else None
    need_gs = need_gs and scale is not None
    # pass A records the max channels unless the scale gradient needs x read anyway
    ga, cntp, ixp, chunks = _reduce_partials(grad_y, x, scale, mx, max_index=not need_gs)
    dev = x.device
    programs = n * _cdiv(hw, _BP_SMALL)
    ntaps = np_ * kh * kw
    npart = ntaps + 3
    bn = bn_stats is not None
    # every element is written by the kernels below (zeros where there is nothing to add)
    part = (torch.empty if programs > 0 else torch.zeros)((max(programs, 1), npart),
                                                          dtype=torch.float64 if bn else torch.float32, device=dev)
    dz = torch.empty((n, 1, h, w), dtype=torch.float32, device=dev)
    cnt = torch.empty_like(dz) if cntp is not None else None
    ix = torch.empty((n, 1, h, w), dtype=torch.int32, device=dev) if ixp is not None else None
    mean_slots = _mean_slots(kinds)
    fmax = torch.empty_like(dz) if mx is not None else None
    fmean = torch.empty_like(dz) if mean_slots else None
    wt = weight.to(torch.float32).contiguous()
    if programs > 0:
        gattn = None if grad_attn is None else grad_attn.reshape(n, 1, h, w).contiguous()
        has_norm = norm_scale is not None
        _gate_backward_kernel[(programs,)](
            ga, cntp if cntp is not None else ga, ixp if ixp is not None else ga,
            gattn if gattn is not None else ga, attn.contiguous(), logits.contiguous(),
            norm_scale if has_norm else ga, dz, cnt if cnt is not None else ga, ix if ix is not None else ga, part,
            bn_stats if bn else part, float(bn_eps), hw, chunks, npart, ntaps, HAS_GATTN=gattn is not None,
            HAS_MAX=cnt is not None, HAS_IX=ix is not None, HAS_NORM=has_norm, BN=bn, BP=_BP_SMALL,
            num_warps=_NUM_WARPS)
        # the batch sums of dz and dz * xhat: part's columns ntaps + 1 and + 2 (or their fold)
        bsum, rows = _folded(part.view(-1)[ntaps + 1:], programs, npart, stats=False) if bn else (part, programs)
        _conv_backward_kernel[(programs,)](
            dz, pooled.contiguous(), wt, cnt if cnt is not None else dz, fmax if fmax is not None else dz,
            fmean if fmean is not None else dz, part, logits.contiguous(), bn_stats if bn else part,
            bn_weight if bn_weight is not None else wt, float(bn_eps), bsum, npart, rows, c, h, w, npart, P=np_, KH=kh,
            KW=kw, DIL=dilation, MEAN_SLOTS=mean_slots, HAS_MAX=fmax is not None, HAS_MEAN=fmean is not None, BN=bn,
            HAS_G=bn and bn_weight is not None, BP=_BP_SMALL, num_warps=_NUM_WARPS)
    gw, gb, gns, gnsh = _parameter_grads(part, weight.shape, norm_scale is not None or bn)
    gx, gs = _gradx_run(grad_y, x, scale, attn, mx, fmax, fmean, cnt, ix, need_gs)
    return gx, gs, gw, gb, gns, gnsh


def _parameter_grads(part: Tensor, weight_shape, norm: bool):
    """``(grad_weight [1, P, kh, kw], grad_bias [1], grad_norm_scale [1] or None,
    grad_norm_shift [1] or None)``, float32: the columns of the partial sums ``part`` [R, P *
    kh * kw + 3] (the taps, bias, norm shift, norm scale) each summed over its rows in a fixed
    order, in one launch (the norm's two columns only where ``norm``)."""
    dev = part.device
    ntaps = weight_shape[1] * weight_shape[2] * weight_shape[3]
    gw = torch.empty((1,) + tuple(weight_shape[1:]), dtype=torch.float32, device=dev)
    gb = torch.empty(1, dtype=torch.float32, device=dev)
    if norm:
        gnsh, gns = torch.empty(1, dtype=torch.float32, device=dev), torch.empty(1, dtype=torch.float32, device=dev)
    else:  # no norm: its two columns are not summed (and gb stands in for their outputs, unwritten)
        gnsh = gns = gb
    _column_sums_kernel[(ntaps + 3 if norm else ntaps + 1,)](part, gw, gb, gnsh, gns, part.shape[0], part.shape[1],
                                                             ntaps, BR=_BP_SMALL, num_warps=_NUM_WARPS)
    return gw, gb, (gns if norm else None), (gnsh if norm else None)


def _sam_band_backward(grad_y: Optional[Tensor], grad_attn: Optional[Tensor], x: Tensor, scale: Optional[Tensor],
                       weight: Tensor, norm_scale: Optional[Tensor], attn: Tensor, logits: Tensor, pooled: Tensor,
                       kinds: List[int], dilation: int, need_gs: bool, bn_stats: Optional[Tensor] = None,
                       bn_weight: Optional[Tensor] = None, bn_eps: float = 0.0):
    """:func:`sam_backward` in one launch (``_sam_band_backward_kernel``, a program per band of
    rows), two with a training BatchNorm (``bn_stats``: its batch sums need every band's pass A
    first), and one or two sums (the parameter gradients' partial rows; the scale gradient's,
    over the bands); the same returns. With the BatchNorm the batch sums are combined from
    partials per band instead of per tile, so d logits, and through them ``grad_x``, may differ
    from the default launches' in the last bits."""
    x, cl = _layout(x)
    n, c, h, w = x.shape
    np_, kh, kw = len(kinds), weight.shape[-2], weight.shape[-1]
    dev = x.device
    th, nb, tw, sr = _band_geometry(n, h, w, dilation * (kh // 2), x)
    tpb = _cdiv(tw, _BP_SMALL)  # tiles of the conv backward per band: rows of partial sums
    ntaps = np_ * kh * kw
    npart = ntaps + 3
    s = _flat_scale(scale, x)
    need_gs = need_gs and s is not None
    g = None if grad_y is None else _grad_like(grad_y, x, cl)
    gattn = None if grad_attn is None else grad_attn.reshape(n, 1, h, w).contiguous()
    has_norm = norm_scale is not None
    bn = bn_stats is not None
    part = torch.empty((n * nb * tpb, npart), dtype=torch.float64 if bn else torch.float32, device=dev)
    scratch = torch.empty(n * nb * 4 * sr * w, dtype=torch.float32, device=dev)
    gs = torch.empty((nb, n, c), dtype=torch.float32, device=dev) if need_gs else None
    gx = torch.empty_like(x)
    wt = weight.to(torch.float32).contiguous()
    i_max = kinds.index(0) if 0 in kinds else -1
    dz = torch.empty((n, 1, h, w), dtype=torch.float32, device=dev) if bn else None
    cnt = torch.empty_like(dz) if bn and i_max >= 0 else None
    bns = torch.empty((n * nb, 2), dtype=torch.float64, device=dev) if bn else None
    dummy = x
    args = (x, s if s is not None else dummy, g if g is not None else dummy, gattn if gattn is not None else dummy,
            attn.contiguous(), logits.contiguous(), pooled.contiguous(), wt, norm_scale if has_norm else wt, gx,
            gs if gs is not None else dummy, part, scratch, dz if bn else part, cnt if cnt is not None else part,
            bn_stats if bn else part, bn_weight if bn_weight is not None else wt)
    meta = dict(P=np_, MEAN_SLOTS=_mean_slots(kinds), I_MAX=i_max, KH=kh, KW=kw, DIL=dilation, HAS_S=s is not None,
                HAS_G=g is not None, HAS_GATTN=gattn is not None, HAS_NORM=has_norm, NEED_GS=need_gs,
                HAS_BNW=bn and bn_weight is not None, W_DIV=_pow2_div(w), TW_DIV=_pow2_div(tw), BC=_BC, BP=_BP,
                BPG=_BP_SMALL, **_meta(c, h * w, cl))

    def launch(phase: int, bsum: Tensor, rows: int) -> None:  # bsum: the [rows, 2] batch sums phase 2 reads
        _sam_band_backward_kernel[(n * nb,)](*args, bsum, float(bn_eps), rows, c, h, w, th, tw, nb, sr, npart, tpb,
                                             BN_PHASE=phase, **meta)

    if bn:
        launch(1, bns, n * nb)
        launch(2, *_folded(bns, n * nb, 2, stats=False))
    else:
        launch(0, part, n * nb)
    gw, gb, gns, gnsh = _parameter_grads(part, weight.shape, has_norm or bn)
    if gs is not None:
        gs = (gs[0] if nb == 1 else _sum_rows(gs)).reshape(n, c, 1, 1)
    return gx, gs, gw, gb, gns, gnsh


def pool_backward(grad: Tensor, x: Tensor, scale: Optional[Tensor], pooled: Tensor, kinds: Sequence[int]):
    kinds = list(kinds)
    mx = pooled[:, kinds.index(0) : kinds.index(0) + 1] if 0 in kinds else None
    _, cnt, ix = reduce(None, x, scale, mx, max_index=scale is None)
    return gradx(None, x, scale, None, pooled, grad, kinds, cnt, max_index=ix)


def gate_backward(grad: Tensor, x: Tensor, attn: Tensor, scale: Optional[Tensor]):
    ga, _, _ = reduce(grad, x, scale, None)
    gx, gs = gradx(grad, x, scale, attn, None, None, [], None)
    return gx, ga, gs


def global_pool_forward(x: Tensor, kinds: Sequence[int], dtype: torch.dtype, count: bool = False
                        ) -> Tuple[Tensor, Optional[Tensor]]:
    """CBAM channel-gate pooling: max / mean over ``H, W`` in one read, ``[len(kinds), N, C]`` in
    ``dtype``; with ``count`` (and a max among ``kinds``) also the number of pixels equal to
    each max, ``[N, C]`` float32, for :func:`global_pool_backward` (else None)."""
    x, cl = _layout(x)
    n, c, h, w = x.shape
    hw = h * w
    kinds = list(kinds)
    out = torch.empty((len(kinds), n, c), dtype=dtype, device=x.device)
    count = count and 0 in kinds
    counts = torch.empty((n, c), dtype=torch.float32, device=x.device) if count else None
    if out.numel() == 0:
        return out, counts
    i_max = kinds.index(0) if 0 in kinds else -1
    i_mean = kinds.index(1) if 1 in kinds else -1
    cblocks = _cdiv(c, _BC)
    p_per, chunks = _split(hw, _BP, n * cblocks, _target_programs(x))
    part = torch.empty((chunks, 3, n, c), dtype=torch.float32, device=x.device) if chunks > 1 else None
    _gpool_kernel[(n, cblocks, chunks)](x, out if part is None else part, counts if counts is not None else x,
                                        n * c, c, hw, p_per, I_MAX=i_max, I_MEAN=i_mean, COUNT=count,
                                        PARTIAL=part is not None, BC=_BC, BP=_BP, **_meta(c, hw, cl))
    if part is not None:
        nc = n * c
        _gpool_combine_kernel[(_cdiv(nc, _BP_SMALL),)](part, out, counts if counts is not None else part, nc,
                                                       chunks, hw, I_MAX=i_max, I_MEAN=i_mean, COUNT=count,
                                                       BLOCK=_BP_SMALL, num_warps=_NUM_WARPS)
    for i, k in enumerate(kinds):
        src = i_max if k == 0 else i_mean
        if src != i:
            out[i].copy_(out[src])
    return out, counts


def global_pool_backward(grad: Tensor, x: Tensor, out: Tensor, kinds: Sequence[int],
                         into: Optional[Tensor] = None, counts: Optional[Tensor] = None) -> Tensor:
    """Gradient w.r.t. ``x`` of :func:`global_pool_forward` (ties share the max gradient evenly);
    ``counts``: the forward's tie counts (counted here, one more read of ``x``, if None); with
    ``into`` (dtype and strides of the dense ``x``), added to it in place and returned."""
    x, cl = _layout(x)
    n, c, h, w = x.shape
    hw = h * w
    kinds = list(kinds)
    if into is not None and (into.shape != x.shape or into.stride() != x.stride() or into.dtype != x.dtype):
        raise ValueError("global_pool_backward: into= must have the shape, strides and dtype of x")
    gx = torch.empty_like(x) if into is None else into
    if x.numel() == 0:
        return gx
    grad = grad.to(torch.float32)
    if len(set(kinds)) < len(kinds):  # a kind in several slots: their gradients summed first (torch)
        g2 = grad.movedim(0, 1)
        sums = [_kind_sum(g2, kinds, k) for k in (0, 1)]
        grad = torch.cat([t for t in sums if t is not None], dim=1).movedim(1, 0)
        uniq = [k for k in (0, 1) if k in kinds]
    else:
        uniq = kinds
    grad = grad.contiguous()
    i_max = uniq.index(0) if 0 in uniq else -1
    i_mean = uniq.index(1) if 1 in uniq else -1
    mx = None
    if i_max >= 0:
        mx = out[kinds.index(0)].to(torch.float32).contiguous()
        if counts is None:
            counts = global_pool_forward(x, [0], torch.float32, count=True)[1]
    cblocks = _cdiv(c, _BC)
    p_per, chunks = _split(hw, _BP, n * cblocks, _target_programs(x))
    dummy = gx
    _gpool_backward_kernel[(n, cblocks, chunks)](
        x, mx if mx is not None else dummy, grad, counts.reshape(n, c).contiguous() if mx is not None else dummy, gx,
        n, c, hw, p_per,
        I_MAX=i_max, I_MEAN=i_mean, ACC=into is not None, BC=_BC, BP=_BP, **_meta(c, hw, cl))
    return gx


# ------------------------------------------------------------------ CBAM channel MLP gate

_MLP_MAX_R = 256  # hidden widths above this take the torch decomposition
_MLP_TILE = 2048  # elements of a [BR, BC] weight tile (16 float32 registers a thread at 4 warps)


def mlp_supported(pooled: Tensor, w1: Tensor, w2: Optional[Tensor]) -> bool:
    """True where :func:`mlp_gate_forward` takes these tensors: float32, two layers, R <= 256."""
    return w2 is not None and pooled.dtype == torch.float32 and w1.shape[0] <= _MLP_MAX_R


def _mlp_tiles(r: int) -> Tuple[int, int]:
    br = max(2, triton.next_power_of_2(r))
    return br, max(16, _MLP_TILE // br)


def mlp_gate_forward(pooled: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor]
                     ) -> Tuple[Tensor, Tensor]:
    """``(gate [N, C], hidden [P, N, R])`` of :func:`spatialattn.ops.reference.channel_mlp_gate`
    (two layers, float32), one launch: a program per image."""
    p, n, c = pooled.shape
    r = w1.shape[0]
    pooled, w1, w2 = pooled.contiguous(), w1.contiguous(), w2.contiguous()
    gate = torch.empty(n, c, device=pooled.device, dtype=torch.float32)
    hidden = torch.empty(p, n, r, device=pooled.device, dtype=torch.float32)
    if n * c == 0:
        return gate, hidden
    br, bc = _mlp_tiles(r)
    _mlp_gate_kernel[(n,)](pooled, w1, b1 if b1 is not None else w1, w2, b2 if b2 is not None else w2, hidden,
                           gate, p, n, c, r, HAS_B1=b1 is not None, HAS_B2=b2 is not None, BR=br, BC=bc,
                           num_warps=_NUM_WARPS)
    return gate, hidden


def mlp_gate_backward(grad: Tensor, gate: Tensor, pooled: Tensor, w1: Tensor, w2: Tensor, hidden: Tensor,
                      needs: Sequence[bool]) -> Tuple[Optional[Tensor], ...]:
    """Gradients ``(pooled, w1, b1, w2, b2)`` of :func:`mlp_gate_forward` (None where ``needs``
    is false): a launch per image for the gradient w.r.t. the pooled maps, then one program
    per channel tile for the parameters' (sums over the batch in order, no atomics)."""
    p, n, c = pooled.shape
    r = w1.shape[0]
    dev = pooled.device
    grad = grad.to(torch.float32).contiguous()
    pooled, w1, w2 = pooled.contiguous(), w1.contiguous(), w2.contiguous()
    gv = torch.empty(p, n, c, device=dev, dtype=torch.float32) if needs[0] else None
    gw1 = torch.empty(r, c, device=dev, dtype=torch.float32)
    gw2 = torch.empty(c, r, device=dev, dtype=torch.float32)
    gb1 = torch.empty(r, device=dev, dtype=torch.float32) if needs[2] else None
    gb2 = torch.empty(c, device=dev, dtype=torch.float32) if needs[4] else None
    if n * c == 0:
        for t in (gw1, gw2, gb1, gb2):
            if t is not None:
                t.zero_()
        return gv, gw1 if needs[1] else None, gb1, gw2 if needs[3] else None, gb2
    dh = torch.empty(p, n, r, device=dev, dtype=torch.float32)
    br, bc = _mlp_tiles(r)
    _mlp_gate_backward_kernel[(n,)](grad, gate, pooled, w1, w2, hidden, dh, gv if gv is not None else dh, p, n, c,
                                    r, NEED_GV=gv is not None, BR=br, BC=bc, num_warps=_NUM_WARPS)
    if any(needs[1:]):
        _mlp_weight_grads_kernel[(_cdiv(c, bc),)](
            grad, gate, pooled, hidden, dh, gw1, gb1 if gb1 is not None else gw1, gw2, gb2 if gb2 is not None else gw2,
            p, n, c, r, HAS_B1=gb1 is not None, HAS_B2=gb2 is not None, BR=br, BC=bc, num_warps=_NUM_WARPS)
    return gv, gw1 if needs[1] else None, gb1, gw2 if needs[3] else None, gb2
