"""Build (once, cached) and load the fused CPU kernels in ``csrc/sam_cpu.cpp``.

The extension is compiled by :func:`torch.utils.cpp_extension.load` on first
use and cached in torch's extensions directory (``TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``). Instruction-set flags follow the CPU
capability that torch itself detected at run time (AVX-512 / AVX2 / baseline; AVX-512
builds add AVX512-BF16 where the CPU has it), and that capability is part of the
extension's name, so a cache shared between different machines never hands one of
them code it cannot run.

If anything goes wrong (no compiler, no ninja, a build error) :func:`get` returns
``None``, the callers use the plain PyTorch path, and the reason is logged once
at DEBUG level on the ``"spatialattn"`` logger. ``SPATIALATTN_DISABLE_CPP=1``
forces that fallback.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

log = logging.getLogger("spatialattn")

_SRC = Path(__file__).with_name("csrc") / "sam_cpu.cpp"
_PARTS = _SRC.with_suffix("")  # csrc/sam_cpu/*.h: the parts sam_cpu.cpp includes
_lock = threading.Lock()
_module: Any = None
_tried = False
_error: Optional[str] = None  # why the last get() returned None ("Type: message")
_built: Any = None  # the loaded extension, kept across reset() (loading twice would rebuild it)
_built_with: dict = {}  # how _build built it: {"isa": ..., "openmp": bool, "lto": bool}

_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mprefer-vector-width=512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}


# GCC's -O3 without loop unswitching and IPA clones: the kernels are already specialised by
# template flags (layout, dtype, which poolings, ...), and these two passes copied their loops
# and functions once more per run-time condition and constant argument. Without them the
# extension compiles in 0.76x the time (GCC 12, Zen 4 VM: 195 -> 148 s of one core) and runs
# as fast (paired, docs/performance-log.md). GCC's own pass flags: given to GCC only.
_GCC_ONLY_FLAGS = ["-fno-unswitch-loops", "-fno-ipa-cp-clone"]


# Parallel code-generation jobs of the LTO link at most: each holds up to about 150 MB (GCC 12),
# and past a few jobs the serial compile step (about 26 s) is most of the build anyway.
_LTO_MAX_JOBS = 8


def _lto_flag() -> str:
    """GCC's link-time optimisation with its code generation in as many parallel jobs as this
    process may use cores (at most ``_LTO_MAX_JOBS``): the source is one translation unit, and
    code generation is most of its compile time. The compile step then only parses and streams
    the code (about 26 s) and the link step generates it in partitions, in parallel (2 cores:
    142 -> 80 s in all; one core: 133 s). Same bits and speed (paired,
    docs/performance-log.md). ``-flto=N`` rather than ``-flto=auto``, which needs GCC 10."""
    try:
        jobs = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        jobs = os.cpu_count() or 1
    return f"-flto={min(max(1, jobs), _LTO_MAX_JOBS)}"


def _cxx() -> List[str]:
    """The C++ compiler command ``cpp_extension`` runs: ``$CXX`` (a command, maybe with
    arguments), else ``c++``."""
    return shlex.split(os.environ.get("CXX", "c++"))


def _lto_links() -> bool:
    """True if the C++ compiler links a tiny shared library with :func:`_lto_flag` (as
    ``cpp_extension`` links the extension: ``-fPIC -shared``). Asked only after a build with
    link-time optimisation failed, to tell a toolchain without it (e.g. a linker without GCC's
    LTO plugin: every later build goes without) from a failure of another cause (an unknown
    flag, a compile error, which the build without LTO would meet too; see :func:`_build`)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="spatialattn_lto_") as tmp:
        src, lib = Path(tmp) / "probe.cpp", Path(tmp) / "probe.so"
        src.write_text("int spatialattn_lto_probe(int v) { return v + 1; }\n")
        try:
            done = subprocess.run(_cxx() + ["-O2", "-fPIC", "-shared", _lto_flag(), str(src), "-o", str(lib)],
                                  capture_output=True, timeout=120)
            links = done.returncode == 0 and lib.exists()
        except (OSError, ValueError, subprocess.SubprocessError):
            links = False
    log.debug("spatialattn: link-time optimisation %s here", "links" if links else "does not link")
    return links


