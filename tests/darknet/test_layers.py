"""Darknet layer modules against slow, loop-based references written from the Darknet spec."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from spatialattn.darknet import DarknetModel
from spatialattn.darknet import layers as L


def ref_maxpool(x, size, stride, padding):
    n, c, h, w = x.shape
    oh, ow = (h + padding - size) // stride + 1, (w + padding - size) // stride + 1
    out = torch.empty(n, c, oh, ow)
    off = -(padding // 2)
    for i, j in itertools.product(range(oh), range(ow)):
        best = torch.full((n, c), -math.inf)
        for dy, dx in itertools.product(range(size), range(size)):
            y, xx = off + i * stride + dy, off + j * stride + dx
            if 0 <= y < h and 0 <= xx < w:
                best = torch.maximum(best, x[:, :, y, xx])
        out[:, :, i, j] = best
    return out


@pytest.mark.parametrize("size,stride,hw", [(2, 2, 7), (2, 2, 8), (2, 1, 5), (3, 2, 7), (3, 2, 8), (5, 1, 6), (3, 1, 4), (4, 2, 9)])
def test_maxpool_darknet_padding(size, stride, hw):
    x = torch.randn(2, 3, hw, hw)
    m = L.MaxPool(size, (stride, stride), size - 1)
    torch.testing.assert_close(m(x), ref_maxpool(x, size, stride, size - 1), rtol=0, atol=0)


def test_reorg3d_channel_order():
    x = torch.randn(2, 3, 4, 6)
    s = 2
    y = L.Reorg3d(s)(x)
    ref = torch.empty(2, 3 * s * s, 2, 3)
    for dy, dx, c in itertools.product(range(s), range(s), range(3)):
        ref[:, (dy * s + dx) * 3 + c] = x[:, c, dy::s, dx::s]
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    assert not torch.equal(y, torch.nn.functional.pixel_unshuffle(x, 2))


def test_route_groups_and_upsample():
    a, b = torch.randn(1, 4, 3, 3), torch.randn(1, 6, 3, 3)
    torch.testing.assert_close(L.Route([0, 1], 2, 1)([a, b]), torch.cat([a[:, 2:], b[:, 3:]], 1))
    x = torch.randn(1, 2, 3, 3)
    up = L.Upsample(2, 0.5)(x)
    for y, xx in itertools.product(range(6), range(6)):
        torch.testing.assert_close(up[:, :, y, xx], 0.5 * x[:, :, y // 2, xx // 2])
    x = torch.randn(1, 2, 5, 4)
    down = L.Upsample(-2, 1.0)(x)
    assert down.shape == (1, 2, 2, 2)
    torch.testing.assert_close(down[0, 1, 1, 0], x[0, 1, 2:4, 0:2].sum())


def ref_act(v: float, name: str) -> float:
    if name == "mish":
        sp = v if v > 20 else (math.exp(v) if v < -20 else math.log(math.exp(v) + 1))
        return v * math.tanh(sp)
    return {
        "linear": v, "logistic": 1 / (1 + math.exp(-v)), "leaky": v if v > 0 else 0.1 * v, "relu": max(v, 0.0),
        "relu6": min(max(v, 0.0), 6.0), "swish": v / (1 + math.exp(-v)),
        "hard_mish": v if v > 0 else (v * v / 2 + v if v > -2 else 0.0), "tanh": 2 / (1 + math.exp(-2 * v)) - 1,
        "elu": v if v >= 0 else math.exp(v) - 1, "selu": 1.0507 * v if v >= 0 else 1.0507 * 1.6732 * (math.exp(v) - 1),
        "gelu": 0.5 * v * (1 + math.tanh(0.797885 * v + 0.035677 * v ** 3)), "loggy": 2 / (1 + math.exp(-v)) - 1,
        "relie": v if v > 0 else 0.01 * v, "ramp": v * (v > 0) + 0.1 * v,
        "plse": 0.01 * (v + 4) if v < -4 else (0.01 * (v - 4) + 1 if v > 4 else 0.125 * v + 0.5),
        "hardtan": -1.0 if v < -1 else (1.0 if v > 1 else v), "lhtan": 0.001 * v if v < 0 else (0.001 * (v - 1) + 1 if v > 1 else v),
        "stair": (math.floor(v / 2) if int(math.floor(v)) % 2 == 0 else (v - math.floor(v)) + math.floor(v / 2)),
    }[name]


@pytest.mark.parametrize("name", ["linear", "logistic", "leaky", "relu", "relu6", "mish", "swish", "hard_mish", "tanh",
                                  "elu", "selu", "gelu", "loggy", "relie", "ramp", "plse", "hardtan", "lhtan", "stair"])
def test_activations(name):
    vals = [-30.0, -21.0, -5.0, -2.5, -1.5, -0.3, 0.0, 0.4, 1.7, 3.2, 5.5, 7.0, 25.0]
    x = torch.tensor(vals, dtype=torch.float64)
    ref = torch.tensor([ref_act(v, name) for v in vals], dtype=torch.float64)
    torch.testing.assert_close(L.darknet_activation(x, name), ref)


def test_weighted_shortcut_reference():
    torch.manual_seed(0)
    prev, a = torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2)
    for norm in ("relu", "softmax"):
        m = L.Shortcut([0], 3, "linear", "per_channel", norm)
        with torch.no_grad():
            m.weight.copy_(torch.tensor([0.5, -0.2, 1.0, 0.3, 0.8, -1.0]))
        w = m.weight.detach().view(2, 3)
        if norm == "relu":
            r = w.clamp(min=0)
            wn = r / (0.0001 + r.sum(0))
        else:
            e = (w - w.max(0).values).exp()
            wn = e / (0.0001 + e.sum(0))
        ref = prev * wn[0].view(1, 3, 1, 1) + a * wn[1].view(1, 3, 1, 1)
        torch.testing.assert_close(m(prev, [a]), ref)


def test_shortcut_with_more_channels_adds_prefix():
    m = L.Shortcut([0], 3, from_channels=[5])
    prev, a = torch.randn(1, 3, 2, 2), torch.randn(1, 5, 2, 2)
    torch.testing.assert_close(m(prev, [a]), prev + a[:, :3])
    m = L.Shortcut([0], 3, from_channels=[2])
    b = torch.randn(1, 2, 2, 2)
    torch.testing.assert_close(m(prev, [b]), torch.cat([prev[:, :2] + b, prev[:, 2:]], 1))


def test_yolo_forward_reference():
    x = torch.randn(1, 2 * 7, 3, 3)
    for new_coords, s in ((False, 1.05), (True, 2.0)):
        y = L.Yolo(classes=2, anchors=[(1, 1), (2, 2)], mask=[0, 1], num=2, scale_x_y=s, new_coords=new_coords)(x)
        v = x.view(2, 7, 3, 3)
        f = (lambda t: t) if new_coords else torch.sigmoid
        ref = torch.cat([f(v[:, 0:2]) * s - 0.5 * (s - 1), v[:, 2:4], f(v[:, 4:])], 1).view(1, 14, 3, 3)
        torch.testing.assert_close(y, ref)


def test_conv_variants_build_and_match_torch():
    cfg = ("[net]\nwidth=12\nheight=10\nchannels=4\n"
           "[convolutional]\nfilters=6\nsize=3\nstride_x=2\nstride_y=1\npad=1\ngroups=2\nactivation=linear\n"
           "[convolutional]\nfilters=6\nsize=3\ndilation=2\npad=1\nactivation=linear\n"
           "[convolutional]\nfilters=3\nsize=3\npadding=0\nstride=2\nactivation=linear\n")
    m = DarknetModel.from_cfg_text(cfg)
    assert [i.out_shape for i in m.infos] == [(6, 10, 6), (6, 10, 6), (3, 4, 2)]
    x = torch.randn(1, 4, 10, 12)
    c0, c1, c2 = (m.layers[i].conv for i in range(3))
    y0 = torch.nn.functional.conv2d(x, c0.weight, c0.bias, stride=(1, 2), padding=1, groups=2)
    y1 = torch.nn.functional.conv2d(y0, c1.weight, c1.bias, padding=2, dilation=2)
    y2 = torch.nn.functional.conv2d(y1, c2.weight, c2.bias, stride=2)
    outs = m(x, return_layers=[0, 1, 2])
    torch.testing.assert_close(outs[2], y2)


def test_compile_matches_eager():
    cfg = ("[net]\nwidth=16\nheight=16\nchannels=3\n[convolutional]\nbatch_normalize=1\nfilters=8\nsize=3\npad=1\n"
           "activation=mish\n[convolutional]\nbatch_normalize=1\nfilters=8\nsize=1\nactivation=logistic\n[sam]\nfrom=-2\n"
           "[maxpool]\nsize=2\nstride=1\n[convolutional]\nfilters=7\nsize=1\nactivation=linear\n"
           "[yolo]\nmask=0\nanchors=4,4\nclasses=2\nnum=1\nscale_x_y=1.1\n")
    m = DarknetModel.from_cfg_text(cfg)
    x = torch.rand(1, 3, 16, 16)
    ref = m(x)
    torch._dynamo.reset()
    out = torch.compile(m, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(out[0], ref[0])
