"""Learning-rate schedule: linear warm-up, then cosine decay to a floor (per iteration)."""
from __future__ import annotations

import math

__all__ = ["warmup_cosine"]


def warmup_cosine(step: int, total: int, warmup: int, start: float = 0.1, floor: float = 0.02) -> float:
    """LR factor at iteration ``step`` of ``total``: ``start -> 1`` linearly over ``warmup``
    iterations, then ``1 -> floor`` along a half cosine until ``total``."""
    if total <= 0:
        return 1.0
    if warmup > 0 and step < warmup:
        return start + (1.0 - start) * step / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
