"""cfg parsing rules (Darknet's read_cfg) and loud, located errors."""
from __future__ import annotations


import pytest
import torch

from spatialattn.darknet import DarknetCfgError, DarknetModel, parse_cfg, parse_cfg_text

NET = "[net]\nwidth=16\nheight=16\nchannels=3\n"
CONV = "[convolutional]\nbatch_normalize=1\nfilters=8\nsize=3\nstride=1\npad=1\nactivation=leaky\n"


def build(text, source="t.cfg"):
    return DarknetModel.from_cfg_text(text, source=source)


def test_whitespace_comments_crlf_first_key_wins():
    text = ("# comment\r\n[net]\r\n width = 16 \r\nheight=16\r\nchannels=3\r\n; other comment\r\n\r\n"
            "[convolutional]\r\nfilters = 4\r\nfilters=99\r\nsize=3\r\npad = 1\r\nactivation = lin ear\r\n")
    secs = parse_cfg_text(text)
    assert [s.type for s in secs] == ["net", "convolutional"]
    assert secs[1].options["filters"].value == "4" and secs[1].options["filters"].line == 9
    assert secs[1].get_str("activation") == "linear"  # all whitespace removed, as Darknet does
    m = build(text)
    assert m.layers[0].conv.out_channels == 4 and m.infos[0].out_shape == (4, 16, 16)


def test_aliases_and_inline_comment_in_numbers():
    m = build("[network]\nwidth=16\nheight=16\nchannels=3\n[conv]\nfilters=4\n[max]\nsize=2\nstride=2\n"
              "[route]\nlayers=0###comment\n")
    assert m.layer_types == ["convolutional", "maxpool", "route"]
    assert m.layers[0].activation == "logistic"  # Darknet's default for a conv without activation=
    assert m.infos[1].out_shape == (4, 8, 8) and m.infos[2].refs == [0]


def test_file_errors_name_file_and_line(tmp_path):
    p = tmp_path / "bad.cfg"
    p.write_text(NET + CONV + "[frobnicate]\nx=1\n")
    with pytest.raises(DarknetCfgError, match=r"bad\.cfg:12: unknown section \[frobnicate\]"):
        parse_cfg(p)
    with pytest.raises(DarknetCfgError, match="cannot read"):
        parse_cfg(tmp_path / "missing.cfg")


@pytest.mark.parametrize(
    "body, pattern",
    [
        (CONV + "[connected]\noutput=3\n", r"t\.cfg:12: section \[connected\] is a Darknet layer this port does not implement"),
        (CONV.replace("size=3", "size=3\nsizee=3"), r"t\.cfg:9: \[convolutional\] \(layer 0\) unknown option 'sizee'"),
        (CONV.replace("filters=8", "filters=eight"), r"t\.cfg:7: \[convolutional\] \(layer 0\) option 'filters': expected a number, found 'eight'"),
        (CONV.replace("activation=leaky", "activation=bogus"), r"option 'activation': unknown activation 'bogus'"),
        (CONV + "[sam]\nactivation=linear\n", r"t\.cfg:12: \[sam\] \(layer 1\): required option 'from' is missing"),
        (CONV + "[sam]\nfrom=5\n", r"t\.cfg:13: \[sam\] \(layer 1\) option 'from': reference 5 resolves to layer 5, outside"),
        (CONV + "[sam]\nfrom=-2\n", r"option 'from': reference -2 resolves to layer -1"),
        (CONV + "[route]\nlayers=-1,7\n", r"t\.cfg:13: \[route\] \(layer 1\) option 'layers': reference 7"),
        (CONV + "[shortcut]\nfrom=a\n", r"option 'from': expected a comma-separated list of integers, found 'a'"),
        (CONV + "filters\n", r"expected 'key=value', found 'filters'"),
        (CONV + "[yolo]\nmask=0\nanchors=1,1\nclasses=2\nnum=1\n", r"must have len\(mask\)\*\(classes\+5\) = 1\*\(2\+5\) = 7 channels, found 8"),
        (CONV + "[convolutional]\nfilters=4\nxnor=1\n", r"xnor=1 is a Darknet feature this port does not implement"),
        (CONV + "[net]\nwidth=1\n", r"may only be the first section"),
        (CONV + "[maxpool]\nsize=2\nstride=2\nmomentumm=0.9\n", r"t\.cfg:15: \[maxpool\] \(layer 1\) unknown option 'momentumm'"),
    ],
)
def test_errors(body, pattern):
    with pytest.raises(DarknetCfgError, match=pattern):
        build(NET + body)


def test_first_section_must_be_net():
    with pytest.raises(DarknetCfgError, match=r"t\.cfg:1: the first section must be \[net\] or \[network\], found \[convolutional\]"):
        build("[convolutional]\nfilters=2\n")
    with pytest.raises(DarknetCfgError, match="no layers"):
        build(NET)


def test_net_value_validation():
    with pytest.raises(DarknetCfgError, match=r"t\.cfg:5: \[net\] option 'momentum': expected a number, found '0\.9x'"):
        build(NET + "momentum=0.9x\n" + CONV)
    with pytest.raises(DarknetCfgError, match="width, height and channels must be positive"):
        build("[net]\nwidth=16\nheight=16\n" + CONV)


