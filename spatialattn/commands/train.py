"""``spatialattn train``: train a detector (default: the bundled SAM model on the built-in data).

    spatialattn train                                   # the README's main job
    spatialattn train --config my.yaml --set lr=0.002 --epochs 30 --data data/shapes_yolo
    spatialattn train --model fasterrcnn_resnet18_fpn --roi-attention cbam --backbone-attention sam
    spatialattn train --resume runs/train/last.pt
    torchrun --nproc-per-node 2 -m spatialattn.cli train ...
"""
from __future__ import annotations

import argparse

# dedicated flags -> config keys
FLAGS = {
    "epochs": int, "batch_size": int, "lr": float, "attention": str, "data": str, "out": str, "name": str,
    "cfg": str, "model": str, "roi_attention": str, "backbone_attention": str, "image_size": int,
    "train_images": int, "val_images": int, "workers": int, "seed": int, "device": str, "optimizer": str,
}


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML file with config keys (defaults built in)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set lr=0.002 --set amp=off")
    for key, typ in FLAGS.items():
        p.add_argument("--" + key.replace("_", "-"), dest=key, type=typ, default=None,
                       help=f"config key {key}")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace, base=None):
    from spatialattn.engine.config import load_config, parse_overrides

    over = parse_overrides(args.overrides)
    for key in FLAGS:
        v = getattr(args, key, None)
        if v is not None:
            over[key] = v
    if getattr(args, "no_progress", False):
        over["progress"] = False
    return load_config(args.config, over, base=base)


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("train", help="train a detector (default: bundled sam-tiny with SAM on the built-in dataset)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--resume", default=None, metavar="LAST_PT",
                   help="continue a run from its last.pt (its config; flags/--set override it)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import yaml

    from spatialattn.engine import distributed as D
    from spatialattn.engine.checkpoint import load_checkpoint
    from spatialattn.engine.trainer import train

    base = None
    if args.resume:
        base = load_checkpoint(args.resume)["config"]
    try:
        cfg = config_from_args(args, base=base)
    except (KeyError, ValueError) as e:
        print(f"spatialattn train: error: {e.args[0] if e.args else e}")
        return 2
    if args.print_config:
        print(yaml.safe_dump(cfg, sort_keys=False), end="")
        return 0
    try:
        train(cfg, resume=args.resume)
    finally:
        D.cleanup()
    return 0
