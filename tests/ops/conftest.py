"""Fixtures shared by the kernel tests."""
from __future__ import annotations

import pytest

from spatialattn.ops import _cpp


@pytest.fixture(scope="module")
def cpp_module():
    """The compiled C++ extension; the test is skipped where it cannot be built."""
    mod = _cpp.get()
    if mod is None:
        pytest.skip("C++ extension could not be built here (no compiler?)")
    return mod
