"""Training configuration: built-in defaults, a YAML file, and ``key=value`` overrides.

Resolution order: :data:`DEFAULTS` < ``--config file.yaml`` < ``--set key=value`` / dedicated flags.
Unknown keys are errors (a typo must not silently train something else). Values given as strings
are parsed as YAML scalars (``--set lr=1e-3``, ``--set amp=false``, ``--set name=null``) and then
checked against the type of the default.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Iterable, Mapping, Optional

import yaml

__all__ = ["DEFAULTS", "load_config", "parse_overrides", "apply_overrides", "dump_config"]

DEFAULTS: Dict[str, Any] = {
    # data
    "data": "synthetic",          # 'synthetic' (built-in), a COCO .json, a YOLO data.yaml, a VOC folder
    "image_dir": None,            # COCO image folder when not next to the json
    "train_split": "train",
    "val_split": "val",
    "train_images": 2000,         # built-in dataset: images per epoch; files: first N (null = all)
    "val_images": 200,             # null = all
    "image_size": 160,            # letterbox side; the bundled cfg is 160x160
    "cache": True,                # keep decoded images in memory (uint8; with workers: 0), ...
    "cache_gb": 4.0,              # ... up to this many GB per process (the rest decoded every epoch)
    "workers": 0,                 # DataLoader worker processes
    # model
    "model": "darknet",           # 'darknet' or fasterrcnn_resnet18_fpn / fasterrcnn_resnet50_fpn / maskrcnn_*
    "cfg": "bundled:sam-tiny",    # Darknet cfg: bundled:NAME or a path
    "attention": "cfg",           # cfg | none | sam_pointwise | sam | cbam | se | cam | nonlocal ...
    "roi_attention": None,        # R-CNN: attention on RoI features
    "backbone_attention": None,   # R-CNN: attention in residual blocks
    # optimisation
    "epochs": 10,
    "batch_size": 32,
    "optimizer": "adamw",         # adamw | sgd
    "lr": 0.004,
    "momentum": 0.9,              # SGD momentum / AdamW beta1
    "weight_decay": 0.01,
    "warmup_iters": 60,           # linear warm-up from warmup_start to lr (iterations)
    "warmup_start": 0.1,          # fraction of lr at iteration 0
    "min_lr": 0.02,               # cosine floor, fraction of lr
    "grad_clip": 10.0,            # max global grad norm (null = off)
    "amp": "auto",                # auto (bf16/fp16 autocast on CUDA only) | off | bf16 | fp16
    "seed": 0,
    "device": "auto",             # auto | cpu | cuda | cuda:N
    # evaluation and output
    "eval_interval": 0,           # evaluate every N epochs (0: only after the last epoch)
    "conf_thresh": 0.005,
    "nms_thresh": 0.45,
    "max_detections": 100,
    "attention_images": 4,        # val images whose attention maps are saved at the end
    "out": "runs",
    "name": None,                 # run folder name (default: train, train2, ...)
    "progress": True,             # tqdm bar on rank 0
    "threads": 0,                 # torch.set_num_threads (0 = leave torch's default)
}

_NULLABLE = {k for k, v in DEFAULTS.items() if v is None} | {"train_images", "val_images", "grad_clip"}


def _coerce(key: str, value: Any) -> Any:
    if key not in DEFAULTS:
        raise KeyError(f"unknown config key {key!r}; known keys: {', '.join(sorted(DEFAULTS))}")
    if isinstance(value, str) and not isinstance(DEFAULTS[key], str):
        value = yaml.safe_load(value) if value.strip() else None
    if value is None:
        if key in _NULLABLE:
            return None
        raise ValueError(f"config {key}: null is not allowed (default {DEFAULTS[key]!r})")
    default = DEFAULTS[key]
    if default is None or isinstance(default, str):
        return value if not isinstance(value, (int, float)) or isinstance(value, bool) else str(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"config {key}: expected true/false, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise ValueError(f"config {key}: expected an integer, got {value!r}")
        return int(value)
    if isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config {key}: expected a number, got {value!r}")
        return float(value)
    return value


def parse_overrides(items: Optional[Iterable[str]]) -> Dict[str, Any]:
    """``["lr=1e-3", "amp=false"]`` -> ``{"lr": 0.001, "amp": False}`` (checked against :data:`DEFAULTS`)."""
    out: Dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        out[k] = _coerce(k, v)
    return out


def apply_overrides(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(dict(config))
    for k, v in overrides.items():
        out[k] = _coerce(k, v)
    return out


def load_config(path: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None,
                base: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Defaults (or ``base``), then the YAML file ``path``, then ``overrides``; validated.

    ``base`` (e.g. a checkpoint's config) takes the defaults of keys it lacks (keys added after
    it was written)."""
    cfg = copy.deepcopy({**DEFAULTS, **(base or {})})
    if path:
        try:
            with open(path, "r", encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except OSError as e:
            raise ValueError(f"--config: cannot read {path!r}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"--config {path}: invalid YAML: {e}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"--config {path}: expected a mapping of keys to values, got {type(data).__name__}")
        try:
            cfg = apply_overrides(cfg, data)
        except (KeyError, ValueError) as e:
            raise ValueError(f"--config {path}: {e.args[0]}") from None
    cfg = apply_overrides(cfg, overrides or {})
    validate(cfg)
    return cfg


def validate(cfg: Mapping[str, Any]) -> None:
    for k in ("epochs", "batch_size", "image_size"):
        if cfg[k] < 1:
            raise ValueError(f"config {k}: expected >= 1, got {cfg[k]}")
    if cfg["image_size"] % 32:
        raise ValueError(f"config image_size: expected a multiple of 32, got {cfg['image_size']}")
    if cfg["lr"] <= 0:
        raise ValueError(f"config lr: expected > 0, got {cfg['lr']}")
    if cfg["optimizer"] not in ("adamw", "sgd"):
        raise ValueError(f"config optimizer: expected adamw or sgd, got {cfg['optimizer']!r}")
    if cfg["amp"] not in ("auto", "off", "bf16", "fp16"):
        raise ValueError(f"config amp: expected auto, off, bf16 or fp16, got {cfg['amp']!r}")
    if cfg["workers"] < 0 or cfg["warmup_iters"] < 0 or cfg["eval_interval"] < 0:
        raise ValueError("config workers / warmup_iters / eval_interval: expected >= 0")
    if cfg["cache_gb"] < 0:
        raise ValueError(f"config cache_gb: expected >= 0, got {cfg['cache_gb']}")


def dump_config(cfg: Mapping[str, Any], path: str) -> None:
    from .checkpoint import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(dict(cfg), sort_keys=False))
