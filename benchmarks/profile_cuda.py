#!/usr/bin/env python
"""Where the time of the fused SAM goes on a GPU: kernels, their GPU time, and host time.

    python benchmarks/profile_cuda.py [--shapes 16x256x104x104,8x256x52x52] [--dtype float32]

For each shape, layout and mode (``fwd``: :func:`spatialattn.ops.spatial_attention_fused`
under ``torch.no_grad()``; ``fwd+bwd``: the same with a dense upstream gradient) it prints

* ``gpu us``: GPU time per call (CUDA events around a batch of queued calls);
* ``host us``: host time per call to queue them (no synchronisation inside the batch): where
  it exceeds ``gpu us`` the op is launch-bound;
* ``graph us``: GPU time per call replaying a CUDA graph of it (no host work at all: what
  the kernels cost; the gap to ``gpu us`` is launch overhead);
* ``clone us``: ``x.clone()`` timed the same way, and the ratio;
* the kernels of one call (``torch.profiler``): name, launches and GPU microseconds per call.

Modes ``fwd band`` / ``fwd+bwd band`` run the same calls with the forward and the backward in
one launch each (``_triton._BAND_FORWARD`` / ``_BAND_BACKWARD``, off by default until these
figures say whether they pay: their ``gpu``, ``host`` and ``graph`` against the ``fwd`` and
``fwd+bwd`` rows of the same run). ``train BN`` / ``train BN band``: a training step of
``SpatialAttention`` with its BatchNorm in training mode (the modules' default), in the
default launches and in the two-launch forward and backward; ``train BN unfolded``, where the
map has more than ``_triton._FOLD_ROWS`` 128-pixel tiles, the default launches without the
one-program fold of the BatchNorm's partial rows (every program reading all of them), to set
``_FOLD_ROWS`` from.

First, the host cost of one launch on a tiny tensor: a Triton launch of the gate-multiply
kernel (straight through ``kernel[grid](...)``), the same through its wrapper
(:func:`spatialattn.ops._triton.gate_forward`), and a torch ``mul``: what an overhead-bound
call is made of.

A diagnostic for a lent GPU (the device tool): short, one table per case.
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="16x256x104x104,16x128x208x208,8x256x52x52")
    p.add_argument("--layouts", default="NCHW,CL")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-band", dest="band", action="store_false",
                   help="skip the one-launch forward and backward (modes 'fwd band', 'fwd+bwd band', 'train BN band')")
    args = p.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from bench_sam import capture_cuda_graph  # (this script's folder is on sys.path)

    from spatialattn import ops
    from spatialattn.nn import SpatialAttention
    from spatialattn.ops import _triton

    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)

    def timed(fn, iters):
        fn()
        torch.cuda.synchronize()
        best_gpu, best_host = float("inf"), float("inf")
        for _ in range(3):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            host = (time.perf_counter() - t0) / iters
            e.record()
            e.synchronize()
            best_gpu = min(best_gpu, s.elapsed_time(e) / 1e3 / iters)
            best_host = min(best_host, host)
        return best_gpu * 1e6, best_host * 1e6

    def host_us(fn, iters=2000):
        fn()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            best = min(best, (time.perf_counter() - t0) / iters)
            torch.cuda.synchronize()
        return best * 1e6

    def graph_us(fn, iters):
        """GPU time per call of ``fn`` replayed from a CUDA graph (``iters`` calls captured)."""
        return timed(capture_cuda_graph(fn, iters).replay, 1)[0] / iters

    tiny = torch.randn(1, 8, 4, 4, device=dev)
    a = torch.rand(1, 1, 4, 4, device=dev)
    y = torch.empty_like(tiny)
    meta = _triton._meta(8, 16, False)
    bc, bp = _triton._MUL_TILE[False]
    launch = host_us(lambda: _triton._mul_kernel[(1, 2)](tiny, tiny, a, y, 8, 16, HAS_S=False, BC=bc, BP=bp, **meta))
    wrapped = host_us(lambda: _triton.gate_forward(tiny, a, None))
    mul = host_us(lambda: torch.mul(tiny, a))
    print(f"host us per call: triton launch {launch:.1f}, gate_forward wrapper {wrapped:.1f}, torch.mul {mul:.1f}")
    # what a launch costs without JITFunction.run's binding, specialisation and cache lookup:
    # the compiled kernel called straight (all arguments in signature order, as the JIT passes
    # them in Triton 3.3+); only a measurement, the library does not launch this way
    try:
        compiled = _triton._mul_kernel[(1, 2)](tiny, tiny, a, y, 8, 16, HAS_S=False, BC=bc, BP=bp, **meta)
        flat = (tiny, tiny, a, y, 8, 16, False, meta["CL"], meta["C_DIV"], meta["HW_DIV"], bc, bp)
        y.fill_(float("nan"))
        compiled[(1, 2, 1)](*flat)
        torch.cuda.synchronize()
        ok = torch.equal(y, tiny * a)
        stream = torch.cuda.current_stream().cuda_stream
        direct = host_us(lambda: compiled[(1, 2, 1)](*flat, stream=stream))
        print(f"host us per call: compiled kernel called straight {direct:.1f} (result {'right' if ok else 'WRONG'})")
    except Exception as e:  # other Triton versions: another calling convention
        print(f"compiled kernel called straight: failed ({type(e).__name__}: {e})")

    for shape_s in args.shapes.split(","):
        shape = tuple(int(v) for v in shape_s.split("x"))
        for lname in args.layouts.split(","):
            fmt = torch.channels_last if lname == "CL" else torch.contiguous_format
            g = torch.Generator().manual_seed(0)
            x = torch.randn(shape, generator=g).to(dev, dtype).contiguous(memory_format=fmt)
            w = (torch.randn(1, 2, 7, 7, generator=g) * 0.1).to(dev, dtype)
            gy = torch.randn(shape, generator=g).to(dev, dtype).contiguous(memory_format=fmt)
            xg = x.clone().requires_grad_()
            wg = w.clone().requires_grad_()

            def fwd():
                with torch.no_grad():
                    return ops.spatial_attention_fused(x, w, order=("mean", "max"))

            def fb():
                y = ops.spatial_attention_fused(xg, wg, order=("mean", "max"))
                y.backward(gy)
                xg.grad = None
                wg.grad = None

            sam = SpatialAttention(shape[1]).to(dev).train()

            def train_bn():
                with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                    y = sam(xg)
                y.backward(gy)
                xg.grad = None
                sam.zero_grad(set_to_none=True)

            def band(fn, on):  # the call with the forward and backward in one launch each, or not
                def run():
                    with _triton.band_launches(on, on):  # (whatever SPATIALATTN_TRITON_BAND_* say)
                        return fn()
                return run

            def unfolded(fn):  # the BatchNorm's partial rows read by every program, not folded first
                def run():
                    with _triton.fold_rows(1 << 62):
                        return fn()
                return run

            # the default launches' partial rows (one per 128-pixel tile): folded above _FOLD_ROWS
            folds = shape[0] * -(-shape[2] * shape[3] // _triton._BP_SMALL) > _triton._FOLD_ROWS
            clone_gpu, clone_host = timed(lambda: x.clone(), args.iters)
            for mode, fn in (("fwd", band(fwd, False)), ("fwd band", band(fwd, True)), ("fwd+bwd", band(fb, False)),
                             ("fwd+bwd band", band(fb, True)), ("train BN", band(train_bn, False)),
                             ("train BN unfolded", unfolded(band(train_bn, False))),
                             ("train BN band", band(train_bn, True))):
                if mode.endswith("band") and not args.band or mode.endswith("unfolded") and not folds:
                    continue
                gpu, host = timed(fn, args.iters)
                try:
                    graph = graph_us(fn, args.iters)
                except Exception as e:  # a capture that fails is a finding, not the end of the run
                    print(f"CUDA graph capture of {mode} failed: {type(e).__name__}: {e}")
                    graph = float("nan")
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        fn()
                    torch.cuda.synchronize()
                rows = []
                for ev in prof.key_averages():
                    t = getattr(ev, "self_device_time_total", None)
                    if t is None:
                        t = getattr(ev, "self_cuda_time_total", 0)
                    if t > 0:
                        rows.append((t / 5, ev.count / 5, ev.key))
                rows.sort(reverse=True)
                print(f"\n{shape_s} {lname} {args.dtype} {mode}: gpu {gpu:.1f} us, host {host:.1f} us, "
                      f"graph {graph:.1f} us, clone {clone_gpu:.1f} us (host {clone_host:.1f}), "
                      f"ratio {gpu / clone_gpu:.2f} (graph {graph / clone_gpu:.2f})")
                for t, n, key in rows[:14]:
                    print(f"  {t:9.1f} us  x{n:4.1f}  {key[:110]}")


if __name__ == "__main__":
    main()
