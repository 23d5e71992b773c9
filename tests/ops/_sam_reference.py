"""The SAM forward in plain PyTorch, the reference the fused-op tests compare against (shared by
the CPU and the CUDA / Triton tests)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from spatialattn.ops import reference


def ref_sam(x, w, b, order, dilation, scale, ns=None, nsh=None, bn=None, eps=1e-5):
    """``(y, attn)``: pooling, the conv (padding ``dilation * (k // 2)`` per dimension, so
    non-square kernels keep the map size), the affine norm ``ns`` / ``nsh``, or with ``bn =
    (gamma, beta)`` a training-mode ``BatchNorm2d(1)`` over the batch's logits, sigmoid, multiply."""
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    pooled = reference.channel_pool(x, order, scale, acc)
    kh, kw = w.shape[-2:]
    logits = F.conv2d(pooled, w.to(acc), None if b is None else b.to(acc),
                      padding=(dilation * (kh // 2), dilation * (kw // 2)), dilation=dilation)
    if ns is not None:
        logits = logits * ns + nsh
    if bn is not None:
        mean = logits.mean(dim=(0, 2, 3), keepdim=True)
        var = logits.var(dim=(0, 2, 3), keepdim=True, unbiased=False)
        logits = (logits - mean) / torch.sqrt(var + eps) * bn[0] + bn[1]
    attn = torch.sigmoid(logits)
    return reference.gate_multiply(x, attn, scale), attn


def max_rel_error(got, want) -> float:
    """max |got - want| over max |want| (0 for empty tensors); ``got`` on any device / dtype,
    ``want`` the float64 reference."""
    want = want.detach()
    if want.numel() == 0:
        return 0.0
    return float((got.detach().cpu().double() - want).abs().max() / (want.abs().max() + 1e-300))
