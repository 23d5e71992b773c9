"""Bundled Darknet cfgs (package data in ``spatialattn/cfg``) and cfg rewrites.

* :func:`bundled_cfg` returns cfg text with ``classes=`` and the ``filters=`` of the conv in front
  of every ``[yolo]`` set for ``num_classes``, and the attention blocks swapped:

  ``attention="sam"``     keep the YOLOv4 modified SAM (1x1 BN logistic conv + ``[sam] from=-2``);
  ``attention="none"``    drop the map conv and the ``[sam]`` (the baseline for ``compare``);
  ``attention="se"``      SE channel attention: ``[avgpool]``, 1x1 relu conv (C/8), 1x1 logistic
                          conv (C), ``[scale_channels] from=-4``;
  ``attention="spatial"`` one-channel spatial map: 1x1 logistic conv (1 filter),
                          ``[scale_channels] from=-2 scale_wh=1``.

  Layer references (``from=``/``layers=``) of every other section are renumbered, keeping
  relative ones relative and absolute ones absolute.
* :func:`bundled_model` builds the :class:`~spatialattn.darknet.DarknetModel`.

Example::

    >>> from spatialattn.darknet import bundled_model
    >>> m = bundled_model("sam-tiny", num_classes=3, attention="none")
    >>> m.yolo_layers[0].classes
    3
"""
from __future__ import annotations

from importlib import resources
from typing import Dict, List, Optional, Tuple

from .cfg import DarknetCfgError, parse_cfg_text
from .model import DarknetModel

__all__ = ["list_bundled", "bundled_cfg", "bundled_model", "rewrite_cfg", "ATTENTION_VARIANTS"]

ATTENTION_VARIANTS = ("sam", "none", "se", "spatial")
_REF_KEYS = {"route": "layers", "shortcut": "from", "sam": "from", "scale_channels": "from"}

Sec = Tuple[str, Dict[str, str]]  # (raw section name, {key: value})


def list_bundled() -> List[str]:
    """Names of the bundled cfgs (``spatialattn/cfg/<name>.cfg``)."""
    root = resources.files("spatialattn") / "cfg"
    return sorted(p.name[:-4] for p in root.iterdir() if p.name.endswith(".cfg"))


def _read_bundled(name: str) -> str:
    res = resources.files("spatialattn") / "cfg" / f"{name}.cfg"
    if not res.is_file():
        raise ValueError(f"no bundled cfg named {name!r}; available: {', '.join(list_bundled())}")
    return res.read_text(encoding="utf-8")


def _to_simple(text: str, source: str) -> List[Sec]:
    return [(s.raw_type, {k: o.value for k, o in s.options.items()}) for s in parse_cfg_text(text, source)]


def _to_text(secs: List[Sec], header: str = "") -> str:
    lines = [header] if header else []
    for i, (typ, opts) in enumerate(secs):
        if i > 0:
            lines.append(f"# {i - 1}")
        lines.append(f"[{typ}]")
        lines += [f"{k}={v}" for k, v in opts.items()]
        lines.append("")
    return "\n".join(lines)


def _replace(secs: List[Sec], start: int, stop: int, new: List[Sec]) -> List[Sec]:
    """Replace layers ``[start, stop)`` (Darknet indices) by ``new``, renumbering references.

    A reference into the replaced range maps to the last new layer (or to ``start - 1`` when
    ``new`` is empty: the layer whose output the removed block was computed from).
    """
    delta = len(new) - (stop - start)

    def remap(k: int) -> int:
        if k < start:
            return k
        if k >= stop:
            return k + delta
        return start + len(new) - 1 if new else start - 1

    out: List[Sec] = [secs[0]]
    layers = secs[1:]
    for old_i, (typ, opts) in enumerate(layers):
        if start <= old_i < stop:
            if old_i == start:
                out += [(t, dict(o)) for t, o in new]
            continue
        new_i = remap(old_i)
        opts = dict(opts)
        key = _REF_KEYS.get(typ)
        if key and key in opts:
            vals = []
            for tok in opts[key].split("#", 1)[0].split(","):
                if not tok:
                    continue
                v = int(tok)
                absolute = old_i + v if v < 0 else v
                na = remap(absolute)
                vals.append(str(na - new_i) if v < 0 else str(na))
            opts[key] = ",".join(vals)
        out.append((typ, opts))
    if not new:
        # start - 1 may not exist if the block began the network
        if start == 0:
            raise DarknetCfgError("cannot remove the first layers of a network")
    return out


