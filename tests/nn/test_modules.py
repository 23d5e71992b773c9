"""Every attention module against a plain-PyTorch oracle, across layouts, dtypes and edge cases."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from spatialattn.nn import (
    CBAM,
    ChannelAttention,
    NonLocal2d,
    PointwiseSpatialAttention,
    SpatialAttention,
    SqueezeExcite,
    create_attention,
)

from ._references import randomize_, sam_reference

C = 32


def ref_channel(m: ChannelAttention, x):
    pools = {"mean": x.mean((2, 3), keepdim=True), "max": x.amax((2, 3), keepdim=True)}
    if m.num_layers == 2:
        mlp = lambda v: m.fc2(m.act(m.fc1(v)))  # noqa: E731
    else:
        mlp = m.fc
    s = sum(mlp(pools[p]) for p in m.pool_types)
    g = torch.sigmoid(s)
    return x * g, g


def ref_spatial(m: SpatialAttention, x):
    return sam_reference(x, m.conv.weight, m.conv.bias, m.order, m.bn, dilation=m.dilation)


def ref_pointwise(m: PointwiseSpatialAttention, x):
    z = m.conv(x)
    if m.bn is not None:
        z = m.bn(z)
    a = torch.sigmoid(z)
    return x * a, a


def ref_cbam(m: CBAM, x):
    if m.arrangement == "channel_spatial":
        x1, _ = ref_channel(m.channel, x)
        return ref_spatial(m.spatial, x1)
    if m.arrangement == "spatial_channel":
        x1, a = ref_spatial(m.spatial, x)
        return ref_channel(m.channel, x1)[0], a
    _, g = ref_channel(m.channel, x)
    _, a = ref_spatial(m.spatial, x)
    return x * g * a, a


def ref_nonlocal(m: NonLocal2d, x):
    n, c, h, w = x.shape
    kv = x if m.pool is None else F.max_pool2d(x, 2)
    g = m.g(kv).flatten(2)
    if m.mode == "gaussian":
        q, k = x.flatten(2), kv.flatten(2)
    else:
        q, k = m.theta(x).flatten(2), m.phi(kv).flatten(2)
    L, M = q.shape[-1], k.shape[-1]
    f = torch.empty(n, L, M, dtype=x.dtype)
    for i in range(L):  # deliberately explicit
        for j in range(M):
            if m.mode == "concatenation":
                wv = m.concat_project.weight.reshape(-1)
                f[:, i, j] = F.relu((torch.cat([q[:, :, i], k[:, :, j]], 1) * wv).sum(1)) / M
            else:
                f[:, i, j] = (q[:, :, i] * k[:, :, j]).sum(1)
    if m.mode in ("embedded_gaussian", "gaussian"):
        f = f.softmax(-1)
    elif m.mode == "dot_product":
        f = f / M
    y = torch.einsum("nlm,ndm->ndl", f, g).reshape(n, -1, h, w)
    z = m.out(y)
    if m.bn is not None:
        z = m.bn(z)
    return x + z, f


def _frozen_bn(module):
    """The module with its SAM's BatchNorm frozen as detector code does (torchvision's class)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    sam = module.spatial if isinstance(module, CBAM) else module
    sam.bn = FrozenBatchNorm2d(1)
    return module


