"""Triton kernels on CPU through Triton's interpreter (tiny shapes, in subprocesses).

``TRITON_INTERPRET=1`` must be set before ``triton`` is imported, so the checks run in fresh
interpreters (see ``_triton_interp_checks.py``). They take minutes of single-threaded Python, so
they are started in the background when the session begins (the ``subprocess_check`` marker, see
``tests/conftest.py``) and overlap the rest of the suite; these tests wait for them.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from ._interpreter_numpy import interpreter_blocker  # noqa: E402

if interpreter_blocker():  # at collection, so the background checks are not started either
    pytest.skip(interpreter_blocker(), allow_module_level=True)

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parents[1]
# The interpreter is single-threaded Python; a second OpenMP team would only contend with the suite's.
_ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.mark.subprocess_check([sys.executable, str(_HERE / "_triton_interp_checks.py")],
                              env={"TRITON_INTERPRET": "1", **_ONE_THREAD}, timeout=900)
def test_triton_kernels_under_interpreter(subprocess_check):
    proc = subprocess_check
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "checks passed" in proc.stdout


@pytest.mark.subprocess_check([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               str(_HERE / "test_cuda.py")],
                              env={"TRITON_INTERPRET": "1", "SPATIALATTN_TRITON_ON_CPU": "1", **_ONE_THREAD}, cwd=str(_ROOT),
                              timeout=1200)
def test_cuda_tests_under_interpreter(subprocess_check):
    """``test_cuda.py`` (the public API on the Triton path, against float64 references) on CPU
    tensors through the interpreter, so its code runs without a GPU too."""
    proc = subprocess_check
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
