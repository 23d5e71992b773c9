"""Non-local block: torch's fused attention against bmm + softmax, in the same run.

``NonLocal2d`` without the attention map asked for runs its softmax attention as
``torch.nn.functional.scaled_dot_product_attention`` from 2**18 position pairs per image
(``spatialattn.functional._sdpa_ok``); with ``return_attention=True`` it writes the
``[N, L, M]`` map with bmm + softmax. This script times both on the same module and input
(interleaved rounds, medians) and reports what autograd saves for backward (unique
storages, ``saved_tensors_hooks``).

    python benchmarks/bench_nonlocal.py [--rounds 7] [--threads 2] [--quick]

``--quick``: two small inputs on either side of the threshold, one round (a smoke run).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from spatialattn.nn import NonLocal2d

# (label, N, C, H, W, NonLocal2d keyword arguments)
CASES = [
    ("8x64x56x56, keys pooled", 8, 64, 56, 56, dict(sub_sample=True)),
    ("8x128x28x28", 8, 128, 28, 28, {}),
    ("2x256x64x64, keys pooled", 2, 256, 64, 64, dict(sub_sample=True)),
    ("8x512x28x28, keys pooled", 8, 512, 28, 28, dict(sub_sample=True)),
    ("8x256x14x14 (below the threshold: bmm both)", 8, 256, 14, 14, {}),
]
QUICK_CASES = [
    ("1x16x32x32 (2**20 pairs)", 1, 16, 32, 32, {}),
    ("1x16x16x16 (below the threshold)", 1, 16, 16, 16, {}),
]


def _step(m, x, with_map: bool, train: bool) -> None:
    if train:
        xx = x.detach().requires_grad_()
        out = m(xx, return_attention=with_map)
        (out[0] if with_map else out).square().mean().backward()
    else:
        with torch.no_grad():
            m(x, return_attention=with_map)


def _saved_mb(m, x, with_map: bool) -> float:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    xx = x.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = m(xx, return_attention=with_map)
    (out[0] if with_map else out).sum().backward()
    return sum(storages.values()) / 2**20


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="two small inputs, one round")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = 1
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, float32, medians of {args.rounds} interleaved rounds\n")
    print("| input | pairs L*M | fwd bmm ms | fused / bmm | fwd+bwd bmm ms | fused / bmm | saved MB bmm | saved MB fused |")
    print("|---|---|---|---|---|---|---|---|")
    for label, n, c, h, w, kw in QUICK_CASES if args.quick else CASES:
        torch.manual_seed(0)
        m = NonLocal2d(c, zero_init=False, **kw).train()
        x = torch.randn(n, c, h, w)
        pairs = (h * w) * ((h // 2) * (w // 2) if kw.get("sub_sample") else h * w)
        times = {}
        for train in (False, True):
            for with_map in (True, False):
                _step(m, x, with_map, train)  # warm-up
            for _ in range(args.rounds):
                for with_map in (True, False):
                    t0 = time.perf_counter()
                    _step(m, x, with_map, train)
                    times.setdefault((train, with_map), []).append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"| {label} | {pairs / 1e6:.2f}M | {med[(False, True)]:.1f} | {med[(False, False)] / med[(False, True)]:.2f} "
              f"| {med[(True, True)]:.1f} | {med[(True, False)] / med[(True, True)]:.2f} "
              f"| {_saved_mb(m, x, True):.1f} | {_saved_mb(m, x, False):.1f} |", flush=True)


if __name__ == "__main__":
    main()