CASES = {
    "sam": (lambda: SpatialAttention(C), ref_spatial),
    "sam_k3_d2_meanmax_bias": (
        lambda: SpatialAttention(C, 3, order=("mean", "max"), norm=None, bias=True, dilation=2), ref_spatial),
    "sam_maxonly": (lambda: SpatialAttention(C, 5, order="max"), ref_spatial),
    "pointwise": (lambda: PointwiseSpatialAttention(C), ref_pointwise),
    "pointwise_nonorm": (lambda: PointwiseSpatialAttention(C, norm=None), ref_pointwise),
    "cam": (lambda: ChannelAttention(C), ref_channel),
    "cam_single": (lambda: ChannelAttention(C, num_layers=1, pool_types=("avg",)), ref_channel),
    "se": (lambda: SqueezeExcite(C), ref_channel),
    "cbam_paper": (lambda: CBAM(C), ref_cbam),
    "cbam_timm": (lambda: CBAM(C, preset="timm"), ref_cbam),
    "cbam_ultralytics": (lambda: CBAM(C, preset="ultralytics"), ref_cbam),
    "cbam_mmyolo": (lambda: CBAM(C, preset="mmyolo"), ref_cbam),
    "cbam_spatial_channel": (lambda: CBAM(C, arrangement="spatial_channel"), ref_cbam),
    "cbam_parallel": (lambda: CBAM(C, arrangement="parallel"), ref_cbam),
    "sam_frozen_bn": (lambda: _frozen_bn(SpatialAttention(C)), ref_spatial),
    "cbam_frozen_bn": (lambda: _frozen_bn(CBAM(C)), ref_cbam),
    "nonlocal": (lambda: NonLocal2d(C, zero_init=False), ref_nonlocal),
    "nonlocal_dot_sub": (lambda: NonLocal2d(C, mode="dot_product", sub_sample=True, zero_init=False), ref_nonlocal),
    "nonlocal_gauss": (lambda: NonLocal2d(C, mode="gaussian", zero_init=False), ref_nonlocal),
    "nonlocal_concat": (lambda: NonLocal2d(C, mode="concatenation", zero_init=False, norm=None), ref_nonlocal),
}


def make(name, dtype=torch.float32, train=False, seed=0):
    build, ref = CASES[name]
    torch.manual_seed(seed)
    m = randomize_(build(), seed).to(dtype)
    m.train(train)
    return m, ref


def layouts(x):
    yield "contiguous", x
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    big = torch.zeros(x.shape[0], x.shape[1], x.shape[2] * 2, x.shape[3] * 2, dtype=x.dtype)
    big[:, :, ::2, ::2] = x
    yield "strided", big[:, :, ::2, ::2]


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("train", [False, True])
def test_matches_reference_all_layouts(name, train):
    m, ref = make(name, torch.float64, train)
    torch.manual_seed(1)
    x0 = torch.randn(2, C, 6, 5, dtype=torch.float64)
    for layout, x in layouts(x0):
        m1, m2 = copy.deepcopy(m), copy.deepcopy(m)  # BN running stats update in train mode
        y, a = m1(x, return_attention=True)
        y_ref, a_ref = ref(m2, x0)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12, msg=f"{name} {layout}")
        torch.testing.assert_close(a.to(a_ref.dtype), a_ref, rtol=1e-10, atol=1e-12)
        assert y.dtype == x.dtype
        if train:  # running statistics updated identically
            for (k, b1), (_, b2) in zip(m1.named_buffers(), m2.named_buffers()):
                torch.testing.assert_close(b1, b2, msg=k)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_match_reference(name):
    m, ref = make(name, torch.float64, train=True)
    m2 = copy.deepcopy(m)
    torch.manual_seed(2)
    x = torch.randn(2, C, 5, 4, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    gy = torch.randn(2, C, 5, 4, dtype=torch.float64)
    (m(x) * gy).sum().backward()
    (ref(m2, x2)[0] * gy).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-9, atol=1e-11)
    for (k, p1), (_, p2) in zip(m.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-9, atol=1e-11, msg=k)


