"""How the C++ extension is built (cpp_extension.load replaced), and that every ISA variant of
the source compiles (a syntax-only compiler run)."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import sysconfig

import pytest
from torch.utils import cpp_extension

from spatialattn.ops import _cpp


def _record_loads(monkeypatch, fails=lambda cflags: False):
    """``cpp_extension.load`` replaced: each call's ``(name, cflags, ldflags)`` appended to the
    returned list; a call whose cflags ``fails`` raises (a build error), others return "module"."""
    calls = []

    def fake_load(name, sources, extra_cflags, extra_ldflags, verbose):
        calls.append((name, list(extra_cflags), list(extra_ldflags)))
        if fails(extra_cflags):
            raise RuntimeError(f"build {name} failed")
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    return calls


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenMP build attempt is Linux-only")
def test_openmp_build_first_then_without(monkeypatch):
    # at::parallel_for only runs in parallel when the extension itself is compiled with
    # -fopenmp; if that build fails, a build without OpenMP is the fallback
    calls = _record_loads(monkeypatch, fails=lambda cflags: "-fopenmp" in cflags)  # no OpenMP here
    monkeypatch.setattr(_cpp, "_cpu_has", lambda flag: False)
    monkeypatch.setattr(_cpp, "_is_gcc", lambda banner=None: False)  # one build per OpenMP choice (no LTO attempt)
    assert _cpp._build() == ("module", {"isa": _cpp._capability(), "openmp": False, "lto": False})
    assert len(calls) == 2
    (name1, cflags1, ldflags1), (name2, cflags2, ldflags2) = calls
    assert name1.endswith("_omp") and "-fopenmp" in cflags1 and ldflags1 == ["-fopenmp"]
    assert not name2.endswith("_omp") and "-fopenmp" not in cflags2 and ldflags2 == []
    assert "-O3" in cflags1 and "-O3" in cflags2


@pytest.mark.parametrize("gcc", [True, False])
def test_gcc_only_flags_go_to_gcc_only(monkeypatch, gcc):
    calls = _record_loads(monkeypatch)
    monkeypatch.setattr(_cpp, "_is_gcc", lambda banner=None: gcc)
    monkeypatch.setattr(_cpp, "_built_before", lambda name, beside: False)
    _cpp._build()
    assert calls and all(("-fno-ipa-cp-clone" in f) == gcc and ("-fno-unswitch-loops" in f) == gcc
                         for _, f, _ in calls)
    assert all(any(a.startswith("-flto") for a in f + ld) == gcc for _, f, ld in calls)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenMP build attempt is Linux-only")
def test_gcc_builds_with_lto_first_then_without(monkeypatch):
    # GCC: link-time optimisation (code generation in parallel jobs at the link) in the compile
    # and the link flags; where that build fails, the same build without it, before giving up
    # OpenMP
    calls = _record_loads(monkeypatch, fails=lambda cflags: any(a.startswith("-flto") for a in cflags))
    monkeypatch.setattr(_cpp, "_is_gcc", lambda banner=None: True)
    monkeypatch.setattr(_cpp, "_cpu_has", lambda flag: False)
    monkeypatch.setattr(_cpp, "_lto_flag", lambda: "-flto=3")
    monkeypatch.setattr(_cpp, "_built_before", lambda name, beside: False)
    for links in (False, True):  # a linker without LTO; or LTO failing on this source alone (memory, ...)
        monkeypatch.setattr(_cpp, "_lto_links", lambda: links)
        calls.clear()
        assert _cpp._build() == ("module", {"isa": _cpp._capability(), "openmp": True, "lto": False})
        assert len(calls) == 2
        (name1, cflags1, ldflags1), (name2, cflags2, ldflags2) = calls
        assert name1.endswith("_omp") and name2 == name1 + "_nolto"  # a build directory of its own
        assert "-flto=3" in cflags1 and ldflags1 == ["-fopenmp", "-flto=3"]
        assert cflags2 == [f for f in cflags1 if f != "-flto=3"] and ldflags2 == ["-fopenmp"]


def _avx512_bf16_cpu_with_gcc(monkeypatch, lto_links, built_before=lambda name, beside: False):
    """An AVX-512 CPU with AVX512-BF16 and GCC (four variants, each with and without LTO);
    ``_lto_links`` answers ``lto_links``, counting its calls in the returned list."""
    asked = []

    def links():
        asked.append(True)
        return lto_links

    monkeypatch.setattr(_cpp, "_capability", lambda: "AVX512")
    monkeypatch.setattr(_cpp, "_cpu_has", lambda flag: flag == "avx512_bf16")
    monkeypatch.setattr(_cpp, "_is_gcc", lambda banner=None: True)
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    monkeypatch.setattr(_cpp, "_lto_links", links)
    monkeypatch.setattr(_cpp, "_built_before", built_before)
    return asked


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenMP build attempt is Linux-only")
def test_failures_of_another_cause_are_not_retried_without_lto(monkeypatch):
    # a compiler without AVX512-BF16 or OpenMP, whose LTO links: each LTO build fails for
    # those flags; the first one's twin without LTO is tried (LTO could have failed on this
    # source alone) and fails the same way, so no later twin is (4 + 1 builds, not 8)
    calls = _record_loads(monkeypatch, fails=lambda cflags: "-mavx512bf16" in cflags or "-fopenmp" in cflags)
    asked = _avx512_bf16_cpu_with_gcc(monkeypatch, lto_links=True)
    assert _cpp._build() == ("module", {"isa": "AVX512", "openmp": False, "lto": True})
    assert [n for n, _, _ in calls] == ["spatialattn_sam_cpu_avx512_bf16_omp", "spatialattn_sam_cpu_avx512_bf16_omp_nolto",
                                        "spatialattn_sam_cpu_avx512_bf16", "spatialattn_sam_cpu_avx512_omp",
                                        "spatialattn_sam_cpu_avx512"]
    assert len(asked) == 1  # asked once, after the first LTO build failed
    assert all(any(a.startswith("-flto") for a in f) != n.endswith("_nolto") for n, f, _ in calls)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenMP build attempt is Linux-only")
def test_without_lto_everywhere_once_lto_cannot_link(monkeypatch):
    # a linker without GCC's LTO plugin (and a compiler without AVX512-BF16): after the first
    # LTO build failed and the probe could not link either, every later build goes without LTO
    calls = _record_loads(monkeypatch, fails=lambda cflags: "-mavx512bf16" in cflags
                          or any(a.startswith("-flto") for a in cflags))
    asked = _avx512_bf16_cpu_with_gcc(monkeypatch, lto_links=False)
    assert _cpp._build() == ("module", {"isa": "AVX512", "openmp": True, "lto": False})
    assert [n for n, _, _ in calls] == ["spatialattn_sam_cpu_avx512_bf16_omp", "spatialattn_sam_cpu_avx512_bf16_omp_nolto",
                                        "spatialattn_sam_cpu_avx512_bf16_nolto", "spatialattn_sam_cpu_avx512_omp_nolto"]
    assert len(asked) == 1


@pytest.mark.parametrize("links", [False, True])
def test_an_earlier_build_without_lto_asks_first(monkeypatch, links):
    # where an earlier process built the extension without LTO (its LTO build had failed), a
    # new process asks whether LTO links before building with it: where it does not, the
    # cached build without it loads at once instead of after a failing LTO build every time
    calls = _record_loads(monkeypatch)
    asked = _avx512_bf16_cpu_with_gcc(monkeypatch, lto_links=links,
                                      built_before=lambda name, beside: name == "spatialattn_sam_cpu_avx512_bf16_omp_nolto")
    assert _cpp._build() == ("module", {"isa": "AVX512_BF16", "openmp": True, "lto": links})
    assert [n for n, _, _ in calls] == ["spatialattn_sam_cpu_avx512_bf16_omp" + ("" if links else "_nolto")]
    assert len(asked) == 1


def test_built_before_looks_in_the_extensions_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert not _cpp._built_before("ext_nolto", beside="ext")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext"]  # (cpp_extension creates that one anyway)
    (tmp_path / "ext_nolto").mkdir()
    assert not _cpp._built_before("ext_nolto", beside="ext")  # a directory without a built library
    (tmp_path / "ext_nolto" / "ext_nolto.so").write_bytes(b"")
    assert _cpp._built_before("ext_nolto", beside="ext")


@pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")
def test_lto_probe(monkeypatch, tmp_path):
    # the real compiler: GCC links with -flto here; a compiler that fails or is missing: False
    monkeypatch.delenv("CXX", raising=False)
    if _cpp._is_gcc():
        assert _cpp._lto_links() is True
    fake = tmp_path / "fake-c++"
    fake.write_text("#!/bin/sh\necho 'lto-wrapper: fatal error' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    assert _cpp._lto_links() is False
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert _cpp._lto_links() is False


def test_lto_jobs_are_the_usable_cores(monkeypatch):
    monkeypatch.setattr(_cpp.os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    assert _cpp._lto_flag() == "-flto=3"
    monkeypatch.setattr(_cpp.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert _cpp._lto_flag() == f"-flto={_cpp._LTO_MAX_JOBS}" == "-flto=8"  # (memory: about 150 MB a job)

    def no_affinity(pid):
        raise AttributeError

    monkeypatch.setattr(_cpp.os, "sched_getaffinity", no_affinity, raising=False)
    monkeypatch.setattr(_cpp.os, "cpu_count", lambda: 4)
    assert _cpp._lto_flag() == "-flto=4"
    monkeypatch.setattr(_cpp.os, "cpu_count", lambda: None)
    assert _cpp._lto_flag() == "-flto=1"


@pytest.mark.parametrize("banner, gcc", [("c++ (Debian 12.2.0-14) 12.2.0\nCopyright (C) 2022 Free Software Foundation", True),
                                         ("g++ (GCC) 13.1.1", True),
                                         ("Debian clang version 14.0.6\nTarget: x86_64-pc-linux-gnu", False),
                                         ("Apple clang version 15.0.0 (clang-1500.0.40.1)", False),
                                         ("clang version 16.0.6\nInstalledDir: /opt/gcc-13/bin", False)])
def test_compiler_is_told_apart_by_its_banner(monkeypatch, tmp_path, banner, gcc):
    fake = tmp_path / "fake-c++"
    fake.write_text(f"#!/bin/sh\nprintf '{banner}\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    assert _cpp._is_gcc() is gcc
    monkeypatch.setenv("CXX", f"env {fake}")  # a command with arguments, as ninja runs it
    assert _cpp._is_gcc() is gcc
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert _cpp._is_gcc() is False


def test_build_error_propagates_after_all_attempts(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # (_built_before asks for build directories)

    def fake_load(**kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: fake_load(**k))
    monkeypatch.setattr(_cpp, "_lto_links", lambda: False)
    with pytest.raises(RuntimeError, match="no compiler"):
        _cpp._build()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenMP build attempt is Linux-only")
def test_avx512_bf16_build_first_then_plain_avx512(monkeypatch):
    # on an AVX-512 CPU with AVX512-BF16 the bfloat16 kernels use the hardware rounding: a
    # build of its own, named for it; if the compiler cannot build it, the plain AVX-512 one
    calls = _record_loads(monkeypatch, fails=lambda cflags: "-mavx512bf16" in cflags)  # a compiler without it
    monkeypatch.setattr(_cpp, "_capability", lambda: "AVX512")
    monkeypatch.setattr(_cpp, "_cpu_has", lambda flag: flag == "avx512_bf16")
    monkeypatch.setattr(_cpp, "_is_gcc", lambda banner=None: False)  # one build per variant (no LTO attempt)
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert _cpp._build() == ("module", {"isa": "AVX512", "openmp": True, "lto": False})
    names = [n for n, _, _ in calls]
    assert names == ["spatialattn_sam_cpu_avx512_bf16_omp", "spatialattn_sam_cpu_avx512_bf16",
                     "spatialattn_sam_cpu_avx512_omp"]
    assert all("-mavx512f" in f for _, f, _ in calls) and "-mavx512bf16" not in calls[-1][1]
    calls.clear()
    monkeypatch.setattr(_cpp, "_cpu_has", lambda flag: False)  # an AVX-512 CPU without it
    _cpp._build()
    assert [n for n, _, _ in calls] == ["spatialattn_sam_cpu_avx512_omp"]


def _syntax_check(compiler: str, flags: list[str]) -> subprocess.Popen:
    """A syntax-only run of ``compiler`` over the extension's source (parsing and template
    instantiation, no code generation), with the build's standard and defines and ``flags``."""
    include = []
    for path in cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]:
        include += ["-isystem", path]
    cmd = [compiler, "-std=c++20", "-fsyntax-only", "-fopenmp", "-DTORCH_EXTENSION_NAME=spatialattn_syntax_check",
           "-DTORCH_API_INCLUDE_EXTENSION_H", "-ffp-contract=off"] + include + flags + [str(_cpp._SRC)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _errors(proc: subprocess.Popen) -> str:
    _, err = proc.communicate(timeout=600)
    return "" if proc.returncode == 0 else "\n".join(line for line in err.splitlines() if "error" in line)[:2000]


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("c++") is None,
                    reason="the ISA variants are x86-64 builds; needs a C++ compiler")
