#!/usr/bin/env python
"""Side-by-side benchmark of CBAM spatial attention (SAM): ours vs eager vs torch.compile.

    python benchmarks/bench_sam.py            # full table (a few minutes on 2 cores)
    python benchmarks/bench_sam.py --quick    # fewer rounds, no torch.compile

Every figure is a ratio to ``x.clone()`` measured in the same run: each round
times every variant (interleaved; per variant the fastest of several calls),
the ratio is taken per round, and the table shows the median over rounds (so a disturbance that slows one round hits every
variant of that round). Absolute clone times are listed as well.

Variants: ``ours`` = :func:`spatialattn.ops.spatial_attention_fused` (C++ on
CPU); ``ours-2op`` = :func:`spatialattn.functional.spatial_attention` as the
modules call it today (fused pooling + torch conv + fused gate-multiply);
``timm`` = timm's formula (mean, amax -> cat -> conv -> sigmoid -> multiply);
``ultra`` = ultralytics' formula (``torch.max(x, 1)`` instead of ``amax``);
``compile`` = ``torch.compile`` of the timm formula. For ``cbam``, ``ours`` is
the channel gate with its two pools read in one pass (:func:`spatialattn.ops.global_pool`)
and its MLP as one op (:func:`spatialattn.ops.channel_mlp_gate`) followed by the fused SAM
with ``channel_scale``; ``eager`` is the channel gate in plain PyTorch (``mean`` / ``amax``,
the shared MLP as matrix products, sigmoid) then ``x * gate`` then the timm SAM.

Modes: ``fwd`` (no autograd), ``fwd+bwd`` (dense upstream gradient, gradients
for x and the conv weight; its ``floor`` column is ``x.clone()`` followed by
``x + grad_y``: the 5 |x| of memory traffic every forward+backward needs, read x
and write y, read x and the upstream gradient and write grad_x, timed the same
way. Where x and y fit the last-level cache but the four tensors of a training
step do not, as at 8x512x26x26 on a 32 MiB L3, this floor is far above 2.5), ``cbam`` (channel gate + spatial attention, no
autograd; the eager CBAM materialises ``x * channel_gate``),
``eval`` / ``cbam-eval`` (inference of the whole modules ``SpatialAttention(C)`` /
``CBAM(C, preset="official")`` in eval mode under ``torch.no_grad()``, Python and
dispatch included: what a model pays per attention layer at test time, with the modules'
direct kernel calls; ``eager`` is the same math in plain PyTorch; float32 calls enter no
autocast context), ``train`` and
``cbam-train`` (one training step, forward + backward, of
``spatialattn.nn.SpatialAttention(C)`` / ``CBAM(C, preset="official")`` with the
BatchNorm of the spatial gate in training mode; ``ours`` runs CBAM's step as one autograd
node, ``spatialattn.nn._fast_train``; ``ours-2op`` is the same module on its module path
without the fused training-BatchNorm op, ``eager`` the same math in plain PyTorch).

Memory (``peak/|x|``, CPU): a fresh child process (same malloc settings, no
trimming) allocates x and the upstream gradient, runs one small warm-up step,
then one forward+backward; the reported figure is the growth of its peak RSS
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``) during that step divided by the bytes of ``x``. The floor for a
lean implementation is 2.0 (``y`` and ``grad_x``). ``saved/|x|`` counts the
bytes autograd keeps for backward after the forward, excluding ``x`` and the
parameters (``saved_tensors_hooks``, unique storages). On CUDA the peak is
``torch.cuda.max_memory_allocated`` over the step minus what was allocated before.

glibc malloc: allocations above the mmap threshold (32 MiB at most) are served
by fresh mmaps and page-fault on every call (a clone of 8x128x104x104 costs 6x
more). Unless ``--system-malloc`` is given the script re-executes itself with
``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...`` so
freed blocks are reused, as a long-running training process would; the table
says which setting was used.

``--dtype bfloat16`` / ``float16``: x, the upstream gradient and every formula's
parameters in that dtype (the ratios stay relative to a clone of the half tensor); the
training modes run the float32 modules under ``torch.autocast`` instead (half feature maps,
float32 parameters: autocast training). Our op computes in float32 and rounds y / grad_x once;
the eager formulas compute in the half format.

``--cold`` (CPU): before every timed call, the clone's included, a pass over a buffer of twice
the last-level cache evicts it, so every call reads its inputs from memory, as a layer does
whose input was not just written (the default times calls back to back: where x and y fit
the LLC, the clone then runs from it, while a training step's four tensors do not). Results
in ``sam_<device>_cold.md`` / ``.csv``; the targets of issue 6 are judged on the default.

``--device cuda``: the same table on a GPU (Triton kernels), with two larger shapes added
(16x256x104x104, 16x128x208x208: beyond the L2 cache), each figure timed with CUDA events
over a batch of queued calls (so that launch latency does not stand in for the copy), and
``peak/|x|`` from the CUDA allocator; the ``graph`` column of ``fwd`` / ``fwd+bwd`` is ``ours``
captured in a CUDA graph and replayed (the kernels' own cost, without the host's launches).

Results: printed, and written to ``benchmarks/results/sam_<device>.md`` / ``.csv``
(``sam_<device>_<dtype>`` for half dtypes).
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import time
from pathlib import Path

TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295"
NO_GRAD_MODES = ("fwd", "cbam", "eval", "cbam-eval")  # timed under torch.no_grad()
SHAPES = [(8, 256, 52, 52), (8, 512, 26, 26), (8, 128, 104, 104), (1, 1024, 13, 13)]
# added on a GPU: tensors of 177-354 MB (float32), well beyond its L2 cache, where a copy runs
# at memory bandwidth
GPU_SHAPES = [(16, 256, 104, 104), (16, 128, 208, 208)]


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 rounds, no torch.compile")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--system-malloc", action="store_true", help="do not set GLIBC_TUNABLES")
    p.add_argument("--shapes", default=None, help="e.g. 8x256x52x52,1x1024x13x13")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--no-mem", action="store_true", help="skip the peak-RSS child processes")
    p.add_argument("--cold", action="store_true", help="evict the last-level cache before every timed call (CPU)")
    p.add_argument("--mem-child", nargs=3, metavar=("IMPL", "SHAPE", "LAYOUT"), help=argparse.SUPPRESS)
    return p.parse_args()


def capture_cuda_graph(fn, calls: int = 1):
    """A ``torch.cuda.CUDAGraph`` of ``calls`` calls of ``fn``, after a warm-up on a side stream
    (as capture needs: kernels compiled and memory allocated before)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def reexec_with_tunables(system_malloc: bool) -> None:
    """Re-execute this script with ``GLIBC_TUNABLES=TUNABLES`` (Linux; unless ``system_malloc``
    or already set): freed blocks are then reused instead of page-faulting fresh mmaps."""
    if not system_malloc and sys.platform.startswith("linux") and os.environ.get("GLIBC_TUNABLES") != TUNABLES:
        os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, GLIBC_TUNABLES=TUNABLES))