@pytest.mark.parametrize("name", ["sam", "pointwise", "cam", "cbam_paper", "cbam_parallel", "cbam_mmyolo", "nonlocal"])
def test_gradcheck_float64(name):
    m, _ = make(name, torch.float64, train=False)
    x = torch.randn(2, C, 3, 2, dtype=torch.float64, requires_grad=True)
    params = [p for p in m.parameters()]
    names = [k for k, _ in m.named_parameters()]

    def f(x, *ps):
        sd = dict(zip(names, ps))
        return torch.func.functional_call(m, sd, (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)
    assert torch.autograd.gradcheck(lambda x: m(x), (x[:1, :, :2],), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", ["sam", "pointwise", "cam", "cbam_paper", "cbam_timm", "nonlocal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(name, dtype):
    m, ref = make(name, torch.float32, train=False)
    x = torch.randn(2, C, 8, 8).to(dtype)
    m = m.to(dtype)
    # the oracle runs in float32 on the same (rounded) parameters and input
    y_ref, _ = ref(copy.deepcopy(m).float(), x.float())
    y = m(x)
    assert y.dtype == dtype
    tol = 2e-2 if dtype == torch.float16 else 8e-2
    if name == "nonlocal":  # softmax of large logits amplifies the half-precision theta/phi convs
        tol *= 8
    torch.testing.assert_close(y.float(), y_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["sam", "pointwise", "cam", "cbam_paper", "nonlocal"])
def test_autocast_keeps_input_dtype_and_fp32_gates(name):
    m, ref = make(name, torch.float32, train=False)
    x = torch.randn(2, C, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, a = m(x, return_attention=True)
    assert y.dtype == torch.float32
    assert a.dtype == torch.float32
    if name != "nonlocal":  # bf16 theta/phi convs under autocast make its softmax too coarse to compare
        y_ref, _ = ref(m, x)
        torch.testing.assert_close(y, y_ref, rtol=5e-2, atol=5e-2)
    # half input under autocast: output stays half, gate in float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, a16 = m(x.bfloat16(), return_attention=True)
    assert y16.dtype == torch.bfloat16 and a16.dtype == torch.float32


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_inference_contexts_match_reference(name, context):
    # without autograd the eval-mode BatchNorm's affine pair is cached: repeated calls, every
    # layout, and a change of the running statistics in between must all match the reference
    m, ref = make(name, torch.float64, train=False)
    torch.manual_seed(1)
    x0 = torch.randn(2, C, 6, 5, dtype=torch.float64)
    ctx = torch.no_grad if context == "no_grad" else torch.inference_mode
    for step in range(2):
        with ctx():
            for layout, x in layouts(x0):
                for _ in range(2):
                    y = m(x)
                    torch.testing.assert_close(y, ref(m, x0)[0], rtol=1e-10, atol=1e-12, msg=f"{name} {layout}")
        with torch.no_grad():
            for b in m.buffers():
                if b.is_floating_point():
                    b.mul_(1.5).add_(0.25)  # running statistics change in place


@pytest.mark.parametrize("name", sorted(CASES))
def test_batch_zero(name):
    m, _ = make(name, train=False)
    x = torch.randn(0, C, 6, 6, requires_grad=True)
    y, a = m(x, return_attention=True)
    assert y.shape == x.shape and a.shape[0] == 0
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("name", ["sam", "cbam_paper", "pointwise", "cam", "nonlocal"])
def test_one_by_one_map_with_7x7_kernel(name):
    m, ref = make(name, torch.float64, train=False)
    x = torch.randn(3, C, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(m(x), ref(m, x)[0])


@pytest.mark.parametrize("name", sorted(CASES))
def test_wrong_shape_errors_say_expected_and_found(name):
    m, _ = make(name)
    with pytest.raises(ValueError, match=r"expected .*\(N, 32, H, W\).*got \(2, 16, 4, 4\)"):
        m(torch.randn(2, 16, 4, 4))
    with pytest.raises(ValueError, match=r"4-D.*got shape \(32, 4, 4\)"):
        m(torch.randn(C, 4, 4))


def test_nan_propagates():
    x = torch.randn(1, C, 10, 10)
    x[0, 3, 1, 2] = float("nan")
    for name in ("sam", "cbam_paper", "pointwise", "cam"):
        m, _ = make(name)
        y = m(x)
        assert torch.isnan(y[0, :, 1, 2]).any(), name  # never hidden
        if name in ("sam", "pointwise"):
            assert not torch.isnan(y[0, :, 8, 8]).any()  # outside the 7x7 reach


def test_return_attention_does_not_change_output_and_keep_attention():
    for name in CASES:
        m, _ = make(name)
        x = torch.randn(2, C, 5, 5)
        y1 = m(x)
        m.keep_attention = True
        y2, a = m(x, return_attention=True)
        torch.testing.assert_close(y1, y2, rtol=0, atol=0)
        assert m.last_attention is not None and torch.equal(m.last_attention, a.detach())
        assert not m.last_attention.requires_grad


def test_nonlocal_starts_as_identity():
    m = NonLocal2d(C)
    x = torch.randn(2, C, 6, 6)
    torch.testing.assert_close(m(x), x)


def test_official_bn_defaults_and_paper_parameter_count():
    m = CBAM(256)
    assert m.spatial.bn.momentum == 0.01 and m.spatial.bn.eps == 1e-5 and m.spatial.conv.bias is None
    assert m.spatial.order == ("max", "mean")
    # MLP 256->16->256 with biases + 7x7x2 conv + BN affine
    assert sum(p.numel() for p in m.parameters()) == 256 * 16 + 16 + 16 * 256 + 256 + 98 + 2


def test_factory_names_and_class():
    assert isinstance(create_attention("sam", 8), SpatialAttention)
    assert isinstance(create_attention("modified_sam", 8), PointwiseSpatialAttention)
    assert isinstance(create_attention("sam_pointwise", 8), PointwiseSpatialAttention)
    assert isinstance(create_attention("cam", 8, reduction=2), ChannelAttention)
    assert isinstance(create_attention("cbam", 16, preset="timm"), CBAM)
    assert isinstance(create_attention("se", 16), SqueezeExcite)
    assert isinstance(create_attention("nonlocal", 8), NonLocal2d)
    assert isinstance(create_attention(SpatialAttention, 8, kernel_size=3), SpatialAttention)
    x = torch.randn(1, 8, 4, 4)
    torch.testing.assert_close(create_attention("none", 8)(x), x)
    with pytest.raises(ValueError, match="unknown attention 'bogus'"):
        create_attention("bogus", 8)
    with pytest.raises(ValueError, match="odd"):
        SpatialAttention(8, 4)
    with pytest.raises(ValueError, match="unknown CBAM preset"):
        CBAM(8, preset="nope")


def test_repr_shows_configuration():
    r = repr(CBAM(64, preset="mmyolo"))
    assert "preset='mmyolo'" in r and "order=('mean', 'max')" in r and "rd_channels=4" in r


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("kind", ["sam", "cbam", "sam_pointwise"])
def test_activation_checkpointing_gives_the_same_gradients(kind, use_reentrant):
    # torch.utils.checkpoint runs the forward again during backward (the custom autograd
    # nodes of the fused kernels must give the same saved state the second time)
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    attn = randomize_(create_attention(kind, 16)).train()
    conv2, attn2 = copy.deepcopy(conv), copy.deepcopy(attn)
    x = torch.randn(3, 8, 11, 13)
    y = attn(conv(x))
    y.square().sum().backward()
    x2 = x.clone().requires_grad_(use_reentrant)  # the reentrant variant needs an input with grad
    y2 = checkpoint(lambda t: attn2(conv2(t)), x2, use_reentrant=use_reentrant)
    y2.square().sum().backward()
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    for (name, p), p2 in zip([*conv.named_parameters(), *attn.named_parameters()],
                             [*conv2.parameters(), *attn2.parameters()]):
        torch.testing.assert_close(p2.grad, p.grad, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_nonlocal_fused_attention_matches_reference(monkeypatch):
    # the fused-attention path (torch's scaled_dot_product_attention) on small maps: the
    # threshold in position pairs lowered to 0; float64 against the explicit reference
    from spatialattn import functional as SF

    monkeypatch.setattr(SF, "_SDPA_MIN_PAIRS", 0)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(SF.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    m, ref = make("nonlocal", torch.float64, train=True)
    m2 = copy.deepcopy(m)
    x = torch.randn(2, C, 5, 4, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    gy = torch.randn(2, C, 5, 4, dtype=torch.float64)
    y = m(x)
    (y * gy).sum().backward()
    y2 = ref(m2, x2)[0]
    (y2 * gy).sum().backward()
    torch.testing.assert_close(y, y2, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-9, atol=1e-11)
    for (k, p1), (_, p2) in zip(m.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-9, atol=1e-11, msg=k)
    assert calls, "the fused attention did not run"
    assert torch.autograd.gradcheck(lambda t: m(t), (x[:1, :, :2].detach().requires_grad_(),), eps=1e-6, atol=1e-5)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(m, x)[0], rtol=1e-9, atol=1e-11)
