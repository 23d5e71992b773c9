"""Attention ablation: train one model per (attention variant, seed), then tabulate COCO AP,
AP50, AP75 (mean +- std over seeds), parameters, GFLOPs and CPU latency.

GFLOPs are counted with :class:`torch.utils.flop_counter.FlopCounterMode` on one forward of a
``1 x 3 x S x S`` input (convolutions and matmuls; element-wise ops such as the sigmoid gates are
not counted, so attention modules add little); 1 multiply-add = 2 FLOPs. Latency: batch 1,
CPU, eval mode, ``torch.no_grad``, median over ``latency_runs`` calls after warm-up.
"""
from __future__ import annotations

import csv
import os
import statistics
import time
from typing import Any, Dict, List, Mapping, Sequence

import torch

from .checkpoint import atomic_write_text
from .trainer import train

__all__ = ["compare", "model_cost", "format_table"]


def model_cost(model: torch.nn.Module, image_size: int, latency_runs: int = 20) -> Dict[str, float]:
    """``{"params": M params, "gflops": GFLOPs, "latency_ms": median ms}`` of an eval-mode forward."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model.cpu().eval()
    x = torch.rand(1, 3, image_size, image_size)
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            model(x)
        flops = fc.get_total_flops()
        for _ in range(3):
            model(x)
        ts = []
        for _ in range(max(1, latency_runs)):
            t = time.perf_counter()
            model(x)
            ts.append(time.perf_counter() - t)
    return {"params": sum(p.numel() for p in model.parameters()) / 1e6, "gflops": flops / 1e9,
            "latency_ms": 1000 * statistics.median(ts)}


def _ms(vals: Sequence[float]) -> str:
    vals = [100 * v for v in vals]
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"


COLUMNS = ["attention", "seeds", "AP", "AP50", "AP75", "params (M)", "GFLOPs", "latency (ms)"]


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of :func:`compare` rows."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([r["attention"], str(len(r["AP"])), _ms(r["AP"]), _ms(r["AP50"]),
                                        _ms(r["AP75"]), f"{r['params']:.3f}", f"{r['gflops']:.3f}",
                                        f"{r['latency_ms']:.2f}"]) + " |")
    return "\n".join(lines)


def compare(cfg: Mapping[str, Any], variants: Sequence[str], seeds: Sequence[int], out_dir: str,
            latency_runs: int = 20) -> List[Dict[str, Any]]:
    """Train ``cfg`` with ``attention=v`` and ``seed=s`` for each pair (runs in ``out_dir/<v>-s<s>``),
    write ``compare.csv``, ``compare.md`` and ``compare.png`` into ``out_dir``; returns the rows."""
    if not variants:
        raise ValueError("compare: no attention variants given")
    if not seeds:
        raise ValueError("compare: no seeds given")
    os.makedirs(out_dir, exist_ok=True)
    rows: List[Dict[str, Any]] = []
    per_run: List[Dict[str, Any]] = []
    for v in variants:
        row: Dict[str, Any] = {"attention": v, "AP": [], "AP50": [], "AP75": []}
        model = None
        for s in seeds:
            c = dict(cfg, attention=v, seed=int(s), out=out_dir, name=f"{v}-s{s}")
            print(f"== compare: attention={v} seed={s}", flush=True)
            res = train(c)
            m = res["metrics"]
            for k in ("AP", "AP50", "AP75"):
                row[k].append(float(m[k]))
            per_run.append({"attention": v, "seed": int(s), **{k: float(m[k]) for k in ("AP", "AP50", "AP75")}})
            model = res["model"]
        row.update(model_cost(model, cfg["image_size"], latency_runs))
        rows.append(row)

    with open(os.path.join(out_dir, "compare.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["attention", "seeds", "AP_mean", "AP_std", "AP50_mean", "AP50_std", "AP75_mean", "AP75_std",
                    "params_M", "GFLOPs", "latency_ms"])
        for r in rows:
            stats = []
            for k in ("AP", "AP50", "AP75"):
                stats += [statistics.mean(r[k]), statistics.stdev(r[k]) if len(r[k]) > 1 else 0.0]
            w.writerow([r["attention"], len(r["AP"])] + [f"{x:.5f}" for x in stats]
                       + [f"{r['params']:.4f}", f"{r['gflops']:.4f}", f"{r['latency_ms']:.3f}"])
    with open(os.path.join(out_dir, "runs.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["attention", "seed", "AP", "AP50", "AP75"])
        w.writeheader()
        w.writerows(per_run)
    table = format_table(rows)
    atomic_write_text(os.path.join(out_dir, "compare.md"), table + "\n")
    _chart(rows, os.path.join(out_dir, "compare.png"))
    return rows


def _chart(rows: Sequence[Mapping[str, Any]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2 + 1.6 * len(rows), 3.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    keys = ("AP", "AP50", "AP75")
    width = 0.8 / len(keys)
    for j, k in enumerate(keys):
        means = [100 * statistics.mean(r[k]) for r in rows]
        errs = [100 * statistics.stdev(r[k]) if len(r[k]) > 1 else 0.0 for r in rows]
        xs = [i + (j - 1) * width for i in range(len(rows))]
        ax.bar(xs, means, width, yerr=errs, capsize=3, label=k)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["attention"] for r in rows])
    ax.set_ylabel("COCO AP (x100)")
    ax.set_title("attention variants (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
