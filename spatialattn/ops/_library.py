"""``torch.library`` custom ops (namespace ``spatialattn``) for the fused kernels.

Each op has a fake (meta) implementation and an autograd formula, so eager
autograd, ``torch.compile(fullgraph=True)`` and ``torch.export`` see one opaque
node per primitive. The real implementation picks a backend by device / dtype /
layout:

* CPU, float32 / float64 / float16 / bfloat16, NCHW- or channels_last-contiguous: the
  C++ kernels of :mod:`spatialattn.ops._cpp` (other layouts are made contiguous first;
  half inputs are computed in float32, small maps returned in float32);
* CUDA with Triton importable: :mod:`spatialattn.ops._triton`;
* anything else: plain PyTorch (the same formulas as :mod:`.reference` / :mod:`.lean`).

Pooling kinds are passed as ints: 0 = max, 1 = mean.
"""
from __future__ import annotations

import contextlib
import functools

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

from . import _cpp

KIND = {"max": 0, "mean": 1}
_EMPTY_SHAPE = (0,)


# ------------------------------------------------------------------ backend choice
_CPP_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _cpp_ok(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in _CPP_DTYPES and _cpp.get() is not None


def _dense(x: Tensor) -> Tensor:
    """``x`` if NCHW- or channels_last-contiguous, else an NCHW-contiguous copy.

    Every backend (C++, Triton, plain PyTorch) computes on ``_dense(x)`` and returns its
    full-size results in that layout, and the fake implementations below say so: a compiled
    graph (Inductor checks the strides of a custom op's outputs) then gets what it was told,
    also for a dense ``x`` in neither layout (say ``x.transpose(2, 3)``)."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def _small_grad(g: Tensor, like: Tensor) -> Tensor:
    """The gradient ``g`` of a small input (a weight, a channel scale, an attention map, a norm
    parameter) as every backend's op returns it: in ``like``'s dtype and shape, contiguous
    whatever ``like``'s strides. :func:`_fake_small_grad` says the same to a compiled graph; a
    fake ``empty_like(like)`` did not where ``like`` had other strides (the 7x7 weight of a
    ``model.to(memory_format=torch.channels_last)``: Inductor's stride check failed)."""
    return g.to(like.dtype).reshape(like.shape).contiguous()


def _fake_small_grad(like: Tensor) -> Tensor:
    return like.new_empty(like.shape)


def _saved_maps(*maps: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """The small maps a backward op takes from its forward (``attn``, ``logits``, ``pooled``,
    ``stats``, an upstream ``grad_attn``), NCHW-contiguous as the forward made them: the kernels
    index them so. A compiled graph may hand them over in another layout (torch 2.7's Inductor
    gave ``pooled`` channels_last strides, and the gradients were wrong); a copy then, else the
    tensor itself."""
    return tuple(None if t is None else t.contiguous() for t in maps)


def _in_layout(t: Tensor, like: Tensor) -> Tensor:
    """``t`` (shaped like ``like``) with ``like``'s strides: ``t`` itself where they already
    match, else a copy. For the plain-PyTorch branches, whose elementwise results follow the
    layouts of all their operands (an upstream gradient in the other layout, a broadcast)."""
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like, dtype=t.dtype).copy_(t)


def _triton_ok(x: Tensor) -> bool:
    if x.device.type != "cuda" or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    from . import _triton

    return _triton.available()


def device_type(t: Tensor) -> str:
    """``t.device.type`` (``"cpu"`` / ``"cuda"`` / ...) without building a ``torch.device``
    (0.05 us instead of 0.3 us: asked several times per attention layer)."""
    return "cpu" if t.is_cpu else "cuda" if t.is_cuda else t.device.type


def autocast_off(device_type: str):
    """``torch.autocast(device_type, enabled=False)`` where autocast is on, else a no-op context
    (entering and leaving a disabled autocast context costs about 3.5 us, the check 0.6 us:
    a visible share of an attention layer on small maps). Devices without autocast (``meta``:
    shape inference, deferred initialisation) get the no-op context: asking them raises."""
    if device_type not in ("cpu", "cuda") and not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _none_if_empty(t: Tensor) -> Optional[Tensor]:
    return None if t.numel() == 0 and t.dim() == 1 else t


# ------------------------------------------------------------------ plain PyTorch formulas
def _scaled(x: Tensor, scale: Optional[Tensor]) -> Tensor:
    return x if scale is None else x * scale.to(x.dtype)


def _pool_torch(x: Tensor, scale: Optional[Tensor], kinds: Sequence[int], dtype: torch.dtype) -> Tensor:
    """The pooled maps ``[N, P, H, W]``, NCHW-contiguous as the kernels return them."""
    xs = _scaled(x, scale)
    maps = [xs.amax(dim=1, keepdim=True).to(dtype) if k == 0 else xs.mean(dim=1, keepdim=True, dtype=dtype)
            for k in kinds]
    return torch.cat(maps, dim=1).contiguous()


def _kind_sum(gpooled: Tensor, kinds: Sequence[int], kind: int) -> Optional[Tensor]:
    out = None
    for i, k in enumerate(kinds):
        if k == kind:
            out = gpooled[:, i : i + 1] if out is None else out + gpooled[:, i : i + 1]
    return out


def _kind_value(pooled: Tensor, kinds: Sequence[int], kind: int) -> Optional[Tensor]:
    for i, k in enumerate(kinds):
        if k == kind:
            return pooled[:, i : i + 1]
    return None


def _pool_grad_xs_torch(gpooled: Tensor, xs: Tensor, pooled: Tensor, kinds: Sequence[int]) -> Tensor:
    """Gradient w.r.t. ``x' = x * scale`` of the channel pooling (amax: ties share evenly)."""
    gmax, gmean = _kind_sum(gpooled, kinds, 0), _kind_sum(gpooled, kinds, 1)
    out = None
    if gmax is not None:
        mask = xs == _kind_value(pooled, kinds, 0).to(xs.dtype)
        count = mask.sum(dim=1, keepdim=True, dtype=gmax.dtype)
        out = mask.to(gmax.dtype) * (gmax / count)
    if gmean is not None:
        part = (gmean / xs.shape[1]).expand(xs.shape)
        out = part if out is None else out + part
    return out.to(xs.dtype)


def _sum_nc(t: Tensor, like: Tensor) -> Tensor:
    return t.sum(dim=(2, 3), keepdim=True, dtype=like.dtype)


# ------------------------------------------------------------------ full-size passes off the C++ path
# Triton on CUDA, plain PyTorch elsewhere; used by the generic branches of the SAM ops.
def _generic_pool(x: Tensor, scale: Optional[Tensor], kinds: Sequence[int], acc: torch.dtype) -> Tensor:
    if _triton_ok(x):
        from . import _triton

        return _triton.pool_forward(x, scale, kinds, acc)
    return _pool_torch(x, scale, kinds, acc)


def _generic_multiply(x: Tensor, attn: Tensor, scale: Optional[Tensor]) -> Tensor:
    """``(x * scale) * attn`` for a dense ``x``, in ``x``'s layout."""
    if _triton_ok(x):
        from . import _triton

        return _triton.gate_forward(x, attn, scale)
    return _in_layout(_scaled(x, scale) * attn.to(x.dtype), x)


def _reduce_torch(grad_y: Tensor, x: Tensor, scale: Optional[Tensor], acc: torch.dtype) -> Tensor:
    """``sum_c grad_y * x'``, ``[N, 1, H, W]`` in ``acc`` (plain PyTorch; the Triton path has
    :func:`_triton.sam_backward`)."""
    return (grad_y * _scaled(x, scale)).sum(dim=1, keepdim=True, dtype=acc)


def _gradx_torch(grad_y: Tensor, x: Tensor, scale: Optional[Tensor], attn: Tensor, pooled: Tensor, gp: Tensor,
                 kinds: Sequence[int], need_gs: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """``(grad_x, grad_scale or None)`` given the gradient ``gp`` of the pooled maps (plain
    PyTorch; ``grad_x`` in the layout of the dense ``x``)."""
    xs = _scaled(x, scale)
    gxs = (grad_y * attn.to(x.dtype)).to(x.dtype) + _pool_grad_xs_torch(gp, xs, pooled, kinds)
    gx = gxs if scale is None else gxs * scale.to(x.dtype)
    gs = _sum_nc(gxs * x, scale) if scale is not None and need_gs else None
    return _in_layout(gx, x), gs


def _conv_backward(dl: Tensor, pooled: Tensor, weight: Tensor, dilation: int) -> Tuple[Tensor, Tensor]:
    """Gradients of the pooled maps and of the conv weight, given d logits (small maps)."""
    kh, kw = weight.shape[-2:]
    gp, gw, _ = torch.ops.aten.convolution_backward(
        dl, pooled, weight.to(dl.dtype), None, [1, 1], [dilation * (kh // 2), dilation * (kw // 2)],
        [dilation, dilation], False, [0, 0], 1, [True, True, False],
    )
    return gp, gw


# ------------------------------------------------------------------ channel_pool
@torch.library.custom_op("spatialattn::channel_pool", mutates_args=())
def channel_pool_op(x: Tensor, scale: Optional[Tensor], kinds: List[int], dtype: torch.dtype) -> Tensor:
    """``Tensor[N, C, H, W] -> Tensor[N, len(kinds), H, W]`` (dtype ``dtype``): max / mean of ``x * scale``."""
    x = _dense(x)
    if _cpp_ok(x) and dtype == _acc(x):
        return _cpp.get().pool_forward(x, scale, list(kinds))
    return _generic_pool(x, scale, kinds, dtype)


@channel_pool_op.register_fake
def _(x, scale, kinds, dtype):
    return x.new_empty((x.shape[0], len(kinds), x.shape[2], x.shape[3]), dtype=dtype)


@torch.library.custom_op("spatialattn::channel_pool_backward", mutates_args=())
def channel_pool_backward_op(
    grad: Tensor, x: Tensor, scale: Optional[Tensor], pooled: Tensor, kinds: List[int]
) -> Tuple[Tensor, Tensor]:
    """Returns ``(grad_x, grad_scale)``; ``grad_scale`` is an empty ``[0]`` tensor without a scale."""
    x = _dense(x)
    (pooled,) = _saved_maps(pooled)
    if _cpp_ok(x):
        gx, gs = _cpp.get().pool_backward(grad, x, scale, pooled, list(kinds), scale is not None)
    elif _triton_ok(x):
        from . import _triton

        gx, gs = _triton.pool_backward(grad, x, scale, pooled, kinds)
    else:
        gxs = _pool_grad_xs_torch(grad, _scaled(x, scale), pooled, kinds)
        gx = _in_layout(gxs if scale is None else gxs * scale.to(x.dtype), x)
        gs = None if scale is None else _sum_nc(gxs * x, scale)
    gs = x.new_empty(_EMPTY_SHAPE) if gs is None else _small_grad(gs, scale)
    return gx, gs


@channel_pool_backward_op.register_fake
def _(grad, x, scale, pooled, kinds):
    gs = x.new_empty(_EMPTY_SHAPE) if scale is None else _fake_small_grad(scale)
    return torch.empty_like(_dense(x)), gs


def _pool_setup(ctx, inputs, output):
    x, scale, kinds, _ = inputs
    ctx.kinds = list(kinds)
    ctx.save_for_backward(x, scale, output)


def _pool_backward(ctx, grad):
    x, scale, pooled = ctx.saved_tensors
    gx, gs = channel_pool_backward_op(grad, x, scale, pooled, ctx.kinds)
    return gx, (gs if scale is not None else None), None, None


channel_pool_op.register_autograd(_pool_backward, setup_context=_pool_setup)


# ------------------------------------------------------------------ gate_multiply
@torch.library.custom_op("spatialattn::gate_multiply", mutates_args=())
def gate_multiply_op(x: Tensor, attn: Tensor, scale: Optional[Tensor]) -> Tensor:
    """``(x * scale) * attn`` with ``attn`` ``[N, 1, H, W]`` and ``scale`` ``[N, C, 1, 1]`` cast to ``x.dtype``."""
    x = _dense(x)
    if _cpp_ok(x):
        return _cpp.get().gate_forward(x, attn, scale, None)
    return _generic_multiply(x, attn, scale)


@gate_multiply_op.register_fake
def _(x, attn, scale):
    return torch.empty_like(_dense(x))


@torch.library.custom_op("spatialattn::gate_multiply_backward", mutates_args=())
def gate_multiply_backward_op(
    grad: Tensor, x: Tensor, attn: Tensor, scale: Optional[Tensor]
) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(grad_x, grad_attn, grad_scale)`` (``grad_scale`` empty ``[0]`` without a scale)."""
    x = _dense(x)
    if _cpp_ok(x):
        gx, ga, gs = _cpp.get().gate_backward(grad, x, attn, scale, True, True, scale is not None)
    elif _triton_ok(x):
        from . import _triton

        gx, ga, gs = _triton.gate_backward(grad, x, attn, scale)
    else:
        a = attn.to(x.dtype)
        gxs = grad * a
        gx = _in_layout(gxs if scale is None else gxs * scale.to(x.dtype), x)
        ga = (grad * _scaled(x, scale)).sum(dim=1, keepdim=True, dtype=attn.dtype)
        gs = None if scale is None else _sum_nc(gxs * x, scale)
    ga = _small_grad(ga, attn)
    gs = x.new_empty(_EMPTY_SHAPE) if gs is None else _small_grad(gs, scale)
    return gx, ga, gs


@gate_multiply_backward_op.register_fake
def _(grad, x, attn, scale):
    gs = x.new_empty(_EMPTY_SHAPE) if scale is None else _fake_small_grad(scale)
    return torch.empty_like(_dense(x)), _fake_small_grad(attn), gs


def _gate_setup(ctx, inputs, output):
    x, attn, scale = inputs
    ctx.save_for_backward(x, attn, scale)


def _gate_backward(ctx, grad):
    x, attn, scale = ctx.saved_tensors
    gx, ga, gs = gate_multiply_backward_op(grad, x, attn, scale)
    return gx, ga, (gs if scale is not None else None)


gate_multiply_op.register_autograd(_gate_backward, setup_context=_gate_setup)


# ------------------------------------------------------------------ whole SAM (sigmoid gate)
def _sam_small_torch(pooled, weight, bias, norm_scale, norm_shift, dilation):
    """conv + bias, affine norm, sigmoid on the pooled maps, in their dtype (never autocast)."""
    kh, kw = weight.shape[-2:]
    with autocast_off(device_type(pooled)):
        logits = F.conv2d(pooled, weight.to(pooled.dtype), None if bias is None else bias.to(pooled.dtype),
                          padding=(dilation * (kh // 2), dilation * (kw // 2)), dilation=dilation)
        z = logits if norm_scale is None else logits * norm_scale.to(logits.dtype) + norm_shift.to(logits.dtype)
        return logits, torch.sigmoid(z)


def _acc(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _params_held(x: Tensor, *params: Optional[Tensor]) -> bool:
    """Every parameter given (None: absent) in ``x``'s accumulation dtype or in ``x``'s own
    dtype: the dtypes the fused ops take (a half one is a ``model.half()``'s, converted to float32
    exactly, see :func:`_as_dtype`)."""
    held = (_acc(x), x.dtype)
    for p in params:  # (a loop, not all() over a generator: every SAM forward asks)
        if p is not None and p.dtype not in held:
            return False
    return True


def _as_dtype(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """``t`` in ``dtype`` (``t`` itself where it already is, or is None; else a differentiable copy)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


@torch.library.custom_op("spatialattn::sam", mutates_args=())
def sam_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    scale: Optional[Tensor],
    norm_scale: Optional[Tensor],
    norm_shift: Optional[Tensor],
    kinds: List[int],
    dilation: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused CBAM SAM with a sigmoid gate. Returns ``(y, attn, logits, pooled)``.

    ``y = x' * sigmoid((conv(pool(x'), weight) + bias) * norm_scale + norm_shift)``,
    ``x' = x * scale``. ``attn`` / ``logits`` / ``pooled`` are in float32 for half
    inputs (``x.dtype`` otherwise); ``logits`` is the conv output before the
    affine norm.
    """
    x = _dense(x)
    if _cpp_ok(x):
        y, attn, logits, pooled = _cpp.get().sam_forward(
            x, weight, bias, scale, norm_scale, norm_shift, list(kinds), dilation, None
        )
        return y, attn, logits, pooled
    if _triton_ok(x):
        return eager_kernels("triton").sam_forward(x, weight, bias, scale, norm_scale, norm_shift, list(kinds),
                                                   dilation, None)
    pooled = _pool_torch(x, scale, kinds, _acc(x))
    logits, attn = _sam_small_torch(pooled, weight, bias, norm_scale, norm_shift, dilation)
    return _generic_multiply(x, attn, scale), attn, logits, pooled


def _fake_sam_maps(x: Tensor, kinds: Sequence[int]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, attn, logits, pooled)`` as the fused SAM ops return them (fake implementations)."""
    acc = _acc(x)
    n, _, h, w = x.shape
    small = x.new_empty((n, 1, h, w), dtype=acc)
    return torch.empty_like(_dense(x)), small, torch.empty_like(small), x.new_empty((n, len(kinds), h, w), dtype=acc)


@sam_op.register_fake
def _(x, weight, bias, scale, norm_scale, norm_shift, kinds, dilation):
    return _fake_sam_maps(x, kinds)


def _sam_small_backward(dA, attn, logits, pooled, weight, norm_scale, dilation):
    """Backward of sigmoid(norm(conv(pooled) + b)) on the small maps, without autograd
    (custom-op implementations run below the autograd dispatch key)."""
    acc = attn.dtype
    dz = dA * ((1 - attn) * attn)
    gnsh = gns = None
    if norm_scale is not None:
        gnsh = dz.sum().reshape(norm_scale.shape).to(norm_scale.dtype)
        gns = (dz * logits).sum().reshape(norm_scale.shape).to(norm_scale.dtype)
        dz = dz * norm_scale.to(acc)
    gb = dz.sum().reshape(1)
    gp, gw = _conv_backward(dz, pooled, weight, dilation)
    return gp, gw, gb, gns, gnsh


@torch.library.custom_op("spatialattn::sam_backward", mutates_args=())
def sam_backward_op(
    grad_y: Tensor,
    grad_attn: Optional[Tensor],
    x: Tensor,
    scale: Optional[Tensor],
    weight: Tensor,
    norm_scale: Optional[Tensor],
    attn: Tensor,
    logits: Tensor,
    pooled: Tensor,
    kinds: List[int],
    dilation: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(grad_x, grad_scale, grad_weight, grad_bias, grad_norm_scale, grad_norm_shift)``.

    Absent optional inputs get empty ``[0]`` gradients.
    """
    def empty():  # a fresh one each time: outputs must not alias each other
        return x.new_empty(_EMPTY_SHAPE)

    x = _dense(x)
    grad_attn, attn, logits, pooled = _saved_maps(grad_attn, attn, logits, pooled)
    if _cpp_ok(x):
        gx, gs, gw, gb, gns, gnsh = _cpp.get().sam_backward(
            grad_y, grad_attn, x, scale, weight, norm_scale, attn, logits, pooled, list(kinds),
            dilation, scale is not None, True, True, norm_scale is not None,
        )
    elif _triton_ok(x):
        from . import _triton

        gx, gs, gw, gb, gns, gnsh = _triton.sam_backward(grad_y, grad_attn, x, scale, weight, norm_scale, attn,
                                                         logits, pooled, kinds, dilation)
    else:  # plain PyTorch: the big passes as tensor ops, the small maps without autograd
        acc = attn.dtype
        dA = _reduce_torch(grad_y, x, scale, acc)
        if grad_attn is not None:
            dA = dA + grad_attn.to(acc)
        gp, gw, gb, gns, gnsh = _sam_small_backward(dA, attn, logits, pooled, weight, norm_scale, dilation)
        gx, gs = _gradx_torch(grad_y, x, scale, attn, pooled, gp, kinds, True)
    gs = empty() if gs is None else _small_grad(gs, scale)
    gns = empty() if gns is None else _small_grad(gns, norm_scale)
    gnsh = empty() if gnsh is None else _small_grad(gnsh, norm_scale)
    return gx, gs, _small_grad(gw, weight), gb.to(weight.dtype), gns, gnsh


@sam_backward_op.register_fake
def _(grad_y, grad_attn, x, scale, weight, norm_scale, attn, logits, pooled, kinds, dilation):
    def empty():
        return x.new_empty(_EMPTY_SHAPE)

    gs = empty() if scale is None else _fake_small_grad(scale)
    gns = empty() if norm_scale is None else _fake_small_grad(norm_scale)
    gnsh = empty() if norm_scale is None else _fake_small_grad(norm_scale)
    return torch.empty_like(_dense(x)), gs, _fake_small_grad(weight), weight.new_empty((1,)), gns, gnsh


def _sam_setup(ctx, inputs, output):
    x, weight, bias, scale, norm_scale, norm_shift, kinds, dilation = inputs
    _, attn, logits, pooled = output
    ctx.kinds = list(kinds)
    ctx.dilation = dilation
    ctx.has_bias = bias is not None
    ctx.bias_shape = None if bias is None else bias.shape
    ctx.save_for_backward(x, scale, weight, norm_scale, attn, logits, pooled)
    # outputs without a gradient (attn, logits, pooled as a rule) arrive as None rather than
    # as zero maps made for the purpose (three launches per backward on a GPU)
    ctx.set_materialize_grads(False)


def _sam_backward(ctx, grad_y, grad_attn, grad_logits, grad_pooled):
    x, scale, weight, norm_scale, attn, logits, pooled = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(x)
    gx, gs, gw, gb, gns, gnsh = sam_backward_op(
        grad_y, grad_attn, x, scale, weight, norm_scale, attn, logits, pooled, ctx.kinds, ctx.dilation
    )
    return (
        gx,
        gw,
        gb.reshape(ctx.bias_shape) if ctx.has_bias else None,
        gs if scale is not None else None,
        gns if norm_scale is not None else None,
        gnsh if norm_scale is not None else None,
        None,
        None,
    )


sam_op.register_autograd(_sam_backward, setup_context=_sam_setup)


# ------------------------------------------------------------------ eager fast path (C++ on CPU, Triton on CUDA)
# The custom ops above are what torch.compile / torch.export see. In eager mode a plain
# autograd.Function around the same kernels costs a fraction of the custom-op dispatch (on an
# overhead-bound GPU call, about a third of the host time of a SAM forward); the numbers are
# identical because both call the same kernels.
class _TritonKernels:
    """The Triton functions behind the C++ extension's interface (same names, arguments and
    results), so that one set of eager autograd Functions serves both backends. Made on first
    use (:func:`eager_kernels`): importing the kernels imports Triton."""

    def __init__(self):
        from . import _triton

        self._t = _triton

    def pool_forward(self, x: Tensor, scale: Optional[Tensor], kinds: List[int]) -> Tensor:
        return self._t.pool_forward(x, scale, kinds, _acc(x))

    def pool_backward(self, grad, x, scale, pooled, kinds, need_gs: bool):
        return self._t.pool_backward(grad, x, scale, pooled, kinds)

    def gate_forward(self, x: Tensor, attn: Tensor, scale: Optional[Tensor], out: Optional[Tensor]) -> Tensor:
        return self._t.gate_forward(x, attn, scale)

    def gate_backward(self, grad, x, attn, scale, need_x: bool, need_attn: bool, need_scale: bool):
        gx, ga, gs = self._t.gate_backward(grad, x, attn, scale)
        return gx, ga, gs if need_scale else None

    def sam_forward(self, x, weight, bias, scale, norm_scale, norm_shift, kinds, dilation, out):
        """``(y, attn, logits, pooled)``: three or four launches (the pooling, the conv and
        sigmoid on the small maps, the gate multiply), or one (:func:`._triton.sam_forward`)."""
        return self._t.sam_forward(x, weight, bias, scale, norm_scale, norm_shift, kinds, dilation)

    def sam_backward(self, grad_y, grad_attn, x, scale, weight, norm_scale, attn, logits, pooled, kinds, dilation,
                     need_gs: bool, need_gw: bool, need_gb: bool, need_norm: bool):
        return self._t.sam_backward(grad_y, grad_attn, x, scale, weight, norm_scale, attn, logits, pooled, kinds,
                                    dilation, need_gs=need_gs)


_triton_kernels: Optional[_TritonKernels] = None


def eager_kernels(backend: str):
    """The kernels behind the eager Functions below: the C++ extension for ``"cpp"``, the
    Triton functions for ``"triton"``."""
    if backend == "cpp":
        return _cpp.get()
    global _triton_kernels
    if _triton_kernels is None:
        _triton_kernels = _TritonKernels()
    return _triton_kernels


DOUBLE_BACKWARD_ERROR = (
    "spatialattn: the fused kernels' backward is first order only, and this graph differentiates "
    "through it a second time (create_graph=True: a gradient penalty, a Hessian-vector product). "
    "Run the forward under spatialattn.ops.decomposed() to use the plain PyTorch ops, which "
    "differentiate any number of times."
)


def first_order_only(backward):
    """``backward`` of an eager kernel Function, run without grad; under ``create_graph=True``
    its results get a node that raises :data:`DOUBLE_BACKWARD_ERROR` when differentiated.

    Like ``torch.autograd.function.once_differentiable``, but always: that decorator attaches
    its error node only where an upstream gradient requires grad, and returns constants
    otherwise (``grad(y.sum(), x, create_graph=True)``), whose missing second-order terms
    then vanish without a word; and its message does not say what to do."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if not torch.is_grad_enabled():  # create_graph=False (the rule): nothing to add
            return backward(ctx, *grads)
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        single = not isinstance(outputs, tuple)
        outs = (outputs,) if single else outputs
        # the error node also takes the saved inputs and the upstream gradients that require
        # grad, so that it lies on the path from the results to them: differentiating the
        # results then reaches it and raises, instead of "not used in the graph"
        anchors = [t for t in (*ctx.saved_tensors, *grads) if isinstance(t, torch.Tensor) and t.requires_grad]
        err = torch._C._functions.DelayedError(DOUBLE_BACKWARD_ERROR.encode(), len(anchors) + len(outs))
        marked = err(*anchors, *[None if t is None else t.detach().requires_grad_() for t in outs])
        marked = (marked,) if isinstance(marked, torch.Tensor) else tuple(marked)
        marked = tuple(None if t is None else m for t, m in zip(outs, marked[len(anchors):]))
        return marked[0] if single else marked

    return wrapper


class EagerChannelPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, kinds, kernels):
        x = _dense(x)
        pooled = kernels.pool_forward(x, scale, kinds)
        ctx.kinds, ctx.kernels = kinds, kernels
        ctx.save_for_backward(x, scale, pooled)
        return pooled

    @staticmethod
    @first_order_only
    def backward(ctx, grad):
        x, scale, pooled = ctx.saved_tensors
        need_gs = scale is not None and ctx.needs_input_grad[1]
        gx, gs = ctx.kernels.pool_backward(grad, x, scale, pooled, ctx.kinds, need_gs)
        return gx, (gs.to(scale.dtype) if need_gs else None), None, None


