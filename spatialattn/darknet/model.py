"""``DarknetModel``: a PyTorch network built from a Darknet ``.cfg``, layer for layer.

Example::

    >>> from spatialattn.darknet import DarknetModel
    >>> model = DarknetModel.from_cfg("yolov4-sam-mish-csp-reorg-bfm.cfg")   # doctest: +SKIP
    >>> model.load_darknet_weights("yolov4-sam-mish-csp-reorg-bfm.weights")  # doctest: +SKIP
    >>> outs = model(x, return_layers=[171, 175])  # {171: [sam] output, 175: [yolo] output}
    >>> yolo_outs = model(x)                        # list of the [yolo] outputs (l.output)
    >>> yolo_outs, gates = model(x, return_attention=True)  # gates: {sam/scale_channels index: map}

``model.layers[i]`` is the module of Darknet layer ``i`` (the index Darknet prints and the one
``from=``/``layers=`` refer to). Shapes are inferred at build time from ``[net]``
width/height/channels and every inconsistency is a :class:`DarknetCfgError` naming the file,
the line and the layers involved.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..nn.base import refuse_torchscript
from . import layers as L
from .cfg import CfgSection, parse_cfg, parse_cfg_text

__all__ = ["DarknetModel", "LayerInfo", "build_layers"]

Shape = Tuple[int, int, int]

# options whose values are not plain numbers (validated where they are read)
_NON_NUMERIC = {
    "activation", "policy", "iou_loss", "nms_kind", "iou_thresh_kind", "weights_type",
    "weights_normalization", "map", "layers", "from", "mask", "anchors", "steps", "scales",
    "seq_scales", "counters_per_class",
}
_INT_LISTS = {"layers", "from", "mask", "steps", "counters_per_class"}
_FLOAT_LISTS = {"anchors", "scales", "seq_scales"}


@dataclass
class LayerInfo:
    """Build-time facts about one Darknet layer."""

    index: int
    type: str
    section: CfgSection
    in_shape: Shape
    out_shape: Shape
    refs: List[int] = field(default_factory=list)  # absolute indices of referenced layers
    dontload: bool = False


def _validate_values(sec: CfgSection) -> None:
    for key in sec.options:
        if key in _INT_LISTS:
            sec.get_int_list(key)
        elif key in _FLOAT_LISTS:
            sec.get_float_list(key)
        elif key not in _NON_NUMERIC:
            sec.get_float(key)


def _fmt(shape: Shape) -> str:
    return "x".join(str(v) for v in shape)


def _resolve(sec: CfgSection, key: str, value: int, count: int) -> int:
    """Darknet reference: negative = relative to this layer, else absolute; must be < this layer."""
    idx = sec.index + value if value < 0 else value
    if not 0 <= idx < sec.index:
        raise sec.error(
            f"reference {value} resolves to layer {idx}, outside the layers before this one "
            f"(0..{sec.index - 1})", key)
    return idx


def _unsupported(sec: CfgSection, keys: Sequence[str]) -> None:
    for k in keys:
        v = sec.get_float(k, 0.0)
        if v:
            raise sec.error(f"{k}={sec.get_str(k)} is a Darknet feature this port does not implement", k)


def build_layers(sections: Sequence[CfgSection]) -> Tuple[Shape, List[nn.Module], List[LayerInfo]]:
    """Build the module of every layer with shape inference; returns ``(input CHW, modules, infos)``."""
    net = sections[0]
    _validate_values(net)
    c, h, w = net.get_int("channels", 0), net.get_int("height", 0), net.get_int("width", 0)
    if not (c > 0 and h > 0 and w > 0):
        raise net.error(f"width, height and channels must be positive, found width={w} height={h} channels={c}")
    in_chw: Shape = (c, h, w)
    modules: List[nn.Module] = []
    infos: List[LayerInfo] = []
    shape: Shape = in_chw
    for sec in sections[1:]:
        _validate_values(sec)
        i = sec.index
        t = sec.type
        refs: List[int] = []
        c, h, w = shape
        if t == "convolutional":
            _unsupported(sec, ["antialiasing", "binary", "xnor", "sway", "rotate", "stretch", "stretch_sway",
                               "deform", "coordconv", "assisted_excitation"])
            if sec.has("share_index"):
                raise sec.error("share_index (weights shared with another layer) is not supported", "share_index")
            filters = sec.get_int("filters", 1)
            size = sec.get_int("size", 1)
            stride = sec.get_int("stride", 1)
            sx, sy = sec.get_int("stride_x", -1), sec.get_int("stride_y", -1)
            sx = stride if sx < 1 else sx
            sy = stride if sy < 1 else sy
            dil = sec.get_int("dilation", 1)
            if size == 1:
                dil = 1
            padding = sec.get_int("padding", 0)
            if sec.get_int("pad", 0):
                padding = size // 2
            groups = sec.get_int("groups", 1)
            bn = bool(sec.get_int("batch_normalize", 0) or sec.get_int("cbn", 0))
            act = sec.get_activation("activation", "logistic")
            if act.startswith("normalize_channels"):
                raise sec.error(f"activation={act} is not supported", "activation")
            for k, v in (("filters", filters), ("size", size), ("stride", min(sx, sy)), ("groups", groups),
                         ("dilation", dil)):
                if v < 1:
                    raise sec.error(f"must be >= 1, found {v}", k)
            if padding < 0:
                raise sec.error(f"must be >= 0, found {padding}", "padding")
            if c % groups or filters % groups:
                raise sec.error(f"groups={groups} must divide the input channels ({c}, from layer {i - 1} "
                                f"{_fmt(shape)}) and filters ({filters})", "groups")
            ekernel = (size - 1) * dil + 1
            oh = (h + 2 * padding * dil - ekernel) // sy + 1
            ow = (w + 2 * padding * dil - ekernel) // sx + 1
            if oh < 1 or ow < 1:
                raise sec.error(f"input {_fmt(shape)} is too small for size={size} padding={padding}", "size")
            mod: nn.Module = L.Conv(c, filters, size, (sy, sx), padding * dil, groups, dil, bn, act,
                                    flipped=bool(sec.get_int("flipped", 0)),
                                    load_scales=not sec.get_int("dontloadscales", 0))
            out: Shape = (filters, oh, ow)
        elif t == "maxpool":
            _unsupported(sec, ["antialiasing", "maxpool_depth", "maxpool_zero_nonmax"])
            stride = sec.get_int("stride", 1)
            sx, sy = sec.get_int("stride_x", stride), sec.get_int("stride_y", stride)
            size = sec.get_int("size", stride)
            padding = sec.get_int("padding", size - 1)
            if size < 1 or sx < 1 or sy < 1 or padding < 0:
                raise sec.error(f"invalid size={size} stride={sy}x{sx} padding={padding}")
            oh, ow = (h + padding - size) // sy + 1, (w + padding - size) // sx + 1
            if oh < 1 or ow < 1:
                raise sec.error(f"input {_fmt(shape)} is too small for size={size}", "size")
            mod, out = L.MaxPool(size, (sy, sx), padding), (c, oh, ow)
        elif t == "avgpool":
            mod, out = L.AvgPool(), (c, 1, 1)
        elif t == "route":
            sec.require("layers")
            refs = [_resolve(sec, "layers", v, i) for v in sec.get_int_list("layers")]
            groups = sec.get_int("groups", 1)
            gid = sec.get_int("group_id", 0)
            if groups < 1:
                raise sec.error(f"must be >= 1, found {groups}", "groups")
            if not 0 <= gid < groups:
                raise sec.error(f"must be in [0, groups={groups}), found {gid}", "group_id")
            first = infos[refs[0]].out_shape
            for r in refs:
                s = infos[r].out_shape
                if s[1:] != first[1:]:
                    raise sec.error(
                        f"layers {refs[0]} ({infos[refs[0]].type} {_fmt(first)}) and {r} ({infos[r].type} "
                        f"{_fmt(s)}) have different height/width and cannot be concatenated", "layers")
                if s[0] % groups:
                    raise sec.error(f"layer {r} has {s[0]} channels, not divisible by groups={groups}", "groups")
            mod = L.Route(refs, groups, gid)
            out = (sum(infos[r].out_shape[0] for r in refs) // groups, first[1], first[2])
        elif t == "shortcut":
            sec.require("from")
            refs = [_resolve(sec, "from", v, i) for v in sec.get_int_list("from")]
            act = sec.get_activation("activation", "linear")
            wt = sec.get_str("weights_type", "none")
            for r in refs:
                rs = infos[r].out_shape
                pair = (f"layer {r} ({infos[r].type} {_fmt(rs)}) and the previous layer {i - 1} "
                        f"({infos[i - 1].type} {_fmt(shape)})")
                if rs[1:] != shape[1:] or (rs != shape and wt != "none"):
                    raise sec.error(f"cannot add {pair}: shapes differ", "from")
                if rs != shape:
                    # Darknet adds the first min(C) channels (flat CHW prefix) and only prints
                    # "Downsample here"; real cfgs rely on it (yolov4-sam-mish-csp-reorg-bfm layer 137).
                    warnings.warn(f"{sec.where('from')}: {pair} have different channel counts; like Darknet, "
                                  f"only the first {min(rs[0], shape[0])} channels are added", RuntimeWarning,
                                  stacklevel=3)
            wn = sec.get_str("weights_normalization", "none")
            if wt not in ("none", "per_feature", "per_layer", "per_channel"):
                raise sec.error(f"expected none, per_feature, per_layer or per_channel, found {wt!r}", "weights_type")
            wt = "per_feature" if wt == "per_layer" else wt
            if wt != "none":
                if wn not in ("relu", "avg_relu", "softmax"):
                    raise sec.error(f"a weighted shortcut needs relu, avg_relu or softmax (Darknet refuses "
                                    f"others), found {wn!r}", "weights_normalization")
                wn = "relu" if wn == "avg_relu" else wn
            mod, out = L.Shortcut(refs, c, act, wt, wn, [infos[r].out_shape[0] for r in refs]), shape
        elif t == "upsample":
            stride = sec.get_int("stride", 2)
            if stride == 0:
                raise sec.error("must not be 0", "stride")
            scale = sec.get_float("scale", 1.0)
            if stride > 0:
                out = (c, h * stride, w * stride)
            else:
                out = (c, h // -stride, w // -stride)
                if out[1] < 1 or out[2] < 1:
                    raise sec.error(f"input {_fmt(shape)} is smaller than the block {-stride}", "stride")
            mod = L.Upsample(stride, scale)
        elif t == "reorg3d":
            _unsupported(sec, ["reverse"])
            s = sec.get_int("stride", 1)
            if s < 1:
                raise sec.error(f"must be >= 1, found {s}", "stride")
            if h % s or w % s:
                raise sec.error(f"input {_fmt(shape)} (layer {i - 1}) is not divisible by stride={s}", "stride")
            mod, out = L.Reorg3d(s), (c * s * s, h // s, w // s)
        elif t in ("sam", "scale_channels"):
            sec.require("from")
            src = _resolve(sec, "from", sec.get_int("from"), i)
            refs = [src]
            fs = infos[src].out_shape
            act = sec.get_activation("activation", "linear")
            prev_desc = f"previous layer {i - 1} ({infos[i - 1].type} {_fmt(shape)})"
            src_desc = f"layer {src} ({infos[src].type} {_fmt(fs)})"
            if t == "sam":
                if fs != shape:
                    raise sec.error(f"{prev_desc} and from {src_desc} must have the same shape", "from")
                mod = L.Sam(src, act)
            else:
                wh = bool(sec.get_int("scale_wh", 0))
                if wh and shape != (1, fs[1], fs[2]):
                    raise sec.error(f"scale_wh=1 needs the {prev_desc} to be 1x{fs[1]}x{fs[2]} to scale "
                                    f"from {src_desc}", "from")
                if not wh and shape != (fs[0], 1, 1):
                    raise sec.error(f"scale_wh=0 needs the {prev_desc} to be {fs[0]}x1x1 to scale "
                                    f"from {src_desc}", "from")
                mod = L.ScaleChannels(src, wh, act)
            out = fs
        elif t == "dropout":
            p = sec.get_float("probability", 0.2)
            if not 0.0 <= p < 1.0:
                raise sec.error(f"must be in [0, 1), found {p}", "probability")
            mod, out = L.Dropout(p, bool(sec.get_int("dropblock", 0))), shape
        elif t == "activation":
            mod, out = L.Activation(sec.get_activation("activation", "linear")), shape
        elif t == "empty":
            mod, out = L.Empty(), shape
        elif t == "yolo":
            mod = _build_yolo(sec, shape, infos, in_chw)
            out = shape
        else:  # pragma: no cover - parse_cfg_text only lets known sections through
            raise sec.error(f"no builder for section type {t}")
        modules.append(mod)
        infos.append(LayerInfo(i, t, sec, shape, out, refs, dontload=bool(sec.get_int("dontload", 0))))
        shape = out
    return in_chw, modules, infos


def _build_yolo(sec: CfgSection, shape: Shape, infos: List[LayerInfo], in_chw: Shape) -> L.Yolo:
    classes = sec.get_int("classes", 20)
    num = sec.get_int("num", 1)
    mask = sec.get_int_list("mask", list(range(num)))
    anchors_flat = sec.get_float_list("anchors", [])
    if classes < 1 or num < 1:
        raise sec.error(f"classes and num must be >= 1, found classes={classes} num={num}")
    if len(anchors_flat) % 2:
        raise sec.error(f"expected (w, h) pairs, found {len(anchors_flat)} numbers", "anchors")
    anchors = [(anchors_flat[2 * k], anchors_flat[2 * k + 1]) for k in range(len(anchors_flat) // 2)]
    for m in mask:
        if not 0 <= m < max(len(anchors), num):
            raise sec.error(f"mask index {m} has no anchor ({len(anchors)} anchor pairs given)", "mask")
    expected = len(mask) * (classes + 5)
    if shape[0] != expected:
        raise sec.error(
            f"the previous layer {sec.index - 1} ({infos[-1].type} {_fmt(shape)}) must have "
            f"len(mask)*(classes+5) = {len(mask)}*({classes}+5) = {expected} channels, found {shape[0]} "
            "(set filters= of the [convolutional] before it)", "classes" if sec.has("classes") else None)
    iou_loss = sec.get_str("iou_loss", "mse")
    if iou_loss not in ("mse", "iou", "giou", "diou", "ciou"):
        raise sec.error(f"expected mse, iou, giou, diou or ciou, found {iou_loss!r}", "iou_loss")
    nms_kind = sec.get_str("nms_kind", "default")
    if nms_kind not in ("default", "greedynms", "diounms", "cornersnms"):
        raise sec.error(f"expected default, greedynms, diounms or cornersnms, found {nms_kind!r}", "nms_kind")
    iou_thresh_kind = sec.get_str("iou_thresh_kind", "iou")
    if iou_thresh_kind not in ("iou", "giou", "diou", "ciou"):
        raise sec.error(f"expected iou, giou, diou or ciou, found {iou_thresh_kind!r}", "iou_thresh_kind")
    return L.Yolo(
        classes=classes, anchors=anchors, mask=mask, num=num,
        scale_x_y=sec.get_float("scale_x_y", 1.0), new_coords=bool(sec.get_int("new_coords", 0)),
        stride=max(1, in_chw[1] // shape[1]),
        jitter=sec.get_float("jitter", 0.2), resize=sec.get_float("resize", 1.0),
        ignore_thresh=sec.get_float("ignore_thresh", 0.5), truth_thresh=sec.get_float("truth_thresh", 1.0),
        iou_thresh=sec.get_float("iou_thresh", 1.0), random=sec.get_float("random", 0.0),
        focal_loss=bool(sec.get_int("focal_loss", 0)), iou_loss=iou_loss,
        iou_normalizer=sec.get_float("iou_normalizer", 0.75), obj_normalizer=sec.get_float("obj_normalizer", 1.0),
        cls_normalizer=sec.get_float("cls_normalizer", 1.0),
        delta_normalizer=sec.get_float("delta_normalizer", 1.0),
        max_delta=sec.get_float("max_delta", math.inf), label_smooth_eps=sec.get_float("label_smooth_eps", 0.0),
        objectness_smooth=bool(sec.get_int("objectness_smooth", 0)), nms_kind=nms_kind,
        beta_nms=sec.get_float("beta_nms", 0.6), max_boxes=sec.get_int("max", 200),
        iou_thresh_kind=iou_thresh_kind, counters_per_class=sec.get_int_list("counters_per_class"),
        options={k: o.value for k, o in sec.options.items()},
    )


class DarknetModel(nn.Module):
    """A Darknet network: ``layers[i]`` is the module of Darknet layer ``i``.

    Build with :meth:`from_cfg` / :meth:`from_cfg_text` (the model is returned in ``eval()``
    mode, i.e. Darknet's inference: BN uses the running statistics; call ``.train()`` to train).

    Attributes:
        layers: ``nn.ModuleList`` indexed by Darknet layer index.
        infos: :class:`LayerInfo` per layer (type, cfg section, input/output CHW at the cfg size).
        input_shape: ``(C, H, W)`` from ``[net]``.
        net_options: the ``[net]`` :class:`CfgSection` (training options for the engine).
        yolo_indices: indices of the ``[yolo]`` layers.
        attention_indices: indices of the ``[sam]`` / ``[scale_channels]`` layers.
        weights_header: ``(major, minor, revision, seen)`` of the last loaded ``.weights`` file.
    """

    def __init__(self, sections: Sequence[CfgSection]) -> None:
        super().__init__()
        self.sections = list(sections)
        self.net_options = self.sections[0]
        self.input_shape, modules, self.infos = build_layers(self.sections)
        self.layers = nn.ModuleList(modules)
        self.layer_types = [info.type for info in self.infos]
        self._refs = [list(info.refs) for info in self.infos]
        self.yolo_indices = [i for i, t in enumerate(self.layer_types) if t == "yolo"]
        self.attention_indices = [i for i, t in enumerate(self.layer_types) if t in ("sam", "scale_channels")]
        # last layer that reads each output (as `prev` or through a reference)
        last_use = list(range(1, len(self.infos) + 1))
        for i, refs in enumerate(self._refs):
            for r in refs:
                last_use[r] = max(last_use[r], i)
        self._last_use = last_use
        self.weights_header: Optional[Tuple[int, int, int, int]] = None
        self.source = self.net_options.source
        self.eval()

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: say why it cannot work instead of failing
        # deep inside the graph walk (sets, lists of references, Python dispatch)
        refuse_torchscript(self)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_cfg(cls, path: Union[str, os.PathLike]) -> "DarknetModel":
        """Parse ``path`` and build the network (eval mode)."""
        return cls(parse_cfg(path))

    @classmethod
    def from_cfg_text(cls, text: str, source: str = "<string>") -> "DarknetModel":
        """Build from cfg text; ``source`` names it in error messages."""
        return cls(parse_cfg_text(text, source=source))

    # ------------------------------------------------------------------ weights
    def load_darknet_weights(self, path: Union[str, os.PathLike], cutoff: Optional[int] = None) -> "DarknetModel":
        """Load a Darknet ``.weights`` file (strict counts; ``cutoff=N`` loads layers ``< N`` only)."""
        from .weights import load_darknet_weights

        load_darknet_weights(self, path, cutoff=cutoff)
        return self

    def save_darknet_weights(self, path: Union[str, os.PathLike], cutoff: Optional[int] = None) -> None:
        """Write a Darknet ``.weights`` file (header of the loaded file, else 0.2.5 seen=0)."""
        from .weights import save_darknet_weights

        save_darknet_weights(self, path, cutoff=cutoff)

    # ------------------------------------------------------------------ forward
    @property
    def yolo_layers(self) -> List[L.Yolo]:
        """The ``[yolo]`` modules in layer order (anchors, mask, classes, training options)."""
        return [self.layers[i] for i in self.yolo_indices]  # type: ignore[misc]

    def forward(self, x: Tensor, return_layers: Optional[Sequence[int]] = None,
                return_attention: bool = False):
        """Run the network.

        Args:
            x: ``Tensor[N, C, H, W]``, C = ``[net] channels``; H, W usually ``[net]`` height/width
                (any size for which every route/shortcut stays consistent works).
            return_layers: Darknet layer indices whose outputs (``l.output``) to return.
            return_attention: also return ``{layer index: gate}`` for every ``[sam]`` /
                ``[scale_channels]`` layer, the gate being the tensor it multiplies by (the
                previous layer's output: ``Tensor[N, C, H, W]`` for ``[sam]``, ``[N, C, 1, 1]``
                or ``[N, 1, H, W]`` for ``[scale_channels]``).

        Returns:
            ``{index: Tensor}`` if ``return_layers`` is given, else the list of ``[yolo]`` outputs
            (the last layer's output if there is no ``[yolo]``); with ``return_attention`` a tuple
            ``(that, gates)``.
        """
        if x.dim() != 4 or x.shape[1] != self.input_shape[0]:
            raise ValueError(f"input: expected Tensor[N, {self.input_shape[0]}, H, W], got shape {tuple(x.shape)}")
        n_layers = len(self.layers)
        if return_layers is not None:
            wanted = [int(i) for i in return_layers]
            for i in wanted:
                if not 0 <= i < n_layers:
                    raise ValueError(f"return_layers: layer {i} does not exist (valid 0..{n_layers - 1})")
            keep = set(wanted)
        else:
            wanted = None
            keep = set(self.yolo_indices) if self.yolo_indices else {n_layers - 1}
        outputs: List[Optional[Tensor]] = []
        gates: Dict[int, Tensor] = {}
        prev = x
        for i, layer in enumerate(self.layers):
            t = self.layer_types[i]
            refs = self._refs[i]
            if t == "route":
                y = layer([outputs[r] for r in refs])
            elif t == "shortcut":
                y = layer(prev, [outputs[r] for r in refs])
            elif t == "sam" or t == "scale_channels":
                y = layer(prev, outputs[refs[0]])
                if return_attention:
                    gates[i] = prev
            else:
                y = layer(prev)
            outputs.append(y)
            # free outputs nobody reads any more (keeps memory flat on deep nets)
            if i >= 1 and self._last_use[i - 1] <= i and (i - 1) not in keep:
                outputs[i - 1] = None
            for r in refs:
                if self._last_use[r] <= i and r not in keep:
                    outputs[r] = None
            prev = y
        if wanted is not None:
            result = {i: outputs[i] for i in wanted}
        elif self.yolo_indices:
            result = [outputs[i] for i in self.yolo_indices]
        else:
            result = [outputs[-1]]
        if return_attention:
            return result, gates
        return result

    @torch.no_grad()
    def attention_maps(self, x: Tensor) -> Dict[int, Tensor]:
        """``{layer index: gate}`` of every ``[sam]`` / ``[scale_channels]`` layer for input ``x``
        (see :meth:`forward`); computed without gradients."""
        return self.forward(x, return_attention=True)[1]

    def summary(self) -> str:
        """One line per layer: index, type, output CHW at the cfg size, references."""
        lines = [f"input {self.input_shape[0]}x{self.input_shape[1]}x{self.input_shape[2]}"]
        for info in self.infos:
            ref = f" <- {info.refs}" if info.refs else ""
            lines.append(f"{info.index:4d} {info.type:15s} {_fmt(info.out_shape):>14s}{ref}")
        n = sum(p.numel() for p in self.parameters())
        lines.append(f"{len(self.infos)} layers, {n} parameters")
        return "\n".join(lines)
