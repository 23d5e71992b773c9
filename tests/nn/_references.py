"""Slow, obviously-correct references: other implementations' layouts, written out in plain PyTorch.

These mirror the parameter layouts (state-dict keys) and the arithmetic of the
CBAM authors' code, ultralytics' CBAM and mmyolo's CBAM, so that converted
weights can be checked against them. timm is used directly (dev dependency).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sam_reference(x, weight, bias=None, order=("max", "mean"), bn=None, gate=torch.sigmoid, dilation=1):
    """Plain CBAM SAM; ``bn`` is a BatchNorm2d(1) or None."""
    pools = {"max": x.amax(1, keepdim=True), "mean": x.mean(1, keepdim=True)}
    p = torch.cat([pools[o] for o in order], 1)
    k = weight.shape[-1]
    z = F.conv2d(p, weight, bias, padding=dilation * (k // 2), dilation=dilation)
    if bn is not None:
        z = bn(z)
    a = gate(z)
    return x * a, a


class _Flat(nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], -1)


class OfficialChannelGate(nn.Module):
    def __init__(self, c, r=16):
        super().__init__()
        self.mlp = nn.Sequential(_Flat(), nn.Linear(c, c // r), nn.ReLU(), nn.Linear(c // r, c))

    def forward(self, x):
        h, w = x.shape[-2:]
        s = self.mlp(F.avg_pool2d(x, (h, w))) + self.mlp(F.max_pool2d(x, (h, w)))
        return x * torch.sigmoid(s)[:, :, None, None]


class _ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

    def forward(self, x):
        return self.bn(self.conv(x))


class OfficialSpatialGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.spatial = _ConvBN()

    def forward(self, x):
        p = torch.cat([torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)], 1)
        return x * torch.sigmoid(self.spatial(p))


class OfficialCBAM(nn.Module):
    """Layout of the CBAM authors' module (keys ChannelGate.mlp.1/3, SpatialGate.spatial.conv/bn)."""

    def __init__(self, c, r=16):
        super().__init__()
        self.ChannelGate = OfficialChannelGate(c, r)
        self.SpatialGate = OfficialSpatialGate()

    def forward(self, x):
        return self.SpatialGate(self.ChannelGate(x))


class UltralyticsCBAM(nn.Module):
    def __init__(self, c, k=7):
        super().__init__()
        self.channel_attention = nn.Module()
        self.channel_attention.fc = nn.Conv2d(c, c, 1, 1, 0, bias=True)
        self.spatial_attention = nn.Module()
        self.spatial_attention.cv1 = nn.Conv2d(2, 1, k, padding=k // 2, bias=False)

    def forward(self, x):
        x = x * torch.sigmoid(self.channel_attention.fc(F.adaptive_avg_pool2d(x, 1)))
        p = torch.cat([torch.mean(x, 1, keepdim=True), torch.max(x, 1, keepdim=True)[0]], 1)
        return x * torch.sigmoid(self.spatial_attention.cv1(p))


class _ConvModule(nn.Module):
    def __init__(self, cin, cout, k, act=None):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=True)
        self.act = act

    def forward(self, x):
        x = self.conv(x)
        return self.act(x) if self.act is not None else x


class MMYoloCBAM(nn.Module):
    def __init__(self, c, r=16, k=7):
        super().__init__()
        self.channel_attention = nn.Module()
        self.channel_attention.fc = nn.Sequential(_ConvModule(c, int(c / r), 1, nn.ReLU()), _ConvModule(int(c / r), c, 1))
        self.spatial_attention = nn.Module()
        self.spatial_attention.conv = _ConvModule(2, 1, k, nn.Sigmoid())

    def forward(self, x):
        fc = self.channel_attention.fc
        ca = torch.sigmoid(fc(F.adaptive_avg_pool2d(x, 1)) + fc(F.adaptive_max_pool2d(x, 1)))
        out = ca * x
        p = torch.cat([torch.mean(out, 1, keepdim=True), torch.max(out, 1, keepdim=True)[0]], 1)
        return self.spatial_attention.conv(p) * out


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and BN buffer non-trivial values (so wrong mappings show)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.dtype.is_floating_point:
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.5)
    return module
