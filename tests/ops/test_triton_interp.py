"""Triton kernels on CPU through Triton's interpreter (tiny shapes, one subprocess).

``TRITON_INTERPRET=1`` must be set before ``triton`` is imported, so the checks
run in a fresh interpreter (see ``_triton_interp_checks.py``).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    script = Path(__file__).with_name("_triton_interp_checks.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "checks passed" in proc.stdout


def test_cuda_tests_under_interpreter():
    """``test_cuda.py`` (the public API on the Triton path, against float64 references) on CPU
    tensors through the interpreter, so its code runs without a GPU too."""
    env = dict(os.environ, TRITON_INTERPRET="1", SPATIALATTN_TRITON_ON_CPU="1")
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).with_name("test_cuda.py"))]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