def test_shape_mismatch_errors_name_both_layers():
    # [sam]: previous layer 1 (8 channels at 8x8) vs layer 0 (8x16x16)
    text = NET + CONV + "[maxpool]\nsize=2\nstride=2\n[sam]\nfrom=0\n"
    with pytest.raises(DarknetCfgError, match=r"previous layer 1 \(maxpool 8x8x8\) and from layer 0 \(convolutional 8x16x16\)"):
        build(text)
    text = NET + CONV + "[maxpool]\nsize=2\nstride=2\n[route]\nlayers=-1,0\n"
    with pytest.raises(DarknetCfgError, match=r"layers 1 \(maxpool 8x8x8\) and 0 \(convolutional 8x16x16\) have different height/width"):
        build(text)
    text = NET + CONV + "[maxpool]\nsize=2\nstride=2\n[shortcut]\nfrom=0\n"
    with pytest.raises(DarknetCfgError, match=r"cannot add layer 0 \(convolutional 8x16x16\) and the previous layer 1 \(maxpool 8x8x8\)"):
        build(text)
    text = NET + CONV + "[avgpool]\n[convolutional]\nfilters=4\nsize=1\n[scale_channels]\nfrom=0\n"
    with pytest.raises(DarknetCfgError, match=r"scale_wh=0 needs the previous layer 2 \(convolutional 4x1x1\) to be 8x1x1"):
        build(text)
    text = NET + CONV + "[convolutional]\nfilters=2\nsize=1\n[scale_channels]\nfrom=0\nscale_wh=1\n"
    with pytest.raises(DarknetCfgError, match=r"scale_wh=1 needs the previous layer 1 \(convolutional 2x16x16\) to be 1x16x16"):
        build(text)
    text = NET + CONV + "[route]\nlayers=0\ngroups=3\n"
    with pytest.raises(DarknetCfgError, match="not divisible by groups=3"):
        build(text)


def test_weighted_shortcut_needs_normalization():
    text = NET + CONV + CONV + "[shortcut]\nfrom=0\nweights_type=per_feature\n"
    with pytest.raises(DarknetCfgError, match="weights_normalization"):
        build(text)


def test_sam_with_mish_warns_and_outputs_zeros():
    text = NET + CONV + "[convolutional]\nfilters=8\nsize=1\nactivation=logistic\n[sam]\nfrom=-2\nactivation=mish\n"
    with pytest.warns(RuntimeWarning, match=r"does not support activation=mish and outputs zeros"):
        m = build(text)
    out = m(torch.rand(1, 3, 16, 16), return_layers=[2])[2]
    assert out.shape == (1, 8, 16, 16) and torch.count_nonzero(out) == 0


def test_ignored_darknet_option_warns():
    text = NET + CONV.replace("filters=8", "filters=21") + "[yolo]\nmask=0,1,2\nanchors=1,2,3,4,5,6\nclasses=2\nnum=3\nuc_normalizer=1.0\n"
    with pytest.warns(RuntimeWarning, match="uc_normalizer' is not used by this section"):
        m = build(text)
    y = m.yolo_layers[0]
    assert y.options["uc_normalizer"] == "1.0" and y.masked_anchors == [(1, 2), (3, 4), (5, 6)]


def test_yolo_keeps_training_options():
    text = (NET + CONV.replace("filters=8", "filters=14") + "[yolo]\nmask=1,2\nanchors=10,14, 23,27, 37,58\n"
            "classes=2\nnum=3\njitter=.3\nignore_thresh=.7\ntruth_thresh=1\niou_loss=ciou\niou_normalizer=0.07\n"
            "cls_normalizer=1.0\nobj_normalizer=0.4\nscale_x_y=1.05\nmax_delta=5\nnms_kind=greedynms\nbeta_nms=0.6\n"
            "label_smooth_eps=0.1\nnew_coords=0\nrandom=1\n")
    y = build(text).yolo_layers[0]
    assert (y.classes, y.num, y.mask) == (2, 3, [1, 2])
    assert y.anchors == [(10, 14), (23, 27), (37, 58)]
    assert (y.jitter, y.ignore_thresh, y.truth_thresh, y.iou_loss) == (0.3, 0.7, 1.0, "ciou")
    assert (y.iou_normalizer, y.cls_normalizer, y.obj_normalizer, y.scale_x_y) == (0.07, 1.0, 0.4, 1.05)
    assert (y.max_delta, y.nms_kind, y.beta_nms, y.label_smooth_eps, y.random) == (5.0, "greedynms", 0.6, 0.1, 1.0)
    assert y.stride == 1 and y.new_coords is False


def test_input_channel_check():
    m = build(NET + CONV)
    with pytest.raises(ValueError, match=r"expected Tensor\[N, 3, H, W\], got shape \(1, 4, 16, 16\)"):
        m(torch.rand(1, 4, 16, 16))
    with pytest.raises(ValueError, match="layer 5 does not exist"):
        m(torch.rand(1, 3, 16, 16), return_layers=[5])
