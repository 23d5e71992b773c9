"""Darknet ``.cfg`` parsing and validation.

Parsing follows Darknet's ``read_cfg`` (AlexeyAB/darknet ``src/parser.c``): every whitespace
character is removed from each line, lines starting with ``#`` or ``;`` are skipped, CRLF line
ends are accepted, and the **first** occurrence of a key in a section wins.

Unlike Darknet, nothing is silently ignored: an unknown section, an unknown option, an option
line without ``=``, a non-numeric value where a number is expected, or a known Darknet feature
that this port does not implement raises :class:`DarknetCfgError`, whose message names the
file, the line and the option.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

__all__ = [
    "DarknetCfgError",
    "CfgOption",
    "CfgSection",
    "parse_cfg",
    "parse_cfg_text",
    "sections_to_text",
    "SECTION_ALIASES",
    "KNOWN_OPTIONS",
    "ACTIVATIONS",
]


class DarknetCfgError(ValueError):
    """A Darknet cfg that cannot be parsed or built; the message names file, line and option."""


# section name in the file -> canonical name
SECTION_ALIASES: Dict[str, str] = {
    "net": "net",
    "network": "net",
    "convolutional": "convolutional",
    "conv": "convolutional",
    "maxpool": "maxpool",
    "max": "maxpool",
    "avgpool": "avgpool",
    "avg": "avgpool",
    "route": "route",
    "shortcut": "shortcut",
    "upsample": "upsample",
    "sam": "sam",
    "scale_channels": "scale_channels",
    "reorg3d": "reorg3d",
    "dropout": "dropout",
    "activation": "activation",
    "empty": "empty",
    "silence": "empty",
    "yolo": "yolo",
}

# Sections Darknet knows but this port does not build (error with a clear message).
UNSUPPORTED_SECTIONS = {
    "connected", "conn", "local", "crnn", "gru", "lstm", "conv_lstm", "history", "rnn", "crop",
    "cost", "detection", "region", "Gaussian_yolo", "softmax", "soft", "contrastive", "lrn",
    "normalization", "batchnorm", "reorg", "local_avg", "local_avgpool", "implicit",
}

# Options every layer section may carry (read by parse_network_cfg_custom for all layers).
_COMMON = {
    "clip", "onlyforward", "dont_update", "burnin_update", "stopbackward", "train_only_bn",
    "dontload", "dontloadscales", "learning_rate",
}

KNOWN_OPTIONS: Dict[str, set] = {
    "net": {
        "max_batches", "batch", "learning_rate", "learning_rate_min", "sgdr_cycle", "sgdr_mult",
        "momentum", "decay", "subdivisions", "time_steps", "track", "augment_speed",
        "sequential_subdivisions", "try_fix_nan", "weights_reject_freq", "equidistant_point",
        "badlabels_rejection_percentage", "num_sigmas_reject_badlabels", "ema_alpha",
        "use_cuda_graph", "loss_scale", "dynamic_minibatch", "optimized_memory",
        "workspace_size_limit_MB", "adam", "B1", "B2", "eps", "height", "width", "channels",
        "inputs", "max_crop", "min_crop", "flip", "blur", "gaussian_noise", "mixup", "cutmix",
        "mosaic", "letter_box", "mosaic_bound", "contrastive", "contrastive_jit_flip",
        "contrastive_color", "unsupervised", "label_smooth_eps", "resize_step", "attention",
        "adversarial_lr", "max_chart_loss", "angle", "aspect", "saturation", "exposure", "hue",
        "power", "policy", "burn_in", "step", "scale", "steps", "scales", "seq_scales", "gamma",
        "show_receptive_field", "random", "center", "cudnn_half", "rotate", "max_epochs",
    },
    "convolutional": _COMMON | {
        "filters", "groups", "size", "stride", "stride_x", "stride_y", "dilation", "antialiasing",
        "pad", "padding", "activation", "assisted_excitation", "share_index", "batch_normalize",
        "cbn", "binary", "xnor", "bin_output", "sway", "rotate", "stretch", "stretch_sway",
        "flipped", "dot", "angle", "grad_centr", "reverse", "coordconv", "stream", "wait_stream",
        "deform",
    },
    "maxpool": _COMMON | {
        "stride", "stride_x", "stride_y", "size", "padding", "maxpool_depth", "out_channels",
        "antialiasing", "maxpool_zero_nonmax",
    },
    "avgpool": set(_COMMON),
    "route": _COMMON | {"layers", "groups", "group_id", "stream", "wait_stream"},
    "shortcut": _COMMON | {"from", "activation", "weights_type", "weights_normalization"},
    "upsample": _COMMON | {"stride", "scale"},
    "sam": _COMMON | {"from", "activation"},
    "scale_channels": _COMMON | {"from", "scale_wh", "activation"},
    "reorg3d": _COMMON | {"stride", "reverse"},
    "dropout": _COMMON | {"probability", "dropblock", "dropblock_size_rel", "dropblock_size_abs"},
    "activation": _COMMON | {"activation"},
    "empty": set(_COMMON),
    "yolo": _COMMON | {
        "classes", "num", "mask", "anchors", "max", "show_details", "max_delta",
        "counters_per_class", "label_smooth_eps", "scale_x_y", "objectness_smooth", "new_coords",
        "iou_normalizer", "obj_normalizer", "cls_normalizer", "delta_normalizer", "iou_loss",
        "iou_thresh_kind", "beta_nms", "nms_kind", "jitter", "resize", "focal_loss",
        "ignore_thresh", "truth_thresh", "iou_thresh", "random", "track_history_size",
        "sim_thresh", "dets_for_track", "dets_for_show", "track_ciou_norm", "embedding_layer",
        "map",
    },
}

# Option names that appear in published Darknet cfgs although Darknet does not read them in
# that section (it prints "Unused field"), e.g. [yolo] uc_normalizer / beta1 in
# yolov4-sam-mish-csp-reorg-bfm.cfg. Such a name -- or a name Darknet reads in another section
# type -- is accepted with a warning; any other unknown name is an error.
DARKNET_LEGACY_OPTIONS = {"uc_normalizer", "yolo_point", "beta1", "coords", "softmax", "rescore",
                          "thresh", "absolute", "bias_match", "coord_scale", "object_scale",
                          "noobject_scale", "class_scale", "mask_scale", "log", "sqrt"}

# Activation names Darknet's get_activation knows (unknown names become relu in Darknet;
# here they are an error).
ACTIVATIONS = (
    "linear", "logistic", "loggy", "relu", "relu6", "elu", "selu", "gelu", "relie", "ramp",
    "leaky", "tanh", "plse", "stair", "hardtan", "lhtan", "mish", "swish", "hard_mish",
    "revleaky", "normalize_channels", "normalize_channels_softmax",
    "normalize_channels_softmax_maxval",
)

_ALL_DARKNET_OPTIONS = set().union(*KNOWN_OPTIONS.values()) | DARKNET_LEGACY_OPTIONS

_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


@dataclass
class CfgOption:
    """One ``key=value`` line of a section (value with whitespace removed)."""

    value: str
    line: int


@dataclass
class CfgSection:
    """One ``[type]`` section.

    Attributes:
        type: canonical section name (``"convolutional"`` for ``[conv]`` too).
        raw_type: the name as written (``"conv"``).
        line: 1-based line of the ``[...]`` header.
        source: file name (or ``"<string>"``) for error messages.
        options: ``{key: CfgOption}`` in file order, first occurrence of a key only.
        index: Darknet layer index (``-1`` for ``[net]``).
    """

    type: str
    raw_type: str
    line: int
    source: str
    options: Dict[str, CfgOption] = field(default_factory=dict)
    index: int = -1

    # ------------------------------------------------------------------ errors
    def where(self, key: Optional[str] = None) -> str:
        what = f"[{self.raw_type}]" if self.index < 0 else f"[{self.raw_type}] (layer {self.index})"
        if key is not None and key in self.options:
            return f"{self.source}:{self.options[key].line}: {what} option '{key}'"
        if key is not None:
            return f"{self.source}:{self.line}: {what} option '{key}'"
        return f"{self.source}:{self.line}: {what}"

    def error(self, message: str, key: Optional[str] = None) -> DarknetCfgError:
        return DarknetCfgError(f"{self.where(key)}: {message}")

    # ------------------------------------------------------------------ typed getters
    def has(self, key: str) -> bool:
        return key in self.options

    def get_str(self, key: str, default: Optional[str] = None) -> Optional[str]:
        opt = self.options.get(key)
        return default if opt is None else opt.value

    def require(self, key: str) -> str:
        if key not in self.options:
            raise self.error(f"required option '{key}' is missing")
        return self.options[key].value

    def _numeric(self, key: str) -> Optional[str]:
        """The value with an inline ``#`` comment removed (Darknet's atoi/atof stop there too)."""
        opt = self.options.get(key)
        return None if opt is None else opt.value.split("#", 1)[0]

    def get_int(self, key: str, default: Optional[int] = None) -> Optional[int]:
        v = self._numeric(key)
        if v is None:
            return default
        if not _INT_RE.fullmatch(v):
            raise self.error(f"expected an integer, found {self.options[key].value!r}", key)
        return int(v)

    def get_float(self, key: str, default: Optional[float] = None) -> Optional[float]:
        v = self._numeric(key)
        if v is None:
            return default
        if not _FLOAT_RE.fullmatch(v):
            raise self.error(f"expected a number, found {self.options[key].value!r}", key)
        return float(v)

    def get_int_list(self, key: str, default: Optional[List[int]] = None) -> Optional[List[int]]:
        v = self._numeric(key)
        if v is None:
            return default
        items = v.split(",")
        if items and items[-1] == "":  # a trailing comma is tolerated
            items = items[:-1]
        if not items or not all(_INT_RE.fullmatch(t) for t in items):
            raise self.error(f"expected a comma-separated list of integers, found {self.options[key].value!r}", key)
        return [int(t) for t in items]

    def get_float_list(self, key: str, default: Optional[List[float]] = None) -> Optional[List[float]]:
        v = self._numeric(key)
        if v is None:
            return default
        items = v.split(",")
        if items and items[-1] == "":
            items = items[:-1]
        if not items or not all(_FLOAT_RE.fullmatch(t) for t in items):
            raise self.error(f"expected a comma-separated list of numbers, found {self.options[key].value!r}", key)
        return [float(t) for t in items]

    def get_activation(self, key: str = "activation", default: str = "linear") -> str:
        act = self.get_str(key, default)
        if act not in ACTIVATIONS:
            raise self.error(f"unknown activation {act!r}; expected one of {', '.join(ACTIVATIONS)}", key)
        return act


