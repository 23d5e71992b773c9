"""Put attention into the residual blocks of existing ResNets.

:func:`insert_attention` adds an attention module (built with
:func:`spatialattn.nn.create_attention`) to every residual block of a
torchvision ResNet / ResNeXt / Wide-ResNet (``BasicBlock`` and ``Bottleneck``)
or a timm ResNet, at the place the CBAM paper puts it: on the residual branch,
after the last conv + norm (``bn2`` of a ``BasicBlock``, ``bn3`` of a
``Bottleneck``) and before the shortcut is added::

    out = bn_last(conv_last(...))
    out = attention(out)            # <- inserted
    out = relu(out + downsample(x))

Mechanism. Each selected block gets a child module named ``attention`` and its
class is swapped for a subclass defined in this module (``torchvision``:
:class:`BasicBlockWithAttention`, :class:`BottleneckWithAttention`; timm: see
below). Nothing else changes: every existing parameter / buffer keeps its key
(``layer1.0.conv1.weight``), the new ones are ``layer1.0.attention.*``, so

* a state_dict of the original model loads with ``strict=False`` and reports
  exactly the new attention keys as missing;
* the augmented model's own state_dict loads strictly into another augmented model;
* the classes live at module level, so ``copy.deepcopy``, ``torch.save`` of the
  whole model (pickle), ``torch.compile(fullgraph=True)`` and
  ``torch.onnx.export(dynamo=False)`` work (no closures, no hooks).

For torchvision blocks the subclass's ``forward`` is torchvision's with the
attention call added (and the residual addition done out of place, so an
attention whose backward needs its output is safe). timm's blocks already call
an optional ``self.se`` right after the last norm, before the addition -- the
same place -- so the timm subclass re-points ``se`` to "the original ``se``
(if any), then ``attention``" through a property and keeps timm's own
``forward`` (drop-path, anti-aliasing, drop-block untouched). The original
``se`` module stays registered under its key.

Works on the whole model or any part of it: a bare ResNet, a detector
(``FasterRCNN``: its ``backbone.body`` is an ``IntermediateLayerGetter`` with
frozen BatchNorm) or its backbone. Returned names are relative to the object
passed in (``backbone.body.layer1.0.attention`` for a detector).

Caveat: the inserted modules are new and trainable (``requires_grad=True``)
even inside stages a detector builder froze; freeze them yourself if you want
that (``model.get_submodule(name).requires_grad_(False)``).
"""
from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Optional, Tuple, Type, Union

from torch import Tensor, nn
from torchvision.models import resnet as _tv_resnet

from .nn import create_attention

__all__ = [
    "insert_attention",
    "has_attention",
    "attention_names",
    "BasicBlockWithAttention",
    "BottleneckWithAttention",
]

AttentionKind = Union[str, Type[nn.Module]]


class _AttentionBlockMixin:
    """Marker of a residual block with an inserted ``attention`` child."""

    _base_block: Type[nn.Module]