def test_every_isa_variant_compiles():
    # The extension is built for the CPU it runs on (AVX-512, AVX2 or baseline), so a test
    # run builds one variant; code inside #if __AVX512F__ used from outside it breaks only the
    # others (as it once did: the AVX2 and baseline builds then fell back to PyTorch). Each
    # variant's source is compiled here with -fsyntax-only.
    procs = {cap: _syntax_check("c++", flags) for cap, flags in {"DEFAULT": [], **_cpp._ISA_FLAGS}.items()}
    errors = {cap: _errors(proc) for cap, proc in procs.items()}
    assert not any(errors.values()), errors


_AARCH64_CXX = "aarch64-linux-gnu-g++"


@pytest.mark.skipif(shutil.which(_AARCH64_CXX) is None,
                    reason=f"needs the cross compiler {_AARCH64_CXX} (Debian: apt install g++-aarch64-linux-gnu)")
def test_generic_code_compiles_for_aarch64():
    """On ARM (Graviton, Ampere, Apple silicon under Linux) the extension is the generic build,
    GCC's vector extensions and no x86 intrinsics. The x86 variants above cannot show an x86
    intrinsic used outside its #if: torch's headers include <x86intrin.h> on x86 (for __rdtsc),
    declaring every intrinsic whatever the target flags. A cross compiler's syntax-only run can
    (checked: an unguarded _mm_sfence fails it). Torch's headers are the host's copies: the same
    files as on ARM, taking their own #if branches for the target."""
    err = _errors(_syntax_check(_AARCH64_CXX, []))
    assert not err, err


