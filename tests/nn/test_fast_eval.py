"""SpatialAttention inference by one direct kernel call (spatialattn.nn._fast_eval)."""
from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from spatialattn import functional as SF
from spatialattn.nn import SpatialAttention
from spatialattn.nn import CBAM, _fast_eval
from spatialattn.nn import cbam as cbam_module
from spatialattn.nn import spatial as spatial_module
from spatialattn.ops import _cpp


@pytest.fixture(autouse=True)
def need_cpp():
    if _cpp.get() is None:
        pytest.skip("C++ extension could not be built here (no compiler?)")


def _randomise(m: SpatialAttention, seed: int) -> SpatialAttention:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(m.parameters()) + [b for b in m.buffers() if b.is_floating_point()]:
            t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5 if t.dim() <= 1 else
                    torch.randn(t.shape, generator=g, dtype=t.dtype))
    return m


def _x(shape, layout, dtype, seed=0):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "noncontig":
        return torch.cat([x, x], dim=3)[..., ::2]
    return x


@contextlib.contextmanager
def _no_direct_call():
    orig = spatial_module.sam_eval
    spatial_module.sam_eval = lambda *a, **k: None
    try:
        yield
    finally:
        spatial_module.sam_eval = orig


def _ordinary(m, x, *args):
    with torch.no_grad(), _no_direct_call():
        return m.attend(x, *args)  # the module's ordinary path (functional -> ops)


def _fast(m, x):
    with torch.no_grad():
        out = _fast_eval.sam_eval(m, x)
        assert out is not None, "the direct call did not apply"
        y, a = m(x, return_attention=True)
    torch.testing.assert_close(y, out[0], rtol=0, atol=0)
    return y, a


def _same(got, want):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_same_bits_as_the_ordinary_path(layout, dtype):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for i, (norm, bias, dil, order, k, n) in enumerate(itertools.product(
            ["bn", None], [False, True], [1, 2], [("max", "mean"), ("mean",), ("mean", "max", "max")], [7, 3],
            [2, 0])):
        if i % 3:  # a third of the 96 combinations, all values of each option among them
            continue
        m = _randomise(SpatialAttention(12, k, order=order, norm=norm, bias=bias, dilation=dil), i).to(acc).eval()
        x = _x((n, 12, 9, 10), layout, dtype, seed=i)
        y, a = _fast(m, x)
        _same((y, a), _ordinary(m, x))
        assert y.dtype == dtype and a.dtype == acc


def test_used_without_autograd_only(monkeypatch):
    m = _randomise(SpatialAttention(8), 1).eval()
    x = torch.randn(2, 8, 5, 5)
    calls = []
    orig = SF.spatial_attention
    monkeypatch.setattr(SF, "spatial_attention", lambda *a, **k: calls.append(1) or orig(*a, **k))
    with torch.no_grad():
        y = m(x)
    assert not calls  # the direct call
    y_grad = m(x)  # autograd on: the ordinary path
    assert calls and y_grad.requires_grad
    torch.testing.assert_close(y_grad.detach(), y, rtol=0, atol=0)
    with torch.inference_mode():
        calls.clear()
        torch.testing.assert_close(m(x), y, rtol=0, atol=0)
        assert not calls


@pytest.mark.parametrize("change", ["gate", "train", "tensor_subclass", "inference_params",
                                    "wrong_channels", "three_channel_conv", "even_kernel"])
def test_falls_back_where_it_does_not_apply(change):
    ctx = torch.inference_mode() if change == "inference_params" else torch.no_grad()
    with ctx:  # a module made in inference mode has inference tensors: no version to key on
        m = _randomise(SpatialAttention(8), 2).eval()
    x = torch.randn(2, 8, 5, 5)
    if change == "gate":
        m.gate = "tanh"
    elif change == "train":
        m.train()
    elif change == "tensor_subclass":
        class Sub(torch.Tensor):
            pass
        x = x.as_subclass(Sub)
    elif change == "wrong_channels":
        x = torch.randn(2, 7, 5, 5)
    elif change == "three_channel_conv":  # a conv that does not match the pooling order
        m.conv = torch.nn.Conv2d(3, 1, 7, padding=3, bias=False)
    elif change == "even_kernel":
        m.conv = torch.nn.Conv2d(2, 1, 4, padding=2, bias=False)
    with torch.no_grad():
        out = _fast_eval.sam_eval(m, x)
        assert out is None
        if change in ("wrong_channels", "three_channel_conv", "even_kernel"):  # the ordinary path's error
            with pytest.raises(ValueError, match="expected shape|must be odd"):
                m(x)
            return
        y = m(x)
    ref = _ordinary(m, x)[0]
    torch.testing.assert_close(torch.as_tensor(y).as_subclass(torch.Tensor), ref.as_subclass(torch.Tensor),
                               rtol=0, atol=0)


