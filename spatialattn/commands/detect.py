"""``spatialattn detect``: run a Darknet cfg + weights on images, print boxes, write annotated PNGs.

Example::

    spatialattn detect --cfg yolov4-sam-mish-csp-reorg-bfm.cfg --weights x.weights \
        --names coco.names --out-dir out/ img1.jpg img2.png

Each image is resized to the cfg's ``[net]`` width x height (Darknet's default, no letterbox),
boxes are scaled back to the original image and drawn on it (``<out-dir>/<stem>_det.png``).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("detect", help="detect objects with a Darknet cfg + .weights; prints boxes, writes PNGs")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (anything Pillow reads)")
    p.add_argument("--cfg", required=True, help="Darknet .cfg, or bundled:NAME (e.g. bundled:sam-tiny)")
    p.add_argument("--weights", required=True, help="Darknet .weights file matching the cfg")
    p.add_argument("--names", default=None, help="class names, one per line (default: class indices)")
    p.add_argument("--conf", type=float, default=0.25, help="score threshold (default 0.25)")
    p.add_argument("--nms", type=float, default=0.45, help="NMS IoU threshold (default 0.45)")
    p.add_argument("--out-dir", default=".", help="folder for the annotated PNGs (default: .)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=run)


def _load_model(cfg: str, weights: str):
    from spatialattn.darknet import DarknetModel, bundled_cfg

    if cfg.startswith("bundled:"):
        model = DarknetModel.from_cfg_text(bundled_cfg(cfg.split(":", 1)[1]), source=cfg)
    else:
        model = DarknetModel.from_cfg(cfg)
    model.load_darknet_weights(weights)
    return model.eval()


def _draw(img, det, names: Optional[List[str]]):
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)
    palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
    for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
        color = palette[label % len(palette)]
        name = names[label] if names and label < len(names) else str(label)
        draw.rectangle(box, outline=color, width=2)
        draw.text((box[0] + 2, box[1] + 2), f"{name} {score:.2f}", fill=color)
    return img


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from spatialattn.darknet import DarknetCfgError, DarknetWeightsError
    from spatialattn.detection.yolo_decode import scale_boxes, yolo_postprocess

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = _load_model(args.cfg, args.weights)
    except (DarknetCfgError, DarknetWeightsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not model.yolo_indices:
        print(f"error: {args.cfg} has no [yolo] layer to decode", file=sys.stderr)
        return 2
    names = None
    if args.names:
        with open(args.names, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    c, h, w = model.input_shape
    if c != 3:
        print(f"error: the cfg expects {c} input channels; only RGB (3-channel) images are supported", file=sys.stderr)
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    for path in args.images:
        try:
            img = Image.open(path).convert("RGB")
        except OSError as e:
            print(f"error: cannot read image {path}: {e}", file=sys.stderr)
            return 2
        arr = np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0
        x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)
        with torch.no_grad():
            outs = model(x)
        det = yolo_postprocess(outs, model.yolo_layers, (h, w), args.conf, args.nms)[0]
        det["boxes"] = scale_boxes(det["boxes"], (h, w), (img.height, img.width))
        out_path = os.path.join(args.out_dir, os.path.splitext(os.path.basename(path))[0] + "_det.png")
        _draw(img, det, names).save(out_path)
        print(f"{path}: {len(det['boxes'])} boxes -> {out_path}")
        for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
            name = names[label] if names and label < len(names) else str(label)
            print(f"  {name:>12s} {score:.3f}  x1={box[0]:.1f} y1={box[1]:.1f} x2={box[2]:.1f} y2={box[3]:.1f}")
    return 0
