"""``spatialattn compare``: train the same model with each attention variant (and seed) and
tabulate AP, AP50, AP75 (mean ± std), parameters, GFLOPs and CPU latency.

    spatialattn compare --attention none,sam,sam_pointwise,cbam --seeds 0,1 --epochs 6
    spatialattn compare --attention none,cfg --config my.yaml --out runs/compare

Writes OUT/compare.csv, OUT/compare.md, OUT/compare.png (and one run folder per variant/seed).
"""
from __future__ import annotations

import argparse

from .train import add_config_args, config_from_args


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("compare", help="ablate attention variants: one table of AP/AP50/AP75, params, GFLOPs, latency",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    p.add_argument("--latency-runs", type=int, default=20)
    p.set_defaults(func=run)
    # --attention here is a comma-separated list (train's flag of the same name is reused)
    for a in p._actions:
        if a.dest == "attention":
            a.default = "none,sam,sam_pointwise,cbam"
            a.help = "comma-separated attention variants (default: none,sam,sam_pointwise,cbam)"


def run(args: argparse.Namespace) -> int:
    from spatialattn.engine.compare import compare

    variants = [v.strip() for v in args.attention.split(",") if v.strip()]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        print(f"spatialattn compare: error: --seeds: expected comma-separated integers, got {args.seeds!r}")
        return 2
    args.attention = None
    try:
        cfg = config_from_args(args)
    except (KeyError, ValueError) as e:
        print(f"spatialattn compare: error: {e.args[0] if e.args else e}")
        return 2
    if not args.out:
        cfg["out"] = "runs/compare"
    cfg["attention_images"] = 0
    out = cfg["out"] if not cfg.get("name") else f"{cfg['out']}/{cfg['name']}"
    try:
        rows = compare(cfg, variants, seeds, out, latency_runs=args.latency_runs)
    except ValueError as e:
        print(f"spatialattn compare: error: {e}")
        return 2
    from spatialattn.engine.compare import format_table

    print(format_table(rows))
    print(f"wrote {out}/compare.csv, compare.md, compare.png")
    return 0
