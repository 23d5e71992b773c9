#!/usr/bin/env python
"""What the attention layers cost inside a model: a torchvision ResNet with SAM / CBAM in every block.

    python benchmarks/bench_model.py              # ResNet-50, batch 8, 224x224, SAM and CBAM
    python benchmarks/bench_model.py --quick      # fewer rounds
    python benchmarks/bench_model.py --model resnet18 --batch 4 --size 160 --kinds sam

The attention modules are put where :func:`spatialattn.surgery.insert_attention` puts them
(after the last conv + BatchNorm of every residual block: 16 layers in a ResNet-50, on maps of
56x56 down to 7x7 at 224x224 input), and timed where they run, between the convolutions, with
the caches as the model leaves them. Each layer's time is divided by the time of ``x.clone()``
of the same input at the same point of the model (a separate pass whose hooks clone the input
just before the attention runs, in the same mode): the "copies" of the issue ("switching a
model's attention to our op makes its attention layers cost about one memory copy in inference
and a few in training").

Backends, in one process: ``fused`` (the C++ kernels on CPU, Triton on CUDA: what the modules
use by default) and ``torch`` (the same modules on plain PyTorch operators; on CPU through
``SPATIALATTN_DISABLE_CPP``, on CUDA ``fused`` vs ``torch`` is not switched and only ``fused``
runs). Modes: ``eval`` (``model.eval()`` under ``torch.no_grad()``) and ``train`` (training
mode, forward + backward of ``out.float().square().mean()``; the attention's backward is timed
by tensor hooks from the moment its output's gradient is complete to the moment its input's is).

Columns: ``attention ms`` (all attention layers of one forward, or forward + backward, summed);
``copies`` (that sum over the summed clone times: what the layers cost in copies of their
inputs); per map size the same ratio; ``model ms`` (the whole forward / training step, without
hooks) and ``share`` (attention ms over model ms: the part of the step the attention
layers take). Medians over rounds; a round runs every backend and mode once per probe
(interleaved, so a slow moment of a shared machine hits all of them).

CPU timings use ``time.perf_counter`` (the ops are synchronous); CUDA timings CUDA events.
Results: ``--out`` (markdown and CSV).
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_sam import machine_name, malloc_setting, reexec_with_tunables  # noqa: E402


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet50", help="a torchvision ResNet builder (resnet18, resnet50, ...)")
    p.add_argument("--kinds", default="sam,cbam", help="attention kinds for insert_attention (comma-separated)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224, help="input height and width")
    p.add_argument("--layouts", default="NCHW,CL", help="NCHW and / or CL (channels_last model and input)")
    p.add_argument("--modes", default="eval,train")
    p.add_argument("--rounds", type=int, default=None, help="default 3 (2 with --quick)")
    p.add_argument("--reps", type=int, default=None, help="timed passes per probe and round (default 2, 1 with --quick)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--system-malloc", action="store_true", help="do not set GLIBC_TUNABLES (see bench_sam.py)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    return p.parse_args(argv)


class Clock:
    """Marks on the host clock (CPU) or CUDA events; ``span(a, b)`` in seconds after ``resolve()``."""

    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        ev = self.torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def resolve(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def span(self, a, b) -> float:
        return (b - a) if not self.cuda else a.elapsed_time(b) / 1e3


class Probe:
    """Forward (pre / post) hooks on every attention module, and in training tensor hooks on
    its output and input. ``what="attention"`` times the module (forward, and backward from
    the output's gradient to the input's); ``what="clone"`` times ``x.clone()`` of its input
    just before the module runs (the module itself then runs untimed). Both record each
    layer's input shape (``shapes``)."""

    def __init__(self, modules, clock, what):
        self.clock, self.what = clock, what
        self.marks = []  # (layer, "fwd" / "bwd" / "clone", start mark, end mark)
        self.shapes = {}  # layer -> its input's shape
        self.handles = []
        for i, m in enumerate(modules):
            self.handles.append(m.register_forward_pre_hook(self._pre(i)))
            if what == "attention":
                self.handles.append(m.register_forward_hook(self._post(i)))
        self.open = {}

    def _pre(self, i):
        def hook(module, inputs):
            x = inputs[0]
            self.shapes[i] = tuple(x.shape)
            if self.what == "clone":
                x = x.detach()  # (no autograd node for the clone)
                a = self.clock.mark()
                x.clone()
                self.marks.append((i, "clone", a, self.clock.mark()))
                return None
            if x.requires_grad:
                x.register_hook(self._grad_in(i))
            self.open[(i, "fwd")] = self.clock.mark()
            return None
        return hook

    def _post(self, i):
        def hook(module, inputs, out):
            self.marks.append((i, "fwd", self.open.pop((i, "fwd")), self.clock.mark()))
            if out.requires_grad:
                out.register_hook(self._grad_out(i))
            return None
        return hook

    def _grad_out(self, i):
        def hook(g):
            self.open[(i, "bwd")] = self.clock.mark()
        return hook

    def _grad_in(self, i):
        def hook(g):
            start = self.open.pop((i, "bwd"), None)
            if start is not None:
                self.marks.append((i, "bwd", start, self.clock.mark()))
        return hook

    def times(self):
        """``{(layer, kind): [seconds, ...]}`` of the marks so far."""
        self.clock.resolve()
        out = defaultdict(list)
        for i, kind, a, b in self.marks:
            out[(i, kind)].append(self.clock.span(a, b))
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


