"""Forward latency of Darknet networks (batch 1, 416x416, CPU): eager vs ``torch.compile``.

Usage::

    python benchmarks/bench_darknet.py [--threads 2] [--size 416] [--repeats 20] [--warmup 3]
        [--data ../shared/darknet] [--markdown benchmarks/results_darknet.md] [--no-compile]

Nets: yolov4-tiny and yolov4-sam-mish-csp-reorg-bfm from the Darknet reference data folder
(``SPATIALATTN_DARKNET_DATA`` or ``<repo>/../shared/darknet``), with ``[net]`` width/height set to
``--size`` (rounded up to the next size the net accepts: yolov4-sam-mish-csp-reorg-bfm needs a
multiple of 64, so 416 becomes 448) and the deterministic weights of ``make_weights.py`` (seed 0), plus the bundled
``sam-tiny`` at its own 160x160. Reports the median (and min) over ``--repeats`` timed calls
after ``--warmup`` untimed ones, under ``torch.no_grad()``.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spatialattn.darknet import DarknetModel, bundled_model  # noqa: E402


def _data_dir(arg):
    if arg:
        return Path(arg)
    env = os.environ.get("SPATIALATTN_DARKNET_DATA")
    return Path(env) if env else REPO.parent / "shared" / "darknet"


def _resized_cfg(cfg: Path, size: int) -> str:
    text = cfg.read_text()
    text = re.sub(r"(?m)^\s*width\s*=.*$", f"width={size}", text, count=1)
    return re.sub(r"(?m)^\s*height\s*=.*$", f"height={size}", text, count=1)


def _load(data: Path, name: str, size: int, tmp: str) -> DarknetModel:
    spec = importlib.util.spec_from_file_location("_mw", data / "make_weights.py")
    mw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mw)
    cfg_text = _resized_cfg(data / name / f"{name}.cfg", size)
    cfg_path = Path(tmp) / f"{name}.cfg"
    cfg_path.write_text(cfg_text)
    wpath = Path(tmp) / f"{name}.weights"
    mw.write_weights(str(cfg_path), 0, str(wpath))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        m = DarknetModel.from_cfg(cfg_path)
    m.load_darknet_weights(wpath)
    wpath.unlink()
    return m.eval()


def _time(fn, x, warmup, repeats):
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            ts.append((time.perf_counter() - t0) * 1000)
    return statistics.median(ts), min(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=416)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--data", default=None)
    ap.add_argument("--markdown", default=None, help="also write the table as markdown here")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--nets", default="yolov4-tiny,yolov4-sam-mish-csp-reorg-bfm,sam-tiny")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    data = _data_dir(a.data)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.nets.split(","):
            if name == "sam-tiny":
                m, size = bundled_model("sam-tiny"), 160
            else:
                if not (data / "make_weights.py").is_file():
                    print(f"skip {name}: no Darknet data at {data}", file=sys.stderr)
                    continue
                # some nets need other multiples (yolov4-sam-mish-csp-reorg-bfm: 64, so 416 -> 448)
                size = a.size
                while True:
                    try:
                        m = _load(data, name, size, tmp)
                        break
                    except ValueError as e:
                        if size >= a.size + 256:
                            raise
                        print(f"{name}: {size}x{size} does not fit ({e}); trying {size + 32}", file=sys.stderr)
                        size += 32
            x = torch.rand(1, 3, size, size)
            params = sum(p.numel() for p in m.parameters()) / 1e6
            eager = _time(m, x, a.warmup, a.repeats)
            row = {"net": name, "input": f"{size}x{size}", "params": params, "eager": eager}
            if not a.no_compile:
                torch._dynamo.reset()
                cm = torch.compile(m)
                t0 = time.perf_counter()
                with torch.no_grad():
                    ref, got = m(x), cm(x)
                row["compile_s"] = time.perf_counter() - t0
                err = max(float((r - g).abs().max() / r.abs().max()) for r, g in zip(ref, got))
                row["compiled"] = _time(cm, x, a.warmup, a.repeats)
                row["err"] = err
            rows.append(row)
            print(row, flush=True)
    head = (f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
            f"torch {torch.__version__}, {a.threads} threads, batch 1, median (min) of {a.repeats} runs, ms")
    lines = [head, "", "| net | input | params (M) | eager ms | torch.compile ms | speed-up | compile time s | max rel. diff |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = f"{r['eager'][0]:.1f} ({r['eager'][1]:.1f})"
        if "compiled" in r:
            c = f"{r['compiled'][0]:.1f} ({r['compiled'][1]:.1f})"
            sp = f"{r['eager'][0] / r['compiled'][0]:.2f}x"
            lines.append(f"| {r['net']} | {r['input']} | {r['params']:.1f} | {e} | {c} | {sp} | {r['compile_s']:.0f} | {r['err']:.1e} |")
        else:
            lines.append(f"| {r['net']} | {r['input']} | {r['params']:.1f} | {e} | - | - | - | - |")
    table = "\n".join(lines)
    print(table)
    if a.markdown:
        Path(a.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