def test_plan_follows_every_change():
    torch.manual_seed(0)
    m = _randomise(SpatialAttention(8, bias=True), 3).eval()
    x = torch.randn(2, 8, 6, 7)

    def check():
        _same(_fast(m, x), _ordinary(m, x))

    check()
    with torch.no_grad():
        m.conv.weight.mul_(-1.5)  # in place
    check()
    for _ in range(4):  # same object and version, new storage (a freed address may come back)
        m.conv.weight.data = torch.randn_like(m.conv.weight)
        check()
    m.conv.bias.data = torch.randn(1)
    check()
    with torch.no_grad():
        m.bn.running_var.mul_(3.0)
        m.bn.weight.fill_(-0.7)
    check()
    m.bn.eps = 0.3
    check()
    m.bn.running_mean = torch.full((1,), 0.4)  # a new tensor object
    check()
    m.load_state_dict({k: v * 0.5 for k, v in m.state_dict().items()})
    check()
    m.bn = torch.nn.BatchNorm2d(1).eval()  # a new norm
    check()
    m.bn = None
    check()
    m.dilation = 2
    check()
    m.order = ("mean",)
    m.conv = torch.nn.Conv2d(1, 1, 5, padding=2, bias=False)
    check()
    m.double()  # same parameters, new storages in another dtype
    y64 = _fast(m, x.double())[0]
    assert y64.dtype == torch.float64
    _same((y64,), _ordinary(m, x.double()))
    # a caller writing into the folded BatchNorm pair (ops.batchnorm_affine hands it out)
    m.bn = _randomise(torch.nn.BatchNorm2d(1), 4).double().eval()
    check64 = lambda: _same(_fast(m, x.double()), _ordinary(m, x.double()))  # noqa: E731
    check64()
    from spatialattn import ops

    with torch.no_grad():
        ops.batchnorm_affine(m.bn)[0].add_(1.0)
    check64()


@contextlib.contextmanager
def _no_direct_calls():
    """CBAM and SpatialAttention on their ordinary paths."""
    orig = cbam_module.cbam_eval
    cbam_module.cbam_eval = lambda *a, **k: None
    try:
        with _no_direct_call():
            yield
    finally:
        cbam_module.cbam_eval = orig


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", ["official", "timm", "ultralytics"])
def test_cbam_same_bits_as_the_ordinary_path(dtype, preset):
    torch.manual_seed(5)
    m = _randomise(CBAM(16, reduction=4, preset=preset), 5).eval()
    for layout in ("nchw", "channels_last", "noncontig"):
        x = _x((3, 16, 7, 9), layout, dtype, seed=6)
        with torch.no_grad():
            assert _fast_eval.cbam_eval(m, x) is not None
            got = m(x, return_attention=True)
            with _no_direct_calls():
                want = m(x, return_attention=True)
        _same(got, want)
        assert got[0].dtype == dtype


