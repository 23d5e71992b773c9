"""``spatialattn dataset``: export the built-in dataset (or any readable dataset) and inspect one.

    spatialattn dataset export --format coco|yolo|voc --out DIR [--num-images N] [--split val]
    spatialattn dataset info SOURCE [--split val]
"""
from __future__ import annotations

import argparse
import sys


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("dataset", help="export the built-in dataset as COCO / YOLO / VOC, or check a dataset")
    dsub = p.add_subparsers(dest="dataset_command", metavar="ACTION")

    e = dsub.add_parser("export", help="write a dataset (default: the built-in one) as COCO JSON, YOLO txt or VOC XML with PNG images")
    e.add_argument("--format", choices=["coco", "yolo", "voc"], default="coco")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--split", default="val", help="split to write (default: val)")
    e.add_argument("--num-images", type=int, default=None,
                   help="images to write (default: the built-in split's default length, or all)")
    e.add_argument("--source", default="synthetic", help="dataset to export (default: synthetic)")
    e.add_argument("--image-size", type=int, default=160, help="built-in dataset image size")
    e.add_argument("--seed", type=int, default=0, help="built-in dataset seed")
    e.set_defaults(func=run_export)

    i = dsub.add_parser("info", help="read and validate a dataset, print its size and box statistics")
    i.add_argument("source", help="'synthetic', a COCO .json, a YOLO data.yaml or a VOC folder")
    i.add_argument("--split", default="val")
    i.add_argument("--image-dir", default=None, help="COCO image folder")
    i.add_argument("--num-images", type=int, default=None)
    i.add_argument("--check-images", action="store_true", help="also decode every image")
    i.set_defaults(func=run_info)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _friendly(fn):
    """Report bad data as one ``error: <file>, <where>: <what>`` line and exit status 2."""
    def wrapped(args: argparse.Namespace) -> int:
        from spatialattn.data import DatasetError

        try:
            return fn(args)
        except DatasetError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    wrapped.__name__ = fn.__name__
    return wrapped


@_friendly
def run_export(args: argparse.Namespace) -> int:
    from spatialattn.data import build_dataset, export_dataset

    ds = build_dataset(args.source, args.split, num_images=args.num_images,
                       image_size=args.image_size, seed=args.seed)
    path = export_dataset(ds, args.out, args.format, split=args.split, num_images=args.num_images,
                          progress=True)
    print(f"wrote {len(ds) if args.num_images is None else min(args.num_images, len(ds))} "
          f"{args.split} images as {args.format}: {path}")
    return 0


@_friendly
def run_info(args: argparse.Namespace) -> int:
    import numpy as np

    from spatialattn.data import build_dataset

    ds = build_dataset(args.source, args.split, image_dir=args.image_dir, num_images=args.num_images)
    counts = np.zeros(len(ds.classes), np.int64)
    sides, empty = [], 0
    for k in range(len(ds)):
        rec = ds.sample(k)[1] if args.check_images else ds.record(k)
        counts += np.bincount(rec.labels, minlength=len(ds.classes))
        empty += len(rec.labels) == 0
        sides.extend(np.sqrt((rec.boxes[:, 2] - rec.boxes[:, 0]) * (rec.boxes[:, 3] - rec.boxes[:, 1])).tolist())
    print(ds)
    print(f"images: {len(ds)} ({empty} without objects), boxes: {int(counts.sum())}")
    for name, c in zip(ds.classes, counts.tolist()):
        print(f"  {name:20s} {c}")
    if sides:
        q = np.percentile(sides, [0, 10, 50, 90, 100])
        print("box side sqrt(w*h) px: min {:.1f}  p10 {:.1f}  median {:.1f}  p90 {:.1f}  max {:.1f}".format(*q))
    return 0
