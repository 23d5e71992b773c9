"""Weight converters: load CBAM weights from other implementations.

``convert_state_dict(sd, source)`` renames (and reshapes) the keys of a state
dict written by another implementation so that it loads, strictly, into the
matching :class:`spatialattn.nn.CBAM` preset -- or, for whole-model
checkpoints, into a model built with :func:`spatialattn.insert_attention`
(whose per-block module is called ``attention``).

=============== ======================================= ==========================
source          their keys                              our keys
=============== ======================================= ==========================
``official``    ``ChannelGate.mlp.1/3`` (Linear)        ``channel.fc1/fc2`` (1x1 conv)
(``paper``)     ``SpatialGate.spatial.conv/bn``         ``spatial.conv`` / ``spatial.bn``
                per-block ``cbam.`` in their ResNets    ``attention.``
``timm``        ``spatial.conv.conv/bn``                ``spatial.conv`` / ``spatial.bn``
``ultralytics`` ``channel_attention.fc``                ``channel.fc``
                ``spatial_attention.cv1``               ``spatial.conv``
``mmyolo``      ``channel_attention.fc.0/1.conv``       ``channel.fc1/fc2``
                ``spatial_attention.conv.conv``         ``spatial.conv``
=============== ======================================= ==========================

A DataParallel / DDP ``module.`` prefix is removed, and a checkpoint dict that
holds the weights under ``"state_dict"`` (the official training script) or
``"model"`` / ``"state_dict_ema"`` (when a mapping) is unwrapped. Keys that
belong to no attention module (the rest of a ResNet) are kept as they are.

Load untrusted checkpoints with ``torch.load(path, weights_only=True)``.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Mapping, Optional, Tuple

from torch import Tensor

__all__ = ["convert_state_dict", "unwrap_state_dict", "CONVERT_SOURCES"]

_Rule = Tuple["re.Pattern[str]", str, Optional[Callable[[Tensor], Tensor]]]


def _linear_to_conv(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], t.shape[1], 1, 1) if t.dim() == 2 else t


def _rules(pairs: List[Tuple[str, str, Optional[Callable[[Tensor], Tensor]]]]) -> List[_Rule]:
    # Each pattern matches at the start of the key or after a '.', so that the
    # same rule converts a bare module and the module inside a larger model.
    return [(re.compile(r"(^|\.)" + p), r"\1" + r, f) for p, r, f in pairs]


_OFFICIAL = _rules([
    (r"cbam\.ChannelGate\.mlp\.1\.weight$", "attention.channel.fc1.weight", _linear_to_conv),
    (r"cbam\.ChannelGate\.mlp\.3\.weight$", "attention.channel.fc2.weight", _linear_to_conv),
    (r"cbam\.ChannelGate\.mlp\.1\.", "attention.channel.fc1.", None),
    (r"cbam\.ChannelGate\.mlp\.3\.", "attention.channel.fc2.", None),
    (r"cbam\.SpatialGate\.spatial\.conv\.", "attention.spatial.conv.", None),
    (r"cbam\.SpatialGate\.spatial\.bn\.", "attention.spatial.bn.", None),
    (r"ChannelGate\.mlp\.1\.weight$", "channel.fc1.weight", _linear_to_conv),
    (r"ChannelGate\.mlp\.3\.weight$", "channel.fc2.weight", _linear_to_conv),
    (r"ChannelGate\.mlp\.1\.", "channel.fc1.", None),
    (r"ChannelGate\.mlp\.3\.", "channel.fc2.", None),
    (r"SpatialGate\.spatial\.conv\.", "spatial.conv.", None),
    (r"SpatialGate\.spatial\.bn\.", "spatial.bn.", None),
])

_TIMM = _rules([
    (r"spatial\.conv\.conv\.", "spatial.conv.", None),
    (r"spatial\.conv\.bn\.", "spatial.bn.", None),
])

_ULTRALYTICS = _rules([
    (r"channel_attention\.fc\.", "channel.fc.", None),
    (r"spatial_attention\.cv1\.", "spatial.conv.", None),
])

_MMYOLO = _rules([
    (r"channel_attention\.fc\.0\.conv\.", "channel.fc1.", None),
    (r"channel_attention\.fc\.1\.conv\.", "channel.fc2.", None),
    (r"channel_attention\.conv1\.conv\.", "channel.fc1.", None),
    (r"channel_attention\.conv2\.conv\.", "channel.fc2.", None),
    (r"spatial_attention\.conv\.conv\.", "spatial.conv.", None),
])

_SOURCES: Dict[str, List[_Rule]] = {
    "official": _OFFICIAL,
    "paper": _OFFICIAL,
    "timm": _TIMM,
    "ultralytics": _ULTRALYTICS,
    "mmyolo": _MMYOLO,
    "mmdet": _MMYOLO,
}
CONVERT_SOURCES = tuple(sorted(_SOURCES))


def unwrap_state_dict(checkpoint: Mapping) -> Mapping:
    """The state dict inside a checkpoint dict, or ``checkpoint`` itself.

    Looks under ``"model"`` (torchvision reference scripts), ``"state_dict"`` (the
    official CBAM script, Lightning), ``"state_dict_ema"`` and ``"model_state_dict"``,
    in that order, for a mapping of ``str -> Tensor``.
    """
    for key in ("model", "state_dict", "state_dict_ema", "model_state_dict"):
        inner = checkpoint.get(key) if isinstance(checkpoint, Mapping) else None
        if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
            if any(isinstance(v, Tensor) for v in inner.values()):
                return inner
    return checkpoint


def convert_state_dict(state_dict: Mapping[str, Tensor], source: str) -> Dict[str, Tensor]:
    """Convert a CBAM (or CBAM-ResNet) state dict from ``source`` to this library's layout.

    Args:
        state_dict: the other implementation's ``state_dict()`` (or a checkpoint
            dict holding it under ``"state_dict"``), possibly with a
            ``module.`` prefix.
        source: ``"official"`` / ``"paper"`` (Jongchan/attention-module),
            ``"timm"``, ``"ultralytics"`` or ``"mmyolo"`` (alias ``"mmdet"``).

    Returns:
        A new ordered dict; tensors are shared, not copied, except where a
        reshape is needed (Linear -> 1x1 conv), which is a view.
    """
    if source not in _SOURCES:
        raise ValueError(f"unknown source {source!r}: expected one of {CONVERT_SOURCES}")
    sd = unwrap_state_dict(state_dict)
    if not isinstance(sd, Mapping):
        raise TypeError(f"expected a state dict (mapping of str -> Tensor), got {type(sd).__name__}")
    rules = _SOURCES[source]
    out: Dict[str, Tensor] = {}
    for key, value in sd.items():
        new_key = key[len("module."):] if key.startswith("module.") else key
        for pattern, repl, fn in rules:
            if pattern.search(new_key):
                new_key = pattern.sub(repl, new_key, count=1)
                if fn is not None and isinstance(value, Tensor):
                    value = fn(value)
                break
        if new_key in out:
            raise ValueError(f"two keys of the {source} state dict map to {new_key!r}")
        out[new_key] = value
    return out
