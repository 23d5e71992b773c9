"""Training-mode CBAM (channel gate, then SAM) in one autograd node on the C++ kernels.

The module path builds four autograd nodes per CBAM (the global pooling, a node that routes
the two gradients w.r.t. ``x`` into one pass, the channel MLP, the SAM) plus views, casts
and the checks of three layers of API; on small maps that Python and autograd work cost
about as much as the kernels (1x1024x13x13 on a 2-core VM: a training step 750 us, the
kernels about 250 us of it). :func:`cbam_train` runs the same kernels with the same
arguments in one node (:class:`spatialattn.ops._library.CppCbam`), so outputs, gradients
and BatchNorm running statistics are bit for bit those of the module path; it applies
where every part of the module takes the C++ kernels anyway:

* CPU, the C++ extension built, eager (no ``torch.compile``, export, tracing or
  ``torch.func`` transform), a plain 4-D tensor with pixels, channels and images;
* the channel half: a sigmoid gate, a ReLU between two layers (or one layer), 1x1 conv /
  Linear weights in the accumulation dtype (float32 for half inputs);
* the spatial half: a sigmoid gate, conv weight and bias in the accumulation dtype, and
  either no norm or a ``BatchNorm2d(1)`` using batch statistics (training mode, or no
  running statistics) with parameters in the accumulation dtype and more than one logit.

Parameters may also be held in the half dtype of a half input (a ``model.half()`` /
``.bfloat16()`` in training): they are converted to float32 (exactly) in front of the node,
so autograd's conversion rounds their gradients back, and the results are those of a float32
copy of the module.

Anything else (an eval-mode BatchNorm folded into an affine, other gates or norms,
subclasses that override ``gate_from_pooled`` / ``attend``) returns ``None``: the caller
takes the module path.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import functional as SF
from .. import ops
from ..ops import _library as _lib
from ._fast_eval import _parts, channel_mlp_args, held_in, plain_params, sam_weight_ok
from .channel import ChannelAttention
from .spatial import SpatialAttention

__all__ = ["cbam_train"]

# False: always the module path (tests compare the two)
ENABLED = True


def _spatial_args(sp, x: Tensor, acc: torch.dtype, held: Optional[torch.dtype]):
    """``(weight, bias, bn or None, kinds, dilation)`` of the spatial half, or None."""
    if type(sp).attend is not SpatialAttention.attend or not SF._is_sigmoid_gate(sp.gate):
        return None
    if sp.channels is not None and sp.channels != x.shape[1]:
        return None
    conv, bn = _parts(sp)
    wb = plain_params(conv)
    if wb is None:
        return None
    weight, bias = wb
    if not held_in(acc, held, weight, bias):
        return None
    try:
        kinds = ops._kinds(sp.order)
    except KeyError:
        return None
    if not sam_weight_ok(weight, len(kinds)) or (bias is not None and bias.numel() != 1):
        return None
    if bn is not None and not (ops.batchnorm_train_fusable(x, bn) and held_in(acc, held, bn.weight, bn.bias)):
        return None
    return weight, bias, bn, kinds, sp.dilation


def cbam_train(m, x: Tensor) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
    """``(y, spatial map, channel gate)`` of a channel-then-spatial CBAM ``m`` in one autograd
    node, with ``m``'s BatchNorm running statistics updated, or ``None`` where that does not
    apply (see the module docstring). For grad mode."""
    if not ENABLED or type(x) is not Tensor or x.dim() != 4 or not x.is_cpu:
        return None
    if ops._torch_ops_only() or ops._fast_device(x) != "cpp":
        return None
    n, c, h, w = x.shape
    if n == 0 or c == 0 or h * w == 0 or c != m.channels:
        return None
    acc = SF.accumulate_dtype(x)
    held = x.dtype if x.dtype != acc else None  # a half model's own parameter dtype
    mods = m._modules
    if type(mods["channel"]).gate_from_pooled is not ChannelAttention.gate_from_pooled:
        return None
    ch = channel_mlp_args(mods["channel"], c, acc, held)
    if ch is None:
        return None
    sp = _spatial_args(mods["spatial"], x, acc, held)
    if sp is None:
        return None
    kinds_ch, w1, b1, w2, b2 = ch
    weight, bias, bn, kinds, dilation = sp
    params = (w1, b1, w2, b2, weight, bias, None if bn is None else bn.weight, None if bn is None else bn.bias)
    if held is not None:  # converted in autograd: the gradients come back rounded to the held dtype
        params = tuple(SF._as_dtype(t, acc) for t in params)
    with _lib.autocast_off("cpu"):
        y, attn, cg, stats = _lib.CppCbam.apply(
            x, *params, 1e-5 if bn is None else float(bn.eps), kinds_ch, kinds, dilation, bn is not None,
        )
    if bn is not None:
        ops._update_running_stats(bn, stats, n * h * w, x)
    return y, attn, cg
