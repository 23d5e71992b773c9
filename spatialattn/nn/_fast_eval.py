"""Inference of :class:`~spatialattn.nn.SpatialAttention` with one direct kernel call.

On small maps the fused C++ SAM takes 25-35 us, and the layers around it
(module -> functional -> ops: argument checks, the BatchNorm fold, context
managers, dispatch) took about as long again. Without autograd, on CPU, the
module can call the kernel directly with arguments it prepared once: the *plan*,
cached on the module and rebuilt whenever anything it was made from changes
(the conv / BatchNorm tensors -- object, storage or in-place version --, the
BatchNorm mode and eps, the gate, order, dilation, the input dtype).

Everything else (autograd, tracing / export, ``torch.func`` transforms,
``torch.compile``, tensor subclasses, CUDA, no C++ extension, a non-sigmoid
gate, a training-mode BatchNorm) takes the module's ordinary path, with the
same numbers: both end in the same kernel with the same arguments.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import functional as SF
from .. import ops
from ..ops import _cpp
from ..ops import _library as _lib

__all__ = ["sam_eval"]

_PLAN = "_spatialattn_eval_plan"


def _state(t: Optional[Tensor]):
    """What the plan depends on in ``t``: the object, its storage and its in-place version
    (raises RuntimeError for inference tensors, which have no version counter)."""
    return None if t is None else (id(t), t.data_ptr(), t._version)


def _parts(m):
    """``m.conv`` and ``m.bn`` from the dicts (``nn.Module.__getattr__`` costs about 0.5 us a
    name); ``bn`` is a plain attribute where the module was made without a norm."""
    mods = m._modules
    return mods["conv"], mods["bn"] if "bn" in mods else m.__dict__.get("bn")


def _key(m, x: Tensor):
    conv, bn = _parts(m)
    p = conv._parameters
    key = (x.dtype, m.gate, m.order, m.dilation, id(conv), _state(p["weight"]), _state(p.get("bias")), id(bn))
    if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
        b, q = bn._buffers, bn._parameters
        key += (bn.training, bn.eps, _state(b.get("running_mean")), _state(b.get("running_var")),
                _state(q.get("weight")), _state(q.get("bias")))
    return key


def _build(m, x: Tensor):
    """The kernel's arguments for ``m`` on inputs like ``x``, or None (not fusable)."""
    if x.dtype not in _lib._CPP_DTYPES:
        return None
    conv, bn = _parts(m)
    weight, bias = conv._parameters["weight"], conv._parameters.get("bias")
    fused = SF._fused_sam_args(x, weight, bias, bn, m.gate)
    if fused is None:
        return None
    order = SF.normalize_pool_order(m.order)
    k_h, k_w = weight.shape[-2:]
    if weight.dim() != 4 or tuple(weight.shape[:2]) != (1, len(order)) or k_h % 2 == 0 or k_w % 2 == 0:
        return None  # the ordinary path raises the error
    ns, nsh = fused
    if not all(t is None or t.is_cpu for t in (weight, bias, ns, nsh)):
        return None
    return (weight.detach(), None if bias is None else bias.detach(), ns, nsh, ops._kinds(order), m.dilation)


def sam_eval(m, x: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
    """``(y, attention)`` of SpatialAttention ``m`` on ``x`` by one direct kernel call, or
    ``None`` where that does not apply (then the caller takes the ordinary path).
    Call only without autograd (``torch.is_grad_enabled()`` false)."""
    if type(x) is not Tensor or not x.is_cpu or x.dim() != 4:
        return None
    c = x.shape[1]
    if c == 0 or (m.channels is not None and c != m.channels):
        return None
    if torch.compiler.is_compiling() or ops._torch_ops_only():
        return None
    ext = _cpp.get()
    if ext is None:
        return None
    try:
        key = _key(m, x)
    except RuntimeError:  # inference tensors among the parameters: no version to key on
        return None
    entry = m.__dict__.get(_PLAN)
    if entry is None or entry[0] != key or (entry[3] is not None and entry[3] != _pair_versions(entry[1])):
        # new, changed, or the folded BatchNorm pair was written into (ops.batchnorm_affine
        # hands the same tensors out)
        plan = _build(m, x)
        # keeps the keyed tensors' storages alive, so that a later storage cannot take an
        # address in the key (a `.data =` swap frees the old one)
        conv, bn = _parts(m)
        held = [t.detach() for t in list(conv.parameters(recurse=False)) + (
            list(bn.parameters(recurse=False)) + list(bn.buffers(recurse=False)) if isinstance(bn, torch.nn.Module)
            else [])]
        entry = m.__dict__[_PLAN] = (key, plan, held, _pair_versions(plan))
    plan = entry[1]
    if plan is None:
        return None
    w, b, ns, nsh, kinds, dilation = plan
    y, attn, _, _ = ext.sam_forward(_lib._dense(x), w, b, None, ns, nsh, kinds, dilation, None)
    return y, attn


def _pair_versions(plan):
    return None if plan is None or plan[2] is None else (plan[2]._version, plan[3]._version)
