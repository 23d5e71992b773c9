"""PyTorch modules for Darknet layer types, numerically matching Darknet's CPU forward pass.

One module per section type. Every module takes the previous layer's output (``prev``) and,
where the section references other layers (``[route]``, ``[shortcut]``, ``[sam]``,
``[scale_channels]``), the list of referenced outputs; :class:`~spatialattn.darknet.model.DarknetModel`
wires them by Darknet layer index. Modules with parameters expose ``darknet_params()``: the
tensors in ``.weights`` file order.

Spec: Darknet (AlexeyAB/darknet) ``*_layer.c`` / ``activations.c``; see ``docs/darknet.md``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import pointwise_attention

__all__ = [
    "darknet_activation",
    "ZERO_IN_GENERIC",
    "Conv",
    "MaxPool",
    "AvgPool",
    "Route",
    "Shortcut",
    "Upsample",
    "Reorg3d",
    "Sam",
    "ScaleChannels",
    "Dropout",
    "Activation",
    "Empty",
    "Yolo",
]

# activate_array (the generic path used by [sam], [scale_channels], [activation]) returns 0
# for these; [shortcut] returns 0 for hard_mish / relu6 / normalize_channels* only.
ZERO_IN_GENERIC = ("mish", "swish", "hard_mish", "relu6", "normalize_channels",
                   "normalize_channels_softmax", "normalize_channels_softmax_maxval")
ZERO_IN_SHORTCUT = ("hard_mish", "relu6", "normalize_channels", "normalize_channels_softmax",
                    "normalize_channels_softmax_maxval")


def _stair(x: Tensor) -> Tensor:
    n = torch.floor(x)
    odd = torch.remainder(n, 2) != 0
    return torch.where(odd, (x - n) + torch.floor(x / 2.0), torch.floor(x / 2.0))


def darknet_activation(x: Tensor, name: str) -> Tensor:
    """Darknet activation ``name`` applied element-wise (``activations.h``), any shape.

    ``mish`` uses softplus with Darknet's +-20 thresholds; ``leaky`` slope 0.1; ``gelu`` the
    tanh approximation Darknet uses. ``normalize_channels*`` are not supported.
    """
    if name == "linear":
        return x
    if name == "logistic":
        return torch.sigmoid(x)
    if name == "leaky":
        return F.leaky_relu(x, 0.1)
    if name == "relu":
        return F.relu(x)
    if name == "relu6":
        return torch.clamp(x, 0.0, 6.0)
    if name == "mish":
        # softplus is x above 20 (Darknet's threshold); below -20 Darknet uses exp(x), which
        # equals log1p(exp(x)) to float precision.
        return x * torch.tanh(F.softplus(x, beta=1.0, threshold=20.0))
    if name == "swish":
        return x * torch.sigmoid(x)
    if name == "hard_mish":
        return torch.where(x > 0, x, torch.where(x > -2, x * x / 2 + x, torch.zeros_like(x)))
    if name == "tanh":
        return torch.tanh(x)
    if name == "elu":
        return F.elu(x, alpha=1.0)
    if name == "selu":
        return 1.0507 * F.elu(x, alpha=1.6732)
    if name == "gelu":
        return 0.5 * x * (1 + torch.tanh(0.797885 * x + 0.035677 * x * x * x))
    if name == "loggy":
        return 2.0 * torch.sigmoid(x) - 1.0
    if name == "relie":
        return torch.where(x > 0, x, 0.01 * x)
    if name == "ramp":
        return x * (x > 0).to(x.dtype) + 0.1 * x
    if name == "revleaky":
        return torch.where(x > 0, x, 0.1 * x)  # Darknet's forward is identical to leaky
    if name == "plse":
        return torch.where(x < -4, 0.01 * (x + 4), torch.where(x > 4, 0.01 * (x - 4) + 1, 0.125 * x + 0.5))
    if name == "hardtan":
        return torch.clamp(x, -1.0, 1.0)
    if name == "lhtan":
        return torch.where(x < 0, 0.001 * x, torch.where(x > 1, 0.001 * (x - 1) + 1, x))
    if name == "stair":
        return _stair(x)
    raise ValueError(f"unsupported Darknet activation {name!r}")


def _generic_activation(x: Tensor, name: str) -> Tensor:
    """Darknet's ``activate_array`` (used by [sam], [scale_channels], [activation])."""
    if name in ZERO_IN_GENERIC:
        return torch.zeros_like(x)  # Darknet writes 0 for every element
    return darknet_activation(x, name)


