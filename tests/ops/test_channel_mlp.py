"""ops.channel_mlp_gate (CBAM's channel gate from pooled maps) against the plain reference."""
from __future__ import annotations

import pytest
import torch

from spatialattn import CBAM, ops
from spatialattn.nn import _fast_train
from spatialattn.ops import _cpp, reference
from spatialattn.ops import _library as lib

from ._autograd_graph import node_names


@pytest.fixture(scope="module", autouse=True)
def cpp_module():
    if _cpp.get() is None:
        pytest.skip("C++ extension could not be built here (no compiler?)")


def make_args(p, n, c, r, two=True, bias=True, dtype=torch.float64, seed=0):
    """pooled, w1, b1, w2, b2 with weights scaled so the logits are O(1) (the gate is not saturated)."""
    g = torch.Generator().manual_seed(seed)
    r1 = r if two else c
    pooled = torch.randn(p, n, c, generator=g, dtype=dtype)
    w1 = torch.randn(r1, c, generator=g, dtype=dtype) / c ** 0.5
    b1 = torch.randn(r1, generator=g, dtype=dtype) if bias else None
    w2 = torch.randn(c, r, generator=g, dtype=dtype) / r ** 0.5 if two else None
    b2 = torch.randn(c, generator=g, dtype=dtype) if (two and bias) else None
    return [pooled, w1, b1, w2, b2]


def assert_as_close_as_reference(got, ref, exact):
    """float32 `got` about as close to the float64 `exact` as the reference's float32 `ref`
    (within 3x its error). Our sums have the same bits in every instruction-set build; torch's
    do not: in the baseline build (ATEN_CPU_CAPABILITY=default) its float32 reference of
    test_sums_split_into_blocks_match_reference came 2.9e-6 from float64 where ours is 7.0e-6
    (2000-term sums), more accurate than in the AVX2 / AVX-512 builds."""
    err = (got.double() - exact).abs().max().item()
    ref_err = (ref.double() - exact).abs().max().item()
    assert err <= 3 * ref_err + 1e-7 * exact.abs().max().item(), (err, ref_err)


