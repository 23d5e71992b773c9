#!/usr/bin/env python
"""What the Triton kernels cost on a GPU: compiled resources per launch, and a sweep of their
launch settings.

    python benchmarks/triton_report.py                # no GPU needed: the launches of the benchmark
                                                      # shapes compiled for sm_90 (grids, registers,
                                                      # spills, access widths)
    python benchmarks/triton_report.py --arch 80      # the same for an A100
    python benchmarks/triton_report.py --sweep        # CUDA: each kernel entry point timed under
                                                      # tile / warp / split settings
    TRITON_INTERPRET=1 python benchmarks/triton_report.py --sweep --device cpu --shapes 1x16x8x8 --iters 1
                                                      # the sweep's code on CPU (numbers meaningless)

**Static report** (``spatialattn.ops._triton_aot``): the public API (a fused SAM
forward + backward and a ``CBAM`` training step) runs on CPU tensors with every Triton launch
recorded instead of run, specialised as Triton's JIT does on a GPU; each distinct launch is
compiled with Triton's compiler and ``ptxas`` for the target. Per shape / layout / dtype and
kernel: the grid (programs, and programs per SM of an H100 / H200, 132), registers, shared
memory, local memory (spills), and the widest global load / narrowest store in bytes per
thread (16 = a 128-bit vector) next to what ``x``'s alignment allows.

**Sweep** (a GPU, or Triton's interpreter for a smoke test): for each kernel entry point of
``spatialattn.ops._triton`` (channel pooling, gate multiply, backward pass A and the
gradient pass, global pooling forward and backward), the time under the default settings
and under one changed setting at a time (channel / pixel tile, warps, the programs-per-SM
target of the loop split, the gate multiply's tile). Each figure is the bytes the kernel
must move divided by its time, as a fraction of ``x.clone()``'s bandwidth measured the same
way in the same run (1.0 = copy speed); median of ``--iters`` timings, each of a batch of
queued calls between CUDA events, over several input sets in turn so that the working set
exceeds the L2 cache (60 MB on an H200). Results: printed and written to
``benchmarks/results/triton_<report>.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sam import GPU_SHAPES, SHAPES  # noqa: E402

H100_SMS = 132


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sweep", action="store_true", help="time the kernels under launch settings (CUDA)")
    p.add_argument("--arch", type=int, default=90, help="static report: compute capability (80, 90)")
    p.add_argument("--device", default="cuda", help="sweep: cuda, or cpu under TRITON_INTERPRET=1")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--shapes", default=None, help="e.g. 8x256x52x52,1x1024x13x13")
    p.add_argument("--iters", type=int, default=7, help="sweep: timings per figure (median)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    return p.parse_args()


def _shapes(args, default):
    if args.shapes:
        return [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    return default


def static_report(args, torch) -> str:
    from spatialattn import ops
    from spatialattn.nn import CBAM
    from spatialattn.ops import _triton_aot as aot

    ok, why = aot.supported()
    if not ok:
        raise SystemExit(f"static report unavailable: {why}")
    dtype = getattr(torch, args.dtype)
    lines = [f"# Triton kernels compiled for sm_{args.arch} ({args.dtype}; Triton's compiler and ptxas, no GPU)", "",
             "programs/SM: of 132 (H100 / H200). load / store: widest global load and narrowest global store,",
             "bytes per thread; `x` allows: the bytes a vector access along `x`'s contiguous axis may move.", "",
             "| shape | layout | kernel | grid | programs/SM | registers | shared B | local B | load | store | x allows |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    worst = []
    for shape in _shapes(args, SHAPES + GPU_SHAPES):
        for cl in (False, True):
            def workload():
                x = torch.randn(shape).to(dtype)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                x.requires_grad_()
                y = ops.spatial_attention_fused(x, torch.randn(1, 2, 7, 7))
                torch.autograd.grad(y, x, torch.ones_like(y))
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    y = CBAM(shape[1], preset="official")(x)
                torch.autograd.grad(y, x, torch.ones_like(y))

            for launch in aot.record_launches(workload, args.arch):
                c = aot.compile_launch(launch, args.arch)
                programs = min(math.prod(g) for g in launch.grids)
                flags = {k: v for k, v in launch.constants().items() if isinstance(v, bool) and v and k != "CL"}
                name = launch.kernel.strip("_").replace("_kernel", "") + ("" if not flags else f" ({', '.join(flags)})")
                lines.append(f"| {'x'.join(map(str, shape))} | {'CL' if cl else 'NCHW'} | {name} | {programs} | "
                             f"{programs / H100_SMS:.1f} | {c.registers} | {c.shared_bytes} | {c.local_bytes} | "
                             f"{c.widest_load()} | {c.narrowest_store()} | {aot.contiguous_alignment(launch)} |")
                worst.append((programs / H100_SMS, c.registers, c.local_bytes, name, shape, cl,
                              "x_ptr" in launch.signature))
    fewest = min(w for w in worst if w[6])  # of the passes over x (the small-map kernels have few pixels)
    lines += ["", f"fewest programs per SM of a pass over x: {fewest[0]:.1f} ({fewest[3]}, {fewest[4]}, "
              f"{'CL' if fewest[5] else 'NCHW'}); most registers: {max(w[1] for w in worst)}; "
              f"local memory anywhere: {max(w[2] for w in worst)} B"]
    return "\n".join(lines + [""] + launch_table(args, torch))


def launch_table(args, torch) -> list:
    """Kernel launches per call on the Triton path (``_triton_aot.kernel_launches``): Triton
    kernels + torch operators that launch one. On a GPU each costs a few microseconds of host
    time, which on these shapes is of the order of the whole op's memory time."""
    from spatialattn import ops
    from spatialattn.nn import CBAM, SpatialAttention
    from spatialattn.ops import _triton_aot as aot

    dtype = getattr(torch, args.dtype)
    modes = ["fused fwd", "fused fwd+bwd", "SpatialAttention eval", "SpatialAttention train", "CBAM eval",
             "CBAM train"]
    lines = ["## Kernel launches per call (Triton + torch)", "",
             "Counted on CPU tensors with the dispatch pointed at the Triton path; modules in eval counted on",
             "their second call (the folded BatchNorm is cached); train = forward + backward of the module.", "",
             "| shape | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]
    for shape in _shapes(args, SHAPES + GPU_SHAPES):
        x = torch.randn(shape).to(dtype)
        xg = x.clone().requires_grad_()
        w = torch.randn(1, 2, 7, 7)
        sam_e, cbam_e = SpatialAttention(shape[1]).eval(), CBAM(shape[1], preset="official").eval()
        sam_t, cbam_t = SpatialAttention(shape[1]).train(), CBAM(shape[1], preset="official").train()
        half = dtype != torch.float32

        def fused_fwd():
            with torch.no_grad():
                ops.spatial_attention_fused(x, w)

        def fused_both():
            y = ops.spatial_attention_fused(xg, w)
            torch.autograd.grad(y, xg, y)

        def evaluate(m):
            def run():
                with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=half):
                    m(x)
            run()
            return run

        def train(m):
            def run():
                with torch.autocast("cpu", dtype=dtype, enabled=half):
                    y = m(xg)
                torch.autograd.grad(y, [xg] + list(m.parameters()), y)
            return run

        cells = []
        for fn in (fused_fwd, fused_both, evaluate(sam_e), train(sam_t), evaluate(cbam_e), train(cbam_t)):
            counts = aot.kernel_launches(fn)
            tri = sum(v for k, v in counts.items() if not k.startswith("aten."))
            cells.append(f"{tri + sum(v for k, v in counts.items() if k.startswith('aten.'))} ({tri} Triton)")
        lines.append(f"| {'x'.join(map(str, shape))} | " + " | ".join(cells) + " |")
    return lines