def malloc_setting() -> str:
    """The malloc setting for a table header."""
    return "GLIBC_TUNABLES=" + TUNABLES if os.environ.get("GLIBC_TUNABLES") == TUNABLES else "system default"


def machine_name(torch, dev) -> str:
    """The GPU's name, or the CPU's model name (``/proc/cpuinfo``, else ``platform``)."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    args = _parse()
    reexec_with_tunables(args.system_malloc)

    import torch
    import torch.nn.functional as F

    from spatialattn import functional as SF
    from spatialattn import ops
    from spatialattn.nn import CBAM, SpatialAttention
    from spatialattn.nn import _fast_train
    from spatialattn.ops import _cpp

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    half = dtype != torch.float32
    if args.mem_child:
        return _mem_child(args, torch, F, SF, ops)
    rounds = args.rounds or (3 if args.quick else 5)
    use_compile = not (args.quick or args.no_compile)
    shapes = (GPU_SHAPES + SHAPES) if dev.type == "cuda" else SHAPES  # the GPU's own first
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]

    if dev.type == "cuda":
        # float32 convs at float32 precision in every formula (cuDNN's TF32 default would make
        # the eager outputs differ from ours by ~1e-3 and hide a real disagreement)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # ---------------------------------------------------------------- formulas
    def timm_sam(x, w):
        p = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        return x * torch.sigmoid(F.conv2d(p, w, padding=3))

    def ultra_sam(x, w):
        p = torch.cat([torch.mean(x, 1, keepdim=True), torch.max(x, 1, keepdim=True)[0]], 1)
        return x * torch.sigmoid(F.conv2d(p, w, padding=3))

    def ours(x, w):
        return ops.spatial_attention_fused(x, w, order=("mean", "max"))

    def ours_2op(x, w):
        return SF.spatial_attention(x, w, order=("mean", "max"))

    def channel_gate(x, w1, w2):  # plain PyTorch: mean / amax, then the reference MLP gate (linear, relu, sigmoid)
        v = torch.stack([x.mean((2, 3)), x.amax((2, 3))])
        gate = ops.reference.channel_mlp_gate(v, w1.reshape(w1.shape[0], -1), None, w2.reshape(w2.shape[0], -1))
        return gate.reshape(x.shape[0], x.shape[1], 1, 1)

    def cbam_eager(x, w, w1, w2):
        return timm_sam(x * channel_gate(x, w1, w2).to(x.dtype), w)

    def cbam_ours(x, w, w1, w2):
        # SF.channel_gate: the two pools in one read (ops.global_pool), the MLP as one op
        # (ops.channel_mlp_gate)
        gate = SF.channel_gate(x, w1, None, w2, None).to(x.dtype)
        return ops.spatial_attention_fused(x, w, order=("mean", "max"), channel_scale=gate)

    if use_compile:  # one graph per shape / layout / grad mode: keep them all
        import torch._dynamo

        torch._dynamo.config.recompile_limit = 1024
        torch._dynamo.config.accumulated_recompile_limit = 4096
    compiled = torch.compile(timm_sam) if use_compile else None
    compiled_cbam = torch.compile(cbam_eager) if use_compile else None

    evict = None
    if args.cold and dev.type == "cpu":  # twice the last-level cache, as the C++ kernels read its size
        ext = _cpp.get()
        evict = torch.zeros(2 * (ext.llc_bytes() if ext is not None else 32 << 20), dtype=torch.uint8)

    def timeit(fn, iters):
        if dev.type == "cuda":
            # throughput: `iters` calls queued between two events, per call, the fastest of
            # three batches (a synchronisation per call would time the launch latency, which
            # exceeds a copy of these tensors at GPU bandwidth)
            fn()
            best = float("inf")
            for _ in range(3):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    fn()
                end.record()
                end.synchronize()
                best = min(best, start.elapsed_time(end) / 1e3 / iters)
            return best
        # the fastest of `iters` calls: on a shared machine a preempted thread stalls a
        # whole parallel region, and the minimum is the figure least hit by that
        ts = []
        for _ in range(iters):
            sync()
            if evict is not None:
                evict.add_(1)
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    def graphed(fn):
        """``fn`` (one call) captured in a CUDA graph: the graph's ``replay``, or None (with a
        message) where the capture fails, so that the rest of the table still runs."""
        try:
            return capture_cuda_graph(fn).replay
        except Exception as e:
            print(f"CUDA graph capture failed: {type(e).__name__}: {e}", file=sys.stderr)
            return None

    def saved_ratio(fn, x, params):
        seen = {}
        skip = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in params}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in skip:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = fn()
        del y
        return sum(seen.values()) / (x.numel() * x.element_size())

    # ---------------------------------------------------------------- report
    def report(final: bool) -> None:
        """Write the tables of ``rows`` so far (after each shape and layout, so a run cut off by
        a time limit keeps what it measured); ``final``: print them as well."""
        header = (f"device {dev.type} ({machine_name(torch, dev)}), {args.dtype}, {args.threads} threads, torch {torch.__version__}, "
                  f"backend {ops.backend(torch.empty(1, 1, 1, 1, device=dev, dtype=dtype))}, rounds {rounds}, "
                  f"malloc: {malloc_setting()}"
                  + (f", LLC evicted before every timed call (a pass over {evict.numel() >> 20} MiB)"
                     if evict is not None else ""))
        impls = {"fwd": ["ours", "graph", "ours-2op", "timm", "ultra", "compile"],
                 "fwd+bwd": ["floor", "ours", "graph", "ours-2op", "timm", "ultra", "compile"],
                 "cbam": ["ours", "eager", "compile"], "eval": ["ours", "eager"], "cbam-eval": ["ours", "eager"],
                 "train": ["ours", "ours-2op", "eager", "compile"],
                 "cbam-train": ["ours", "ours-2op", "eager", "compile"]}
        lines = [f"# SAM benchmark: ratio to x.clone() (median of {rounds} interleaved rounds)", "", header, ""]
        for mode, names in impls.items():
            present = [nm for nm in names if any(r["mode"] == mode and r["impl"] == nm for r in rows)]
            lines += [f"## {mode}", "", "| shape | layout | clone ms | " + " | ".join(present) + (" | peak/\\|x\\| (ours, 2op, timm, ultra) | saved/\\|x\\|" if mode == "fwd+bwd" else "") + " |",
                      "|---|---|---|" + "---|" * len(present) + ("---|---|" if mode == "fwd+bwd" else "")]
            for shape in shapes:
                for lname, _ in layouts:
                    sel = {r["impl"]: r for r in rows if r["mode"] == mode and r["layout"] == lname and r["shape"] == "x".join(map(str, shape))}
                    if not sel:
                        continue
                    any_r = next(iter(sel.values()))
                    cells = [f"{sel[nm]['ratio']:.2f}" if nm in sel else "-" for nm in present]
                    extra = ""
                    if mode == "fwd+bwd":
                        four = [nm for nm in ("ours", "ours-2op", "timm", "ultra") if nm in sel]
                        extra = (" | " + ", ".join(f"{sel[nm]['peak_over_x']:.2f}" for nm in four)
                                 + " | " + ", ".join(f"{sel[nm]['saved_over_x']:.2f}" for nm in four))
                    lines.append(f"| {any_r['shape']} | {lname} | {any_r['clone_ms']:.3f} | " + " | ".join(cells) + extra + " |")
            lines.append("")
        text = "\n".join(lines)
        if final:
            print(text)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"sam_{dev.type}" + ("" if not half else f"_{args.dtype}") + ("_cold" if evict is not None else "")
        (out / f"{stem}.md").write_text(text + "\n")
        with open(out / f"{stem}.csv", "w", newline="") as fh:
            wr = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
            wr.writeheader()
            wr.writerows(rows)
        if final:
            print(f"written {out / (stem + '.md')} and .csv", file=sys.stderr)

    rows = []
    layouts = [("NCHW", torch.contiguous_format), ("CL", torch.channels_last)]
    for shape in shapes:
        n, c, h, wd = shape
        for lname, fmt in layouts:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(shape, generator=g).to(dev, dtype).contiguous(memory_format=fmt)
            w = (torch.randn(1, 2, 7, 7, generator=g) * 0.1).to(dev, dtype)
            w1 = (torch.randn(max(c // 16, 1), c, generator=g) * 0.05).to(dev, dtype)
            w2 = (torch.randn(c, max(c // 16, 1), generator=g) * 0.05).to(dev, dtype)
            gy = torch.randn(shape, generator=g).to(dev, dtype).contiguous(memory_format=fmt)
            xg = x.clone().requires_grad_()
            wg = w.clone().requires_grad_()

            def fb(f):
                def run():
                    y = f(xg, wg)
                    y.backward(gy)
                    xg.grad = None
                    wg.grad = None
                return run

            cases = {
                ("fwd", "clone"): lambda: x.clone(),
                ("fwd", "ours"): lambda: ours(x, w),
                ("fwd", "ours-2op"): lambda: ours_2op(x, w),
                ("fwd", "timm"): lambda: timm_sam(x, w),
                ("fwd", "ultra"): lambda: ultra_sam(x, w),
                # the least memory traffic of any forward+backward, 5 |x|: read x, write y;
                # read x and the upstream gradient, write grad_x (same tensors, same cache state)
                ("fwd+bwd", "floor"): lambda: (x.clone(), torch.add(x, gy)),
                ("fwd+bwd", "ours"): fb(ours),
                ("fwd+bwd", "ours-2op"): fb(ours_2op),
                ("fwd+bwd", "timm"): fb(timm_sam),
                ("fwd+bwd", "ultra"): fb(ultra_sam),
                ("cbam", "ours"): lambda: cbam_ours(x, w, w1, w2),
                ("cbam", "eager"): lambda: cbam_eager(x, w, w1, w2),
            }
            # training steps of whole modules (forward + backward, BatchNorm in training mode):
            # ours = spatialattn.nn modules (fused ops incl. the training-BatchNorm SAM);
            # ours-2op = the same modules without the fused training-BatchNorm op (what they
            # ran before it: fused pooling + torch conv/BN + fused multiply); eager = the
            # same math in plain PyTorch (timm / official-CBAM style formulas).
            sam_mod = SpatialAttention(c).to(dev).train()
            cbam_mod = CBAM(c, preset="official").to(dev).train()
            eager_bn = torch.nn.BatchNorm2d(1).to(dev).train()
            eager_cbam_bn = torch.nn.BatchNorm2d(1).to(dev).train()
            mlp1 = (torch.randn(max(c // 16, 1), c, 1, 1, generator=g) * 0.05).to(dev).requires_grad_()
            mlp2 = (torch.randn(c, max(c // 16, 1), 1, 1, generator=g) * 0.05).to(dev).requires_grad_()
            w_e = w.detach().to(torch.float32, copy=True).requires_grad_()  # never w itself (fp32)

            def eager_sam_with(bn):  # the official CBAM's SAM (max, mean; BatchNorm) in plain PyTorch
                def sam(t):
                    p = torch.cat([t.amax(1, keepdim=True), t.mean(1, keepdim=True)], 1)
                    return t * torch.sigmoid(bn(F.conv2d(p, w_e, padding=3)))
                return sam

            def eager_cbam_with(bn):  # channel gate (shared MLP on mean and max) then that SAM
                sam = eager_sam_with(bn)

                def cbam(t):
                    a = F.conv2d(F.relu(F.conv2d(t.mean((2, 3), keepdim=True), mlp1)), mlp2)
                    m = F.conv2d(F.relu(F.conv2d(t.amax((2, 3), keepdim=True), mlp1)), mlp2)
                    return sam(t * torch.sigmoid(a + m))
                return cbam

            eager_sam_bn = eager_sam_with(eager_bn)
            eager_cbam = eager_cbam_with(eager_cbam_bn)

            def step(f, params):
                def run():
                    with torch.autocast(dev.type, dtype=dtype, enabled=half):
                        y = f(xg)
                    y.backward(gy)
                    xg.grad = None
                    for t in params:
                        t.grad = None
                return run

            def no_fused_bn(f):
                def run():
                    orig = SF._fused_batchnorm_ok
                    SF._fused_batchnorm_ok = lambda *a: False
                    _fast_train.ENABLED = False  # (CBAM: the module path, node by node)
                    try:
                        f()
                    finally:
                        SF._fused_batchnorm_ok = orig
                        _fast_train.ENABLED = True
                return run

            # inference of whole modules (no autograd, BatchNorm in eval mode: folded into the
            # fused op): what a model pays per attention layer at test time, Python included
            sam_eval = SpatialAttention(c).to(dev).eval()
            cbam_eval = CBAM(c, preset="official").to(dev).eval()
            bn_eval = torch.nn.BatchNorm2d(1).to(dev).eval()
            eager_sam_eval = eager_sam_with(bn_eval)
            eager_cbam_eval = eager_cbam_with(bn_eval)

            def infer(f):
                # float32: no autocast context at all (entering and leaving a disabled one costs
                # about 3.5 us, a quarter of a 1x1024x13x13 clone, and fp32 inference has none)
                def run():
                    if not half:
                        return f(x)
                    with torch.autocast(dev.type, dtype=dtype):
                        return f(x)
                return run

            cases[("eval", "ours")] = infer(sam_eval)
            cases[("eval", "eager")] = infer(eager_sam_eval)
            cases[("cbam-eval", "ours")] = infer(cbam_eval)
            cases[("cbam-eval", "eager")] = infer(eager_cbam_eval)
            cases[("train", "ours")] = step(sam_mod, list(sam_mod.parameters()))
            cases[("train", "ours-2op")] = no_fused_bn(step(sam_mod, list(sam_mod.parameters())))
            cases[("train", "eager")] = step(eager_sam_bn, [w_e] + list(eager_bn.parameters()))
            cases[("cbam-train", "ours")] = step(cbam_mod, list(cbam_mod.parameters()))
            cases[("cbam-train", "ours-2op")] = no_fused_bn(step(cbam_mod, list(cbam_mod.parameters())))
            cases[("cbam-train", "eager")] = step(eager_cbam, [w_e, mlp1, mlp2] + list(eager_cbam_bn.parameters()))
            if compiled is not None:
                cases[("train", "compile")] = step(torch.compile(eager_sam_bn), [w_e] + list(eager_bn.parameters()))
                cases[("cbam-train", "compile")] = step(torch.compile(eager_cbam),
                                                        [w_e, mlp1, mlp2] + list(eager_cbam_bn.parameters()))
            if compiled is not None:
                cases[("fwd", "compile")] = lambda: compiled(x, w)
                cases[("fwd+bwd", "compile")] = fb(compiled)
                cases[("cbam", "compile")] = lambda: compiled_cbam(x, w, w1, w2)
            if dev.type == "cuda":
                # ours replayed from a CUDA graph (one call captured): the kernels without the
                # host's launches, as a model captured in a graph pays them
                with torch.no_grad():
                    rep = graphed(lambda: ours(x, w))
                if rep is not None:
                    cases[("fwd", "graph")] = rep
                rep = graphed(fb(ours))
                if rep is not None:
                    cases[("fwd+bwd", "graph")] = rep
            # warm-up (builds the extension / compiles once)
            with torch.no_grad():
                for (mode, name), fn in cases.items():
                    if mode in NO_GRAD_MODES:
                        fn()
            for (mode, name), fn in cases.items():
                if mode not in NO_GRAD_MODES:
                    fn()
            # agreement of our output with the eager formula (sanity, not a test)
            with torch.no_grad():
                err = (ours(x, w) - timm_sam(x, w)).abs().max().item()
                err = max(err, (cbam_ours(x, w, w1, w2) - cbam_eager(x, w, w1, w2)).abs().max().item())
                # the eager formulas round every intermediate to the half format
                tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}[dtype] * max(
                    1.0, x.abs().max().item())
                if not err < tol:
                    raise SystemExit(f"outputs disagree with the eager formula: max abs diff {err}")
            est = timeit(cases[("fwd", "clone")], 3)
            iters = max(3, min(50, int(0.05 / max(est, 1e-6))))
            ratios = {k: [] for k in cases}
            clone_ms = []
            for _ in range(rounds):
                base = None
                for key, fn in cases.items():
                    if key[0] not in NO_GRAD_MODES:
                        t = timeit(fn, max(2, iters // 8))
                    else:
                        with torch.no_grad():
                            t = timeit(fn, iters)
                    if key == ("fwd", "clone"):
                        base = t
                        clone_ms.append(t * 1e3)
                    ratios[key].append(t)
                for key in cases:
                    ratios[key][-1] /= base
            mem, peak = {}, {}
            for name, f in (("ours", ours), ("ours-2op", ours_2op), ("timm", timm_sam), ("ultra", ultra_sam)):
                if dev.type == "cpu" and not args.no_mem:
                    import subprocess

                    res = subprocess.run([sys.executable, __file__, "--mem-child", name, "x".join(map(str, shape)), lname,
                                          "--threads", str(args.threads), "--dtype", args.dtype],
                                         capture_output=True, text=True)
                    try:
                        peak[name] = float(res.stdout.strip().splitlines()[-1])
                    except (ValueError, IndexError):
                        peak[name] = float("nan")
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                    fb(f)()
                    torch.cuda.synchronize()
                    peak[name] = (torch.cuda.max_memory_allocated() - before) / (x.numel() * x.element_size())
                else:
                    mem[name] = saved_ratio(lambda: f(xg, wg), xg, [wg])
            for key, vals in ratios.items():
                if key == ("fwd", "clone"):
                    continue
                rows.append(dict(shape="x".join(map(str, shape)), layout=lname, mode=key[0], impl=key[1],
                                 ratio=statistics.median(vals), ratio_min=min(vals), ratio_max=max(vals),
                                 clone_ms=statistics.median(clone_ms),
                                 saved_over_x=mem.get(key[1], float("nan")) if key[0] == "fwd+bwd" else float("nan"),
                                 peak_over_x=peak.get(key[1], float("nan")) if key[0] == "fwd+bwd" else float("nan"),
                                 max_abs_diff_vs_timm=err))
            print(f"done {shape} {lname}: clone {statistics.median(clone_ms):.3f} ms", file=sys.stderr, flush=True)
            report(final=False)

    report(final=True)


def _mem_child(args, torch, F, SF, ops):
    """Peak-RSS growth of one forward+backward, in units of |x| (printed on stdout)."""
    impl, shape_s, layout = args.mem_child
    shape = tuple(int(v) for v in shape_s.split("x"))
    fmt = torch.channels_last if layout == "CL" else torch.contiguous_format
    dtype = getattr(torch, args.dtype)

    def f(x, w):
        if impl == "ours":
            return ops.spatial_attention_fused(x, w, order=("mean", "max"))
        if impl == "ours-2op":
            return SF.spatial_attention(x, w, order=("mean", "max"))
        if impl == "timm":
            p = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        else:
            p = torch.cat([torch.mean(x, 1, keepdim=True), torch.max(x, 1, keepdim=True)[0]], 1)
        return x * torch.sigmoid(F.conv2d(p, w, padding=3))

    w = torch.randn(1, 2, 7, 7, dtype=dtype, requires_grad=True)
    small = torch.randn(2, 8, 8, 8, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    f(small, w).backward(torch.ones_like(small))  # loads libraries / the extension
    # created in place: no freed |x|-sized block left in the heap to hide the step's allocations
    x = torch.empty(shape, memory_format=fmt, dtype=dtype).normal_().requires_grad_()
    gy = torch.empty(shape, memory_format=fmt, dtype=dtype).normal_()
    def status(key):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    # ru_maxrss survives execve (it would report the parent's peak): reset the
    # kernel's high-water mark of this process instead and read VmHWM
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = status("VmRSS")
    f(x, w).backward(gy)
    after = status("VmHWM")
    print((after - before) / (x.numel() * x.element_size()))


if __name__ == "__main__":
    main()