# C++20 constructs the compilers of torch's C++17 releases reject. cpp_extension compiled
# extensions as C++17 until torch moved to C++20 in 2026, and our torch>=2.8 includes those
# releases: there, one requires-clause made the whole build fail (found with torch 2.9.1, the
# extension then silently the PyTorch fallback). The headers of the torch installed here need
# C++20, so no syntax-only C++17 run is possible with them; the source is searched instead.
_CXX20_ONLY = {
    "requires-clause or expression": r"\brequires\b",
    "concept": r"\bconcept\b",
    "three-way comparison": r"<=>",
    "consteval / constinit": r"\bconst(eval|init)\b",
    "coroutine": r"\bco_(await|yield|return)\b",
    "char8_t": r"\bchar8_t\b",
    "C++20 header": r"#\s*include\s*<(bit|span|concepts|ranges|numbers|compare|format|source_location|version)>",
    "C++20 library call": r"\bstd::(span|bit_cast|popcount|countl_zero|countr_zero|has_single_bit|bit_width|"
                          r"remove_cvref|type_identity|is_constant_evaluated|ssize|midpoint|lerp|to_array|"
                          r"assume_aligned|unreachable)\b",
    "starts_with / ends_with / contains": r"\.(starts_with|ends_with|contains)\s*\(",
    "[[likely]] / [[unlikely]] / [[no_unique_address]]": r"\[\[\s*(likely|unlikely|no_unique_address)\s*\]\]",
    "using enum": r"\busing\s+enum\b",
    "template lambda": r"\]\s*<\s*(typename|class|int|auto)\b",
    "designated initialiser": r"[{,]\s*\.[A-Za-z_]\w*\s*=",
}


