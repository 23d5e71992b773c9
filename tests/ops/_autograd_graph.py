"""Names of the autograd nodes behind a tensor (shared by the CPU tests and the Triton
interpreter checks, which run as a script with this folder on ``sys.path``)."""
from __future__ import annotations

from typing import Set

from torch import Tensor


def node_names(t: Tensor) -> Set[str]:
    """Type names of every node reachable from ``t.grad_fn``."""
    seen: Set[str] = set()
    todo = [t.grad_fn]
    while todo:
        f = todo.pop()
        if f is not None and type(f).__name__ not in seen:
            seen.add(type(f).__name__)
            todo.extend(g for g, _ in f.next_functions)
    return seen