class EagerGateMultiply(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, attn, scale, kernels):
        x = _dense(x)
        ctx.kernels = kernels
        ctx.save_for_backward(x, attn, scale)
        return kernels.gate_forward(x, attn, scale, None)

    @staticmethod
    @first_order_only
    def backward(ctx, grad):
        x, attn, scale = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx, ga, gs = ctx.kernels.gate_backward(
            grad, x, attn, scale, need[0], need[1], scale is not None and need[2]
        )
        return (gx if need[0] else None, ga.to(attn.dtype) if need[1] else None,
                gs.to(scale.dtype) if gs is not None else None, None)


class EagerSam(torch.autograd.Function):
    """Returns ``(y, attn)``; the small pooled / logit maps stay on ``ctx`` (fewer
    autograd outputs: the engine's per-output cost is most of a small map's step)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, norm_scale, norm_shift, kinds, dilation, kernels):
        x = _dense(x)
        y, attn, logits, pooled = kernels.sam_forward(
            x, weight, bias, scale, norm_scale, norm_shift, kinds, dilation, None
        )
        ctx.kinds, ctx.dilation, ctx.kernels = kinds, dilation, kernels
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.small_maps = (logits, pooled)  # not inputs or outputs: no version tracking needed
        ctx.save_for_backward(x, scale, weight, norm_scale, attn)
        # an unused attention arrives as None, not as a map of zeros made for the purpose (a
        # launch and a pass over it on a GPU)
        ctx.set_materialize_grads(False)
        return y, attn

    @staticmethod
    @first_order_only
    def backward(ctx, grad_y, grad_attn):
        x, scale, weight, norm_scale, attn = ctx.saved_tensors
        logits, pooled = ctx.small_maps
        need = ctx.needs_input_grad
        if grad_y is None:
            grad_y = torch.zeros_like(x)
        gx, gs, gw, gb, gns, gnsh = ctx.kernels.sam_backward(
            grad_y, grad_attn, x, scale, weight, norm_scale, attn, logits, pooled, ctx.kinds,
            ctx.dilation, scale is not None and need[3], need[1], need[2], norm_scale is not None and (need[4] or need[5]),
        )
        return (
            gx,
            gw.to(weight.dtype) if need[1] else None,
            gb.to(weight.dtype).reshape(ctx.bias_shape) if need[2] and ctx.bias_shape is not None else None,
            gs.to(scale.dtype) if gs is not None and need[3] else None,
            gns.to(norm_scale.dtype).reshape(norm_scale.shape) if gns is not None and need[4] else None,
            gnsh.to(norm_scale.dtype).reshape(norm_scale.shape) if gnsh is not None and need[5] else None,
            None,
            None,
            None,
        )


# shared by the two training-BatchNorm SAM Functions (C++ and generic)
def _bn_save(ctx, x, scale, weight, bias, bn_weight, bn_bias, eps, kinds, dilation, attn, logits, pooled, stats):
    ctx.kinds, ctx.dilation, ctx.eps = kinds, dilation, eps
    ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
    ctx.beta_dtype = None if bn_bias is None else bn_bias.dtype
    ctx.small_maps = (logits, pooled, stats)  # not inputs or outputs: no version tracking needed
    ctx.save_for_backward(x, scale, weight, bn_weight, attn)
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)  # an unused attention gradient arrives as None, not as zeros


def _bn_saved(ctx, grad_y):
    """``(grad_y or zeros, x, scale, weight, bn_weight, attn, logits, pooled, stats)``."""
    x, scale, weight, bn_weight, attn = ctx.saved_tensors
    return (torch.zeros_like(x) if grad_y is None else grad_y, x, scale, weight, bn_weight, attn) + ctx.small_maps


def _bn_grads(ctx, gx, gw, gb, gs, ggamma, gbeta, weight, scale, bn_weight):
    """The backward's return tuple, each gradient where wanted, in its input's dtype and shape."""
    need = ctx.needs_input_grad
    return (
        gx,
        gw.to(weight.dtype) if need[1] else None,
        gb.to(ctx.bias_meta[1]).reshape(ctx.bias_meta[0]) if need[2] and ctx.bias_meta else None,
        gs.to(scale.dtype) if gs is not None else None,
        ggamma.to(bn_weight.dtype).reshape(bn_weight.shape) if need[4] else None,
        gbeta.to(ctx.beta_dtype).reshape(1) if need[5] else None,
        None,
        None,
        None,
    )


class CppSamBatchNorm(torch.autograd.Function):
    """SAM with a training-mode ``BatchNorm2d(1)`` on the logits (batch statistics), C++ on
    CPU. Returns ``(y, attn, stats)`` with ``stats = [mean, biased var]`` (float64, no grad)
    for the running-statistics update."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, bn_weight, bn_bias, eps, kinds, dilation):
        x = _dense(x)
        y, attn, logits, pooled, stats = _cpp.get().sam_forward_bn(
            x, weight, bias, scale, bn_weight, bn_bias, eps, kinds, dilation
        )
        _bn_save(ctx, x, scale, weight, bias, bn_weight, bn_bias, eps, kinds, dilation, attn, logits, pooled, stats)
        return y, attn, stats

    @staticmethod
    @first_order_only
    def backward(ctx, grad_y, grad_attn, _gstats):
        grad_y, x, scale, weight, bn_weight, attn, logits, pooled, stats = _bn_saved(ctx, grad_y)
        need = ctx.needs_input_grad
        gx, gs, gw, gb, ggamma, gbeta = _cpp.get().sam_backward_bn(
            grad_y, grad_attn, x, scale, weight, bn_weight, attn, logits, pooled, stats, ctx.eps, ctx.kinds,
            ctx.dilation, scale is not None and need[3], need[1], need[2], need[4] or need[5],
        )
        return _bn_grads(ctx, gx, gw, gb, gs, ggamma, gbeta, weight, scale, bn_weight)


