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