class BasicBlockWithAttention(_tv_resnet.BasicBlock, _AttentionBlockMixin):
    """torchvision ``BasicBlock`` with ``attention`` after ``bn2``, before the addition.

    Shape: ``[N, inplanes, H, W]`` -> ``[N, planes, H / stride, W / stride]``.
    Built by :func:`insert_attention` (class swap of an existing block).
    """

    _base_block = _tv_resnet.BasicBlock
    attention: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.attention(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu(out)


class BottleneckWithAttention(_tv_resnet.Bottleneck, _AttentionBlockMixin):
    """torchvision ``Bottleneck`` with ``attention`` after ``bn3``, before the addition.

    Shape: ``[N, inplanes, H, W]`` -> ``[N, 4 * planes, H / stride, W / stride]``.
    Built by :func:`insert_attention` (class swap of an existing block).
    """

    _base_block = _tv_resnet.Bottleneck
    attention: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv3(out)
        out = self.bn3(out)
        out = self.attention(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu(out)


# --------------------------------------------------------------------------- timm
# timm is optional (a test dependency): its subclasses are made on first use and
# published as attributes of this module (PEP 562 ``__getattr__`` recreates them
# when a pickle is loaded in a fresh process).

_TIMM_CLASS_NAMES = {"TimmBasicBlockWithAttention": "BasicBlock", "TimmBottleneckWithAttention": "Bottleneck"}
_timm_classes: Dict[str, type] = {}


def _se_property(self) -> Any:
    # timm's forward does ``if self.se is not None: x = self.se(x)`` right after
    # the last norm; answer with the original ``se`` followed by ``attention``.
    if self._modules.get("se") is None:
        return self._modules["attention"]
    return self._se_then_attention


def _se_then_attention(self, x: Tensor) -> Tensor:
    return self._modules["attention"](self._modules["se"](x))


def _timm_class(name: str) -> type:
    if name not in _timm_classes:
        from timm.models import resnet as timm_resnet

        base = getattr(timm_resnet, _TIMM_CLASS_NAMES[name])
        cls = type(
            name,
            (base, _AttentionBlockMixin),
            {
                "__module__": __name__,
                "__qualname__": name,
                "__doc__": f"timm ``{base.__name__}`` whose ``se`` slot (after the last norm, before the "
                "addition) runs the original ``se`` (if any) then ``attention``.",
                "_base_block": base,
                "se": property(_se_property),
                "_se_then_attention": _se_then_attention,
            },
        )
        _timm_classes[name] = cls
        globals()[name] = cls
    return _timm_classes[name]


def __getattr__(name: str) -> Any:  # PEP 562: unpickling a timm model in a fresh process
    if name in _TIMM_CLASS_NAMES:
        return _timm_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _timm_block_types() -> Dict[type, str]:
    """timm block class -> name of our subclass (empty when timm is not importable or not loaded)."""
    import sys

    if "timm.models.resnet" not in sys.modules:  # a timm block cannot exist without it
        return {}
    timm_resnet = sys.modules["timm.models.resnet"]
    return {
        getattr(timm_resnet, base): ours
        for ours, base in _TIMM_CLASS_NAMES.items()
        if hasattr(timm_resnet, base)
    }


# --------------------------------------------------------------------------- insertion

_STAGE_RE = re.compile(r"(?:^|\.)layer(\d+)\.\d+$")


def _block_plan(block: nn.Module) -> Optional[Tuple[type, nn.Module]]:
    """(attention-subclass, last conv) for a recognised block, else ``None``."""
    t = type(block)
    if t is _tv_resnet.BasicBlock:
        return BasicBlockWithAttention, block.conv2
    if t is _tv_resnet.Bottleneck:
        return BottleneckWithAttention, block.conv3
    timm_types = _timm_block_types()
    if t in timm_types:
        cls = _timm_class(timm_types[t])
        last = block.conv3 if hasattr(block, "conv3") else block.conv2
        return cls, last
    return None


def _stage_of(name: str) -> Optional[int]:
    m = _STAGE_RE.search(name)
    return int(m.group(1)) if m else None


def _normalize_stages(stages: Union[None, int, str, Iterable[Union[int, str]]]) -> Optional[Tuple[int, ...]]:
    if stages is None:
        return None
    if isinstance(stages, (int, str)):
        stages = (stages,)
    out = []
    for s in stages:
        if isinstance(s, str) and re.fullmatch(r"layer\d+", s):
            s = int(s[5:])
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"stages: expected stage numbers like 1..4 or names 'layer1'..'layer4', got {s!r}")
        out.append(s)
    if not out:
        raise ValueError("stages is empty: pass None for all stages")
    return tuple(sorted(set(out)))


def _found_summary(model: nn.Module) -> str:
    kinds: Dict[str, int] = {}
    for _, m in model.named_modules():
        kinds[type(m).__name__] = kinds.get(type(m).__name__, 0) + 1
    top = sorted(kinds.items(), key=lambda kv: -kv[1])[:8]
    return ", ".join(f"{k} x{v}" for k, v in top)


def has_attention(block: nn.Module) -> bool:
    """Whether ``block`` is a residual block that :func:`insert_attention` already augmented."""
    return isinstance(block, _AttentionBlockMixin)


def attention_names(model: nn.Module) -> List[str]:
    """Names (relative to ``model``) of the ``attention`` modules inserted in its residual blocks."""
    return [f"{n}.attention" if n else "attention" for n, m in model.named_modules() if has_attention(m)]


def insert_attention(
    model: nn.Module,
    kind: AttentionKind,
    *,
    stages: Union[None, int, str, Iterable[Union[int, str]]] = None,
    **kwargs: Any,
) -> Tuple[nn.Module, List[str]]:
    """Add attention after the last conv + norm of residual blocks, in place.

    Args:
        model: a torchvision ResNet / ResNeXt / Wide-ResNet, a timm ResNet, a
            torchvision detector (``FasterRCNN``, ``MaskRCNN``, ...) or any
            module containing such blocks (e.g. ``model.backbone``).
        kind: attention name for :func:`spatialattn.nn.create_attention`
            (``"sam"``, ``"cbam"``, ``"sam_pointwise"``, ``"se"``, ...) or a class
            ``cls(channels, **kwargs)``.
        stages: which stages get attention: ``None`` (all), or numbers / names,
            e.g. ``(3, 4)`` or ``("layer3", "layer4")``. Stages are read from the
            block names (``...layer3.<i>``).
        **kwargs: passed to the attention constructor (e.g. ``kernel_size=7``,
            ``preset="timm"``).

    Returns:
        ``(model, names)``: the same model object, augmented, and the names of the
        inserted modules relative to ``model`` (``["layer1.0.attention", ...]``).
        The new modules are on the device and dtype of their block's last conv,
        in the block's train / eval mode.

    Raises:
        ValueError: no recognised residual block, a requested stage without
            blocks, a block that already has attention (double insertion), or a
            block with an unrelated ``attention`` attribute.

    Example:
        >>> import torchvision
        >>> m, names = insert_attention(torchvision.models.resnet50(), "cbam")
        >>> names[0], len(names)
        ('layer1.0.attention', 16)
        >>> round(sum(p.numel() for p in m.parameters()) / 1e6, 2)
        28.09
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    wanted = _normalize_stages(stages)

    blocks: List[Tuple[str, nn.Module, Optional[int]]] = []
    already: List[str] = []
    for name, m in model.named_modules():
        if has_attention(m):
            already.append(name)
            blocks.append((name, m, _stage_of(name)))
        elif _block_plan(m) is not None:
            blocks.append((name, m, _stage_of(name)))
    if not blocks:
        raise ValueError(
            f"insert_attention: no residual block found in {type(model).__name__} (expected torchvision "
            f"BasicBlock/Bottleneck or timm BasicBlock/Bottleneck; found: {_found_summary(model)})"
        )

    if wanted is not None:
        present = sorted({s for _, _, s in blocks if s is not None})
        missing = [s for s in wanted if s not in present]
        if missing:
            raise ValueError(
                f"insert_attention: stage(s) {missing} not found in {type(model).__name__}; "
                f"stages with residual blocks: {present}"
            )
        blocks = [b for b in blocks if b[2] in wanted]

    doubled = [n for n, m, _ in blocks if has_attention(m)]
    if doubled:
        raise ValueError(
            f"insert_attention: attention is already inserted in {len(doubled)} selected block(s) "
            f"(first: {doubled[0]!r}); refusing to insert twice"
        )
    clash = [n for n, m, _ in blocks if hasattr(m, "attention")]
    if clash:
        raise ValueError(f"insert_attention: block {clash[0]!r} already has an attribute named 'attention'")

    names: List[str] = []
    # Build every module before changing any block, so a constructor error leaves the model untouched.
    plans = []
    for name, block, _ in blocks:
        cls, last_conv = _block_plan(block)  # type: ignore[misc]
        channels = int(last_conv.out_channels)
        att = create_attention(kind, channels, **kwargs)
        att.to(device=last_conv.weight.device, dtype=last_conv.weight.dtype)
        att.train(block.training)
        plans.append((name, block, cls, att))
    for name, block, cls, att in plans:
        block.__class__ = cls
        block.add_module("attention", att)
        names.append(f"{name}.attention" if name else "attention")
    return model, names
