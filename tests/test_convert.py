"""Weights from other CBAM implementations load, strictly, and give their outputs."""
from __future__ import annotations

import copy
import types

import pytest
import torch
import torchvision

import spatialattn
from spatialattn import CBAM, convert_state_dict

from .nn._references import MMYoloCBAM, OfficialCBAM, UltralyticsCBAM, randomize_

timm_cbam = pytest.importorskip("timm.layers.cbam")


def _check(theirs, ours, x, atol=1e-5):
    """Same outputs: to 1e-10 in float64 (the same math), and in float32 within ``atol``
    of their float32 result scaled by the output's size (two float32 computations of one
    sum differ by rounding, and theirs is not the exact one either)."""
    theirs.eval(), ours.eval()
    with torch.no_grad():
        expected = theirs(x)
        got = ours(x)
        exact = copy.deepcopy(theirs).double()(x.double())
        got64 = copy.deepcopy(ours).double()(x.double())
    assert (got64 - exact).abs().max().item() < 1e-10
    scale = max(1.0, exact.abs().max().item())
    diff = (got - expected).abs().max().item()
    assert diff < atol * scale, (diff, scale)
    return diff


@pytest.mark.parametrize("channels", [64, 72, 200])  # 72 and 200: the hidden-width rounding differs
def test_timm_cbam_module_parity(channels):
    theirs = randomize_(timm_cbam.CbamModule(channels), seed=1)
    ours = CBAM(channels, preset="timm")
    ours.load_state_dict(convert_state_dict(theirs.state_dict(), "timm"), strict=True)
    x = torch.randn(2, channels, 13, 11)
    _check(theirs, ours, x)
    # training mode too (BN batch statistics, same momentum)
    theirs.train(), ours.train()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.spatial.bn.running_mean, theirs.spatial.conv.bn.running_mean)


def test_official_cbam_module_parity():
    theirs = randomize_(OfficialCBAM(96), seed=2)
    ours = CBAM(96, preset="paper")
    ours.load_state_dict(convert_state_dict(theirs.state_dict(), "official"), strict=True)
    _check(theirs, ours, torch.randn(2, 96, 9, 9))


def test_ultralytics_cbam_module_parity():
    theirs = randomize_(UltralyticsCBAM(48), seed=3)
    ours = CBAM(48, preset="ultralytics")
    # inside a YOLO model the keys carry a prefix such as "model.9."
    sd = {f"model.9.{k}": v for k, v in theirs.state_dict().items()}
    conv = {k[len("model.9."):]: v for k, v in convert_state_dict(sd, "ultralytics").items()}
    ours.load_state_dict(conv, strict=True)
    _check(theirs, ours, torch.randn(2, 48, 10, 12))


def test_mmyolo_cbam_module_parity():
    theirs = randomize_(MMYoloCBAM(64), seed=4)
    ours = CBAM(64, preset="mmyolo")
    ours.load_state_dict(convert_state_dict(theirs.state_dict(), "mmyolo"), strict=True)
    _check(theirs, ours, torch.randn(2, 64, 8, 8))


def test_presets_disagree_without_conversion():
    """The presets are not interchangeable: a wrong preset gives other numbers (the tests above can fail)."""
    theirs = randomize_(timm_cbam.CbamModule(64), seed=1).eval()
    wrong = CBAM(64, preset="timm", spatial_kwargs=dict(order=("max", "mean"))).eval()
    wrong.load_state_dict(convert_state_dict(theirs.state_dict(), "timm"))
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        assert (wrong(x) - theirs(x)).abs().max() > 1e-3


def _official_resnet50(num_classes=1000):
    """The official CBAM ResNet-50 layout: each Bottleneck owns `cbam`, applied after bn3 before the add."""
    model = torchvision.models.resnet50(num_classes=num_classes)

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out = self.cbam(out)
        return self.relu(out + residual)

    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            block.cbam = randomize_(OfficialCBAM(block.bn3.num_features), seed=block.bn3.num_features)
            with torch.no_grad():
                block.cbam.SpatialGate.spatial.bn.running_var.uniform_(0.5, 1.5)
            block.forward = types.MethodType(forward, block)
    return model


@pytest.mark.parametrize("drop_num_batches_tracked", [False, True])
def test_official_resnet50_checkpoint_loads_strict_and_gives_same_logits(tmp_path, drop_num_batches_tracked):
    torch.manual_seed(0)
    official = _official_resnet50().eval()
    sd = {"module." + k: v for k, v in official.state_dict().items()}  # DataParallel prefix
    if drop_num_batches_tracked:  # checkpoints written by PyTorch 0.4.0 lack these buffers
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "RESNET50_CBAM.pth"
    torch.save({"epoch": 90, "arch": "resnet", "best_prec1": 77.3, "state_dict": sd}, path)

    ckpt = torch.load(path, weights_only=True)
    ours, names = spatialattn.insert_attention(torchvision.models.resnet50(), "cbam")
    assert len(names) == 16
    ours.load_state_dict(convert_state_dict(ckpt, "official"), strict=True)
    ours.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected, got = official(x), ours(x)
    # float32: 16 blocks of summation-order rounding (fused kernels, BN folded into the gate)
    assert (got - expected).abs().max() <= 5e-4 * expected.abs().max()
    # float64: the mapping is exact
    with torch.no_grad():
        expected, got = official.double()(x.double()), ours.double()(x.double())
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


def test_resnet50_cbam_has_paper_parameter_count():
    model, _ = spatialattn.insert_attention(torchvision.models.resnet50(), "cbam")
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6, 2) == 28.09  # CBAM paper, Table 4
    assert round(sum(p.numel() for p in torchvision.models.resnet50().parameters()) / 1e6, 2) == 25.56


def test_convert_errors():
    with pytest.raises(ValueError, match="unknown source 'keras'"):
        convert_state_dict({}, "keras")
    with pytest.raises(ValueError, match="map to"):
        convert_state_dict({"ChannelGate.mlp.1.bias": torch.zeros(1), "channel.fc1.bias": torch.zeros(1)}, "official")