# (P, N, C, R): lane tails (37, 5, 24), the q-lane layer 2 (2 * N * P >= 16) and the
# dot-product one (one image), CBAM-sized maps; the last two: AVX-512 builds' wide kernels
# (layer 1 by pairs of weight rows, an odd row left over, pooled vectors by three with one
# left over; layer 2 by 4, 2 and 1 blocks of q: 112 pooled vectors are 7 blocks of 16 lanes
# in float32, 14 of 8 in float64; R % 4 rows in the tail)
SHAPES = [(2, 8, 512, 32), (2, 1, 1024, 64), (1, 3, 37, 5), (3, 2, 24, 3), (2, 5, 96, 6), (2, 56, 37, 7),
          (1, 40, 64, 9)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("two", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_reference(shape, two, bias):
    args = make_args(*shape, two=two, bias=bias)
    exact = reference.channel_mlp_gate(*args)
    torch.testing.assert_close(ops.channel_mlp_gate(*args), exact, rtol=1e-12, atol=1e-14)
    a32 = [None if t is None else t.float() for t in args]
    got = ops.channel_mlp_gate(*a32)
    assert got.dtype == torch.float32 and got.shape == exact.shape
    # float32 sums of up to 1024 products, in an order of their own: within what the
    # reference's own float32 result is from the exact one, a few times over
    ref_err = (reference.channel_mlp_gate(*a32).double() - exact).abs().max().item()
    err = (got.double() - exact).abs().max().item()
    assert err < max(4 * ref_err, 2e-6), (err, ref_err)


@pytest.mark.parametrize("shape", [(2, 3, 37, 5), (1, 2, 20, 4), (3, 1, 9, 2)])
@pytest.mark.parametrize("two", [True, False])
def test_gradcheck(shape, two):
    args = [None if t is None else t.requires_grad_() for t in make_args(*shape, two=two)]
    assert torch.autograd.gradcheck(lambda *a: ops.channel_mlp_gate(*a), args)


@pytest.mark.parametrize("needs", [(True, False, False, False, False), (False, True, True, False, False),
                                   (False, False, False, True, False), (True, True, True, True, True)])
def test_backward_matches_reference_for_each_input(needs):
    shape = (2, 8, 512, 32)
    base = make_args(*shape, dtype=torch.float32)
    ours = [t.clone().requires_grad_(need) for t, need in zip(base, needs)]
    refs = [t.clone().requires_grad_(need) for t, need in zip(base, needs)]
    exact = [t.double().requires_grad_(need) for t, need in zip(base, needs)]
    gy = torch.randn(shape[1], shape[2])
    g_ours = ops.channel_mlp_gate(*ours)
    assert "ChannelMlpGateBackward" in node_names(g_ours)
    g_ours.backward(gy)
    reference.channel_mlp_gate(*refs).backward(gy)
    reference.channel_mlp_gate(*exact).backward(gy.double())
    for a, b, e, need in zip(ours, refs, exact, needs):
        assert (a.grad is not None) == need
        if need:
            assert_as_close_as_reference(a.grad, b.grad, e.grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sums_split_into_blocks_match_reference(dtype):
    # 2000 x 40 weights (320 KB in float32): layer 1 takes weight1's rows in blocks (2 in
    # float32, 3 in float64), the backward sums weight2's 2000 rows in 5 / 10 blocks, each
    # resuming the last's sums; 3 images (pairs of outputs and one left over), 40 hidden units
    # (a vector pair and a scalar tail), 2000 channels (a last column block of 16)
    shape = (2, 3, 2000, 40)
    base = make_args(*shape, dtype=dtype, seed=5)
    ours = [t.clone().requires_grad_() for t in base]
    exact = [t.double().requires_grad_() for t in base]
    gy = torch.randn(shape[1], shape[2], generator=torch.Generator().manual_seed(6), dtype=dtype)
    g = ops.channel_mlp_gate(*ours)
    assert "ChannelMlpGateBackward" in node_names(g)
    g.backward(gy)
    e = reference.channel_mlp_gate(*exact)
    e.backward(gy.double())
    if dtype == torch.float64:
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)
        for a, b in zip(ours, exact):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-11, atol=1e-13)
        return
    refs = [t.clone().requires_grad_() for t in base]
    reference.channel_mlp_gate(*refs).backward(gy)
    assert (g.double() - e).abs().max().item() < 2e-6
    for a, b, x in zip(ours, refs, exact):
        assert_as_close_as_reference(a.grad, b.grad, x.grad)


def test_thread_count_does_not_change_results():
    # big enough that every loop runs in parallel chunks with two threads
    args = [t.float().requires_grad_() for t in make_args(4, 16, 1024, 64)]
    gy = torch.randn(16, 1024)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            g = ops.channel_mlp_gate(*args)
            grads = torch.autograd.grad(g, args, gy)
            outs.append([g, *grads])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_empty_batch_and_nan():
    args = make_args(2, 0, 16, 4)
    args = [t.requires_grad_() for t in args]
    g = ops.channel_mlp_gate(*args)
    assert g.shape == (0, 16)
    g.sum().backward()
    assert args[0].grad.shape == (2, 0, 16) and torch.equal(args[1].grad, torch.zeros_like(args[1]))
    args = make_args(2, 2, 16, 4)
    args[0][1, 0, 3] = float("nan")  # reaches every logit of image 0 through the relu
    g = ops.channel_mlp_gate(*args)
    assert torch.isnan(g[0]).all() and not torch.isnan(g[1]).any()


def test_saturated_logits():
    args = make_args(2, 4, 64, 8, dtype=torch.float32)
    args[3] = args[3] * 200  # logits in the hundreds: sigmoid is 0 or 1 in float32
    got = ops.channel_mlp_gate(*args)
    assert torch.isfinite(got).all() and ((got == 0) | (got == 1)).float().mean() > 0.5
    # where the two layers' sums of hundreds cancel to a small logit, any float32 order of
    # additions is off by up to a few 1e-6 (x86: ours 6e-7, torch's 1.3e-6; the generic build on
    # aarch64, emulated: ours 2.2e-6, torch's 3.5e-6, which had failed an rtol of 1e-5 against
    # torch's float32 result): both against the float64 result
    want = reference.channel_mlp_gate(*[a.double() for a in args])
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(reference.channel_mlp_gate(*args).double(), want, rtol=0, atol=1e-5)


def test_bad_shapes_say_what_was_expected():
    pooled, w1, b1, w2, b2 = make_args(2, 3, 32, 4)
    with pytest.raises(ValueError, match=r"\[P, N, C\]"):
        ops.channel_mlp_gate(pooled[0], w1, b1, w2, b2)
    with pytest.raises(RuntimeError, match=r"weight2 has shape \[32, 5\], expected \[32, 4\]"):
        ops.channel_mlp_gate(pooled, w1, b1, torch.zeros(32, 5, dtype=pooled.dtype), b2)
    with pytest.raises(RuntimeError, match="single layer must map 32 channels to 32"):
        ops.channel_mlp_gate(pooled, w1, b1)


def test_fallbacks_use_the_reference(monkeypatch):
    args = make_args(2, 3, 40, 5, dtype=torch.float32)
    expected = reference.channel_mlp_gate(*args)
    # float16, and no C++ build: the reference decomposition
    half = [t.half() for t in args]
    got = ops.channel_mlp_gate(*half)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=2e-3)  # float16 rounding of the same math
    monkeypatch.setattr(_cpp, "get", lambda: None)
    g = ops.channel_mlp_gate(*[t.requires_grad_() for t in args])
    assert "ChannelMlpGateBackward" not in node_names(g)
    torch.testing.assert_close(g, expected, rtol=0, atol=0)


