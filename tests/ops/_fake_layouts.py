"""The custom ops' fake implementations against their real outputs, in every input layout.

Inductor asserts at run time that a custom op's outputs have the strides its fake gave, so a
fake that is right about shapes and dtypes but not about the layout breaks compiled graphs.
Shared by the CPU tests (C++ and plain-PyTorch backends) and the Triton tests.
"""
from __future__ import annotations

import torch
from torch._prims_common import check_significant_strides
from torch._subclasses.fake_tensor import FakeTensorMode

from spatialattn.ops import _library as lib

# the two formats, a dense x in neither (H and W swapped in memory, as x.transpose(2, 3)
# gives) and a strided one (every other element of a wider tensor)
LAYOUTS = ["nchw", "channels_last", "hw_swapped", "strided"]


def layout_of(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` (NCHW-contiguous) with the same values in ``layout`` (one of :data:`LAYOUTS`)."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "hw_swapped":
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "strided":
        return torch.cat([t, t], dim=3)[..., : t.shape[3]]
    return t


def assert_fake_matches(op, args) -> None:
    """Each output of ``op(*args)`` has the shape, dtype and significant strides its fake gives."""
    real = op(*args)
    with FakeTensorMode() as mode:
        fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    real, fake = (real, fake) if isinstance(real, tuple) else ((real,), (fake,))
    for i, (r, f) in enumerate(zip(real, fake)):
        assert (r.shape, r.dtype) == (f.shape, f.dtype), (op, i)
        assert check_significant_strides(r, f, only_cuda=False)[0], (op, i, r.stride(), f.stride())


def _saved_maps(x, s, w, b, gamma, beta, kinds):
    """What the backward ops take from the forward: ``(attn, logits, pooled)`` of ``sam`` (no
    bias, no norm) and ``(attn, logits, pooled, stats)`` of ``sam_batchnorm``."""
    _, attn, logits, pooled = lib.sam_op(x, w, None, s, None, None, kinds, 1)
    _, bn_attn, bn_logits, bn_pooled, stats = lib.sam_batchnorm_op(x, w, b, s, gamma, beta, 1e-5, kinds, 1)
    return (attn, logits, pooled), (bn_attn, bn_logits, bn_pooled, stats)


def check_custom_op_layouts(layout: str, dtype: torch.dtype, device: torch.device,
                            small_layout: str = "nchw") -> None:
    """``torch.library.opcheck`` (schema, autograd registration, fake tensors, AOT dispatch) on
    the four forward ops with ``x`` in ``layout`` and the 4-D small inputs (conv weight, channel
    scale, attention map) in ``small_layout`` (``model.to(memory_format=torch.channels_last)``
    gives the weights channels_last strides), and the backward ops' fakes against their outputs
    for upstream gradients in every layout (``grad_x`` follows ``x``, not them; the small inputs'
    gradients are contiguous)."""
    g = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=g).to(dtype).to(device)

    x = layout_of(randn(2, 5, 4, 3), layout).requires_grad_()
    s = layout_of(randn(2, 5, 1, 1).abs() + 0.5, small_layout).requires_grad_()
    a = layout_of(randn(2, 1, 4, 3).sigmoid(), small_layout).requires_grad_()
    w = layout_of(randn(1, 2, 3, 3), small_layout).requires_grad_()
    acc = lib._acc(x)
    gamma = (torch.rand(1, dtype=torch.float64, generator=g) + 0.5).to(acc).to(device).requires_grad_()
    beta = torch.randn(1, dtype=torch.float64, generator=g).to(acc).to(device).requires_grad_()
    b = torch.randn(1, dtype=torch.float64, generator=g).to(w.dtype).to(device).requires_grad_()
    for op, args in ((lib.channel_pool_op, (x, s, [0, 1], acc)), (lib.gate_multiply_op, (x, a, s)),
                     (lib.sam_op, (x, w, None, s, None, None, [1, 0], 1)),
                     (lib.sam_batchnorm_op, (x, w, b, s, gamma, beta, 1e-5, [1, 0], 1))):
        torch.library.opcheck(op, args)
    with torch.no_grad():
        (attn, logits, pooled), (bn_attn, bn_logits, bn_pooled, stats) = _saved_maps(x, s, w, b, gamma, beta, [0, 1])
        for g_layout in LAYOUTS:
            gy = layout_of(randn(2, 5, 4, 3), g_layout)
            assert_fake_matches(lib.sam_backward_op, (gy, None, x, s, w, None, attn, logits, pooled, [0, 1], 1))
            assert_fake_matches(lib.sam_batchnorm_backward_op, (gy, None, x, s, w, gamma, beta, bn_attn, bn_logits,
                                                                bn_pooled, stats, 1e-5, [0, 1], 1))
            assert_fake_matches(lib.gate_multiply_backward_op, (gy, x, a, s))
        for kinds in ([0, 1], [1], [0]):
            p = lib.channel_pool_op(x, None, kinds, lib._acc(x))
            assert_fake_matches(lib.channel_pool_backward_op, (torch.randn_like(p), x, None, p, kinds))


def check_saved_maps_in_any_layout(dtype: torch.dtype, device: torch.device) -> None:
    """The backward ops give the same gradients whatever the layout of the small maps they take
    from the forward (``attn``, ``logits``, ``pooled``, an upstream ``grad_attn``): a compiled
    graph may hand them over in another layout than the forward made (torch 2.7's Inductor gave
    ``pooled`` channels_last strides, and the kernels, which indexed it as NCHW, gave wrong
    gradients)."""
    g = torch.Generator().manual_seed(3)

    def randn(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=g).to(dtype).to(device)

    x, gy = randn(2, 5, 6, 7), randn(2, 5, 6, 7)
    s, w = randn(2, 5, 1, 1).abs() + 0.5, randn(1, 2, 3, 3)
    acc = lib._acc(x)
    gamma, beta, b = (randn(1).to(acc).abs() + 0.5), randn(1).to(acc), randn(1)
    kinds = [0, 1]
    with torch.no_grad():
        (attn, logits, pooled), (bn_attn, bn_logits, bn_pooled, stats) = _saved_maps(x, s, w, b, gamma, beta, kinds)
        grad_attn = randn(2, 1, 6, 7).to(attn.dtype)
        calls = {
            "sam_backward": (lambda m: lib.sam_backward_op(gy, m["grad_attn"], x, s, w, None, m["attn"], m["logits"],
                                                           m["pooled"], kinds, 1),
                             dict(grad_attn=grad_attn, attn=attn, logits=logits, pooled=pooled)),
            "sam_batchnorm_backward": (
                lambda m: lib.sam_batchnorm_backward_op(gy, m["grad_attn"], x, s, w, gamma, beta, m["attn"],
                                                        m["logits"], m["pooled"], stats, 1e-5, kinds, 1),
                dict(grad_attn=grad_attn, attn=bn_attn, logits=bn_logits, pooled=bn_pooled)),
            "channel_pool_backward": (lambda m: lib.channel_pool_backward_op(m["grad"], x, s, m["pooled"], kinds),
                                      dict(grad=torch.randn_like(pooled), pooled=pooled)),
        }
        for name, (call, maps) in calls.items():
            want = call(maps)
            for key in maps:
                for layout in LAYOUTS[1:]:
                    got = call({**maps, key: layout_of(maps[key], layout)})
                    for i, (a, e) in enumerate(zip(got, want)):
                        torch.testing.assert_close(a, e, rtol=0, atol=0, msg=f"{name}, {key} {layout}, output {i}")