def test_cbam_plan_follows_every_change():
    m = _randomise(CBAM(16, reduction=4, preset="official"), 7).eval()
    m.keep_attention = True
    x = torch.randn(2, 16, 6, 5)

    def check(direct=True):
        with torch.no_grad():
            assert (_fast_eval.cbam_eval(m, x) is not None) == direct
            got = m(x, return_attention=True)
            cg = m.last_channel_attention
            with _no_direct_calls():
                want = m(x, return_attention=True)
        _same(got, want)
        _same((cg,), (m.last_channel_attention,))

    check()
    with torch.no_grad():
        m.channel.fc2.weight.mul_(-2.0)
    check()
    for _ in range(3):
        m.channel.fc1.weight.data = torch.randn_like(m.channel.fc1.weight)
        check()
    m.channel.fc1.bias.data = torch.randn(m.channel.fc1.bias.shape)
    check()
    with torch.no_grad():
        m.spatial.bn.running_mean.add_(0.5)  # the spatial half's own plan
    check()
    m.channel.pool_types = ("max",)
    check()
    m.channel.act = torch.nn.GELU()  # not the C++ MLP (ReLU only): the ordinary path
    check(direct=False)
    m.channel.act = torch.nn.ReLU()
    check()
    m.channel.gate = "hard_sigmoid"
    check(direct=False)
    m.channel.gate = "sigmoid"
    m.double()
    x = x.double()
    check()
    m.arrangement = "parallel"  # other arrangements: the ordinary path
    with torch.no_grad():
        y = m(x)
        with _no_direct_calls():
            _same((y,), (m(x),))
    m.arrangement = "channel_spatial"
    with torch.inference_mode():
        m2 = _randomise(CBAM(16, reduction=4), 8).eval()  # inference tensors: no plan
        assert _fast_eval.cbam_eval(m2, x.float()) is None
        y2 = m2(x.float())
    with torch.no_grad(), _no_direct_calls():
        _same((y2,), (m2(x.float()),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", ["official", "timm"])
def test_spatial_attend_with_channel_scale(dtype, preset):
    # CBAM's spatial half through spatial.attend(x, channel_scale)
    m = _randomise(CBAM(16, reduction=4, preset=preset), 5).eval()
    for layout in ("nchw", "channels_last"):
        x = _x((3, 16, 7, 9), layout, dtype, seed=6)
        cs = torch.rand(3, 16, 1, 1, dtype=torch.float32)  # a float32 scale on a bfloat16 x: rounded first
        with torch.no_grad():
            _same(m.spatial.attend(x, cs), _ordinary(m.spatial, x, cs))
            assert _fast_eval.sam_eval(m.spatial, x, cs[:2]) is None  # wrong shape: the ordinary path's error
        with pytest.raises(ValueError, match="channel_scale"):
            _ordinary(m.spatial, x, cs[:2])


def test_moving_a_module_drops_its_plans():
    # a plan holds the tensors it was made from: .to() / .double() / .cuda() drop it, so it
    # does not keep the old storages alive
    m = _randomise(CBAM(16, reduction=4), 9).eval()
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        m(x)  # CBAM's plan covers both halves
        m.spatial(x)  # the spatial half on its own: a plan of its own
    assert _fast_eval._PLAN in m.__dict__ and _fast_eval._PLAN in m.spatial.__dict__
    m.double()
    assert _fast_eval._PLAN not in m.__dict__ and _fast_eval._PLAN not in m.spatial.__dict__
    with torch.no_grad():
        y = m(x.double())
        with _no_direct_calls():
            _same((y,), (m(x.double()),))


def test_torch_compile_fullgraph_in_inference():
    # under torch.compile the direct calls step aside (is_compiling) and the graph holds the
    # ordinary path's custom ops: same numbers as eager inference, no graph break
    m = _randomise(torch.nn.Sequential(CBAM(16, reduction=4), SpatialAttention(16)), 10).eval()
    x = torch.randn(2, 16, 7, 6)
    with torch.no_grad():
        want = m(x)
        got = torch.compile(m, fullgraph=True)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("threads,batch", [(2, 1), (3, 2), (4, 1), (4, 3), (8, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cbam_one_call_below_the_thread_count(monkeypatch, threads, batch, dtype):
    # fewer images than threads: cbam_forward runs pooling, MLP, gate and SAM in one parallel
    # region, each phase split between the threads by hand (8 threads, 4 images: layer 2 as
    # lanes over the pooled vectors); the bits of the kernels called one by one
    ext = _cpp.get()
    calls = []
    real = ext.cbam_forward
    monkeypatch.setattr(ext, "cbam_forward", lambda *a: calls.append(1) or real(*a))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for shared, preset, order in ((0, "official", None), (0, "timm", ("max", "mean", "max")),
                                      (-1, "official", ("mean",))):
            ext.set_shared_bytes(shared)  # 0: every thread, however small the input; -1: the default
            m = _randomise(CBAM(32, reduction=4, preset=preset), 11).eval()
            m.to(torch.float64 if dtype == torch.float64 else torch.float32)  # parameters in the compute dtype
            m.keep_attention = True
            if order is not None:
                m.channel.pool_types = order
            for layout in ("nchw", "channels_last", "noncontig"):
                x = _x((batch, 32, 9, 11), layout, dtype, seed=12)
                with torch.no_grad():
                    n = len(calls)
                    got = m(x, return_attention=True)
                    assert len(calls) == n + 1, "cbam_forward was not called"
                    cg = m.last_channel_attention
                    with _no_direct_calls():
                        want = m(x, return_attention=True)
                _same(got, want)
                _same((cg,), (m.last_channel_attention,))
                fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                assert got[0].dtype == dtype and got[0].is_contiguous(memory_format=fmt)
    finally:
        torch.set_num_threads(old)
        ext.set_shared_bytes(-1)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_parameters_fuse_like_float32_ones(layout, dtype, monkeypatch):
    # a model.half() / .bfloat16(): its SAMs and CBAMs took the layered path (torch's conv,
    # BatchNorm in half precision, sigmoid, then the product; 2.3-4.3x the time of the fused
    # op on the CPU). Now their half parameters are converted to float32 (exactly) and the
    # fused kernels run: the same bits as a float32 copy of the module, in inference (the
    # direct call) and with autograd on (the ordinary path), the weight's gradient in dtype
    def unfused(*a, **k):
        raise AssertionError("the layered (unfused) SAM path was taken")

    monkeypatch.setattr(SF, "spatial_attention_map", unfused)
    configs = [("sam", norm, bias) for norm in ("bn", None) for bias in (False, True)] + [("cbam", "bn", False)]
    for i, (kind, norm, bias) in enumerate(configs):
        def make():
            return CBAM(12, preset="official") if kind == "cbam" else SpatialAttention(12, 7, norm=norm, bias=bias)

        half = _randomise(make(), i).to(dtype).eval()
        full = make().eval()
        full.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in half.state_dict().items()})
        x = _x((3, 12, 9, 10), layout, dtype, seed=i)
        with torch.no_grad():
            _same([half(x)], [full(x)])
        y_half, y_full = half(x), full(x)  # autograd on: the ordinary path, the fused op
        _same([y_half], [y_full])
        if kind == "sam":
            g = torch.randn(y_half.shape, generator=torch.Generator().manual_seed(i)).to(dtype)
            y_half.backward(g)
            y_full.backward(g)
            w_half, w_full = half.conv.weight.grad, full.conv.weight.grad
            assert w_half.dtype == dtype
            torch.testing.assert_close(w_half, w_full.to(dtype), rtol=0, atol=0)


def test_frozen_batchnorm_fuses_and_the_plan_follows_its_buffers(monkeypatch):
    # detector code freezes every BatchNorm (torchvision's FrozenBatchNorm2d: an affine map
    # with buffers for parameters, in training too); the SAM's then folds like an eval one
    from torchvision.ops.misc import FrozenBatchNorm2d

    from spatialattn import ops

    from ._references import sam_reference

    m = _randomise(SpatialAttention(8), 5).eval()
    m.bn = _randomise(FrozenBatchNorm2d(1), 6)
    x = torch.randn(2, 8, 6, 7)

    def check():
        y, a = _fast(m, x)  # (asserts the direct call applies)
        _same((y, a), _ordinary(m, x))
        y_ref, a_ref = sam_reference(x.double(), m.conv.weight.double(), None, m.order, m.bn.double())
        m.bn.float()
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-6, atol=1e-6)

    check()
    with torch.no_grad():
        m.bn.weight.fill_(-0.7)
        m.bn.running_var.mul_(3.0)
    check()
    m.load_state_dict({k: v * 0.5 for k, v in m.state_dict().items()})
    check()
    # training: one fused op (its affine pair constant), gradients as the layered reference
    calls = []
    fused = ops.spatial_attention_fused
    monkeypatch.setattr(ops, "spatial_attention_fused", lambda *a, **k: calls.append(1) or fused(*a, **k))
    m.train()
    x1, x2 = x.clone().requires_grad_(), x.double().requires_grad_()
    m(x1).square().sum().backward()
    w = m.conv.weight.detach().double().requires_grad_()
    sam_reference(x2, w, None, m.order, m.bn.double())[0].square().sum().backward()
    m.bn.float()
    assert calls
    torch.testing.assert_close(x1.grad.double(), x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.conv.weight.grad.double(), w.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["sam", "cbam", "functional", "frozen"])
def test_cached_batchnorm_fold_sees_updates_that_bump_no_version(kind):
    # torch's BatchNorm updates its running statistics in training without bumping their
    # version counters, and writes through `.data` do not bump them either: caches keyed on
    # versions (the inference plan, ops.batchnorm_affine's pair) served the old fold
    from torchvision.ops.misc import FrozenBatchNorm2d

    from spatialattn import ops

    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)
    w = torch.randn(1, 2, 7, 7)
    if kind == "functional":
        bn = torch.nn.BatchNorm2d(1).eval()
        run = lambda: SF.spatial_attention(x, w, norm=bn)  # noqa: E731
    else:
        m = SpatialAttention(8) if kind in ("sam", "frozen") else CBAM(8, reduction=2)
        if kind == "frozen":
            m.bn = _randomise(FrozenBatchNorm2d(1), 3)
        m.eval()
        bn = m.bn if kind != "cbam" else m.spatial.bn
        run = lambda: m(x)  # noqa: E731

    def check():
        with torch.no_grad():
            got = run()
            with ops.decomposed():  # (no cache there)
                want = run()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)

    check()  # the fold is cached now
    if kind != "frozen":  # torch's BatchNorm trains its statistics (without version bumps)
        before = bn.running_var._version
        bn.train()
        with torch.no_grad():
            bn(torch.randn(4, 1, 5, 5) * 3 + 1)
        bn.eval()
        assert bn.running_var._version == before  # (what made the caches stale)
        check()
    for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias):  # writes through .data
        t.data.add_(0.25)
        check()


