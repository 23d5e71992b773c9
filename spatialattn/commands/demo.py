"""``spatialattn demo``: a quick look at the attention modules on random data."""
from __future__ import annotations

import argparse


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("demo", help="run every attention module once on random data and print its output")
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from spatialattn.nn import create_attention

    torch.manual_seed(0)
    x = torch.randn(2, args.channels, args.size, args.size)
    for name in ("sam", "sam_pointwise", "cam", "cbam", "se", "nonlocal"):
        m = create_attention(name, args.channels).eval()
        with torch.no_grad():
            y, attn = m(x, return_attention=True)
        n_params = sum(p.numel() for p in m.parameters())
        print(f"{name:14s} params={n_params:8d} out={tuple(y.shape)} attention={tuple(attn.shape)} "
              f"mean|y-x|={float((y - x).abs().mean()):.4f}")
    return 0
