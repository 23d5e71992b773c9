"""``spatialattn attention``: heat-map overlays of every attention layer of a model for images.

    spatialattn attention img1.png img2.jpg --weights runs/train/best.pt --out-dir maps/
    spatialattn attention img.png --cfg bundled:sam-tiny --attention cbam   # untrained model
    spatialattn attention img.png --model fasterrcnn_resnet18_fpn --backbone-attention sam

For each image: ``OUT/<stem>_attention.png`` (the image, then one overlay per attention layer;
maps with C channels are averaged over channels and upsampled to the image) and the raw maps as
``OUT/<stem>_maps/<layer>.npy`` (at the network input's resolution, batch dim removed).
"""
from __future__ import annotations

import argparse


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("attention", help="draw the attention maps of a model for images (PNG grids + .npy)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--weights", default=None, help="checkpoint of spatialattn train")
    p.add_argument("--cfg", default=None, help="Darknet cfg (bundled:NAME or a path) when no --weights")
    p.add_argument("--model", default=None, help="darknet (default) or an R-CNN name, when no --weights")
    p.add_argument("--attention", default="cfg", help="YOLO attention variant when no --weights")
    p.add_argument("--roi-attention", default=None)
    p.add_argument("--backbone-attention", default=None)
    p.add_argument("--num-classes", type=int, default=5, help="classes of an untrained model")
    p.add_argument("--image-size", type=int, default=None, help="letterbox side (default: the model's)")
    p.add_argument("--out-dir", default="attention_maps")
    p.add_argument("--raw", action="store_true", help="do not min-max normalise each map (clip to [0, 1])")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    import numpy as np
    import torch

    from spatialattn.data.base import image_to_tensor, read_image
    from spatialattn.data.transforms import letterbox
    from spatialattn.engine.checkpoint import load_checkpoint
    from spatialattn.engine.models import build_model
    from spatialattn.viz import overlay_attention

    try:
        if args.weights:
            ckpt = load_checkpoint(args.weights)
            model = build_model(ckpt["spec"])
            model.load_state_dict(ckpt["model"])
            size = int(ckpt["config"].get("image_size", 160))
        else:
            torch.manual_seed(0)
            spec = {"model": args.model or "darknet", "cfg": args.cfg or "bundled:sam-tiny",
                    "attention": args.attention, "roi_attention": args.roi_attention,
                    "backbone_attention": args.backbone_attention, "num_classes": args.num_classes,
                    "image_size": args.image_size or 160}
            model = build_model(spec)
            size = args.image_size or int(getattr(model, "input_size", (160, 160))[0])
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"spatialattn attention: error: {e}")
        return 2
    if args.image_size:
        size = args.image_size
    model.eval()
    os.makedirs(args.out_dir, exist_ok=True)
    for path in args.images:
        try:
            arr = read_image(path)
        except Exception as e:  # noqa: BLE001 - report and continue with the next image
            print(f"{path}: error: cannot read the image ({e})")
            return 2
        img, _ = letterbox(image_to_tensor(arr), {}, size)
        maps = model.attention_maps(img[None])
        stem = os.path.splitext(os.path.basename(path))[0]
        if not maps:
            print(f"{path}: the model has no attention layer")
            continue
        mdir = os.path.join(args.out_dir, f"{stem}_maps")
        os.makedirs(mdir, exist_ok=True)
        for k, m in maps.items():
            np.save(os.path.join(mdir, f"{k}.npy"), m[0].float().cpu().numpy())
        png = os.path.join(args.out_dir, f"{stem}_attention.png")
        overlay_attention(img, {k: m[0] for k, m in maps.items()}, path=png, normalize=not args.raw, title=stem)
        print(f"{path}: {len(maps)} attention layers -> {png}, {mdir}/")
    return 0
