"""How the C++ extension is built (no compiler run here: cpp_extension.load is replaced)."""
from __future__ import annotations

import sys

import pytest
from torch.utils import cpp_extension

from spatialattn.ops import _cpp


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenMP build attempt is Linux-only")
def test_openmp_build_first_then_without(monkeypatch):
    # at::parallel_for only runs in parallel when the extension itself is compiled with
    # -fopenmp; if that build fails, a build without OpenMP is the fallback
    calls = []

    def fake_load(name, sources, extra_cflags, extra_ldflags, verbose):
        calls.append((name, list(extra_cflags), list(extra_ldflags)))
        if "-fopenmp" in extra_cflags:
            raise RuntimeError("no OpenMP here")
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert _cpp._build() == "module"
    assert len(calls) == 2
    (name1, cflags1, ldflags1), (name2, cflags2, ldflags2) = calls
    assert name1.endswith("_omp") and "-fopenmp" in cflags1 and ldflags1 == ["-fopenmp"]
    assert not name2.endswith("_omp") and "-fopenmp" not in cflags2 and ldflags2 == []
    assert "-O3" in cflags1 and "-O3" in cflags2


def test_build_error_propagates_after_all_attempts(monkeypatch):
    def fake_load(**kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: fake_load(**k))
    with pytest.raises(RuntimeError, match="no compiler"):
        _cpp._build()
