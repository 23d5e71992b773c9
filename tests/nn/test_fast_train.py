"""CBAM training in one autograd node (spatialattn.nn._fast_train): the same bits as the
module path, and the module path wherever the node does not apply."""
from __future__ import annotations

import contextlib
import copy
import itertools

import pytest
import torch

from spatialattn.nn import CBAM, _fast_train
from spatialattn.ops import _cpp
from spatialattn.ops import _library as _lib


@pytest.fixture(autouse=True)
def need_cpp():
    if _cpp.get() is None:
        pytest.skip("C++ extension could not be built here (no compiler?)")


@contextlib.contextmanager
def _module_path():
    _fast_train.ENABLED = False
    try:
        yield
    finally:
        _fast_train.ENABLED = True


@contextlib.contextmanager
def _count_fused():
    calls = []
    orig = _lib.CppCbam.apply

    def spy(*args):
        calls.append(1)
        return orig(*args)

    _lib.CppCbam.apply = spy
    try:
        yield calls
    finally:
        _lib.CppCbam.apply = orig


def _randomise(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_((torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3).to(p.dtype))
        for name, b in m.named_buffers():
            if b.is_floating_point():
                b.copy_((torch.rand(b.shape, generator=g, dtype=torch.float64) + 0.5).to(b.dtype))
    return m


def _x(shape, layout, dtype, seed=0):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x.round(decimals=1).to(dtype)  # some ties for the max pools
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "noncontig":
        return torch.cat([x, x], dim=3)[..., ::2]
    return x


def _step(m, x, with_attention_loss=False, x_grad=True):
    """One training step: outputs, gradients of x and every parameter, buffers after."""
    m.zero_grad(set_to_none=True)
    xg = x.detach().clone().requires_grad_(x_grad)
    y, sa = m(xg, return_attention=True)
    g = torch.Generator().manual_seed(7)
    loss = (y.float() * torch.randn(y.shape, generator=g).to(y.dtype).float()).sum()
    if with_attention_loss:
        loss = loss + (sa.float() * torch.randn(sa.shape, generator=g)).sum()
    loss.backward()
    grads = [xg.grad] + [p.grad for p in m.parameters()]
    return [y, sa] + grads + [b.clone() for b in m.buffers()]


def _assert_same(a, b):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        if u is None or v is None:
            assert u is None and v is None, i
            continue
        assert u.dtype == v.dtype and u.shape == v.shape, i
        assert torch.equal(u, v), (i, (u.double() - v.double()).abs().max().item())


def _compare(m, x, with_attention_loss=False, fused=True, x_grad=True):
    ref_m = copy.deepcopy(m)
    with _module_path():
        ref = _step(ref_m, x, with_attention_loss, x_grad)
    with _count_fused() as calls:
        out = _step(m, x, with_attention_loss, x_grad)
    assert len(calls) == (1 if fused else 0)
    _assert_same(out, ref)
    return out


@pytest.mark.parametrize(
    "preset,dtype,layout,batch",
    [p for p in itertools.product(["paper", "timm", "ultralytics", "mmyolo"],
                                   [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                                   ["contiguous", "channels_last"], [1, 3])
     # every preset and dtype; the layouts and batch sizes in turn
     if (p[2] == "contiguous") == (p[3] == 3) or p[1] == torch.float32],
)
def test_training_step_matches_module_path(preset, dtype, layout, batch):
    m = _randomise(CBAM(24, reduction=4, preset=preset), 1).train()
    if dtype not in (torch.float16, torch.bfloat16):  # (half inputs: float32 parameters, as under autocast)
        m = m.to(dtype)
    for step in range(2):  # the running statistics move between the steps
        _compare(m, _x((batch, 24, 7, 9), layout, dtype, seed=step))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("preset", ["paper", "timm"])
def test_half_model_in_one_node(dtype, preset):
    # a model.half() / .bfloat16() in training took the module path (and, until the forty-sixth
    # session, the layered SAM): its parameters now go to the node converted to float32 (exactly),
    # the same bits as a float32 copy of the module, gradients and running statistics rounded
    half = _randomise(CBAM(24, reduction=4, preset=preset), 8).train().to(dtype)
    for step, layout in enumerate(["contiguous", "channels_last"]):
        full = copy.deepcopy(half).float()  # (from the half statistics of the previous step)
        x = _x((3, 24, 7, 9), layout, dtype, seed=step)
        with _count_fused() as calls:
            out_h, out_f = _step(half, x), _step(full, x)
        assert len(calls) == 2
        _assert_same(out_h[:3], out_f[:3])  # y, the attention map, grad x
        _assert_same(out_h[3:], [t.to(dtype) if t.is_floating_point() else t for t in out_f[3:]])
    # parameters held in another half dtype than x's: not the node
    other = torch.bfloat16 if dtype == torch.float16 else torch.float16
    assert _fast_train.cbam_train(half, _x((3, 24, 7, 9), "contiguous", other).requires_grad_()) is None


def test_attention_map_gradient_and_noncontiguous_input():
    m = _randomise(CBAM(16, reduction=4), 2).train()
    _compare(m, _x((2, 16, 6, 5), "noncontig", torch.float32), with_attention_loss=True)
    _compare(m, _x((2, 16, 6, 5), "channels_last", torch.float32), with_attention_loss=True)


@pytest.mark.parametrize("case", ["no_running_stats", "momentum_none", "no_affine", "frozen_params", "one_layer_mlp",
                                  "x_no_grad", "big"])
def test_variants(case):
    kw = dict(channel_kwargs=dict(num_layers=1)) if case == "one_layer_mlp" else {}
    m = _randomise(CBAM(32 if case != "big" else 256, reduction=8, **kw), 3).train()
    bn = m.spatial.bn
    if case == "no_running_stats":
        m.spatial.bn = torch.nn.BatchNorm2d(1, track_running_stats=False)
    if case == "momentum_none":
        bn.momentum = None
    if case == "no_affine":
        m.spatial.bn = torch.nn.BatchNorm2d(1, affine=False, momentum=0.3)
    if case == "frozen_params":
        for p in list(m.channel.parameters())[:2] + [m.spatial.conv.weight]:
            p.requires_grad_(False)
    shape = (4, 256, 13, 13) if case == "big" else (2, 32, 9, 9)
    for step in range(2):
        _compare(m, _x(shape, "contiguous", torch.float32, seed=step), x_grad=case != "x_no_grad")


def test_module_path_where_the_node_does_not_apply():
    # eval-mode BatchNorm while training the rest (frozen statistics): the module path
    m = _randomise(CBAM(16, reduction=4), 4).train()
    m.spatial.bn.eval()
    _compare(m, _x((2, 16, 5, 5), "contiguous", torch.float32), fused=False)
    # a gate the kernels do not have
    m = _randomise(CBAM(16, reduction=4, channel_kwargs=dict(gate="hard_sigmoid")), 4).train()
    _compare(m, _x((2, 16, 5, 5), "contiguous", torch.float32), fused=False)
    # one logit per batch: the module path raises BatchNorm's error
    m = CBAM(16, reduction=4).train()
    with pytest.raises(ValueError, match="more than 1 value"):
        m(torch.randn(1, 16, 1, 1, requires_grad=True))
    # an empty batch
    m = CBAM(16, reduction=4, preset="mmyolo").train()
    with _count_fused() as calls:
        y = m(torch.randn(0, 16, 5, 5, requires_grad=True))
    assert y.shape == (0, 16, 5, 5) and not calls


def test_no_grad_and_inference_skip_the_node():
    m = _randomise(CBAM(16, reduction=4), 5).train()
    x = torch.randn(2, 16, 5, 5)
    with _count_fused() as calls, torch.no_grad():
        m(x)
    assert not calls


def test_autocast_bfloat16():
    m = _randomise(CBAM(16, reduction=4), 6).train()
    x = _x((2, 16, 6, 6), "contiguous", torch.float32)
    ref_m = copy.deepcopy(m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with _module_path():
            ref = _step(ref_m, x)
        out = _step(m, x)
    _assert_same(out, ref)


def test_gradcheck_float64():
    m = _randomise(CBAM(8, reduction=2), 7).train().double()
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(2, 8, 5, 4, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]

    def f(x, *ps):
        with _count_fused() as calls:
            y = torch.func.functional_call(m, dict(zip(names, ps)), (x,))
        assert calls, "the fused node did not run"
        return y

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7)


def test_compile_matches_eager():
    m = _randomise(CBAM(16, reduction=4, preset="mmyolo"), 8).train()
    x = _x((2, 16, 6, 6), "contiguous", torch.float32)
    eager = _step(copy.deepcopy(m), x)
    cm = torch.compile(m, backend="eager")
    with _count_fused() as calls:
        compiled = _step(cm, x)
    assert not calls  # under torch.compile the custom ops run, not the node
    for a, b in zip(eager, compiled):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channel_gate_gradient(dtype):
    # a loss on the channel gate too (what the node returns as its third output)
    m = _randomise(CBAM(16, reduction=4), 9).train()
    x = _x((2, 16, 5, 6), "channels_last", dtype)
    g = torch.Generator().manual_seed(3)
    r1, r2 = torch.randn(x.shape, generator=g), torch.randn(2, 16, 1, 1, generator=g)
    outs = []
    for fused in (False, True):
        mm = copy.deepcopy(m)
        xg = x.detach().clone().requires_grad_()
        with _count_fused() as calls:
            y, sa, cg = _fast_train.cbam_train(mm, xg) if fused else mm._channel_spatial(xg)
        assert len(calls) == int(fused)
        ((y.float() * r1).sum() + (cg * r2).sum()).backward()
        outs.append([y, sa, cg, xg.grad] + [p.grad for p in mm.parameters()] + list(mm.buffers()))
    _assert_same(outs[1], outs[0])


def test_malformed_mlp_bias_names_it_and_keeps_the_statistics():
    m = _randomise(CBAM(16, reduction=4), 10).train()
    with torch.no_grad():
        m.channel.fc1.bias = torch.nn.Parameter(torch.zeros(5))  # the MLP has 4 hidden units
    before = [b.clone() for b in m.buffers()]
    with pytest.raises(RuntimeError, match=r"bias1 has shape \[5\], expected \[4\]"):
        m(torch.randn(2, 16, 5, 5, requires_grad=True))
    _assert_same([b for b in m.buffers()], before)