def test_torch_compile_and_func_transforms():
    args = make_args(2, 3, 40, 5, dtype=torch.float32)
    expected = reference.channel_mlp_gate(*args)
    compiled = torch.compile(ops.channel_mlp_gate, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), expected, rtol=1e-6, atol=1e-7)
    # torch.func sees the reference (our Function has no functorch rules)
    gw = torch.func.grad(lambda w: ops.channel_mlp_gate(args[0], w, *args[2:]).sum())(args[1])
    w = args[1].clone().requires_grad_()
    reference.channel_mlp_gate(args[0], w, *args[2:]).sum().backward()
    torch.testing.assert_close(gw, w.grad)


@pytest.mark.parametrize("preset", ["paper", "ultralytics"])
def test_cbam_training_step_uses_the_fused_gate(preset, monkeypatch):
    torch.manual_seed(0)
    m = CBAM(48, preset=preset)
    x = torch.randn(2, 48, 9, 7, requires_grad=True)
    calls = []
    real = lib.ChannelMlpGate.apply
    monkeypatch.setattr(lib.ChannelMlpGate, "apply", lambda *a: calls.append(1) or real(*a))
    # the module path (CBAM training otherwise runs as one node: tests/nn/test_fast_train.py)
    monkeypatch.setattr(_fast_train, "ENABLED", False)
    y = m(x)
    y.square().sum().backward()
    grads = [x.grad] + [p.grad for p in m.parameters()]
    assert calls
    # the same step with the gate's plain decomposition
    monkeypatch.setattr(ops, "channel_mlp_gate", reference.channel_mlp_gate)
    x2 = x.detach().clone().requires_grad_()
    m.zero_grad()
    y2 = m(x2)
    y2.square().sum().backward()
    torch.testing.assert_close(y, y2, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, [x2.grad] + [p.grad for p in m.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
