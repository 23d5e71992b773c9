"""A stand-in for a Triton kernel that counts its launches (shared by the CUDA tests and the
Triton interpreter checks, which run as a script with this folder on ``sys.path``)."""
from __future__ import annotations

from typing import Any, List


class CountLaunches:
    """``kernel[grid](...)`` as the kernel does it, each ``grid`` recorded in ``grids``."""

    def __init__(self, kernel: Any) -> None:
        self.kernel, self.grids = kernel, []  # type: Any, List[Any]

    def __getitem__(self, grid: Any) -> Any:
        self.grids.append(grid)
        return self.kernel[grid]