def _cxx20_constructs(text: str) -> list[str]:
    """``line: what`` for each C++20-only construct in C++ source ``text`` (comments and string
    literals left out)."""
    import re

    code = re.sub(r"//[^\n]*|/\*.*?\*/|\"(?:\\.|[^\"\\\n])*\"",
                  lambda m: re.sub(r"[^\n]", " ", m.group()), text, flags=re.S)
    found = []
    for what, pattern in _CXX20_ONLY.items():
        for m in re.finditer(pattern, code):
            found.append(f"{code.count(chr(10), 0, m.start()) + 1}: {what}")
    return found


def test_the_source_is_cxx17():
    parts = [_cpp._SRC] + sorted(_cpp._PARTS.glob("*.h"))
    found = {p.name: _cxx20_constructs(p.read_text()) for p in parts}
    assert not any(found.values()), {name: hits for name, hits in found.items() if hits}


@pytest.mark.parametrize("snippet, what", [
    ("template <typename T>\n  requires std::is_floating_point_v<T>\ninline T f(T v);", "requires-clause or expression"),
    ("auto c = a <=> b;", "three-way comparison"),
    ("if (name.starts_with(\"x\")) {}", "starts_with / ends_with / contains"),
    ("Opts o{.rows = 2, .cols = 3};", "designated initialiser"),
    ("auto f = []<typename T>(T v) { return v; };", "template lambda"),
    ("#include <bit>", "C++20 header"),
])
def test_the_cxx17_search_finds_cxx20(snippet, what):
    hits = _cxx20_constructs("int x;\n" + snippet)
    assert hits and all(hit.endswith(f": {what}") for hit in hits) and hits[0].startswith(("2: ", "3: "))
    assert _cxx20_constructs("int x; // " + snippet.replace("\n", " ")) == []  # in a comment: not code


def test_compiler_asked_for_its_version_once(monkeypatch):
    # `spatialattn kernels` forgets a failed build's record, then builds: both key on the
    # compiler's --version banner, which one process now asks for once per compiler and PATH
    calls = []
    real = _cpp.subprocess.run

    def counting(cmd, *a, **k):
        calls.append(cmd)
        return real(cmd, *a, **k)

    monkeypatch.setattr(_cpp, "_BANNERS", {})
    monkeypatch.setattr(_cpp.subprocess, "run", counting)
    first = _cpp._compiler_banner()
    assert _cpp._compiler_banner() == first and len(calls) == 1
    monkeypatch.setenv("PATH", os.environ.get("PATH", "") + os.pathsep + "/nonexistent")
    _cpp._compiler_banner()  # another PATH: asked again
    assert len(calls) == 2