@contextlib.contextmanager
def _settings(T, **kw):
    saved = {k: getattr(T, k) for k in kw}
    for k, v in kw.items():
        setattr(T, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(T, k, v)


# (label, module constants, applies to the gate multiply, to the other kernels)
SETTINGS = [
    ("default", {}, True, True),
    ("BC=8", {"_BC": 8}, False, True), ("BC=32", {"_BC": 32}, False, True),
    ("BP=32", {"_BP": 32}, False, True), ("BP=128", {"_BP": 128}, False, True),
    ("warps=2", {"_NUM_WARPS": 2}, True, True), ("warps=8", {"_NUM_WARPS": 8}, True, True),
    ("no split", {"_PROGRAMS_PER_SM": 0}, False, True), ("4/SM", {"_PROGRAMS_PER_SM": 4}, False, True),
    ("16/SM", {"_PROGRAMS_PER_SM": 16}, False, True),
    ("mul 8x128 / 32x32", {"_MUL_TILE": {False: (8, 128), True: (32, 32)}}, True, False),
    ("mul 2x512 / 128x8", {"_MUL_TILE": {False: (2, 512), True: (128, 8)}}, True, False),
    ("mul 4x512 / 64x32", {"_MUL_TILE": {False: (4, 512), True: (64, 32)}}, True, False),
    # the forward and backward in one launch only (_sam_band_kernel, _sam_band_backward_kernel: programs per SM)
    ("band 1/SM", {"_BAND_PROGRAMS_PER_SM": 1}, False, True),
    ("band 16/SM", {"_BAND_PROGRAMS_PER_SM": 16}, False, True),
]


def sweep(args, torch) -> str:
    from spatialattn.ops import _triton as T

    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cuda = dev.type == "cuda"
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--sweep needs a CUDA device (or TRITON_INTERPRET=1 with --device cpu, for a smoke test)")
    name = torch.cuda.get_device_name(dev) if cuda else "cpu (Triton interpreter)"
    shapes = _shapes(args, [(8, 256, 52, 52), (8, 512, 26, 26), (1, 1024, 13, 13)] + GPU_SHAPES)
    l2 = 60e6 if cuda else 0

    def timed(fn, sets, calls):
        """Seconds per call: median of ``args.iters`` batches of ``calls`` calls over the input sets in turn."""
        for s in sets:
            fn(*s)
        ts = []
        for _ in range(args.iters):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for i in range(calls):
                    fn(*sets[i % len(sets)])
                end.record()
                end.synchronize()
                ts.append(start.elapsed_time(end) / 1e3 / calls)
            else:
                t0 = time.perf_counter()
                for i in range(calls):
                    fn(*sets[i % len(sets)])
                ts.append((time.perf_counter() - t0) / calls)
        return statistics.median(ts)

    cols, rows = [], {}
    for shape in shapes:
        n, c, h, w = shape
        for cl in (False, True):
            col = f"{'x'.join(map(str, shape))} {'CL' if cl else 'NCHW'}"
            cols.append(col)
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            nsets = max(1, math.ceil(4 * l2 / (3 * nbytes)))  # x, g, a second buffer: > 4 L2s in turn
            calls = max(nsets, 8 if cuda else 1)
            fmt = torch.channels_last if cl else torch.contiguous_format
            sets = []
            for _ in range(nsets):
                x = torch.randn(shape, device=dev).to(dtype).contiguous(memory_format=fmt)
                g = torch.randn(shape, device=dev).to(dtype).contiguous(memory_format=fmt)
                into = torch.empty_like(x)
                attn = torch.rand(n, 1, h, w, device=dev)
                pooled = T.pool_forward(x, None, [0, 1], torch.float32)
                gp = torch.randn(n, 2, h, w, device=dev)
                _, cnt, ix = T.reduce(g, x, None, pooled[:, :1], max_index=True)
                gout, counts = T.global_pool_forward(x, [1, 0], torch.float32, count=True)
                gg = torch.randn(2, n, c, device=dev)
                sets.append((x, g, into, attn, pooled, gp, cnt, ix, gout, counts, gg))
            clone = timed(lambda x, *_: x.clone(), sets, calls)
            wt = torch.randn(1, 2, 7, 7, device=dev) * 0.1
            saved = {id(x): T.sam_forward(x, wt, None, None, None, None, [0, 1], 1) for x, *_ in sets}

            def sam(band):
                def run(x, *_):
                    with _settings(T, _BAND_FORWARD=band):
                        return T.sam_forward(x, wt, None, None, None, None, [0, 1], 1)
                return run

            def sam_backward(band):
                def run(x, g, *_):
                    _, attn_, logits, pooled_ = saved[id(x)]
                    with _settings(T, _BAND_BACKWARD=band):
                        return T.sam_backward(g, None, x, None, wt, None, attn_, logits, pooled_, [0, 1], 1)
                return run
            cases = {
                "pool [1]": (1, lambda x, g, into, attn, pooled, gp, cnt, ix, gout, counts, gg:
                                 T.pool_forward(x, None, [0, 1], torch.float32)),
                "gate multiply [2]": (2, lambda x, g, into, attn, *_: T.gate_forward(x, attn, None)),
                "pass A [2]": (2, lambda x, g, into, attn, pooled, *_: T.reduce(g, x, None, pooled[:, :1],
                                                                                  max_index=True)),
                "gradient pass [2]": (2, lambda x, g, into, attn, pooled, gp, cnt, ix, *_:
                                      T.gradx(g, x, None, attn, pooled, gp, [0, 1], cnt, False, max_index=ix)),
                "global pool [1]": (1, lambda x, *_: T.global_pool_forward(x, [1, 0], torch.float32, count=True)),
                "global pool bwd, in place [3]": (3, lambda x, g, into, attn, pooled, gp, cnt, ix, gout, counts, gg:
                                                  T.global_pool_backward(gg, x, gout, [1, 0], into=into,
                                                                         counts=counts)),
                # the whole SAM forward: three launches (the pooling unsplit under "no split"), or one
                "SAM forward, three launches [2]": (2, sam(False)),
                "SAM forward, one launch [2]": (2, sam(True)),
                "SAM backward, five launches [3]": (3, sam_backward(False)),
                "SAM backward, one launch [3]": (3, sam_backward(True)),
            }
            for label, settings, gate, others in SETTINGS:
                with _settings(T, **settings):
                    for case, (moved, fn) in cases.items():
                        if not (gate if case.startswith("gate") else others):
                            continue
                        # the whole SAM at the default settings; the one launch also at its own
                        if label.startswith("band") and "one launch" not in case:
                            continue
                        if case.startswith("SAM") and not (label == "default" or label.startswith("band")):
                            continue
                        t = timed(fn, sets, calls)
                        rows.setdefault((case, label), {})[col] = moved * clone / (2 * t)
            print(f"{col}: clone {clone * 1e6:.1f} us ({2 * nbytes / clone / 1e9:.0f} GB/s)", flush=True)
    lines = [f"# Triton kernel sweep on {name} ({args.dtype})", "",
             "Bandwidth of each kernel (the bytes it must move, [k] times those of `x`, over its time) as a fraction of",
             "`x.clone()`'s in the same run (1.0 = copy speed); median of "
             f"{args.iters} timings; one setting changed at a time.", "",
             "| kernel | setting | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for (case, label), vals in rows.items():
        lines.append(f"| {case} | {label} | " + " | ".join(f"{vals.get(col, float('nan')):.2f}" for col in cols) + " |")
    lines += ["", "Best setting per kernel (geometric mean over the columns):", ""]
    for case in dict.fromkeys(k[0] for k in rows):
        scored = [(math.exp(statistics.fmean(math.log(v) for v in vals.values())), label)
                  for (cs, label), vals in rows.items() if cs == case]
        best = max(scored)
        base = next(s for s, label in scored if label == "default")
        lines.append(f"* {case}: {best[1]} ({best[0]:.2f}; default {base:.2f})")
    return "\n".join(lines)


def main() -> None:
    args = _parse()
    import torch

    text = sweep(args, torch) if args.sweep else static_report(args, torch)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kind = "sweep" if args.sweep else f"sm{args.arch}"
    path = out / f"triton_{kind}_{args.dtype}.md"
    path.write_text(text + "\n")
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