def main(argv=None) -> list:
    args = _parse(argv)
    if argv is None:  # (called with arguments, from a test: no re-execution)
        reexec_with_tunables(args.system_malloc)

    import torch
    import torchvision

    from spatialattn import ops
    from spatialattn.ops import _cpp
    from spatialattn.surgery import insert_attention

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    clock = Clock(torch, dev)
    rounds = args.rounds or (2 if args.quick else 3)
    reps = args.reps or (1 if args.quick else 2)
    kinds = [k for k in args.kinds.split(",") if k]
    layouts = [(l, torch.channels_last if l == "CL" else torch.contiguous_format) for l in args.layouts.split(",") if l]
    modes = [m for m in args.modes.split(",") if m]
    backends = ["fused", "torch"] if dev.type == "cpu" else ["fused"]

    @contextmanager
    def backend(name):
        """``torch``: the C++ kernels off (SPATIALATTN_DISABLE_CPP), so every module takes its
        plain PyTorch path; restored afterwards."""
        if name == "fused":
            yield
            return
        old = os.environ.get("SPATIALATTN_DISABLE_CPP")
        os.environ["SPATIALATTN_DISABLE_CPP"] = "1"
        _cpp.reset()
        try:
            yield
        finally:
            if old is None:
                del os.environ["SPATIALATTN_DISABLE_CPP"]
            else:
                os.environ["SPATIALATTN_DISABLE_CPP"] = old
            _cpp.reset()

    def build(kind, fmt):
        torch.manual_seed(0)
        m, names = insert_attention(getattr(torchvision.models, args.model)(weights=None), kind)
        m = m.to(dev).to(memory_format=fmt)
        return m, [m.get_submodule(n) for n in names]

    def run(model, x, mode):
        if mode == "eval":
            model.eval()
            with torch.no_grad():
                model(x)
        else:
            model.train()
            out = model(x)
            out.float().square().mean().backward()
            model.zero_grad(set_to_none=True)

    def timed(model, x, mode):
        clock.resolve()
        a = clock.mark()
        run(model, x, mode)
        b = clock.mark()
        clock.resolve()
        return clock.span(a, b)

    g = torch.Generator().manual_seed(0)
    rows = []
    for lname, fmt in layouts:
        x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(dev).contiguous(memory_format=fmt)
        models = {k: build(k, fmt) for k in kinds}
        # per (kind, mode, backend): attention sums, clone sums, per-size sums, model times
        acc = defaultdict(lambda: defaultdict(list))
        for r in range(rounds):
            for mode in modes:
                for k, (m, mods) in models.items():
                    for be in backends:
                        with backend(be):
                            if be == "torch" and r == 0 and mode == modes[0]:
                                got = ops.backend(torch.zeros(1, 1, 1, 1, device=dev))
                                if got != "torch":
                                    raise RuntimeError(f"switching the C++ kernels off failed: backend {got!r}")
                            run(m, x, mode)  # warm-up (plans, caches)
                            a = acc[(k, mode, be)]
                            a["model"].append(timed(m, x, mode))
                            per = {}
                            for what in ("attention", "clone"):
                                p = Probe(mods, clock, what)
                                for _ in range(reps):
                                    run(m, x, mode)
                                per[what] = p.times()
                                p.remove()
                            shapes = p.shapes
                            n = len(mods)
                            if mode == "train" and any(not per["attention"][(i, "bwd")] for i in range(n)):
                                raise RuntimeError("a backward hook did not fire")
                            # per layer: fastest pass; attention = forward (+ backward)
                            att = [min(per["attention"][(i, "fwd")]) + (min(per["attention"][(i, "bwd")])
                                                                        if mode == "train" else 0.0) for i in range(n)]
                            cl = [min(per["clone"][(i, "clone")]) for i in range(n)]
                            a["att"].append(sum(att))
                            a["clone"].append(sum(cl))
                            by = defaultdict(lambda: [0.0, 0.0])
                            for i in range(n):
                                hw = "x".join(map(str, shapes[i][2:]))
                                by[hw][0] += att[i]
                                by[hw][1] += cl[i]
                            for hw, (s_att, s_cl) in by.items():
                                a["size:" + hw].append(s_att / s_cl)
            print(f"round {r + 1}/{rounds} {lname} done", file=sys.stderr, flush=True)
        for k, (m, mods) in models.items():
            for mode in modes:
                for be in backends:
                    a = acc[(k, mode, be)]
                    ratios = [t / c for t, c in zip(a["att"], a["clone"])]
                    model_ms = statistics.median(a["model"]) * 1e3
                    rows.append(dict(
                        model=args.model, kind=k, layers=len(mods), mode=mode, layout=lname, backend=be,
                        attention_ms=statistics.median(a["att"]) * 1e3,
                        clone_ms=statistics.median(a["clone"]) * 1e3,
                        copies=statistics.median(ratios), copies_min=min(ratios), copies_max=max(ratios),
                        per_size={s[5:]: statistics.median(v) for s, v in a.items() if s.startswith("size:")},
                        model_ms=model_ms, share=statistics.median(a["att"]) * 1e3 / model_ms,
                    ))
    _report(args, torch, dev, rounds, rows)
    return rows


