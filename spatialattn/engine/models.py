"""Detectors for the training engine, built from a plain, serialisable spec.

Two families, with one interface (``forward(images, targets=None)``: a loss dict when targets
are given, else detections; ``attention_maps(images)``; ``spec``):

* :class:`YoloDetector` -- a Darknet-cfg YOLO model (default: the bundled ``sam-tiny``) and its
  loss (:class:`~spatialattn.engine.yolo_loss.YoloLoss`). Attention variants:

  ``cfg``            the cfg as written (``sam-tiny``: the YOLOv4 modified SAM, ``[sam]`` blocks);
  ``none``           every ``[sam] from=-2`` block (1x1 logistic conv + ``[sam]``) removed;
  ``sam_pointwise``  the cfg's own ``[sam]`` blocks (identical to ``create_attention("sam_pointwise")``:
                     1x1 conv without bias + BN + logistic, times the feature); on a cfg without
                     ``[sam]`` blocks, that module on the sites below;
  any other name of :func:`spatialattn.nn.create_attention` (``sam`` = CBAM spatial attention,
  ``cbam``, ``se``, ``cam``, ``nonlocal``, ...): the blocks are removed and the module is applied to
  the feature map each block gated (its "site"), through a forward hook on ``darknet.layers[site]``.
  On a cfg without ``[sam]`` blocks the sites are the inputs of the conv before each ``[yolo]``.
  The modules live in ``YoloDetector.attention`` (trained, saved in the state_dict).

* :class:`RCNNDetector` -- a torchvision Faster / Mask R-CNN of :mod:`spatialattn.detection.rcnn`
  with ``roi_attention`` / ``backbone_attention``; labels are shifted by one for torchvision's
  background class, so both families use 0-based labels.

A spec is a dict of strings / numbers / lists (stored in checkpoints, ``weights_only``-safe);
:func:`resolve_spec` fills in the cfg text, so a checkpoint rebuilds without the original files.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..darknet import DarknetModel
from ..darknet.bundled import bundled_cfg, rewrite_cfg
from ..detection.yolo_decode import yolo_postprocess
from ..nn import create_attention
from .yolo_loss import YoloLoss

__all__ = ["YoloDetector", "RCNNDetector", "build_model", "resolve_spec", "RCNN_MODELS",
           "YOLO_ATTENTION_BUILTIN", "collect_module_maps"]

RCNN_MODELS = ("fasterrcnn_resnet18_fpn", "fasterrcnn_resnet50_fpn", "maskrcnn_resnet18_fpn",
               "maskrcnn_resnet50_fpn")
YOLO_ATTENTION_BUILTIN = ("cfg", "none", "sam_pointwise")


def _sam_blocks(model: DarknetModel) -> List[int]:
    """Indices of ``[sam]`` layers that form a ``conv + [sam] from=-2`` block (what rewrite_cfg swaps)."""
    return [i for i, info in enumerate(model.infos)
            if info.type == "sam" and info.refs == [i - 2] and model.infos[i - 1].type == "convolutional"]


def _read_cfg(cfg: str) -> Tuple[str, str]:
    """``(text, source)`` of ``bundled:NAME`` or a cfg file path."""
    if cfg.startswith("bundled:"):
        name = cfg.split(":", 1)[1]
        return bundled_cfg(name), f"spatialattn/cfg/{name}.cfg"
    try:
        with open(cfg, "r", encoding="utf-8") as f:
            return f.read(), cfg
    except OSError as e:
        raise ValueError(f"cfg: cannot read {cfg!r}: {e.strerror or e}") from None


def resolve_spec(spec: Mapping[str, Any]) -> Dict[str, Any]:
    """Complete a model spec: for Darknet models compute the cfg text with ``num_classes`` and the
    attention variant and the hook sites; returns a new dict (``weights_only``-safe)."""
    out = dict(spec)
    model = out.get("model", "darknet")
    num_classes = int(out["num_classes"])
    if num_classes < 1:
        raise ValueError(f"num_classes: expected >= 1, got {num_classes}")
    if model in RCNN_MODELS:
        return out
    if model != "darknet":
        raise ValueError(f"model: expected 'darknet' or one of {', '.join(RCNN_MODELS)}, got {model!r}")
    if "cfg_text" in out:
        return out
    attention = str(out.get("attention", "cfg"))
    text, source = _read_cfg(str(out.get("cfg", "bundled:sam-tiny")))
    base = DarknetModel.from_cfg_text(text, source=source)
    blocks = _sam_blocks(base)
    hook_kind: Optional[str] = None
    sites: List[int] = []
    if attention in ("cfg",) or (attention == "sam_pointwise" and blocks):
        new_text = rewrite_cfg(text, num_classes, "sam", source=source)
    else:
        if attention != "none":
            create_attention(attention, 8)  # unknown names fail here, with the factory's message
            hook_kind = attention
        new_text = rewrite_cfg(text, num_classes, "none", source=source)
        if hook_kind is not None:
            if blocks:
                # block k (sam at index s) gated layer s-2; every earlier block removed 2 layers
                sites = [s - 2 - 2 * k for k, s in enumerate(blocks)]
            else:
                stripped = DarknetModel.from_cfg_text(new_text, source=source)
                sites = [y - 2 for y in stripped.yolo_indices]
    out.update(cfg_text=new_text, cfg_source=source, hook_attention=hook_kind, hook_sites=sites)
    return out


def build_model(spec: Mapping[str, Any]) -> nn.Module:
    """Build the detector of ``spec`` (see :func:`resolve_spec`); random initialisation."""
    spec = resolve_spec(spec)
    if spec.get("model", "darknet") in RCNN_MODELS:
        return RCNNDetector(spec)
    return YoloDetector(spec)


def collect_module_maps(model: nn.Module, run) -> Dict[str, Tensor]:
    """Run ``run()`` with ``keep_attention`` on every :class:`spatialattn.nn` attention module of
    ``model`` and return ``{module name: last attention map}``."""
    from ..nn.base import AttentionModule

    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, AttentionModule)]
    before = [m.keep_attention for _, m in mods]
    for _, m in mods:
        m.keep_attention, m.last_attention = True, None
    try:
        run()
        return {n: m.last_attention for n, m in mods if m.last_attention is not None}
    finally:
        for (_, m), b in zip(mods, before):
            m.keep_attention, m.last_attention = b, None


class YoloDetector(nn.Module):
    """A Darknet YOLO model, its attention variant and its loss (see the module docstring).

    ``forward(images Tensor[N, 3, H, W], targets=None)``: with targets the loss dict of
    :class:`YoloLoss` (``"loss"`` is the total); without, detections in input pixels (a list of
    ``{"boxes", "scores", "labels"}``) using ``conf_thresh`` / ``nms_thresh`` / ``max_detections``.
    """

    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__()
        self.spec = resolve_spec(spec)
        self.darknet = DarknetModel.from_cfg_text(self.spec["cfg_text"], source=self.spec.get("cfg_source", "<cfg>"))
        self.darknet.train()
        kind = self.spec.get("hook_attention")
        self.attention = nn.ModuleDict()
        self._collect: Optional[Dict[str, Tensor]] = None
        for site in self.spec.get("hook_sites", []) or []:
            c = self.darknet.infos[site].out_shape[0]
            self.attention[str(site)] = create_attention(kind, c, **dict(self.spec.get("attention_kwargs") or {}))
            self.darknet.layers[site].register_forward_hook(self._make_hook(site))
        self.loss_fn = YoloLoss(self.darknet.yolo_layers)
        if self.spec.get("prior_init", True):
            self._prior_init()
        self.raw_indices = [i - 1 for i in self.darknet.yolo_indices]
        self.conf_thresh = float(self.spec.get("conf_thresh", 0.005))
        self.nms_thresh = float(self.spec.get("nms_thresh", 0.45))
        self.max_detections = int(self.spec.get("max_detections", 100))

    @torch.no_grad()
    def _prior_init(self, obj_prior: float = 0.01) -> None:
        """Start the objectness of every ``[yolo]`` at probability ``obj_prior`` (bias of the conv
        before it; logistic outputs only), so the first steps are not spent pushing ~1000 empty cells
        per image down from 0.5 (the focal-loss paper's prior; YOLOv5 does the same)."""
        for yi, layer in zip(self.darknet.yolo_indices, self.darknet.yolo_layers):
            conv = getattr(self.darknet.layers[yi - 1], "conv", None)
            if layer.new_coords or conv is None or conv.bias is None:
                continue
            b = conv.bias.view(len(layer.mask), layer.classes + 5)
            b[:, 4] = math.log(obj_prior / (1 - obj_prior))

    def _make_hook(self, site: int):
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
            if self._collect is None:  # (the map only when collected: a non-local block then
                return self.attention[str(site)](output)  # runs torch's fused attention)
            y, amap = self.attention[str(site)](output, return_attention=True)
            self._collect[f"layer{site}.{self.spec['hook_attention']}"] = amap.detach()
            return y
        return hook

    @property
    def input_size(self) -> Tuple[int, int]:
        return int(self.darknet.input_shape[1]), int(self.darknet.input_shape[2])

    def raw_outputs(self, images: Tensor) -> List[Tensor]:
        """The inputs of the ``[yolo]`` layers (raw logits), one ``Tensor[N, A*(5+K), H, W]`` each."""
        out = self.darknet(images, return_layers=self.raw_indices)
        return [out[i] for i in self.raw_indices]

    def postprocess(self, raw: Sequence[Tensor], input_size: Tuple[int, int]) -> List[Dict[str, Tensor]]:
        outs = [layer(r.float()) for layer, r in zip(self.darknet.yolo_layers, raw)]
        return yolo_postprocess(outs, self.darknet.yolo_layers, input_size, conf_thresh=self.conf_thresh,
                                nms_thresh=self.nms_thresh, max_detections=self.max_detections)

    def forward(self, images: Tensor, targets: Optional[Sequence[Mapping[str, Any]]] = None):
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError("images: expected Tensor[N, 3, H, W] (letterboxed to one size)")
        raw = self.raw_outputs(images)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        if targets is not None:
            return self.loss_fn(raw, targets, size)
        return self.postprocess(raw, size)

    @torch.no_grad()
    def attention_maps(self, images: Tensor) -> Dict[str, Tensor]:
        """``{name: map}`` for every attention layer: ``layer{i}.sam`` for the cfg's ``[sam]`` /
        ``[scale_channels]`` gates (``Tensor[N, C, H, W]`` etc.) and ``layer{i}.{kind}`` for the
        hooked modules (their own map, e.g. ``[N, 1, H, W]`` for ``sam`` / ``cbam``)."""
        self._collect = {}
        try:
            _, gates = self.darknet(images, return_layers=self.raw_indices, return_attention=True)
            maps = {f"layer{i}.{self.darknet.layer_types[i]}": g.detach() for i, g in gates.items()}
            maps.update(self._collect)
        finally:
            self._collect = None
        return maps


class RCNNDetector(nn.Module):
    """A torchvision R-CNN with attention (``spec["model"]`` in :data:`RCNN_MODELS`), 0-based labels.

    ``forward(images, targets)`` in train mode: torchvision's loss dict plus ``"loss"`` (their sum);
    in eval mode (or without targets): detections with 0-based ``labels``.
    """

    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__()
        from ..detection import rcnn

        self.spec = resolve_spec(spec)
        size = int(self.spec.get("image_size", 160))
        builder = getattr(rcnn, self.spec["model"])
        self.model = builder(roi_attention=self.spec.get("roi_attention") or None,
                             backbone_attention=self.spec.get("backbone_attention") or None,
                             num_classes=int(self.spec["num_classes"]) + 1, min_size=size, max_size=size,
                             box_score_thresh=float(self.spec.get("conf_thresh", 0.005)),
                             box_nms_thresh=float(self.spec.get("nms_thresh", 0.5)),
                             box_detections_per_img=int(self.spec.get("max_detections", 100)))
        self.input_size = (size, size)

    def forward(self, images: Any, targets: Optional[Sequence[Mapping[str, Any]]] = None):
        imgs = list(images)
        if targets is not None and self.training:
            tg = [{"boxes": torch.as_tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4).to(imgs[0].device),
                   "labels": torch.as_tensor(t["labels"], dtype=torch.int64).to(imgs[0].device) + 1}
                  for t in targets]
            losses = self.model(imgs, tg)
            total = sum(losses.values())
            out = {"loss": total}
            out.update({k: v.detach() for k, v in losses.items()})
            return out
        if self.training:
            raise ValueError("RCNNDetector in train mode needs targets; call .eval() for detections")
        dets = self.model(imgs)
        return [{"boxes": d["boxes"], "scores": d["scores"], "labels": d["labels"] - 1} for d in dets]

    @torch.no_grad()
    def attention_maps(self, images: Any) -> Dict[str, Tensor]:
        """``{module name: map}`` of the backbone attention modules for ``images`` (RoI maps, one
        per proposal, are left out: see :func:`spatialattn.detection.roi_heads.roi_attention_maps`)."""
        was = self.training
        self.eval()
        try:
            n = len(images)
            maps = collect_module_maps(self.model, lambda: self.model(list(images)))
        finally:
            self.train(was)
        return {k: v for k, v in maps.items() if "roi_pool" not in k and v.dim() >= 3 and v.shape[0] == n}
