"""Tests of :func:`spatialattn.surgery.insert_attention` (attention in residual blocks)."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tvr
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

from spatialattn.nn import CBAM, SpatialAttention
from spatialattn.surgery import (
    BasicBlockWithAttention,
    BottleneckWithAttention,
    attention_names,
    has_attention,
    insert_attention,
)


def _nparams(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _tiny_bottleneck_resnet(**kw) -> tvr.ResNet:
    return tvr.ResNet(tvr.Bottleneck, [1, 1, 1, 1], num_classes=5, **kw)


def _tiny_basic_resnet() -> tvr.ResNet:
    return tvr.ResNet(tvr.BasicBlock, [1, 1, 1, 1], num_classes=5)


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial BN statistics so eval-mode outputs are not dominated by init values."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


class Recorder(nn.Module):
    """Attention stand-in: records its input and multiplies it by a constant."""

    def __init__(self, channels: int, scale: float = 0.0) -> None:
        super().__init__()
        self.channels = channels
        self.scale = scale
        self.seen = None

    def forward(self, x, return_attention=False):
        self.seen = x.detach().clone()
        y = x * self.scale
        return (y, torch.full_like(x[:, :1], self.scale)) if return_attention else y


# ----------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize(
    "arch, expected",
    # CBAM paper (Woo et al. 2018) Table 4: ResNet-50 + CBAM 28.09M, ResNet-101 + CBAM 49.33M;
    # ResNet-18/34 + CBAM: 11.78M / 21.96M (paper Table 4 / our count).
    [("resnet18", 11.78), ("resnet34", 21.96), ("resnet50", 28.09), ("resnet101", 49.33)],
)
def test_cbam_parameter_counts(arch, expected):
    with torch.device("meta"):  # counts only: no weight initialisation
        model = getattr(torchvision.models, arch)()
    base = _nparams(model)
    model, names = insert_attention(model, "cbam")
    assert round(_nparams(model) / 1e6, 2) == expected
    # the added parameters are exactly those of one CBAM per block with the block's output channels
    blocks = [model.get_submodule(n.rsplit(".", 1)[0]) for n in names]
    outs = [b.conv3.out_channels if isinstance(b, tvr.Bottleneck) else b.conv2.out_channels for b in blocks]
    with torch.device("meta"):
        assert _nparams(model) - base == sum(_nparams(CBAM(c)) for c in outs)
    assert len(names) == {"resnet18": 8, "resnet34": 16, "resnet50": 16, "resnet101": 33}[arch]


def test_resnet50_alone_has_25_56m():
    with torch.device("meta"):
        assert round(_nparams(torchvision.models.resnet50()) / 1e6, 2) == 25.56


# ----------------------------------------------------------------------------- placement and values


@pytest.mark.parametrize("make", [_tiny_basic_resnet, _tiny_bottleneck_resnet])
def test_none_attention_keeps_outputs(make):
    torch.manual_seed(0)
    ref = make().eval()
    _randomize_bn(ref)
    model = copy.deepcopy(ref)
    insert_attention(model, "none")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("make", [_tiny_basic_resnet, _tiny_bottleneck_resnet])
def test_attention_sits_after_last_norm_before_addition(make):
    torch.manual_seed(0)
    model = make().eval()
    _randomize_bn(model)
    block = model.layer2[0]  # has a downsample branch
    last_bn = block.bn3 if isinstance(block, tvr.Bottleneck) else block.bn2
    captured = {}
    last_bn.register_forward_hook(lambda m, i, o: captured.__setitem__("bn", o.detach().clone()))
    x = torch.randn(2, block.conv1.in_channels, 16, 16)
    insert_attention(model, Recorder, stages=(2,), scale=0.0)
    y = block(x)
    # the attention received the output of the last norm ...
    torch.testing.assert_close(block.attention.seen, captured["bn"], rtol=0, atol=0)
    # ... and zeroing the residual branch leaves relu(shortcut): the addition comes after it
    torch.testing.assert_close(y, torch.relu(block.downsample(x)))


def test_sam_block_matches_manual_reference():
    torch.manual_seed(0)
    model = _tiny_bottleneck_resnet().eval()
    _randomize_bn(model)
    insert_attention(model, "sam")
    b = model.layer3[0]
    with torch.no_grad():
        b.attention.conv.weight.normal_()
    x = torch.randn(2, b.conv1.in_channels, 8, 8)
    with torch.no_grad():
        out = torch.relu(b.bn1(b.conv1(x)))
        out = torch.relu(b.bn2(b.conv2(out)))
        out = b.bn3(b.conv3(out))
        # CBAM SAM written out: [max, mean] over channels, 7x7 conv, BN (eval), sigmoid
        pooled = torch.cat([out.amax(1, keepdim=True), out.mean(1, keepdim=True)], 1)
        logit = nn.functional.conv2d(pooled, b.attention.conv.weight, padding=3)
        bn = b.attention.bn
        logit = (logit - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
        logit = logit * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
        expected = torch.relu(out * torch.sigmoid(logit) + b.downsample(x))
        # float32 error is relative to the operands (|out| up to ~9 here, logits up to ~40),
        # not to the result: where out * gate and the shortcut nearly cancel, a last-bit
        # difference in the gate shows as a large relative error of the sum
        torch.testing.assert_close(b(x), expected, rtol=1e-5, atol=1e-6 * float(out.abs().max()))


def test_backward_reaches_attention_and_block():
    torch.manual_seed(0)
    model = _tiny_basic_resnet()
    insert_attention(model, "cbam")
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    for name in attention_names(model):
        att = model.get_submodule(name)
        assert att.spatial.conv.weight.grad is not None and att.spatial.conv.weight.grad.abs().sum() > 0
    assert model.conv1.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- names, stages, keys


def test_names_stages_and_classes():
    model, names = insert_attention(torchvision.models.resnet18(), "sam", stages=(3, 4))
    assert names == ["layer3.0.attention", "layer3.1.attention", "layer4.0.attention", "layer4.1.attention"]
    assert type(model.layer3[0]) is BasicBlockWithAttention and isinstance(model.layer3[0], tvr.BasicBlock)
    assert type(model.layer1[0]) is tvr.BasicBlock and not hasattr(model.layer1[0], "attention")
    assert isinstance(model.layer4[1].attention, SpatialAttention)
    assert model.layer4[1].attention.channels == 512
    assert attention_names(model) == names
    # stage names work too, and other stages can still be added later
    _, more = insert_attention(model, "sam", stages=["layer1"])
    assert more == ["layer1.0.attention", "layer1.1.attention"]


def test_resnext_and_wide_resnet():
    for arch in ("resnext50_32x4d", "wide_resnet50_2"):
        with torch.device("meta"):
            model, names = insert_attention(getattr(torchvision.models, arch)(), "sam", stages=4)
        assert len(names) == 3 and type(model.layer4[0]) is BottleneckWithAttention
        assert model.layer4[0].attention.channels == 2048
    # values on small ResNeXt- / Wide-style nets (same Bottleneck class, grouped / wider 3x3 conv)
    for kw in (dict(groups=4, width_per_group=4), dict(width_per_group=128)):
        torch.manual_seed(0)
        ref = _tiny_bottleneck_resnet(**kw).eval()
        _randomize_bn(ref)
        model, _ = insert_attention(copy.deepcopy(ref), "none")
        x = torch.randn(1, 3, 32, 32)
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


def test_state_dict_compatibility():
    torch.manual_seed(0)
    plain = _tiny_bottleneck_resnet()
    _randomize_bn(plain)
    sd = plain.state_dict()
    model, names = insert_attention(_tiny_bottleneck_resnet(), "cbam")
    new_keys = {k for k in model.state_dict() if k not in sd}
    assert all(any(k.startswith(n + ".") for n in names) for k in new_keys)
    assert "layer1.0.attention.channel.fc1.weight" in new_keys
    assert set(sd) <= set(model.state_dict())  # existing keys unchanged
    res = model.load_state_dict(sd, strict=False)
    assert res.unexpected_keys == [] and set(res.missing_keys) <= new_keys
    # torch's BatchNorm fills num_batches_tracked itself when a checkpoint has no entry for that module
    assert all(k.endswith("num_batches_tracked") for k in new_keys - set(res.missing_keys))
    assert any(k.endswith("spatial.conv.weight") for k in res.missing_keys)
    for k, v in sd.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    other, _ = insert_attention(_tiny_bottleneck_resnet(), "cbam")
    other.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(other.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_errors():
    with pytest.raises(ValueError, match=r"no residual block found in Sequential.*Conv2d"):
        insert_attention(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), "sam")
    model, _ = insert_attention(_tiny_basic_resnet(), "sam")
    with pytest.raises(ValueError, match=r"already inserted.*layer1.0"):
        insert_attention(model, "cbam")
    with pytest.raises(ValueError, match=r"stage\(s\) \[5\] not found.*\[1, 2, 3, 4\]"):
        insert_attention(_tiny_basic_resnet(), "sam", stages=(4, 5))
    with pytest.raises(ValueError, match="stage numbers"):
        insert_attention(_tiny_basic_resnet(), "sam", stages=(0,))
    with pytest.raises(ValueError, match="unknown attention"):
        insert_attention(_tiny_basic_resnet(), "nope")
    # a failing constructor leaves the model untouched
    model = _tiny_basic_resnet()
    with pytest.raises(ValueError):
        insert_attention(model, "sam", kernel_size=4)
    assert not any(has_attention(m) for m in model.modules())


def test_device_dtype_and_mode_follow_the_block():
    model = _tiny_basic_resnet().double().eval()
    insert_attention(model, "cbam")
    att = model.layer1[0].attention
    assert att.spatial.conv.weight.dtype == torch.float64 and not att.training
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


# ----------------------------------------------------------------------------- detector backbones


def _frozen_body_backbone():
    return resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d,
                               trainable_layers=3)


def test_detector_backbone_with_frozen_bn():
    torch.manual_seed(0)
    backbone = _frozen_body_backbone()
    _randomize_bn(backbone)
    ref = copy.deepcopy(backbone).eval()
    detector = torchvision.models.detection.FasterRCNN(backbone, num_classes=3)
    detector2 = copy.deepcopy(detector)
    _, names = insert_attention(detector, "none")
    assert names[0] == "backbone.body.layer1.0.attention" and len(names) == 8
    x = torch.randn(1, 3, 64, 64)
    out, expected = detector.backbone.eval()(x), ref(x)
    for k in expected:
        torch.testing.assert_close(out[k], expected[k], rtol=0, atol=0)
    # accepting the backbone or its body gives the same insertion, relative names
    _, names_b = insert_attention(detector2.backbone, "sam", stages=(2,))
    assert names_b == ["body.layer2.0.attention", "body.layer2.1.attention"]
    body = _frozen_body_backbone().body
    _, names_body = insert_attention(body, "cbam")
    assert names_body[-1] == "layer4.1.attention"
    assert isinstance(body.layer1[0].bn1, FrozenBatchNorm2d)
    # the new modules train even where the frozen layers do not
    assert all(p.requires_grad for p in body.layer1[0].attention.parameters())
    assert not body.layer1[0].conv1.weight.requires_grad


# ----------------------------------------------------------------------------- timm


timm = pytest.importorskip("timm")


def _timm_tiny(block: str, se: bool) -> nn.Module:
    from timm.models import resnet as timm_resnet

    block_args = dict(attn_layer="se") if se else None
    return timm_resnet.ResNet(block=getattr(timm_resnet, block), layers=[1, 1, 1, 1], num_classes=5,
                              block_args=block_args)


@pytest.mark.parametrize("block, se", [("BasicBlock", False), ("Bottleneck", False), ("BasicBlock", True)])
def test_timm_resnets(block, se):
    torch.manual_seed(0)
    ref = _timm_tiny(block, se).eval()
    assert (ref.layer2[0].se is not None) == se
    _randomize_bn(ref)
    model = copy.deepcopy(ref)
    base_keys = set(ref.state_dict())
    _, names = insert_attention(model, "none")
    assert names[0] == "layer1.0.attention"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    assert set(model.state_dict()) == base_keys  # "none" has no state; keys unchanged

    model = copy.deepcopy(ref)
    insert_attention(model, Recorder, stages=(2,), scale=0.0)
    block = model.layer2[0]
    last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
    captured = {}
    last_bn.register_forward_hook(lambda m, i, o: captured.__setitem__("bn", o.detach().clone()))
    xb = torch.randn(2, block.conv1.in_channels, 8, 8)
    y = block(xb)
    orig_se = ref.layer2[0].se
    seen = captured["bn"] if orig_se is None else orig_se(captured["bn"])
    torch.testing.assert_close(block.attention.seen, seen)  # after the last norm (and timm's own se)
    torch.testing.assert_close(y, torch.relu(block.downsample(xb)))  # before the addition


def test_timm_cbam_backward_and_pickle(monkeypatch):
    import spatialattn.surgery as surgery

    model = _timm_tiny("BasicBlock", se=False)
    insert_attention(model, "cbam", stages=(4,))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.layer4[0].attention.channel.fc1.weight.grad is not None
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    y = model(x)
    buf = io.BytesIO()
    torch.save(model, buf)
    # as in a fresh interpreter: the timm subclasses do not exist until the pickle asks for them
    monkeypatch.setattr(surgery, "_timm_classes", {})
    for name in ("TimmBasicBlockWithAttention", "TimmBottleneckWithAttention"):
        monkeypatch.delitem(vars(surgery), name, raising=False)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded.layer4[0]).__name__ == "TimmBasicBlockWithAttention"
    assert type(loaded.layer4[0]) is not type(model.layer4[0])  # recreated through the module __getattr__
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)


# ----------------------------------------------------------------------------- copy, pickle, compile, ONNX


def test_deepcopy_and_pickle():
    torch.manual_seed(0)
    model, _ = insert_attention(_tiny_basic_resnet(), "cbam")
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    y = model(x)
    clone = copy.deepcopy(model)
    assert clone.layer1[0].attention is not model.layer1[0].attention
    torch.testing.assert_close(clone(x), y, rtol=0, atol=0)
    with torch.no_grad():  # the copy is independent
        clone.layer1[0].attention.spatial.conv.weight.add_(1.0)
    assert not torch.equal(clone(x), y)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded.layer2[0]) is BasicBlockWithAttention
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    model, _ = insert_attention(_tiny_basic_resnet(), "sam", stages=(3, 4))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    # aot_eager: dynamo capture (fullgraph: no graph break) + AOT autograd, without a C++ build.
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_onnx_export_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    model, _ = insert_attention(torchvision.models.resnet18(num_classes=10), "sam")
    _randomize_bn(model)
    model.eval()
    path = tmp_path / "r18_sam.onnx"
    torch.onnx.export(
        model, (torch.randn(1, 3, 64, 64),), str(path), dynamo=False, opset_version=17,
        input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}},
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 96, 80)  # other size than the export's
    (y,) = sess.run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), model(x).detach(), rtol=1e-3, atol=1e-4)
