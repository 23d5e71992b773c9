"""Whether Triton's interpreter can run here: before Triton 3.6 it converted a block of one
element to a Python int with ``int(array)``, which NumPy 2.4 turned from a deprecation warning
into a ``TypeError`` (triton-lang/triton#9171; torch 2.9's Triton 3.5.1 with NumPy 2.4 fails
every kernel with a loop bound computed in the kernel, passes with NumPy 2.3)."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional


@functools.lru_cache(maxsize=1)  # (asked for a skip condition and again for its reason: one read)
def interpreter_blocker() -> Optional[str]:
    """Why Triton's interpreter cannot run our kernels here (a skip reason), or None."""
    try:
        import numpy
        from triton.runtime import interpreter
    except Exception:  # no Triton: the tests' own importorskip says so
        return None
    if tuple(int(p) for p in numpy.__version__.split(".")[:2]) < (2, 4):
        return None
    try:
        source = Path(interpreter.__file__).read_text()
    except OSError:
        return None
    if "int(self.handle.data)" not in source:  # (fixed: int(self.handle.data.squeeze()))
        return None
    import triton

    return (f"Triton {triton.__version__}'s interpreter cannot run with NumPy {numpy.__version__} "
            "(int() of a one-element array, triton-lang/triton#9171): pip install 'numpy<2.4' to run it")
