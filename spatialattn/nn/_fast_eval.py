"""Inference of :class:`~spatialattn.nn.SpatialAttention` and CBAM with direct kernel calls.

On small maps the fused C++ SAM takes 25-35 us, and the layers around it
(module -> functional -> ops: argument checks, the BatchNorm fold, context
managers, dispatch) took about as long again; CBAM's channel gate (global
pooling, the MLP) likewise. Without autograd, on CPU, a module can call the
kernels directly with arguments it prepared once: the *plan*, cached on the
module and rebuilt whenever anything it was made from changes (its parameter and
buffer tensors -- object, storage or in-place version --, the BatchNorm mode and
eps, the gates, pooling orders, dilation, activation, the input dtype).

Everything else (autograd, tracing / export, ``torch.func`` transforms,
``torch.compile``, tensor subclasses, CUDA, no C++ extension, a non-sigmoid
gate, a training-mode BatchNorm) takes the module's ordinary path, with the
same numbers: both end in the same kernel with the same arguments.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import functional as SF
from .. import ops
from ..ops import _cpp
from ..ops import _library as _lib
from .base import EVAL_PLAN

__all__ = ["sam_eval", "cbam_eval"]

_PLAN = EVAL_PLAN


def _state(t: Optional[Tensor]):
    """What the plan depends on in ``t``: the object, its storage and its in-place version
    (raises RuntimeError for inference tensors, which have no version counter)."""
    return None if t is None else (id(t), t.data_ptr(), t._version)


def _parts(m):
    """``m.conv`` and ``m.bn`` from the dicts (``nn.Module.__getattr__`` costs about 0.5 us a
    name); ``bn`` is a plain attribute where the module was made without a norm."""
    mods = m._modules
    return mods["conv"], mods["bn"] if "bn" in mods else m.__dict__.get("bn")


def plain_params(module) -> Optional[Tuple[Tensor, Optional[Tensor]]]:
    """``(weight, bias)`` of a conv / linear layer straight from its ``_parameters``, or None
    where either is not a plain parameter there: a parametrization
    (``torch.nn.utils.parametrize``: ``weight_norm``, ``spectral_norm``...) computes it on
    attribute access, pruning (``torch.nn.utils.prune``) keeps it as a plain attribute. The
    ordinary path reads those as attributes. (A layer without bias holds ``bias = None``.)"""
    p = module._parameters
    if "weight" not in p or "bias" not in p:
        return None
    return p["weight"], p["bias"]


def cpu_in(dtype: torch.dtype, *tensors: Optional[Tensor]) -> bool:
    """Every tensor given (None skipped) is a CPU tensor of ``dtype``."""
    return all(t is None or (t.is_cpu and t.dtype == dtype) for t in tensors)


def held_in(acc: torch.dtype, held: Optional[torch.dtype], *tensors: Optional[Tensor]) -> bool:
    """The tensors are all CPU tensors of ``acc``, or all of ``held`` (a half model's parameters,
    which the caller converts; None: ``acc`` only)."""
    return cpu_in(acc, *tensors) or (held is not None and cpu_in(held, *tensors))


def sam_weight_ok(weight: Tensor, p: int) -> bool:
    """``weight`` is a SAM conv weight ``[1, p, kh, kw]`` with odd ``kh``, ``kw`` (else the
    ordinary path raises the error)."""
    shape = tuple(weight.shape)
    return len(shape) == 4 and shape[:2] == (1, p) and bool(shape[2] % 2 and shape[3] % 2)


def _key(m, x: Tensor):
    conv, bn = _parts(m)
    wb = plain_params(conv)  # (None: _build gives no plan)
    key = (x.dtype, m.gate, m.order, m.dilation, id(conv), wb and (_state(wb[0]), _state(wb[1])), id(bn))
    four = ops._batchnorm_tensors(bn)  # (the fold's values, not versions: see _batchnorm_values)
    if four is not None:
        key += (bn.training, bn.eps) + ops._batchnorm_values(*four)
    return key


def _build(m, x: Tensor):
    """The kernel's arguments for ``m`` on inputs like ``x``, or None (not fusable)."""
    if x.dtype not in _lib._CPP_DTYPES:
        return None
    conv, bn = _parts(m)
    wb = plain_params(conv)
    if wb is None:
        return None
    weight, bias = wb
    fused = SF._fused_sam_args(x, weight, bias, bn, m.gate)
    if fused is None:
        return None
    order = SF.normalize_pool_order(m.order)
    if not sam_weight_ok(weight, len(order)):
        return None
    weight, bias, ns, nsh = fused  # (in the accumulation dtype: converted once here for half parameters)
    if not all(t is None or t.is_cpu for t in (weight, bias, ns, nsh)):
        return None
    return (weight.detach(), None if bias is None else bias.detach(), ns, nsh, ops._kinds(order), m.dilation)