class Conv(nn.Module):
    """``[convolutional]``: ``act(BN(conv(x)))`` (BN eps 1e-5, no conv bias with BN) or ``act(conv(x) + b)``.

    Shapes: ``Tensor[N, C, H, W] -> Tensor[N, filters, H_out, W_out]`` with
    ``H_out = (H + 2*padding - size) // stride_y + 1``.
    """

    def __init__(self, in_channels: int, filters: int, size: int, stride: Tuple[int, int], padding: int,
                 groups: int = 1, dilation: int = 1, batch_normalize: bool = False,
                 activation: str = "logistic", flipped: bool = False, load_scales: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, filters, size, stride=stride, padding=padding, groups=groups,
                              dilation=dilation, bias=not batch_normalize)
        self.bn = nn.BatchNorm2d(filters, eps=1e-5) if batch_normalize else None
        self.activation = activation
        self.flipped = flipped
        self.load_scales = load_scales

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        if self.bn is not None:
            y = self.bn(y)
        return darknet_activation(y, self.activation)

    def darknet_params(self) -> List[Tuple[str, Tensor]]:
        out: List[Tuple[str, Tensor]] = []
        if self.bn is not None:
            out.append(("biases", self.bn.bias))
            if self.load_scales:
                out += [("scales", self.bn.weight), ("rolling_mean", self.bn.running_mean),
                        ("rolling_variance", self.bn.running_var)]
        else:
            out.append(("biases", self.conv.bias))
        out.append(("weights", self.conv.weight))
        return out

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


class MaxPool(nn.Module):
    """``[maxpool]`` with Darknet's padding: ``padding`` is a *total*, ``padding // 2`` on the
    left/top and the rest on the right/bottom; padded positions never win.

    ``Tensor[N, C, H, W] -> Tensor[N, C, (H + padding - size) // stride_y + 1, ...]``.
    """

    def __init__(self, size: int, stride: Tuple[int, int], padding: int) -> None:
        super().__init__()
        self.size = size
        self.stride = stride  # (sy, sx)
        self.padding = padding

    def forward(self, x: Tensor) -> Tensor:
        p = self.padding
        lo, hi = p // 2, p - p // 2
        if lo == hi and 2 * lo <= self.size:
            return F.max_pool2d(x, self.size, self.stride, padding=lo)
        if p > 0:
            x = F.pad(x, (lo, hi, lo, hi), value=float("-inf"))
        return F.max_pool2d(x, self.size, self.stride)

    def extra_repr(self) -> str:
        return f"size={self.size}, stride={self.stride}, padding={self.padding}"