def _attention_block(kind: str, channels: int) -> List[Sec]:
    if kind == "sam":
        return [("convolutional", {"batch_normalize": "1", "filters": str(channels), "size": "1", "stride": "1",
                                   "pad": "1", "activation": "logistic"}),
                ("sam", {"from": "-2"})]
    if kind == "none":
        return []
    if kind == "se":
        return [("avgpool", {}),
                ("convolutional", {"filters": str(max(1, channels // 8)), "size": "1", "stride": "1",
                                   "pad": "1", "activation": "relu"}),
                ("convolutional", {"filters": str(channels), "size": "1", "stride": "1", "pad": "1",
                                   "activation": "logistic"}),
                ("scale_channels", {"from": "-4"})]
    if kind == "spatial":
        return [("convolutional", {"filters": "1", "size": "1", "stride": "1", "pad": "1", "activation": "logistic"}),
                ("scale_channels", {"from": "-2", "scale_wh": "1"})]
    raise ValueError(f"attention: expected one of {', '.join(ATTENTION_VARIANTS)}, got {kind!r}")


def rewrite_cfg(text: str, num_classes: Optional[int] = None, attention: str = "sam",
                source: str = "<cfg>") -> str:
    """Rewrite cfg text: set ``classes``/yolo conv filters, and swap each ``[sam] from=-2`` block
    (1x1 map conv + ``[sam]``) for the ``attention`` variant. Returns cfg text."""
    if attention not in ATTENTION_VARIANTS:
        raise ValueError(f"attention: expected one of {', '.join(ATTENTION_VARIANTS)}, got {attention!r}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes: expected >= 1, got {num_classes}")
    model = DarknetModel.from_cfg_text(text, source=source)  # validates; gives channel counts
    secs = _to_simple(text, source)
    if attention != "sam":
        blocks = [i for i, info in enumerate(model.infos)
                  if info.type == "sam" and info.refs == [i - 2] and model.infos[i - 1].type == "convolutional"]
        for i in sorted(blocks, reverse=True):  # back to front: earlier indices stay valid
            channels = model.infos[i].out_shape[0]
            secs = _replace(secs, i - 1, i + 1, _attention_block(attention, channels))
    if num_classes is not None:
        for j in range(1, len(secs)):
            typ, opts = secs[j]
            if typ != "yolo":
                continue
            prev_typ, prev_opts = secs[j - 1]
            if prev_typ not in ("convolutional", "conv"):
                raise DarknetCfgError(f"{source}: the layer before [yolo] (layer {j - 1}) must be a [convolutional]")
            num = int(opts.get("num", "1"))
            n_mask = len([t for t in opts.get("mask", "").split("#")[0].split(",") if t]) or num
            opts["classes"] = str(num_classes)
            prev_opts["filters"] = str(n_mask * (num_classes + 5))
    header = f"# generated by spatialattn.darknet.rewrite_cfg from {source}: classes={num_classes}, attention={attention}"
    out = _to_text(secs, header)
    DarknetModel.from_cfg_text(out, source=f"{source} (rewritten)")  # must still build
    return out


def bundled_cfg(name: str = "sam-tiny", num_classes: Optional[int] = None, attention: str = "sam") -> str:
    """cfg text of bundled ``name`` for ``num_classes`` with the ``attention`` variant."""
    text = _read_bundled(name)
    if num_classes is None and attention == "sam":
        return text
    return rewrite_cfg(text, num_classes, attention, source=f"spatialattn/cfg/{name}.cfg")


def bundled_model(name: str = "sam-tiny", num_classes: Optional[int] = None, attention: str = "sam") -> DarknetModel:
    """:class:`DarknetModel` of :func:`bundled_cfg` (random init, eval mode)."""
    return DarknetModel.from_cfg_text(bundled_cfg(name, num_classes, attention), source=f"{name}.cfg")