def _report(args, torch, dev, rounds, rows) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"model_{args.model}_{dev.type}"
    lines = [
        f"# Attention layers inside {args.model} (batch {args.batch}, {args.size}x{args.size}): "
        f"cost in copies of their inputs (median of {rounds} rounds)",
        "",
        f"device {dev.type} ({machine_name(torch, dev)}), float32, {args.threads} threads, torch {torch.__version__}, "
        f"malloc: {malloc_setting()}",
        "",
        "| kind | layers | mode | layout | backend | attention ms | clone ms | copies [min-max] | copies by map size | model ms | share |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per = ", ".join(f"{s}: {v:.2f}" for s, v in sorted(r["per_size"].items(), key=lambda kv: -int(kv[0].split("x")[0])))
        lines.append(
            f"| {r['kind']} | {r['layers']} | {r['mode']} | {r['layout']} | {r['backend']} | {r['attention_ms']:.2f} | "
            f"{r['clone_ms']:.2f} | {r['copies']:.2f} [{r['copies_min']:.2f}-{r['copies_max']:.2f}] | {per} | "
            f"{r['model_ms']:.1f} | {100 * r['share']:.1f} % |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    (out / f"{stem}.md").write_text(text)
    with open(out / f"{stem}.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        keys = ["model", "kind", "layers", "mode", "layout", "backend", "attention_ms", "clone_ms", "copies",
                "copies_min", "copies_max", "model_ms", "share", "per_size"]
        w.writerow(keys)
        for r in rows:
            w.writerow([r[k] if k != "per_size" else ";".join(f"{s}={v:.4f}" for s, v in r[k].items()) for k in keys])
    print(f"written {out / stem}.md and .csv", file=sys.stderr)


if __name__ == "__main__":
    main()