class AvgPool(nn.Module):
    """``[avgpool]``: global average, ``Tensor[N, C, H, W] -> Tensor[N, C, 1, 1]``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


class Route(nn.Module):
    """``[route] layers=...``: channel concatenation; with ``groups=g group_id=k`` each input
    contributes its channels ``[k*C/g, (k+1)*C/g)``."""

    def __init__(self, layers: Sequence[int], groups: int = 1, group_id: int = 0) -> None:
        super().__init__()
        self.layers = list(layers)
        self.groups = groups
        self.group_id = group_id

    def forward(self, inputs: List[Tensor]) -> Tensor:
        if self.groups > 1:
            parts = []
            for t in inputs:
                c = t.shape[1] // self.groups
                parts.append(t[:, self.group_id * c:(self.group_id + 1) * c])
            inputs = parts
        if len(inputs) == 1:
            return inputs[0]
        return torch.cat(inputs, dim=1)

    def extra_repr(self) -> str:
        s = f"layers={self.layers}"
        if self.groups > 1:
            s += f", groups={self.groups}, group_id={self.group_id}"
        return s


class Shortcut(nn.Module):
    """``[shortcut] from=...``: ``act(prev + sum(from_i))`` (output shape = prev's; a ``from``
    layer with other channel count adds its first ``min(C)`` channels, as Darknet does), or with ``weights_type`` the
    weighted sum ``w0*prev + sum w_{i+1}*from_i`` (per feature or per channel), the weights
    normalised by ``relu`` (``relu(w) / (1e-4 + sum relu(w))``) or ``softmax``."""

    def __init__(self, layers: Sequence[int], channels: int, activation: str = "linear",
                 weights_type: str = "none", weights_normalization: str = "none",
                 from_channels: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        self.layers = list(layers)
        # channel count of each `from` layer (Darknet adds the first min(C) channels if they differ)
        self.from_channels = list(from_channels) if from_channels is not None else [channels] * len(self.layers)
        self.activation = activation
        self.weights_type = weights_type
        self.weights_normalization = weights_normalization
        n = len(self.layers) + 1
        if weights_type == "per_feature":
            self.weight: Optional[nn.Parameter] = nn.Parameter(torch.ones(n))
        elif weights_type == "per_channel":
            self.weight = nn.Parameter(torch.ones(n * channels))
        else:
            self.weight = None
        self.channels = channels

    def _normalized_weights(self) -> Tensor:
        n = len(self.layers) + 1
        w = self.weight
        assert w is not None
        w = w.view(n, 1) if self.weights_type == "per_feature" else w.view(n, self.channels)
        if self.weights_normalization == "relu":
            r = F.relu(w)
            w = r / (0.0001 + r.sum(dim=0, keepdim=True))
        elif self.weights_normalization == "softmax":
            e = torch.exp(w - w.max(dim=0, keepdim=True).values)
            w = e / (0.0001 + e.sum(dim=0, keepdim=True))
        return w  # [n, 1] or [n, C]

    def forward(self, prev: Tensor, inputs: List[Tensor]) -> Tensor:
        if self.weight is None:
            y = prev
            c = self.channels
            for t, ct in zip(inputs, self.from_channels):
                if ct == c:
                    y = y + t
                elif ct > c:
                    y = y + t[:, :c]
                else:
                    y = torch.cat([y[:, :ct] + t, y[:, ct:]], dim=1)
        else:
            w = self._normalized_weights()
            y = prev * w[0].view(1, -1, 1, 1)
            for i, t in enumerate(inputs):
                y = y + t * w[i + 1].view(1, -1, 1, 1)
        if self.activation in ZERO_IN_SHORTCUT:
            return torch.zeros_like(y)
        return darknet_activation(y, self.activation)

    def darknet_params(self) -> List[Tuple[str, Tensor]]:
        return [] if self.weight is None else [("weights", self.weight)]

    def extra_repr(self) -> str:
        return f"from={self.layers}, activation={self.activation}, weights_type={self.weights_type}"


class Upsample(nn.Module):
    """``[upsample] stride=s scale=a``: nearest ``a * x`` upsampling by ``s``; a negative stride
    sums ``|s| x |s|`` blocks (times ``a``)."""

    def __init__(self, stride: int = 2, scale: float = 1.0) -> None:
        super().__init__()
        self.stride = stride
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        s = self.stride
        if s > 0:
            n, c, h, w = x.shape
            y = x[:, :, :, None, :, None].expand(n, c, h, s, w, s).reshape(n, c, h * s, w * s)
        else:
            s = -s
            n, c, h, w = x.shape
            ho, wo = h // s, w // s
            y = x[:, :, :ho * s, :wo * s].reshape(n, c, ho, s, wo, s).sum(dim=(3, 5))
        if self.scale != 1.0:
            y = y * self.scale
        return y

    def extra_repr(self) -> str:
        return f"stride={self.stride}, scale={self.scale}"


class Reorg3d(nn.Module):
    """``[reorg3d] stride=s``: space-to-depth with Darknet's channel order
    ``out[(dy*s + dx)*C + c, y, x] = in[c, y*s + dy, x*s + dx]`` (not ``pixel_unshuffle``)."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        s = self.stride
        n, c, h, w = x.shape
        return (x.reshape(n, c, h // s, s, w // s, s).permute(0, 3, 5, 1, 2, 4)
                .reshape(n, s * s * c, h // s, w // s))

    def extra_repr(self) -> str:
        return f"stride={self.stride}"


class Sam(nn.Module):
    """``[sam] from=i``: ``act(prev * layers[i])`` element by element, no parameters.

    ``prev`` (the previous layer's output, in practice a 1x1 BN logistic conv) is the gate;
    ``layers[i]`` is the feature map. Both ``Tensor[N, C, H, W]``. ``activation`` mish, swish,
    hard_mish, relu6 give zeros, as in Darknet.
    """

    def __init__(self, source: int, activation: str = "linear") -> None:
        super().__init__()
        self.source = source
        self.activation = activation

    def forward(self, prev: Tensor, feature: Tensor) -> Tensor:
        return _generic_activation(pointwise_attention(feature, prev), self.activation)

    def extra_repr(self) -> str:
        return f"from={self.source}, activation={self.activation}"


class ScaleChannels(nn.Module):
    """``[scale_channels] from=i``: ``act(prev * layers[i])`` with ``prev`` ``Tensor[N, C, 1, 1]``
    (SE, ``scale_wh=0``) or ``Tensor[N, 1, H, W]`` (``scale_wh=1``) broadcast over the feature map
    ``layers[i]`` ``Tensor[N, C, H, W]``."""

    def __init__(self, source: int, scale_wh: bool = False, activation: str = "linear") -> None:
        super().__init__()
        self.source = source
        self.scale_wh = scale_wh
        self.activation = activation

    def forward(self, prev: Tensor, feature: Tensor) -> Tensor:
        return _generic_activation(pointwise_attention(feature, prev), self.activation)

    def extra_repr(self) -> str:
        return f"from={self.source}, scale_wh={int(self.scale_wh)}, activation={self.activation}"


class Dropout(nn.Module):
    """``[dropout] probability=p``: identity at inference; inverted dropout when training
    (``dropblock`` is kept as an attribute, trained as plain dropout)."""

    def __init__(self, probability: float = 0.2, dropblock: bool = False) -> None:
        super().__init__()
        self.probability = probability
        self.dropblock = dropblock

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.probability, self.training)

    def extra_repr(self) -> str:
        return f"probability={self.probability}"


class Activation(nn.Module):
    """``[activation]``: Darknet's generic ``activate_array`` (mish/swish/... give zeros)."""

    def __init__(self, activation: str = "linear") -> None:
        super().__init__()
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        return _generic_activation(x, self.activation)


class Empty(nn.Module):
    """``[empty]`` / ``[silence]``: identity."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class Yolo(nn.Module):
    """``[yolo]`` inference output (Darknet's ``l.output``), same shape as the input
    ``Tensor[N, len(mask)*(classes+5), H, W]`` laid out per anchor as
    ``[x, y, w, h, obj, cls...]``.

    ``new_coords=0``: logistic on x, y, obj and classes, w/h raw; ``new_coords=1``: no logistic.
    Then ``x = x*scale_x_y - 0.5*(scale_x_y - 1)`` (same for y).

    Every option of the section (training ones included) is kept as an attribute for the loss:
    ``anchors`` (list of (w, h) pixel pairs, all ``num``), ``mask``, ``classes``, ``num``,
    ``jitter``, ``ignore_thresh``, ``truth_thresh``, ``iou_thresh``, ``iou_loss``,
    ``iou_normalizer``, ``cls_normalizer``, ``obj_normalizer``, ``delta_normalizer``,
    ``scale_x_y``, ``new_coords``, ``max_delta``, ``nms_kind``, ``beta_nms``,
    ``label_smooth_eps``, ``focal_loss``, ``objectness_smooth``, ``random``, ``resize``,
    ``max_boxes``, ``counters_per_class``, ``iou_thresh_kind``; ``options`` holds the raw strings.
    """

    def __init__(self, classes: int, anchors: Sequence[Tuple[float, float]], mask: Sequence[int],
                 num: int, scale_x_y: float = 1.0, new_coords: bool = False, stride: int = 1,
                 **attrs) -> None:
        super().__init__()
        self.classes = classes
        self.anchors = [tuple(a) for a in anchors]
        self.mask = list(mask)
        self.num = num
        self.scale_x_y = scale_x_y
        self.new_coords = bool(new_coords)
        self.stride = stride  # input pixels per output cell (set by the builder)
        self.options = dict(attrs.pop("options", {}))
        for k, v in attrs.items():
            setattr(self, k, v)

    @property
    def masked_anchors(self) -> List[Tuple[float, float]]:
        """The (w, h) anchors, in input pixels, of this layer's ``len(mask)`` outputs."""
        return [self.anchors[m] for m in self.mask]

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        na = len(self.mask)
        v = x.reshape(n, na, self.classes + 5, h, w)
        xy, wh, rest = v[:, :, 0:2], v[:, :, 2:4], v[:, :, 4:]
        if not self.new_coords:
            xy = torch.sigmoid(xy)
            rest = torch.sigmoid(rest)
        if self.scale_x_y != 1.0:
            s = self.scale_x_y
            xy = xy * s + (-0.5 * (s - 1))
        return torch.cat([xy, wh, rest], dim=2).reshape(n, c, h, w)

    def extra_repr(self) -> str:
        return (f"classes={self.classes}, mask={self.mask}, anchors={self.masked_anchors}, "
                f"scale_x_y={self.scale_x_y}, new_coords={int(self.new_coords)}")