def _generic_bn_forward(x, weight, bias, scale, bn_weight, bn_bias, eps, kinds, dilation, running=None):
    """``(y, attn, logits, pooled, stats)`` of the training-BatchNorm SAM off the C++ path
    (Triton on CUDA, plain PyTorch elsewhere) for a dense ``x``. ``running``
    (:data:`_triton.Running`, Triton path only): the running statistics, updated by the
    kernels from the batch statistics."""
    if _triton_ok(x):
        from . import _triton

        return _triton.sam_forward_batchnorm(x, weight, bias, scale, bn_weight, bn_bias, eps, kinds, dilation,
                                             running)
    assert running is None, "the running statistics are updated in the kernels only on the Triton path"
    acc = _acc(x)
    pooled = _pool_torch(x, scale, kinds, acc)
    kh, kw = weight.shape[-2:]
    with autocast_off(device_type(x)):
        logits = F.conv2d(pooled, weight.to(acc), None if bias is None else bias.to(acc),
                          padding=(dilation * (kh // 2), dilation * (kw // 2)), dilation=dilation)
        l64 = logits.double()
        mean = l64.mean()
        var = (l64 - mean).square().mean()
        k = torch.rsqrt(var + eps) * (1.0 if bn_weight is None else bn_weight.double().reshape(()))
        shift = (0.0 if bn_bias is None else bn_bias.double().reshape(())) - mean * k
        attn = torch.sigmoid(logits * k.to(acc) + shift.to(acc))
    stats = torch.stack([mean, var])
    y = _generic_multiply(x, attn, scale)
    return y, attn, logits, pooled, stats


def _generic_bn_backward(grad_y, grad_attn, x, scale, weight, bn_weight, attn, logits, pooled, stats, eps, kinds,
                         dilation, need_gs):
    """``(grad_x, grad_scale or None, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias)`` of
    :func:`_generic_bn_forward` (dtypes and shapes as the kernels give them)."""
    if _triton_ok(x):
        from . import _triton

        return _triton.sam_backward(grad_y, grad_attn, x, scale, weight, None, attn, logits, pooled, kinds,
                                    dilation, need_gs, bn_stats=stats, bn_weight=bn_weight, bn_eps=eps)
    acc = attn.dtype
    dA = _reduce_torch(grad_y, x, scale, acc)
    if grad_attn is not None:
        dA = dA + grad_attn.to(acc)
    # BatchNorm backward with the batch statistics, in float64 (as the C++ op)
    invstd = torch.rsqrt(stats[1] + eps)
    dz = (dA * ((1 - attn) * attn)).double()
    xhat = (logits.double() - stats[0]) * invstd
    m = dz.numel()
    s_dz, s_dzx = dz.sum(), (dz * xhat).sum()
    gm = 1.0 if bn_weight is None else bn_weight.double().reshape(())
    dl = gm * invstd * (dz - s_dz / m - xhat * (s_dzx / m))
    gp, gw = _conv_backward(dl.to(acc), pooled, weight, dilation)
    gx, gs = _gradx_torch(grad_y, x, scale, attn, pooled, gp, kinds, need_gs)
    return gx, gs, gw, dl.sum(), s_dzx, s_dz


class GenericSamBatchNorm(torch.autograd.Function):
    """:class:`CppSamBatchNorm` off the C++ path: Triton on CUDA (the full-size passes and the
    small maps, :func:`_triton.gate_batchnorm` / :func:`_triton.sam_backward`), plain PyTorch
    elsewhere. Forward: one read of x for the pooling, one for the product. Backward: one
    reduction pass (``sum_c g * x'`` and the tie counts), the BatchNorm and conv backward on
    the small maps, one gradient pass; nothing full-size is kept besides x. Same outputs as
    :class:`CppSamBatchNorm` (``stats`` in float64)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, bn_weight, bn_bias, eps, kinds, dilation, running=None):
        x = _dense(x)  # one dense copy of a strided x, made here and saved, not in every pass
        y, attn, logits, pooled, stats = _generic_bn_forward(x, weight, bias, scale, bn_weight, bn_bias, eps, kinds,
                                                             dilation, running)
        _bn_save(ctx, x, scale, weight, bias, bn_weight, bn_bias, eps, kinds, dilation, attn, logits, pooled, stats)
        return y, attn, stats

    @staticmethod
    @first_order_only
    def backward(ctx, grad_y, grad_attn, _gstats):
        grad_y, x, scale, weight, bn_weight, attn, logits, pooled, stats = _bn_saved(ctx, grad_y)
        need_gs = scale is not None and ctx.needs_input_grad[3]
        gx, gs, gw, gb, ggamma, gbeta = _generic_bn_backward(grad_y, grad_attn, x, scale, weight, bn_weight, attn,
                                                             logits, pooled, stats, ctx.eps, ctx.kinds, ctx.dilation,
                                                             need_gs)
        return _bn_grads(ctx, gx, gw, gb, gs, ggamma, gbeta, weight, scale, bn_weight) + (None,)  # (running)


# ------------------------------------------------------------------ the same as custom ops (torch.compile)
# What torch.compile sees of spatial_attention_fused_batchnorm: one node forward and one
# backward, like spatialattn::sam (eager calls keep the Functions above: their dispatch costs
# less). Before these, a compiled training step took the unfused ops (channel_pool and
# gate_multiply custom ops, torch conv and BatchNorm), which cost four times the eager step.
@torch.library.custom_op("spatialattn::sam_batchnorm", mutates_args=())
def sam_batchnorm_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    scale: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    eps: float,
    kinds: List[int],
    dilation: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused CBAM SAM with a training-mode ``BatchNorm2d(1)`` on the logits (batch statistics).
    Returns ``(y, attn, logits, pooled, stats)``, ``stats = [mean, biased var]`` of the logits
    in float64 (for the running statistics, updated by the caller); small maps as in
    :func:`sam_op`."""
    x = _dense(x)
    if _cpp_ok(x):
        return tuple(_cpp.get().sam_forward_bn(x, weight, bias, scale, bn_weight, bn_bias, eps, list(kinds), dilation))
    return _generic_bn_forward(x, weight, bias, scale, bn_weight, bn_bias, eps, list(kinds), dilation)


@sam_batchnorm_op.register_fake
def _(x, weight, bias, scale, bn_weight, bn_bias, eps, kinds, dilation):
    return (*_fake_sam_maps(x, kinds), x.new_empty((2,), dtype=torch.float64))


@torch.library.custom_op("spatialattn::sam_batchnorm_backward", mutates_args=())
def sam_batchnorm_backward_op(
    grad_y: Tensor,
    grad_attn: Optional[Tensor],
    x: Tensor,
    scale: Optional[Tensor],
    weight: Tensor,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    attn: Tensor,
    logits: Tensor,
    pooled: Tensor,
    stats: Tensor,
    eps: float,
    kinds: List[int],
    dilation: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(grad_x, grad_scale, grad_weight, grad_bias [1], grad_bn_weight, grad_bn_bias)``
    in the dtypes and shapes of those inputs (``grad_bias`` in ``weight``'s dtype); absent
    optional inputs get empty ``[0]`` gradients."""
    x = _dense(x)
    grad_attn, attn, logits, pooled, stats = _saved_maps(grad_attn, attn, logits, pooled, stats)
    if _cpp_ok(x):
        gx, gs, gw, gb, ggamma, gbeta = _cpp.get().sam_backward_bn(
            grad_y, grad_attn, x, scale, weight, bn_weight, attn, logits, pooled, stats, eps, list(kinds), dilation,
            scale is not None, True, True, True)
    else:
        gx, gs, gw, gb, ggamma, gbeta = _generic_bn_backward(grad_y, grad_attn, x, scale, weight, bn_weight, attn,
                                                             logits, pooled, stats, eps, list(kinds), dilation,
                                                             scale is not None)

    def like(g, t):  # a fresh empty one each time: outputs must not alias each other
        return x.new_empty(_EMPTY_SHAPE) if t is None else _small_grad(g, t)

    return (gx, like(gs, scale), _small_grad(gw, weight), gb.to(weight.dtype).reshape(1), like(ggamma, bn_weight),
            like(gbeta, bn_bias))


@sam_batchnorm_backward_op.register_fake
def _(grad_y, grad_attn, x, scale, weight, bn_weight, bn_bias, attn, logits, pooled, stats, eps, kinds, dilation):
    def like(t):
        return x.new_empty(_EMPTY_SHAPE) if t is None else _fake_small_grad(t)

    return (torch.empty_like(_dense(x)), like(scale), _fake_small_grad(weight), weight.new_empty((1,)),
            like(bn_weight), like(bn_bias))


def _sam_bn_setup(ctx, inputs, output):
    x, weight, bias, scale, bn_weight, bn_bias, eps, kinds, dilation = inputs
    _, attn, logits, pooled, stats = output
    ctx.eps, ctx.kinds, ctx.dilation = eps, list(kinds), dilation
    ctx.bias_shape = None if bias is None else bias.shape
    ctx.save_for_backward(x, scale, weight, bn_weight, bn_bias, attn, logits, pooled, stats)
    ctx.set_materialize_grads(False)


def _sam_bn_backward(ctx, grad_y, grad_attn, grad_logits, grad_pooled, grad_stats):
    x, scale, weight, bn_weight, bn_bias, attn, logits, pooled, stats = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(x)
    gx, gs, gw, gb, ggamma, gbeta = sam_batchnorm_backward_op(
        grad_y, grad_attn, x, scale, weight, bn_weight, bn_bias, attn, logits, pooled, stats, ctx.eps, ctx.kinds,
        ctx.dilation)
    return (gx, gw, gb.reshape(ctx.bias_shape) if ctx.bias_shape is not None else None,
            gs if scale is not None else None, ggamma if bn_weight is not None else None,
            gbeta if bn_bias is not None else None, None, None, None)


sam_batchnorm_op.register_autograd(_sam_bn_backward, setup_context=_sam_bn_setup)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(DOUBLE_BACKWARD_ERROR)


# the backward ops' own "backward": differentiating their results (a double backward through
# the custom ops, as under a dispatch mode) raises the message that names decomposed()
for _op in (channel_pool_backward_op, gate_multiply_backward_op, sam_backward_op, sam_batchnorm_backward_op):
    _op.register_autograd(_no_double_backward)


# FlopCounterMode counts convolutions and matrix products; the SAM's is its k x k conv on the
# pooled maps (the plain decomposition's count: the same figures with and without the ops;
# the BatchNorm's arithmetic, like the pooling's, is not counted by torch either)
@register_flop_formula([torch.ops.spatialattn.sam, torch.ops.spatialattn.sam_batchnorm])
def _sam_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    n, _, h, w = x_shape
    return conv_flop_count([n, w_shape[1], h, w], list(w_shape), [n, 1, h, w])


@register_flop_formula([torch.ops.spatialattn.sam_backward, torch.ops.spatialattn.sam_batchnorm_backward])
def _sam_backward_flop(grad_y_shape, grad_attn_shape, x_shape, scale_shape, w_shape, *args, out_shape=None,
                       **kwargs) -> int:
    return 2 * _sam_flop(x_shape, w_shape)  # the conv's input and weight gradients


def _global_pool_forward(x: Tensor, kinds: List[int], dtype: torch.dtype, backend: str, count: bool
                         ) -> Tuple[Tensor, Optional[Tensor]]:
    """``(pooled, tie counts or None)``; the C++ kernel counts the maxima of a channels_last
    ``x`` in the same read, the Triton kernel those of any ``x`` where ``count`` (the
    backward then needs no counting pass)."""
    if backend == "cpp":
        out, counts = _cpp.get().global_pool_counted(x, kinds, True)  # counts: None if not counted
        return out, counts
    from . import _triton

    return _triton.global_pool_forward(x, kinds, dtype, count=count)


def _global_pool_backward(grad: Tensor, x: Tensor, out: Tensor, kinds: List[int], backend: str,
                          into: Optional[Tensor] = None, counts: Optional[Tensor] = None) -> Tensor:
    if backend == "cpp":
        return _cpp.get().global_pool_backward(grad, x, out, kinds, into, counts)
    from . import _triton

    return _triton.global_pool_backward(grad, x, out, kinds, into, counts)


class GlobalPool(torch.autograd.Function):
    """CBAM channel-gate pooling (max / mean over H, W, ``[P, N, C]`` in ``dtype``) with a
    fused backward; ``backend``: ``"cpp"`` (CPU, ``dtype`` = ``x.dtype``, float32 for half ``x``) or ``"triton"``.
    One read of ``x`` forward; backward one write of the gradient, after a read for the tie
    counts where the forward did not count them (the C++ kernel counts for channels_last, the
    Triton kernel for both layouts when ``x`` needs a gradient; ``amax`` semantics: ties share
    the max gradient evenly). With a ``slot`` (:class:`GradSlot`, filled by a :class:`GradTap`
    node), the gradient is added in place to the one the slot holds, and the sum is returned."""

    @staticmethod
    def forward(ctx, x, kinds, dtype, backend, slot=None):
        x = _dense(x)
        out, counts = _global_pool_forward(x, kinds, dtype, backend, ctx.needs_input_grad[0])
        ctx.kinds, ctx.backend, ctx.slot = kinds, backend, slot
        ctx.counts = counts  # small, not an input or output: no version tracking needed
        ctx.save_for_backward(x, out)
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, grad):
        x, out = ctx.saved_tensors
        into = None
        if ctx.slot is not None:
            into, ctx.slot.grad = ctx.slot.grad, None
        kinds, backend, counts = ctx.kinds, ctx.backend, ctx.counts
        if into is None:
            gx = _global_pool_backward(grad, x, out, kinds, backend, counts=counts)
        else:
            gx = _add_global_pool_grad(into, grad, x, out, kinds, backend, counts)
        return gx, None, None, None, None


def _same_layout(a: Tensor, b: Tensor) -> bool:
    """``a`` and ``b`` (one shape) put every element at the same offset: equal strides in
    every dimension of more than one element (a batch-1 gradient may come with another
    stride in its size-1 batch dimension than ``x``)."""
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def _add_global_pool_grad(into: Tensor, grad: Tensor, x: Tensor, out: Tensor, kinds: List[int], backend: str,
                          counts: Optional[Tensor]) -> Tensor:
    """``into`` + the global pooling's gradient: added in place (one read-modify-write, one
    rounding) where ``into`` has ``x``'s dtype and layout, else as a new tensor."""
    if into.dtype == x.dtype and into.shape == x.shape and _same_layout(into, x):
        view = into if into.stride() == x.stride() else into.as_strided(x.shape, x.stride())
        _global_pool_backward(grad, x, out, kinds, backend, into=view, counts=counts)
        return into
    return into + _global_pool_backward(grad, x, out, kinds, backend, counts=counts)


class CppCbam(torch.autograd.Function):
    """A channel-then-spatial CBAM on the C++ kernels (CPU) in one autograd node: global
    pooling -> channel MLP -> sigmoid gate ``cg`` -> the SAM of ``x * cg`` (with a
    training-mode ``BatchNorm2d(1)`` on its logits where ``batch_norm``, else with the conv
    bias only). The kernels and arguments of the module path (:class:`GlobalPool`,
    :class:`ChannelMlpGate`, :class:`CppSamBatchNorm` / :class:`EagerSam`, the pooling's
    gradient added in place into the SAM's), so the same bits; one node instead of four
    (with their views and Python glue: about a fifth of a training step on small maps).

    Inputs: ``x``; the MLP weights as the module holds them (``[out, in]`` or
    ``[out, in, 1, 1]``, the accumulation dtype), ``weight2`` / ``bias2`` None for the one-layer
    MLP; the SAM conv ``weight`` ``[1, P, k, k]`` / ``bias``; the BatchNorm's affine
    parameters (or None). Returns ``(y, attn [N, 1, H, W], cg [N, C, 1, 1], stats)``,
    ``stats`` = the logits' ``[mean, biased var]`` (float64, no grad) with ``batch_norm``,
    else an empty tensor."""

    @staticmethod
    def forward(ctx, x, weight1, bias1, weight2, bias2, weight, bias, bn_weight, bn_bias, eps, ch_kinds, kinds,
                dilation, batch_norm):
        ext = _cpp.get()
        x = _dense(x)
        n, c = x.shape[0], x.shape[1]
        w1 = weight1 if weight1.dim() == 2 else weight1.reshape(weight1.shape[0], -1)
        w2 = weight2 if weight2 is None or weight2.dim() == 2 else weight2.reshape(weight2.shape[0], -1)
        pooled_ch, counts = ext.global_pool_counted(x, ch_kinds, True)
        gate, hidden = ext.channel_mlp_forward(pooled_ch, w1, bias1, w2, bias2, True)
        cg = gate.view(n, c, 1, 1)
        scale = cg.to(x.dtype)  # rounded to x's dtype, as the module path (cg itself where it has it)
        if batch_norm:
            y, attn, logits, pooled, stats = ext.sam_forward_bn(x, weight, bias, scale, bn_weight, bn_bias, eps,
                                                                kinds, dilation)
        else:
            y, attn, logits, pooled = ext.sam_forward(x, weight, bias, scale, None, None, kinds, dilation, None)
            stats = torch.empty(0, dtype=torch.float64)
        ctx.args = (eps, ch_kinds, kinds, dilation, batch_norm)
        ctx.meta = (None if bias is None else (bias.shape, bias.dtype), None if bn_bias is None else bn_bias.dtype,
                    weight1.shape, None if weight2 is None else weight2.shape)
        # small, not inputs or outputs: no version tracking needed
        ctx.small = (pooled_ch, counts, hidden, logits, pooled, stats)
        ctx.save_for_backward(x, w1, w2, weight, bn_weight, attn, cg)
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)
        return y, attn, cg, stats

    @staticmethod
    @first_order_only
    def backward(ctx, grad_y, grad_attn, grad_cg, _gstats):
        x, w1, w2, weight, bn_weight, attn, cg = ctx.saved_tensors
        pooled_ch, counts, hidden, logits, pooled, stats = ctx.small
        eps, ch_kinds, kinds, dilation, batch_norm = ctx.args
        need = ctx.needs_input_grad
        ext = _cpp.get()
        n, c = x.shape[0], x.shape[1]
        if grad_y is None:
            grad_y = torch.zeros_like(x)
        scale = cg.to(x.dtype)
        need_gate = any(need[:5])  # x (through the pooling) or the MLP's parameters
        if batch_norm:
            gx, gs, gw, gb, ggamma, gbeta = ext.sam_backward_bn(
                grad_y, grad_attn, x, scale, weight, bn_weight, attn, logits, pooled, stats, eps, kinds, dilation,
                need_gate, need[5], need[6], need[7] or need[8],
            )
        else:
            gx, gs, gw, gb, _, _ = ext.sam_backward(
                grad_y, grad_attn, x, scale, weight, None, attn, logits, pooled, kinds, dilation, need_gate, need[5],
                need[6], False,
            )
        gw1 = gb1 = gw2 = gb2 = None
        if need_gate:
            # the scale's gradient in x's dtype, then in the gate's (the casts of the module path)
            g = gs.to(scale.dtype).to(cg.dtype).reshape(n, c)
            if grad_cg is not None:
                g = g + grad_cg.reshape(n, c)
            two = w2 is not None
            gp, gw1, gb1, gw2, gb2 = ext.channel_mlp_backward(
                g, cg.view(n, c), pooled_ch, w1, w2, hidden if two else None,
                [need[0], need[1], need[2], two and need[3], two and need[4]],
            )
            if need[0]:
                gx = _add_global_pool_grad(gx, gp, x, pooled_ch, ch_kinds, "cpp", counts)
        bias_meta, beta_dtype, w1_shape, w2_shape = ctx.meta
        return (
            gx if need[0] else None,
            gw1.view(w1_shape) if need[1] else None,
            gb1 if need[2] else None,
            gw2.view(w2_shape) if need[3] else None,
            gb2 if need[4] else None,
            gw.to(weight.dtype) if need[5] else None,
            gb.to(bias_meta[1]).reshape(bias_meta[0]) if need[6] and bias_meta else None,
            ggamma.to(bn_weight.dtype).reshape(bn_weight.shape) if need[7] else None,
            gbeta.to(beta_dtype).reshape(1) if need[8] else None,
            None, None, None, None, None,
        )


class GradSlot:
    """Hands one gradient from a :class:`GradTap` node to the :class:`GlobalPool` node that
    shares the slot (see :func:`spatialattn.ops.with_global_pool`)."""

    __slots__ = ("grad",)

    def __init__(self) -> None:
        self.grad: Optional[Tensor] = None


class GradTap(torch.autograd.Function):
    """``(x, pooled)`` passed through, for a body that reads both. Backward puts the gradient
    w.r.t. ``x`` into ``slot`` instead of sending it to ``x`` (``x`` comes in detached), and
    sends the gradient w.r.t. ``pooled`` on (zeros if there is none): so the
    :class:`GlobalPool` node that made ``pooled`` always runs after this one, takes the
    gradient from the slot, adds the pooling's gradient into it in place and passes the sum
    to ``x``."""

    @staticmethod
    def forward(ctx, x, pooled, slot):
        ctx.slot = slot
        ctx.pooled_meta = (pooled.shape, pooled.dtype, pooled.device)
        return x.view_as(x), pooled.view_as(pooled)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_x, grad_pooled):
        ctx.slot.grad = grad_x
        if grad_pooled is None:
            shape, dtype, device = ctx.pooled_meta
            grad_pooled = torch.zeros(shape, dtype=dtype, device=device)
        return None, grad_pooled, None


class ChannelMlpGate(torch.autograd.Function):
    """:func:`spatialattn.ops.reference.channel_mlp_gate` on fused kernels: ``backend``
    ``"cpp"`` (CPU, float32 / float64, one or two layers) or ``"triton"`` (float32, two
    layers). The forward in one call, the backward (sigmoid, both layers, the relu and the sums
    over the pools) in one C++ call or two Triton launches; saves the small hidden activations
    ``[P, N, R]``."""

    @staticmethod
    def forward(ctx, pooled, weight1, bias1, weight2, bias2, backend="cpp"):
        if backend == "cpp":
            gate, hidden = _cpp.get().channel_mlp_forward(pooled, weight1, bias1, weight2, bias2, True)
        else:
            from . import _triton

            gate, hidden = _triton.mlp_gate_forward(pooled, weight1, bias1, weight2, bias2)
        ctx.backend = backend
        ctx.save_for_backward(pooled, weight1, weight2, gate, hidden)
        return gate

    @staticmethod
    @first_order_only
    def backward(ctx, grad):
        pooled, weight1, weight2, gate, hidden = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:5])
        if ctx.backend == "cpp":
            grads = _cpp.get().channel_mlp_backward(grad.to(gate.dtype), gate, pooled, weight1, weight2, hidden,
                                                    needs)
        else:
            from . import _triton

            grads = _triton.mlp_gate_backward(grad, gate, pooled, weight1, weight2, hidden, needs)
        return tuple(g if need else None for g, need in zip(grads, needs)) + (None,)