def _direct_ok(x: Tensor) -> bool:
    """``x`` is a plain 4-D tensor that the ops would send to the C++ kernels, and only
    torch operators are not required (no tracing / export, no ``torch.func`` transform);
    ``_fast_device`` also rules out CUDA, a missing extension and ``torch.compile``."""
    return type(x) is Tensor and x.dim() == 4 and not ops._torch_ops_only() and ops._fast_device(x) == "cpp"


def sam_eval(m, x: Tensor, channel_scale: Optional[Tensor] = None) -> Optional[Tuple[Tensor, Tensor]]:
    """``m.attend(x, channel_scale)`` of SpatialAttention ``m`` by one direct kernel call, or
    ``None`` where that does not apply (then the caller takes the ordinary path).
    Call only without autograd (``torch.is_grad_enabled()`` false)."""
    if not _direct_ok(x):
        return None
    c = x.shape[1]
    if c == 0 or (m.channels is not None and c != m.channels):
        return None
    if channel_scale is not None and (type(channel_scale) is not Tensor or not channel_scale.is_cpu
                                      or channel_scale.shape != (x.shape[0], c, 1, 1)):
        return None
    plan = _plan(m, x, _key, _build, _pair_versions)
    if plan is None:
        return None
    if channel_scale is not None and channel_scale.dtype != x.dtype:
        channel_scale = channel_scale.to(x.dtype)  # CBAM's channel gate, rounded to x's dtype first
    w, b, ns, nsh, kinds, dilation = plan
    y, attn, _, _ = _cpp.get().sam_forward(_lib._dense(x), w, b, channel_scale, ns, nsh, kinds, dilation, None)
    return y, attn


def _pair_versions(plan):
    """The folded BatchNorm pair's versions: ops.batchnorm_affine hands the same tensors out."""
    return None if plan is None or plan[2] is None else (plan[2]._version, plan[3]._version)


def _plan(m, x: Tensor, key_of, build, versions=lambda plan: None):
    """``m``'s cached plan for inputs like ``x`` (None: not fusable), rebuilt when its key
    changes or ``versions(plan)`` (tensors of the plan a caller may write into) does."""
    try:
        key = key_of(m, x)
    except RuntimeError:  # inference tensors among the parameters: no version to key on
        return None
    entry = m.__dict__.get(_PLAN)
    if entry is None or entry[0] != key or entry[3] != versions(entry[1]):
        plan = build(m, x)
        # keeps the keyed tensors' storages alive, so that a later storage cannot take an
        # address in the key (a `.data =` swap frees the old one)
        held = [t.detach() for t in list(m.parameters()) + list(m.buffers())]
        entry = m.__dict__[_PLAN] = (key, plan, held, versions(plan))
    return entry[1]


def _channel_key(m, x: Tensor):
    ch = m._modules["channel"]
    mods = ch._modules
    key = (x.dtype, ch.pool_types, ch.gate, ch.num_layers, id(ch))
    for name in ("fc1", "fc2") if ch.num_layers == 2 else ("fc",):
        fc = mods[name]
        wb = plain_params(fc)  # (None: channel_mlp_args gives no plan)
        key += (id(fc), wb and (_state(wb[0]), _state(wb[1])))
    return key + ((id(mods["act"]),) if ch.num_layers == 2 else ())