def _built_before(name: str, beside: str) -> bool:
    """True if ``cpp_extension``'s build directory holds a built library of extension ``name``
    (up to date or not); False where that cannot be told. ``beside``: the extension about to be
    built, whose directory ``cpp_extension`` creates anyway (asking for ``name``'s own would
    create that one)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        folder = Path(_get_build_directory(beside, verbose=False)).parent / name
    except Exception:  # a private function: gone or changed
        return False
    return (folder / f"{name}.so").exists() or (folder / f"{name}.pyd").exists()


def _ninja_dir() -> Optional[str]:
    """The folder of a ``ninja`` that ``cpp_extension`` can run, where none is on ``PATH``: the
    folder of this Python's executable (a virtual environment's ``bin``, where pip installs the
    ``ninja`` package's command, a dependency of ours), else the ``ninja`` package's own. None
    where there is none. (``cpp_extension`` runs plain ``ninja``, so a virtual environment's
    Python run without activating it, as IDEs, services and ``venv/bin/python script.py``
    do, fell back to the PyTorch ops though ninja was installed.)"""
    folders = [os.path.dirname(sys.executable)]  # not resolved: a venv's python links elsewhere
    try:
        import ninja

        folders.append(str(getattr(ninja, "BIN_DIR", "")))
    except Exception:  # not installed, or broken
        pass
    for folder in folders:
        if folder and shutil.which("ninja", path=folder):
            return folder
    return None


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[bool]:
    """Within the block, ``ninja`` is on ``PATH`` where it can be: ``PATH`` as it is where it
    holds one, else with :func:`_ninja_dir` put first for the block only (other code of the
    process, a user's own extensions, sees its ``PATH`` unchanged). Yields whether ``ninja`` can
    be run."""
    on_path = shutil.which("ninja") is not None
    folder = None if on_path else _ninja_dir()
    if folder is None:
        yield on_path
        return
    before = os.environ.get("PATH")
    os.environ["PATH"] = folder + (os.pathsep + before if before else "")
    try:
        yield True
    finally:
        if before is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = before


_BANNERS: dict = {}  # (compiler command, PATH) -> its --version output, asked once a process


def _compiler_banner() -> Optional[str]:
    """The ``--version`` output of the C++ compiler ``cpp_extension`` runs (``$CXX``, else
    ``c++``); None where it cannot be run. Asked once per process for each command and PATH
    (``spatialattn kernels`` needed it twice: forgetting a failed build, then building)."""
    key = (tuple(_cxx()), os.environ.get("PATH"))
    if key not in _BANNERS:
        try:
            _BANNERS[key] = subprocess.run(list(key[0]) + ["--version"], capture_output=True, text=True,
                                           timeout=60).stdout
        except (OSError, ValueError, subprocess.SubprocessError):
            _BANNERS[key] = None
    return _BANNERS[key]


def _is_gcc(banner: Optional[str] = None) -> bool:
    """True if the C++ compiler ``cpp_extension`` runs is GCC, by its ``--version`` banner
    (``c++`` is often GCC under another name); ``banner``: that output where already taken."""
    banner = (_compiler_banner() if banner is None else banner) or ""
    banner = banner.lower()
    return "clang" not in banner and any(s in banner for s in ("gcc", "g++", "free software foundation"))


# A build where every variant failed is recorded (the error, the time) in the extensions
# directory under a key of everything the build depends on (the sources, torch, Python, the CPU
# capability, the compiler and its version), and new processes do not build it again for
# _RETRY_AFTER_S: a compiler that fails on the source can take minutes to fail all variants
# (measured: 370 s, five attempts of 70-80 s, for GCC 12 held to C++14), which every new process
# paid before falling back. An edit of the source or a new compiler is another key (built at
# once); `spatialattn kernels` forgets the record and builds. _RECORD_DIR: where the records
# go (None: the extensions directory; the tests point it elsewhere).
_RETRY_AFTER_S = 3600.0
_RECORD_DIR: Optional[str] = None


def _build_key(banner: Optional[str]) -> str:
    import hashlib
    import platform

    import torch

    h = hashlib.sha1()
    for item in (_SRC.read_bytes(), _parts_hash().encode(), torch.__version__.encode(), sys.version.encode(),
                 _capability().encode(), platform.machine().encode(), " ".join(_cxx()).encode(),
                 (banner or "").encode()):
        h.update(item)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _failure_record(banner: Optional[str]) -> Optional[Path]:
    """The file recording a failed build of this key (it may not exist); None where no
    directory for it can be found."""
    try:
        from torch.utils.cpp_extension import get_default_build_root

        root = _RECORD_DIR or os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
        return Path(root) / f"spatialattn_build_failed.{_build_key(banner)}.json"
    except Exception:
        return None


def _recent_failure(record: Optional[Path]) -> Optional[str]:
    """Why the build is not tried again (a message with the recorded error), where ``record``
    holds a failure less than ``_RETRY_AFTER_S`` old; else None."""
    import json
    import time

    if record is None:
        return None
    try:
        data = json.loads(record.read_text())
        age = time.time() - float(data["time"])
        error = str(data["error"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not 0 <= age < _RETRY_AFTER_S:
        return None
    return (f"not built: the same build failed {age / 60:.0f} min ago and is retried after "
            f"{_RETRY_AFTER_S / 60:.0f} min, or at once by `spatialattn kernels` (record: {record}). "
            f"The error then: {error}")


def _record_failure(record: Optional[Path], error: str) -> None:
    """Write the record of a failed build (atomically; nothing where it cannot be written)."""
    import json
    import tempfile
    import time

    if record is None:
        return
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=record.parent, prefix=record.name, suffix=".tmp",
                                         delete=False) as fh:
            json.dump({"time": time.time(), "error": error[-20000:]}, fh)
        os.replace(fh.name, record)
    except OSError as exc:
        log.debug("spatialattn: could not record the failed build (%s)", exc)


def _remove_record(record: Optional[Path]) -> None:
    """Remove a failed build's record where there is one (nothing where it cannot be removed)."""
    if record is not None:
        try:
            record.unlink(missing_ok=True)
        except OSError as exc:
            log.debug("spatialattn: could not remove the failed build's record (%s)", exc)


def forget_failure() -> None:
    """Remove the record of a failed build of this key (the next :func:`get` in any process
    builds again)."""
    _remove_record(_failure_record(_compiler_banner()))


def disabled() -> bool:
    """True when ``SPATIALATTN_DISABLE_CPP`` is set to a true value."""
    return os.environ.get("SPATIALATTN_DISABLE_CPP", "").strip().lower() not in ("", "0", "false", "no")


def _cpu_has(flag: str) -> bool:
    """True if Linux's ``/proc/cpuinfo`` lists ``flag`` for this CPU (False elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return flag in line.split(":", 1)[1].split()
    except OSError:
        pass
    return False


def _capability() -> str:
    try:
        import torch

        cap = str(torch.backends.cpu.get_cpu_capability()).upper()
    except Exception:  # pragma: no cover - very old torch
        cap = "DEFAULT"
    return cap if cap in _ISA_FLAGS else "DEFAULT"


@functools.lru_cache(maxsize=1)
def _parts_hash() -> str:
    """A hash of the headers ``sam_cpu.cpp`` includes. ``cpp_extension.load`` decides whether to
    rebuild from the listed sources and the build flags only: with this hash among the flags,
    an edit of any part rebuilds the extension too. Once per process (the build's flags and
    the failure record's key both ask)."""
    import hashlib

    h = hashlib.sha1()
    for part in sorted(_PARTS.glob("*.h")):
        h.update(part.name.encode())
        h.update(part.read_bytes())
    return h.hexdigest()[:16]


def _build(banner: Optional[str] = None) -> Tuple[Any, dict]:
    """Build (or load from the cache) the extension: ``(module, {"isa", "openmp", "lto"})``, how
    it was built; raises the last build error where every variant failed. ``banner``: the
    compiler's ``--version`` output where already taken."""
    import platform

    from torch.utils import cpp_extension

    cap = _capability()
    # -ffp-contract=off: every rounding happens where the source writes it (no fused
    # multiply-adds chosen per inlining site), so the float16 / bfloat16 kernels give
    # exactly the float32 results rounded once, and results do not depend on how the
    # compiler inlined a kernel (measured: timings within noise of the contracted build)
    flags = ["-O3", "-ffp-contract=off", f"-DSPATIALATTN_PARTS_HASH={_parts_hash()}"]
    ltos: List[Tuple[List[str], str]] = [([], "")]
    if _is_gcc(banner):
        flags += _GCC_ONLY_FLAGS
        # with link-time optimisation first; without it where LTO cannot link here (e.g. a linker
        # without GCC's LTO plugin: _lto_links, asked once the first LTO build fails), named
        # apart: in one build directory the two would overwrite each other's object, and every
        # new process would compile both again. Where LTO links, a failed LTO build's twin without
        # it is tried once (in case LTO itself failed on this source: memory, a compiler fault);
        # after that twin failed too, the cause is another (an unknown flag, a compile error),
        # which a build without LTO would meet the same way, and later twins are not tried.
        ltos = [([_lto_flag()], ""), ([], "_nolto")]
    variants = [(cap, [])]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags += _ISA_FLAGS.get(cap, [])
        if cap == "AVX512" and _cpu_has("avx512_bf16"):
            # hardware float32 -> bfloat16 rounding for the bfloat16 kernels: a build of its
            # own (not every AVX-512 CPU has the instruction), tried first
            variants.insert(0, ("AVX512_BF16", ["-mavx512bf16"]))
    # ATen's parallel_for is an inline template: without -fopenmp its pragmas are
    # ignored and every kernel runs on one thread. On Linux the extension then links
    # libgomp.so.1, which resolves to the copy torch has already loaded (one OpenMP
    # pool, shared thread count). Where OpenMP cannot be compiled, build without it.
    omps = [(["-fopenmp"], "_omp"), ([], "")] if sys.platform.startswith("linux") else [([], "")]
    error: Optional[BaseException] = None
    lto_ok: Optional[bool] = None  # whether LTO links here: asked (_lto_links) after the first LTO build fails
    twin_tried = False  # a build without LTO tried after an LTO build failed where LTO links
    for vcap, vflags in variants:
        for omp, suffix in omps:
            for lto, lto_suffix in ltos:
                ext_name = f"spatialattn_sam_cpu_{vcap.lower()}{suffix}{lto_suffix}"
                if lto and lto_ok is None and _built_before(f"spatialattn_sam_cpu_{vcap.lower()}{suffix}_nolto", ext_name):
                    # an earlier process built this one without LTO (its LTO build failed): ask
                    # first, instead of failing that build again in every new process
                    lto_ok = _lto_links()
                if lto and lto_ok is False:
                    continue  # LTO cannot link here
                if not lto and lto_ok is True:
                    if twin_tried:
                        continue  # LTO links here, and the LTO build failed for another reason
                    twin_tried = True
                try:
                    module = cpp_extension.load(
                        name=ext_name,
                        sources=[str(_SRC)],
                        extra_cflags=flags + vflags + omp + lto,
                        extra_ldflags=omp + lto,
                        verbose=False,
                    )
                except Exception as exc:  # e.g. a compiler without OpenMP or AVX512-BF16: try the next
                    error = exc
                    log.debug("spatialattn: building %s failed (%s: %s)", ext_name, type(exc).__name__, exc)
                    if lto and lto_ok is None:
                        lto_ok = _lto_links()
                    continue
                return module, {"isa": vcap, "openmp": bool(omp), "lto": bool(lto)}
    assert error is not None
    raise error


def _build_unless_failed_recently() -> Tuple[Any, dict, Optional[str]]:
    """``(module, how it was built, None)`` from :func:`_build`, or ``(None, {}, why not)`` where
    the same build failed less than ``_RETRY_AFTER_S`` ago (not tried) or fails now (recorded)."""
    banner = _compiler_banner()
    record = _failure_record(banner)
    error = _recent_failure(record)
    if error is not None:
        return None, {}, error
    try:
        module, how = _build(banner)
    except Exception as exc:  # no compiler, build error, ...
        error = f"{type(exc).__name__}: {exc}"
        _record_failure(record, error)
        return None, {}, error
    _remove_record(record)  # (a failure older than the retry time)
    return module, how, None


def get() -> Optional[Any]:
    """The compiled extension module, or ``None`` when it is disabled or cannot be built."""
    global _module, _tried, _built, _built_with, _error
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        _module, _error = None, None
        if disabled():
            _error = "disabled by SPATIALATTN_DISABLE_CPP"
        else:
            if _built is None:
                with _ninja_on_path() as has_ninja:
                    if has_ninja:
                        _built, _built_with, _error = _build_unless_failed_recently()
                    else:
                        # not recorded as a failed build: nothing was compiled (torch fails at
                        # once without ninja), and the record's key would not change when ninja
                        # is installed, so the build would wait for the retry time
                        _error = ("RuntimeError: ninja, which torch's cpp_extension builds with, is not "
                                  "on PATH or beside this Python (pip install ninja)")
            _module = _built
        if _error is not None:
            log.debug("spatialattn: C++ CPU kernels unavailable (%s); using PyTorch ops", _error)
        _tried = True
    return _module


def describe() -> dict:
    """The extension :func:`get` loads (building it if needed): ``{"available", "name", "path",
    "isa", "openmp", "lto", "error"}``; ``isa``: the instruction set it was compiled for
    (``AVX512_BF16``, ``AVX512``, ``AVX2``, ``DEFAULT``), ``openmp`` / ``lto``: whether it was
    built with OpenMP (else its kernels run on one thread) and GCC's link-time optimisation;
    ``error`` says why it is not available (disabled, the build error)."""
    module = get()
    on = module is not None
    return {"available": on, "name": getattr(module, "__name__", None), "path": getattr(module, "__file__", None),
            "isa": _built_with.get("isa") if on else None, "openmp": on and _built_with.get("openmp", False),
            "lto": on and _built_with.get("lto", False), "error": _error}


def reset() -> None:
    """Forget the cached load result (tests toggle ``SPATIALATTN_DISABLE_CPP``)."""
    global _module, _tried, _error
    with _lock:
        _module = None
        _tried = False
        _error = None
