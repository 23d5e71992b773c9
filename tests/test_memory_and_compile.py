"""CBAM saves no full-size tensor besides its input for backward, a non-local block no
position-by-position attention; the modules compile with fullgraph."""
from __future__ import annotations

import copy

import pytest
import torch

from spatialattn.nn import CBAM, NonLocal2d, PointwiseSpatialAttention, SpatialAttention

from .nn._references import OfficialCBAM, randomize_


def _saved(fn, x, **kwargs):
    """The tensors autograd saves for backward in ``fn(x, **kwargs)``'s graph (then backward runs)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x, **kwargs)
    (out[0] if isinstance(out, tuple) else out).square().sum().backward()
    return saved


def _full_size_saved(fn, x):
    """Shapes of the saved-for-backward tensors as large as x that do not share x's storage."""
    own = x.untyped_storage().data_ptr()
    return [tuple(t.shape) for t in _saved(fn, x)
            if t.numel() >= x.numel() and t.untyped_storage().data_ptr() != own]


@pytest.mark.parametrize("arrangement", ["channel_spatial", "parallel"])
def test_cbam_saves_only_its_input(arrangement):
    m = CBAM(64, arrangement=arrangement).train()
    x = torch.randn(2, 64, 12, 12, requires_grad=True)
    assert _full_size_saved(m, x) == []
    m.eval()
    assert _full_size_saved(m, x) == []


def test_sam_saves_only_its_input():
    x = torch.randn(2, 64, 12, 12, requires_grad=True)
    assert _full_size_saved(SpatialAttention(64), x) == []


def test_straightforward_cbam_keeps_the_scaled_tensor():
    """The same probe on the straightforward composition finds x * channel_gate (the probe can fail)."""
    x = torch.randn(2, 64, 12, 12, requires_grad=True)
    assert len(_full_size_saved(randomize_(OfficialCBAM(64)), x)) >= 1


def test_compile_fullgraph_forward_backward():
    """One compile (it costs ~10 s): CBAM covers the channel gate, the SAM ops and their backward."""
    torch.manual_seed(0)
    m = randomize_(torch.nn.Sequential(CBAM(32), PointwiseSpatialAttention(32))).train()
    x = torch.randn(2, 32, 10, 9)
    gy = torch.randn_like(x)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_eager = m(x1)
    (y_eager * gy).sum().backward()  # before the compiled call updates the BN buffers in place
    compiled = torch.compile(m, fullgraph=True)
    y_comp = compiled(x2)
    (y_comp * gy).sum().backward()
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-5)


def test_compile_channels_last_model_training_step():
    """``model.to(memory_format=torch.channels_last)`` gives the 7x7 weight channels_last
    strides; the compiled training step had failed Inductor's stride check on that weight's
    gradient (the fakes gave it the weight's strides, the ops return it contiguous)."""
    torch.manual_seed(1)
    m = randomize_(SpatialAttention(16)).train().to(memory_format=torch.channels_last)
    assert not m.conv.weight.is_contiguous()
    mc = copy.deepcopy(m)
    x = torch.randn(2, 16, 9, 8).to(memory_format=torch.channels_last)
    gy = torch.randn_like(x)
    (m(x) * gy).sum().backward()
    (torch.compile(mc, fullgraph=True)(x) * gy).sum().backward()
    for (name, p), pc in zip(m.named_parameters(), mc.parameters()):
        torch.testing.assert_close(pc.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("momentum", [0.01, None])
@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_training_batchnorm_is_one_fused_op(momentum, channels_last):
    """Under torch.compile a SAM with a training BatchNorm is one ``spatialattn::sam_batchnorm``
    node (a compiled step had taken the unfused ops, four times the eager step's cost), and
    the step matches eager: output, gradients, running statistics (the cumulative average,
    ``momentum=None``, without a ``float()`` of the batch counter, which broke the graph)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    torch.manual_seed(0)
    m = randomize_(SpatialAttention(24, bn_momentum=momentum)).train()
    mc = copy.deepcopy(m)
    targets = []

    def record(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    x = torch.randn(3, 24, 11, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gy = torch.randn(x.shape)
    compiled = torch.compile(mc, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True)
    for _ in range(2):  # twice: the running statistics and the batch counter move on
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1 = m(x1)
        (y1 * gy).sum().backward()
        y2 = compiled(x2)
        (y2 * gy).sum().backward()
        torch.testing.assert_close(y2, y1, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)
    for (name, p1), p2 in zip(m.named_parameters(), mc.parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-5, atol=1e-5, msg=name)
    for (name, b1), b2 in zip(m.named_buffers(), mc.buffers()):
        torch.testing.assert_close(b2, b1, rtol=1e-6, atol=1e-7, msg=name)
    assert targets.count("spatialattn.sam_batchnorm.default") == 1, targets
    assert targets.count("spatialattn.sam_batchnorm_backward.default") == 1, targets
    assert not any("channel_pool" in t or "gate_multiply" in t for t in targets), targets


def _largest_saved(module, x, **kwargs):
    """Elements of the largest tensor autograd saves in ``module(x, **kwargs)``'s graph."""
    return max(t.numel() for t in _saved(module, x, **kwargs))


@pytest.mark.parametrize("mode,inner", [("embedded_gaussian", None), ("gaussian", 4)])
def test_nonlocal_training_keeps_no_position_by_position_attention(mode, inner):
    # without the map asked for, softmax attention over 2**18 position pairs and more runs as
    # torch's fused attention (an [N, L] log-sum-exp kept) instead of bmm + softmax, which
    # keeps the [N, L, M] attention for backward
    torch.manual_seed(0)
    n, c, h, w = 1, 4, 32, 32  # L = 1024 positions, M = 256 keys (pooled): 2**18 pairs
    # float64: the two paths then agree to rounding, also in the gradients of g's and phi's
    # biases, which are zero (float32 leaves 1e-3-sized noise there in both paths)
    # ("gaussian" compares the input's c channels: the values as wide, inner_channels = c)
    m = NonLocal2d(c, mode=mode, inter_channels=inner, sub_sample=True, zero_init=False).train().double()
    x = torch.randn(n, c, h, w, dtype=torch.float64, requires_grad=True)
    attention = n * (h * w) * (h * w // 4)
    assert _largest_saved(m, x) < attention // 16
    grads = [p.grad.clone() for p in m.parameters()], x.grad.clone()
    for p in m.parameters():
        p.grad = None
    x.grad = None
    # with the map asked for: bmm + softmax (the probe can fail), the same gradients
    assert _largest_saved(m, x, return_attention=True) >= attention
    scale = max(float(g.abs().max()) for g in grads[0])
    torch.testing.assert_close(x.grad, grads[1], rtol=1e-9, atol=1e-11)
    for p, g in zip(m.parameters(), grads[0]):
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12 * scale)