def parse_cfg_text(text: str, source: str = "<string>") -> List[CfgSection]:
    """Parse cfg text into sections; the first must be ``[net]``/``[network]``.

    Validates section names and option names (see :data:`KNOWN_OPTIONS`); values are
    validated when the model is built.
    """
    sections: List[CfgSection] = []
    current: Optional[CfgSection] = None
    # str.splitlines also splits on \r alone, \x0b ...; Darknet splits on \n and strips \r.
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = re.sub(r"\s", "", raw)
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            if not line.endswith("]"):
                raise DarknetCfgError(f"{source}:{lineno}: malformed section header {line!r}")
            raw_type = line[1:-1]
            if raw_type not in SECTION_ALIASES:
                if raw_type in UNSUPPORTED_SECTIONS:
                    raise DarknetCfgError(
                        f"{source}:{lineno}: section [{raw_type}] is a Darknet layer this port does not implement"
                    )
                raise DarknetCfgError(
                    f"{source}:{lineno}: unknown section [{raw_type}]; expected one of "
                    + ", ".join(f"[{k}]" for k in SECTION_ALIASES)
                )
            canon = SECTION_ALIASES[raw_type]
            if sections and canon == "net":
                raise DarknetCfgError(f"{source}:{lineno}: [{raw_type}] may only be the first section")
            if not sections and canon != "net":
                raise DarknetCfgError(
                    f"{source}:{lineno}: the first section must be [net] or [network], found [{raw_type}]"
                )
            current = CfgSection(canon, raw_type, lineno, source, index=len(sections) - 1)
            sections.append(current)
            continue
        if current is None:
            raise DarknetCfgError(f"{source}:{lineno}: option {line!r} before the first section")
        if "=" not in line:
            raise DarknetCfgError(f"{source}:{lineno}: [{current.raw_type}] expected 'key=value', found {line!r}")
        key, value = line.split("=", 1)
        if key not in KNOWN_OPTIONS[current.type] and key in _ALL_DARKNET_OPTIONS:
            warnings.warn(
                f"{source}:{lineno}: [{current.raw_type}] (layer {current.index}) option '{key}' is not used by "
                "this section (Darknet ignores it too: 'Unused field'); accepted", RuntimeWarning, stacklevel=2)
        elif key not in KNOWN_OPTIONS[current.type]:
            raise DarknetCfgError(
                f"{source}:{lineno}: [{current.raw_type}] (layer {current.index}) unknown option '{key}'; "
                f"known options: {', '.join(sorted(KNOWN_OPTIONS[current.type]))}"
            )
        if key not in current.options:  # first occurrence wins, like Darknet's option_find
            current.options[key] = CfgOption(value, lineno)
    if not sections:
        raise DarknetCfgError(f"{source}: no sections found (the first section must be [net])")
    if len(sections) == 1:
        raise DarknetCfgError(f"{source}: the cfg has a [net] section but no layers")
    for sec in sections:
        if sec.type in ("sam", "scale_channels", "activation"):
            act = sec.get_str("activation", "linear")
            if act in ("mish", "swish", "hard_mish", "relu6") or (act or "").startswith("normalize_channels"):
                warnings.warn(
                    f"{sec.where('activation')}: Darknet's [{sec.raw_type}] does not support activation={act} "
                    "and outputs zeros for it; this port reproduces that",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return sections


def parse_cfg(path: Union[str, os.PathLike]) -> List[CfgSection]:
    """Read and parse a cfg file (see :func:`parse_cfg_text`)."""
    path = os.fspath(path)
    try:
        with open(path, "r", encoding="utf-8", errors="replace", newline="") as f:
            text = f.read()
    except OSError as e:
        raise DarknetCfgError(f"{path}: cannot read the cfg file: {e}") from e
    return parse_cfg_text(text, source=path)


def sections_to_text(sections: Sequence[CfgSection]) -> str:
    """Write sections back as cfg text (one ``key=value`` per line, comments dropped)."""
    out: List[str] = []
    for sec in sections:
        if sec.index >= 0:
            out.append(f"# {sec.index}")
        out.append(f"[{sec.raw_type}]")
        for k, opt in sec.options.items():
            out.append(f"{k}={opt.value}")
        out.append("")
    return "\n".join(out)
