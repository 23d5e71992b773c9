"""``spatialattn eval``: COCO metrics of a trained checkpoint.

    spatialattn eval --weights runs/train/best.pt                  # on the run's val split
    spatialattn eval --weights best.pt --data data/shapes --split val --json out.json
"""
from __future__ import annotations

import argparse


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("eval", help="COCO AP / AP50 / AP75 / APs/m/l of a checkpoint on a dataset",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="a checkpoint written by spatialattn train (last.pt / best.pt)")
    p.add_argument("--data", default=None, help="dataset (default: the one the model was trained with)")
    p.add_argument("--split", default=None, help="split (default: the run's val split)")
    p.add_argument("--image-dir", default=None, help="COCO image folder")
    p.add_argument("--num-images", type=int, default=None, help="evaluate the first N images (default: the run's val_images for the built-in data, else all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--conf", type=float, default=None, help="score threshold (default: the run's conf_thresh)")
    p.add_argument("--nms", type=float, default=None, help="NMS IoU threshold (default: the run's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="also write the metrics as JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spatialattn.data import DatasetError
    from spatialattn.engine import distributed as D
    from spatialattn.engine.checkpoint import load_checkpoint
    from spatialattn.engine.evaluator import evaluate, format_metrics, make_eval_loader, open_dataset, save_metrics_json
    from spatialattn.engine.models import build_model

    try:
        ckpt = load_checkpoint(args.weights)
    except (FileNotFoundError, ValueError) as e:
        print(f"spatialattn eval: error: {e}")
        return 2
    cfg = dict(ckpt["config"])
    spec = dict(ckpt["spec"])
    if args.data is not None:
        cfg["data"] = args.data
        cfg["val_images"] = None
        cfg["image_dir"] = args.image_dir
    if args.split is not None:
        cfg["val_split"] = args.split
    if args.num_images is not None:
        cfg["val_images"] = args.num_images
    if args.conf is not None:
        spec["conf_thresh"] = args.conf
    if args.nms is not None:
        spec["nms_thresh"] = args.nms
    rank, ws, device = D.init_distributed(args.device)
    try:
        try:
            ds = open_dataset(cfg, "val_split", "val_images", train=False, cache=False)  # read once
        except DatasetError as e:
            print(f"spatialattn eval: error: {e}")
            return 2
        if list(ds.classes) != list(spec["classes"]):
            print(f"spatialattn eval: error: the dataset's classes {list(ds.classes)} differ from the model's "
                  f"{list(spec['classes'])}")
            return 2
        model = build_model(spec)
        model.load_state_dict(ckpt["model"])
        model.to(device).eval()
        loader = make_eval_loader(ds, args.batch_size)
        metrics = evaluate(model, loader, ds, device, progress=True)
        if rank == 0:
            print(format_metrics(metrics, title=f"COCO bbox, {args.weights} on {cfg['data']} ({cfg['val_split']})"))
            if args.json:
                save_metrics_json(metrics, args.json)
    finally:
        D.cleanup()
    return 0