def test_plan_dropped_when_the_mode_changes():
    # torch.optim's fused optimizers update parameters without bumping their version counters;
    # a plan holding converted copies (a model held in bfloat16) served the old weights
    torch.manual_seed(0)
    m = SpatialAttention(16, bias=True, norm=None).bfloat16()
    x = torch.randn(2, 16, 8, 8, dtype=torch.bfloat16)
    opt = torch.optim.AdamW(m.parameters(), lr=0.05, fused=True)
    m.eval()
    with torch.no_grad():
        m(x)
    m.train()
    for _ in range(2):
        opt.zero_grad()
        m(x).float().square().mean().backward()
        v = m.conv.weight._version
        opt.step()
    m.eval()
    with torch.no_grad():
        y = m(x)
        m.bfloat16()  # (drops the plans: a fresh one)
        want = m(x)
    assert m.conv.weight._version == v  # (what the plan's key could not see)
    torch.testing.assert_close(y, want, rtol=0, atol=0)


def test_off_cpu_pair_keyed_on_versions_and_dropped_at_a_mode_switch():
    # off the CPU (here the meta device: no data to read) the BatchNorm pair is keyed on
    # versions, and an attention module's train() / eval() drops it (what follows training
    # through torch's BatchNorm, which bumps no version); ops.clear_batchnorm_cache for others
    from spatialattn import ops

    m = SpatialAttention(8).to("meta").eval()
    with torch.no_grad():
        first = ops.batchnorm_affine(m.bn, torch.float32)
        assert ops.batchnorm_affine(m.bn, torch.float32)[0] is first[0]  # cached
        with torch.no_grad():
            m.bn.running_var.add_(1.0)  # a version bump: a new pair
        second = ops.batchnorm_affine(m.bn, torch.float32)
        assert second[0] is not first[0]
        m.train()
        m.eval()
        third = ops.batchnorm_affine(m.bn, torch.float32)
        assert third[0] is not second[0]
        assert ops.batchnorm_affine(m.bn, torch.float32)[0] is third[0]
        ops.clear_batchnorm_cache(m.bn)
        assert ops.batchnorm_affine(m.bn, torch.float32)[0] is not third[0]
