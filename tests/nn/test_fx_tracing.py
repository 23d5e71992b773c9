"""torch.fx symbolic tracing of models that contain the attention modules: each module is one
``call_module`` node (as ``torch.nn``'s own layers are), so torchvision's
``create_feature_extractor`` and FX graph passes work and the traced graph runs the fused kernels."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from spatialattn import SpatialAttention, insert_attention
from spatialattn.nn import create_attention

from ._references import randomize_

KINDS = ["sam", "cbam", "sam_pointwise", "cam", "nonlocal"]


def _resnet(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model, _ = insert_attention(torchvision.models.resnet18(num_classes=10), kind)
    for name, m in model.named_modules():
        if name.endswith(".attention"):
            randomize_(m)  # (NonLocal2d starts as the identity)
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_feature_extractor_records_one_node_per_attention_module(kind):
    model = _resnet(kind).eval()
    nodes = {"layer1.0.attention": "a1", "layer2.1": "c3", "layer4": "c5"}
    extractor = create_feature_extractor(model, return_nodes=nodes)
    modules = dict(extractor.named_modules())
    attention_nodes = [n.target for n in extractor.graph.nodes
                       if n.op == "call_module" and n.target.endswith(".attention")]
    assert attention_nodes, "the attention modules were traced through instead of called"
    assert all(type(modules[t]).__module__.startswith("spatialattn.") for t in attention_nodes)
    x = torch.randn(2, 3, 64, 48)
    feats = {}
    hooks = [model.get_submodule(k).register_forward_hook(lambda m, i, o, key=v: feats.__setitem__(key, o))
             for k, v in nodes.items()]
    with torch.no_grad():
        out = extractor(x)
        model(x)
    for h in hooks:
        h.remove()
    assert out.keys() == feats.keys()
    for key in out:  # the same module calls: the same bits
        torch.testing.assert_close(out[key], feats[key], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["sam", "cbam"])
def test_traced_training_step_matches_the_model(kind):
    model = _resnet(kind).train()
    traced = torch.fx.symbolic_trace(copy.deepcopy(model))
    x = torch.randn(2, 3, 40, 40)
    for m in (model, traced):
        m(x).logsumexp(1).sum().backward()
    grads = dict(model.named_parameters())
    for name, p in traced.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-6, msg=lambda s: f"{name}: {s}")
    buffers = dict(model.named_buffers())
    for name, b in traced.named_buffers():  # the attention's BatchNorm statistics updated alike
        torch.testing.assert_close(b, buffers[name], rtol=0, atol=0, msg=lambda s: f"{name}: {s}")


class _Both(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.attn = randomize_(create_attention(kind, 16))

    def forward(self, x):
        y, attention = self.attn(self.conv(x), return_attention=True)
        return y, attention


@pytest.mark.parametrize("kind", KINDS + ["none"])
def test_return_attention_in_a_traced_model(kind):
    model = _Both(kind).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 9, 11)
    with torch.no_grad():
        for got, want in zip(traced(x), model(x)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_tracing_the_module_alone_says_what_works():
    with pytest.raises(TypeError, match="SpatialAttention: torch.fx can trace a model that contains this module"):
        torch.fx.symbolic_trace(SpatialAttention())


@pytest.mark.parametrize("call", ["spatial_attention", "pointwise_spatial_attention", "channel_gate",
                                  "channel_gate_from_pooled", "position_attention"])
def test_tracing_through_the_functional_form_says_what_works(call):
    from spatialattn import functional as SF

    w = nn.Parameter(torch.randn(1, 2, 7, 7))
    w1, w2 = nn.Parameter(torch.randn(4, 16)), nn.Parameter(torch.randn(16, 4))
    calls = {
        "spatial_attention": lambda x: SF.spatial_attention(x, w),
        "pointwise_spatial_attention": lambda x: SF.pointwise_spatial_attention(x, w2.view(16, 4, 1, 1)[:, :1].expand(16, 16, 1, 1)),
        "channel_gate": lambda x: SF.channel_gate(x, w1, None, w2, None),
        "channel_gate_from_pooled": lambda x: SF.channel_gate_from_pooled(x.mean((2, 3))[None], w1, None, w2, None),
        "position_attention": lambda x: SF.position_attention(x.flatten(2), x.flatten(2), x.flatten(2), "embedded_gaussian"),
    }
    with pytest.raises(TypeError, match="cannot trace through spatialattn.functional; call the attention through its module"):
        torch.fx.symbolic_trace(calls[call])


def test_fx_graph_mode_quantization_keeps_the_attention_in_float():
    quantize_fx = pytest.importorskip("torch.ao.quantization.quantize_fx")
    from torch.ao.quantization import get_default_qconfig_mapping

    model = _resnet("cbam").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch.ao.quantization's deprecation notices)
        prepared = quantize_fx.prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (x,))
        prepared(x)  # calibration
        quantized = quantize_fx.convert_fx(prepared)
        out = quantized(x)
        want = model(x)
    targets = [n.target for n in quantized.graph.nodes if n.op == "call_module"]
    assert "layer1.0.attention" in targets  # still the float module, called as one
    assert out.shape == want.shape and torch.isfinite(out).all()
    # int8 activations and weights: close to the float model (measured 0.9996), not equal
    assert torch.nn.functional.cosine_similarity(out.flatten(), want.flatten(), dim=0) > 0.99


def test_timm_fx_feature_extractor():
    timm = pytest.importorskip("timm")
    from timm.models._features_fx import create_feature_extractor as timm_extractor

    torch.manual_seed(0)
    model, _ = insert_attention(timm.create_model("resnet18", pretrained=False), "cbam")
    model.eval()
    extractor = timm_extractor(model, return_nodes={"layer1.0.attention": "a", "layer2": "c3"})
    targets = [n.target for n in extractor.graph.nodes if n.op == "call_module"]
    assert "layer1.0.attention" in targets
    x = torch.randn(2, 3, 64, 64)
    feats = {}
    # (a copy: timm's block adds the shortcut into the attention's output in place, which the
    # traced graph records as an out-of-place add)
    model.layer1[0].attention.register_forward_hook(lambda m, i, o: feats.__setitem__("a", o.clone()))
    with torch.no_grad():
        out = extractor(x)
        model(x)
    torch.testing.assert_close(out["a"], feats["a"], rtol=0, atol=0)
