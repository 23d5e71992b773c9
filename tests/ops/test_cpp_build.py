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
    monkeypatch.setattr(_cpp, "_cpu_has", lambda flag: False)
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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenMP build attempt is Linux-only")
def test_avx512_bf16_build_first_then_plain_avx512(monkeypatch):
    # on an AVX-512 CPU with AVX512-BF16 the bfloat16 kernels use the hardware rounding: a
    # build of its own, named for it; if the compiler cannot build it, the plain AVX-512 one
    calls = []

    def fake_load(name, sources, extra_cflags, extra_ldflags, verbose):
        calls.append((name, list(extra_cflags)))
        if "-mavx512bf16" in extra_cflags:
            raise RuntimeError("compiler without AVX512-BF16")
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(_cpp, "_capability", lambda: "AVX512")
    monkeypatch.setattr(_cpp, "_cpu_has", lambda flag: flag == "avx512_bf16")
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert _cpp._build() == "module"
    names = [n for n, _ in calls]
    assert names == ["spatialattn_sam_cpu_avx512_bf16_omp", "spatialattn_sam_cpu_avx512_bf16",
                     "spatialattn_sam_cpu_avx512_omp"]
    assert all("-mavx512f" in f for _, f in calls) and "-mavx512bf16" not in calls[-1][1]
    calls.clear()
    monkeypatch.setattr(_cpp, "_cpu_has", lambda flag: False)  # an AVX-512 CPU without it
    _cpp._build()
    assert [n for n, _ in calls] == ["spatialattn_sam_cpu_avx512_omp"]