def channel_mlp_args(ch, c: int, acc: torch.dtype, held: Optional[torch.dtype] = None):
    """``(pool kinds, w1, b1, w2, b2)`` of a ChannelAttention on ``c`` channels, its MLP
    parameters as held (``w2`` / ``b2`` None for one layer), or None where the fused MLP
    kernels do not apply: a gate other than sigmoid, an activation other than ReLU, a pooling
    order that is not normalised (the ordinary path names that error), parameters off the CPU
    or not in ``acc`` (or ``held``, where given: float16 / bfloat16 parameters of a half
    model, which the caller converts), weights that are not Linear ``[out, in]`` / conv ``[out, in, ...]``
    (read as ``[out, prod(in, ...)]``, as ``SF._as_linear_weight`` does) of a C -> R -> C (or
    C -> C) MLP. Shared with :mod:`._fast_train`."""
    if not SF._is_sigmoid_gate(ch.gate):
        return None
    try:
        kinds = ops._kinds(ch.pool_types)
    except KeyError:
        return None
    mods = ch._modules
    if ch.num_layers == 2:
        if not SF._is_relu(mods["act"]):
            return None
        p1, p2 = plain_params(mods["fc1"]), plain_params(mods["fc2"])
        if p1 is None or p2 is None:
            return None
        (w1, b1), (w2, b2) = p1, p2
    else:
        p1 = plain_params(mods["fc"])
        if p1 is None:
            return None
        (w1, b1), w2, b2 = p1, None, None
    if not held_in(acc, held, w1, b1, w2, b2) or any(
            w is not None and w.dim() not in (2, 4) for w in (w1, w2)):
        return None
    r = w1.shape[0]
    if math.prod(w1.shape[1:]) != c or (w1 if w2 is None else w2).shape[0] != c:
        return None
    if w2 is not None and math.prod(w2.shape[1:]) != r:
        return None
    return kinds, w1, b1, w2, b2


def _channel_build(m, x: Tensor):
    """Arguments of the global pooling and the channel MLP kernels, or None (not fusable)."""
    if x.dtype not in _lib._CPP_DTYPES:
        return None
    acc = SF.accumulate_dtype(x)
    # half parameters (a model.half()) of a half x: converted to float32 once, here
    args = channel_mlp_args(m._modules["channel"], x.shape[1], acc, x.dtype)
    if args is None:
        return None
    kinds, w1, b1, w2, b2 = args

    def linear(w):
        return None if w is None else SF._as_linear_weight(w.detach(), acc)

    def detached(b):
        return None if b is None else SF._as_dtype(b.detach(), acc)

    return kinds, linear(w1), detached(b1), linear(w2), detached(b2)


def _cbam_key(m, x: Tensor):
    return _channel_key(m, x) + _key(m._modules["spatial"], x)


def _cbam_build(m, x: Tensor):
    """(channel-half arguments, spatial-half arguments or None), or None (not fusable)."""
    ch = _channel_build(m, x)
    if ch is None:
        return None
    spatial = m._modules["spatial"]
    return ch, _build(spatial, x) if spatial.channels in (None, x.shape[1]) else None


def _cbam_versions(plan):
    return None if plan is None else _pair_versions(plan[1])


def cbam_eval(m, x: Tensor) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
    """``(y, spatial map, channel gate)`` of a channel-then-spatial CBAM ``m`` by direct kernel
    calls, or ``None`` where that does not apply. Where the spatial half is fusable too, one
    call does everything (``cbam_forward``: global pooling, the channel MLP, the gate, the
    SAM); else global pooling and the MLP, then ``m.spatial.attend`` with the gate as channel
    scale. Call only without autograd."""
    if not _direct_ok(x) or x.shape[2] * x.shape[3] == 0:
        return None
    n, c = x.shape[0], x.shape[1]
    if c == 0 or c != m.channels:
        return None
    plan = _plan(m, x, _cbam_key, _cbam_build, _cbam_versions)
    if plan is None:
        return None
    ch, sam = plan
    ext = _cpp.get()
    if sam is not None:  # all of it in one call (one parallel region for batches below the threads)
        y, sa, cg = ext.cbam_forward(_lib._dense(x), *ch, *sam)
        return y, sa, cg
    pooled = ext.global_pool(_lib._dense(x), ch[0])
    cg = ext.channel_mlp_forward(pooled, *ch[1:], False)[0].view(n, c, 1, 1)
    y, sa = m._modules["spatial"].attend(x, channel_scale=cg)
    return y, sa, cg
