"""The functional layer: semantics, gradients (incl. ties), errors."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from spatialattn import functional as SF
from spatialattn import ops


def test_channel_pool_orders_and_aliases():
    x = torch.randn(2, 5, 3, 4)
    mx, mn = x.amax(1, keepdim=True), x.mean(1, keepdim=True)
    torch.testing.assert_close(SF.channel_pool(x), torch.cat([mx, mn], 1))
    torch.testing.assert_close(SF.channel_pool(x, ("avg", "max")), torch.cat([mn, mx], 1))
    torch.testing.assert_close(SF.channel_pool(x, "max"), mx)
    assert SF.channel_pool(x.half(), dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="unknown pooling 'min'"):
        SF.channel_pool(x, ("min",))


@pytest.mark.parametrize("order", [("max", "mean"), ("mean", "max"), ("max",)])
def test_spatial_attention_with_channel_scale_gradcheck(order):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    cs = torch.rand(2, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, len(order), 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, dtype=torch.float64, requires_grad=True)

    def f(x, cs, w, b):
        return SF.spatial_attention(x, w, b, order=order, channel_scale=cs)

    assert torch.autograd.gradcheck(f, (x, cs, w, b))


def test_spatial_attention_equals_composition():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 7, dtype=torch.float64)
    cs = torch.rand(2, 8, 1, 1, dtype=torch.float64)
    w = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    xs = x * cs
    p = torch.cat([xs.amax(1, keepdim=True), xs.mean(1, keepdim=True)], 1)
    a = torch.sigmoid(F.conv2d(p, w, padding=4, dilation=2))
    y, attn = SF.spatial_attention(x, w, dilation=2, channel_scale=cs, return_attention=True)
    torch.testing.assert_close(y, xs * a)
    torch.testing.assert_close(attn, a)


def test_max_gradient_at_ties_is_split_evenly():
    """amax semantics: tied channels share the gradient (torch.max(x, 1) would send it to one)."""
    x = torch.zeros(1, 4, 1, 1, dtype=torch.float64)
    x[0, 1] = x[0, 3] = 2.0  # tie between channels 1 and 3
    x.requires_grad_(True)
    w = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    w[0, 0] = 1.0
    cs = torch.ones(1, 4, 1, 1, dtype=torch.float64, requires_grad=True)
    attn = SF.spatial_attention_map(x, w, order=("max",), gate=lambda t: t, channel_scale=cs)
    attn.sum().backward()
    torch.testing.assert_close(x.grad.flatten(), torch.tensor([0.0, 0.5, 0.0, 0.5], dtype=torch.float64))


def test_pointwise_attention_shapes_and_errors():
    x = torch.randn(2, 4, 3, 3)
    g = torch.rand(2, 4, 3, 3)
    torch.testing.assert_close(SF.pointwise_attention(x, g), x * g)
    torch.testing.assert_close(SF.pointwise_attention(x, g[:, :1]), x * g[:, :1])
    with pytest.raises(ValueError, match=r"gate: expected shape \(2, 4, 3, 3\).*got \(2, 4, 3, 2\)"):
        SF.pointwise_attention(x, g[..., :2])
    assert SF.pointwise_attention(x.half(), g).dtype == torch.float16


def test_channel_attention_single_layer_and_mlp():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    w1, b1 = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    w2, b2 = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    mlp = lambda v: F.linear(F.relu(F.linear(v, w1, b1)), w2, b2)  # noqa: E731
    g = torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))[..., None, None]
    torch.testing.assert_close(SF.channel_attention(x, w1, b1, w2, b2), x * g)
    w = torch.randn(6, 6, 1, 1, dtype=torch.float64)
    g1 = torch.sigmoid(F.conv2d(x.mean((2, 3), keepdim=True), w))
    torch.testing.assert_close(SF.channel_attention(x, w, pool_types="avg"), x * g1)


def test_normalize_pool_order_cached_per_input():
    # results are cached by the (hashable) order given: each input keeps its own answer
    calls = [("max",), "max", ("max", "avg"), "avg", ["avg", "max"], ("MEAN", "max"), "max", ("max", "avg")]
    want = [("max",), ("max",), ("max", "mean"), ("mean",), ("mean", "max"), ("mean", "max"), ("max",), ("max", "mean")]
    for _ in range(2):
        assert [SF.normalize_pool_order(o) for o in calls] == want
    with pytest.raises(ValueError, match="unknown pooling 'min'"):
        SF.normalize_pool_order(("max", "min"))
    with pytest.raises(ValueError, match="at least one"):
        SF.normalize_pool_order(())


@pytest.mark.parametrize("activation", ["module", "functional", "torch", "silu", "needs_4d"])
def test_channel_gate_activations(activation):
    # ReLU runs on the [P * N, r] rows directly; any other activation sees the
    # [P * N, r, 1, 1] maps of the 1x1-conv formulation
    torch.manual_seed(0)
    x = torch.randn(3, 8, 5, 4, dtype=torch.float64)
    w1, b1 = torch.randn(2, 8, 1, 1, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    w2, b2 = torch.randn(8, 2, 1, 1, dtype=torch.float64), torch.randn(8, dtype=torch.float64)

    def needs_4d(t):
        assert t.dim() == 4 and t.shape[2:] == (1, 1)
        return torch.tanh(t)

    act = {"module": torch.nn.ReLU(inplace=True), "functional": F.relu, "torch": torch.relu,
           "silu": torch.nn.SiLU(), "needs_4d": needs_4d}[activation]
    ref_act = torch.relu if activation in ("module", "functional", "torch") else (
        F.silu if activation == "silu" else torch.tanh)
    mlp = lambda v: F.conv2d(ref_act(F.conv2d(v, w1, b1)), w2, b2)  # noqa: E731
    want = torch.sigmoid(mlp(x.mean((2, 3), keepdim=True)) + mlp(x.amax((2, 3), keepdim=True)))
    got = SF.channel_gate(x, w1, b1, w2, b2, activation=act, pool_types=("avg", "max"))
    torch.testing.assert_close(got, want)


def test_input_checks_name_expected_and_found():
    with pytest.raises(ValueError, match=r"expected a 4-D tensor.*got shape \(3, 4\)"):
        SF.channel_pool(torch.randn(3, 4))
    for dtype in (torch.int64, torch.uint8, torch.bool):  # torch's own error would name mean() or a conv
        with pytest.raises(TypeError, match=f"input: expected a floating-point tensor, got {dtype}"):
            SF.spatial_attention(torch.ones(1, 4, 5, 5, dtype=dtype), torch.randn(1, 2, 3, 3))
        with pytest.raises(TypeError, match=f"input: expected a floating-point tensor, got {dtype}"):
            SF.channel_attention(torch.ones(1, 4, 5, 5, dtype=dtype), torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"weight: expected shape \(1, 2, k, k\), got \(1, 3, 7, 7\)"):
        SF.spatial_attention(torch.randn(1, 4, 5, 5), torch.randn(1, 3, 7, 7))
    with pytest.raises(ValueError, match="odd"):
        SF.spatial_attention(torch.randn(1, 4, 5, 5), torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"channel_scale: expected shape \(1, 4, 1, 1\)"):
        SF.spatial_attention(torch.randn(1, 4, 5, 5), torch.randn(1, 2, 3, 3), channel_scale=torch.rand(1, 3, 1, 1))
    with pytest.raises(ValueError, match="unknown gate"):
        SF.get_gate("softsign")
    x, w = torch.randn(1, 4, 5, 5), torch.randn(1, 2, 3, 3)
    for kwargs in ({}, {"norm": torch.nn.BatchNorm2d(1).eval()}, {"norm": torch.nn.BatchNorm2d(1)}, {"gate": "hard_sigmoid"}):
        # every route (fused, fused with the training BatchNorm, unfused) checks the same way
        with pytest.raises(ValueError, match=r"bias: expected shape \(1,\), got \(2,\)"):
            SF.spatial_attention(x, w, torch.randn(2), **kwargs)
        for dilation in (0, -1, 1.5):
            with pytest.raises(ValueError, match=f"dilation: expected a positive int, got {dilation}"):
                SF.spatial_attention(x, w, dilation=dilation, **kwargs)


@pytest.mark.parametrize("mode", ["embedded_gaussian", "dot_product", "concatenation"])
def test_position_attention_rows(mode):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 6), torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    out, attn = SF.position_attention(q, k, v, mode, concat_weight=torch.randn(6))
    assert attn.shape == (2, 6, 4)
    if mode == "embedded_gaussian":
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, 6))
    torch.testing.assert_close(out, torch.einsum("nlm,nem->nel", attn, v))


@pytest.mark.parametrize("gate", ["sigmoid", "Sigmoid", "SIGMOID", torch.sigmoid])
@pytest.mark.parametrize("norm", [None, "bn-train", "bn-eval"])
def test_sigmoid_gate_in_any_case_takes_the_fused_op(gate, norm):
    # get_gate resolves a gate name in any case; the fused SAM (plain, eval-mode BatchNorm as
    # an affine map, training-mode BatchNorm) takes every spelling of the sigmoid as the
    # channel gate's fused MLP does, with the numbers of the lower-case name.
    from tests.ops._autograd_graph import node_names

    if ops.backend(torch.randn(1, 1, 1, 1)) != "cpp":
        pytest.skip("no fused CPU backend")
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 8, 9, 9, generator=g)
    w = torch.randn(1, 2, 7, 7, generator=g)
    bn = None
    if norm is not None:
        bn = torch.nn.BatchNorm2d(1)
        bn.running_mean.fill_(0.3)
        bn.running_var.fill_(2.0)
        bn.train(norm == "bn-train")
    runs = []
    for gt in (gate, "sigmoid"):
        x = x0.clone().requires_grad_()
        y = SF.spatial_attention(x, w, gate=gt, norm=copy.deepcopy(bn) if bn is not None else None)
        names = node_names(y)
        assert {"EagerSamBackward", "CppSamBatchNormBackward"} & names, names
        runs.append((y, torch.autograd.grad(y.sum(), x)[0]))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
