"""Bundled cfg + attention/class rewrites."""
from __future__ import annotations

import pytest
import torch

from spatialattn.darknet import DarknetModel, bundled_cfg, bundled_model, list_bundled, rewrite_cfg


def test_sam_tiny_design():
    assert "sam-tiny" in list_bundled()
    m = bundled_model("sam-tiny")
    n = sum(p.numel() for p in m.parameters())
    assert 300_000 <= n <= 1_000_000
    assert m.input_shape == (3, 160, 160)
    assert [y.stride for y in m.yolo_layers] == [16, 8]
    for i in m.attention_indices:  # modified SAM pattern: 1x1 BN logistic conv with C(F) filters, from=-2
        gate = m.layers[i - 1]
        assert m.layer_types[i] == "sam" and m.infos[i].refs == [i - 2]
        assert gate.activation == "logistic" and gate.bn is not None and gate.conv.kernel_size == (1, 1)
        assert gate.conv.out_channels == m.infos[i - 2].out_shape[0]
    anchors = [a for y in m.yolo_layers for a in y.masked_anchors]
    assert min(min(a) for a in anchors) >= 8 and max(max(a) for a in anchors) <= 80


@pytest.mark.parametrize("attention", ["sam", "none", "se", "spatial"])
def test_variants_build_run_and_keep_the_trunk(attention):
    m = bundled_model("sam-tiny", num_classes=4, attention=attention)
    assert all(y.classes == 4 for y in m.yolo_layers)
    x = torch.rand(2, 3, 160, 160)
    out = m(x)
    assert [tuple(o.shape) for o in out] == [(2, 27, 10, 10), (2, 27, 20, 20)]
    types = [t for t in m.layer_types]
    if attention == "none":
        assert "sam" not in types and "scale_channels" not in types and len(types) == 20
        # the second head's route still concatenates the upsampled map with the stride-8 features
        route = [info for info in m.infos if info.type == "route"][1]
        assert [m.infos[r].out_shape for r in route.refs] == [(64, 20, 20), (96, 20, 20)]
    else:
        assert len(m.attention_indices) == 2


def test_none_variant_equals_sam_variant_with_gate_one():
    """Dropping the [sam] block is the same network as SAM with a gate of exactly 1."""
    sam = bundled_model("sam-tiny", num_classes=2, attention="sam")
    none = bundled_model("sam-tiny", num_classes=2, attention="none")
    sam_layers = [i for i, t in enumerate(sam.layer_types) if i not in (11, 12, 20, 21)]
    assert len(sam_layers) == len(none.layers)
    for i_none, i_sam in enumerate(sam_layers):
        none.layers[i_none].load_state_dict(sam.layers[i_sam].state_dict())
    for g in (11, 20):  # gate conv -> logistic(+inf) = 1
        with torch.no_grad():
            sam.layers[g].bn.bias.fill_(100.0)
    x = torch.rand(1, 3, 160, 160)
    for a, b in zip(sam(x), none(x)):
        torch.testing.assert_close(a, b)


def test_rewrite_keeps_absolute_and_relative_references():
    text = ("[net]\nwidth=16\nheight=16\nchannels=3\n"
            "[convolutional]\nfilters=8\nsize=3\npad=1\nactivation=leaky\n"           # 0
            "[convolutional]\nbatch_normalize=1\nfilters=8\nsize=1\nactivation=logistic\n"  # 1
            "[sam]\nfrom=-2\n"                                                          # 2
            "[convolutional]\nfilters=8\nsize=3\npad=1\nactivation=leaky\n"           # 3
            "[route]\nlayers=2,-1\n"                                                    # 4
            "[shortcut]\nfrom=-5\n"                                                     # 5 (-> 0)
            "[convolutional]\nfilters=7\nsize=1\nactivation=linear\n"                 # 6
            "[yolo]\nmask=0\nanchors=2,2\nclasses=2\nnum=1\n")
    # the shortcut adds 8 channels to 16, as Darknet allows (the overlap), with a warning
    with pytest.warns(RuntimeWarning, match="different channel counts"):
        out = rewrite_cfg(text, num_classes=1, attention="none")
    with pytest.warns(RuntimeWarning, match=r"layer 0 \(convolutional 8x16x16\).*layer 2 \(route 16x16x16\)"):
        m = DarknetModel.from_cfg_text(out)
    assert m.layer_types == ["convolutional", "convolutional", "route", "shortcut", "convolutional", "yolo"]
    assert m.infos[2].refs == [0, 1] and m.infos[3].refs == [0]
    assert m.layers[4].conv.out_channels == 6 and m.yolo_layers[0].classes == 1
    with pytest.raises(ValueError, match="attention: expected one of"):
        rewrite_cfg(text, attention="cbam3d")


def test_unknown_bundled_name():
    with pytest.raises(ValueError, match="no bundled cfg named 'nope'"):
        bundled_cfg("nope")
