"""The SAM forward in plain PyTorch, the reference the fused-op tests compare against (shared by
the CPU and the CUDA / Triton tests)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from spatialattn.ops import reference


def ref_sam(x, w, b, order, dilation, scale, ns=None, nsh=None):
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    pooled = reference.channel_pool(x, order, scale, acc)
    k = w.shape[-1]
    logits = F.conv2d(pooled, w.to(acc), None if b is None else b.to(acc), padding=dilation * (k // 2), dilation=dilation)
    if ns is not None:
        logits = logits * ns + nsh
    attn = torch.sigmoid(logits)
    return reference.gate_multiply(x, attn, scale), attn
