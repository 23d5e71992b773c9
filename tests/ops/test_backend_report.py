"""ops.backend_report and the ``spatialattn kernels`` command that prints it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spatialattn import ops
from spatialattn.cli import main
from spatialattn.ops import _cpp

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@pytest.fixture
def cpp_reloaded_after():
    """Tests that change how the C++ kernels load: the next get() after them loads them again."""
    yield
    _cpp.reset()


def test_report_matches_the_dispatch():
    report = ops.backend_report()
    module = _cpp.get()
    assert report["torch"] == torch.__version__ and report["threads"] == torch.get_num_threads()
    assert report["backends"]["cpu"] == {str(d).replace("torch.", ""): ops.backend(torch.ones(1, 1, 1, 1, dtype=d))
                                         for d in DTYPES}
    cpp = report["cpp"]
    assert cpp["available"] is (module is not None)
    assert set(report["backends"]["cpu"].values()) == ({"cpp"} if module is not None else {"torch"})
    if module is not None:
        assert cpp["name"] == module.__name__ and cpp["path"] == module.__file__ and cpp["error"] is None
        # the build's name says what it was built with (_cpp._build: ISA, then _omp, then _nolto)
        assert cpp["name"].startswith(f"spatialattn_sam_cpu_{cpp['isa'].lower()}")
        assert cpp["openmp"] is ("_omp" in cpp["name"]) and cpp["lto"] is (_cpp._is_gcc() and "_nolto" not in cpp["name"])
    else:
        assert cpp["error"] and cpp["isa"] is None and not cpp["openmp"]  # the reason is reported, not only logged
    assert list(report["backends"]) == ["cpu"] + [f"cuda:{i}" for i in range(len(report["cuda_devices"]))]
    assert len(report["cuda_devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_disabled_kernels_are_reported(monkeypatch, capsys, cpp_reloaded_after):
    monkeypatch.setenv("SPATIALATTN_DISABLE_CPP", "1")
    _cpp.reset()
    report = ops.backend_report()
    assert report["cpp"]["available"] is False and "SPATIALATTN_DISABLE_CPP" in report["cpp"]["error"]
    assert set(report["backends"]["cpu"].values()) == {"torch"}
    assert main(["kernels"]) == 0
    assert main(["kernels", "--require", "cpp"]) == 1
    out, err = capsys.readouterr()
    assert "C++ CPU kernels: not used (PyTorch ops instead): disabled by SPATIALATTN_DISABLE_CPP" in out
    assert "cpu     float32 torch, float64 torch, float16 torch, bfloat16 torch" in out
    assert "error: required C++ CPU kernels are not usable here" in err


def test_build_error_is_shown(monkeypatch, capsys, cpp_reloaded_after):
    # a build that fails: the compiler's message in the report and, cut to its first lines, in the command's output
    message = "Error building extension 'spatialattn_sam_cpu_avx2_omp':\n" + "\n".join(f"line {i}" for i in range(1, 60))

    def failing_build(banner=None):
        raise RuntimeError(message)

    monkeypatch.delenv("SPATIALATTN_DISABLE_CPP", raising=False)
    monkeypatch.setattr(_cpp, "_built", None)
    monkeypatch.setattr(_cpp, "_build", failing_build)
    _cpp.reset()
    assert ops.backend_report()["cpp"]["error"] == f"RuntimeError: {message}"
    assert main(["kernels", "--require", "cpp"]) == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    first = lines.index("C++ CPU kernels: not used (PyTorch ops instead): RuntimeError: Error building extension "
                        "'spatialattn_sam_cpu_avx2_omp':")
    assert lines[first + 1:first + 40] == [f"  line {i}" for i in range(1, 40)]
    assert lines[first + 40] == "  ... (20 more lines)"
    assert "error: required C++ CPU kernels are not usable here" in err


def test_json_report(capsys):
    assert main(["kernels", "--json"]) == 0
    out, err = capsys.readouterr()
    printed = json.loads(out)  # stdout is the JSON alone
    expected = ops.backend_report()
    printed["cpp"].pop("seconds"), expected["cpp"].pop("seconds")
    assert printed == expected and err == ""


def test_require(capsys):
    has_cpp = _cpp.get() is not None
    assert main(["kernels", "--require", "cpp"]) == (0 if has_cpp else 1)
    has_triton = any("triton" in t.values() for t in ops.backend_report()["backends"].values())
    assert main(["kernels", "--require", "cpp", "triton"]) == (0 if has_cpp and has_triton else 1)
    out, err = capsys.readouterr()
    assert ("error: required Triton (CUDA) kernels are not usable here" in err) is not has_triton
    assert "implementation per device and dtype:" in out
    if has_cpp:  # how they were built, and where
        cpp = ops.backend_report()["cpp"]
        line = f"C++ CPU kernels: {cpp['isa']}, {'OpenMP' if cpp['openmp'] else 'without OpenMP (one thread)'}"
        assert line + (", LTO" if cpp["lto"] else "") + " (loaded in " in out and f"\n  {cpp['path']}\n" in out


@pytest.mark.parametrize("seconds", [0.0, 0.5])
def test_a_build_is_announced_only_where_loading_takes_a_while(monkeypatch, capsys, cpp_reloaded_after, seconds):
    # `spatialattn kernels` says the kernels are being compiled (minutes) when loading them takes
    # longer than a cached build's load; a cached build is loaded without that notice
    import time

    from spatialattn.commands import kernels

    def slow_build(banner=None):
        time.sleep(seconds)
        return "module", {"isa": "AVX2", "openmp": True, "lto": True}

    monkeypatch.delenv("SPATIALATTN_DISABLE_CPP", raising=False)
    monkeypatch.setattr(_cpp, "_built", None)
    monkeypatch.setattr(_cpp, "_build", slow_build)
    monkeypatch.setattr(kernels, "_NOTICE_AFTER_S", 0.2)
    _cpp.reset()
    assert main(["kernels"]) == 0
    out, err = capsys.readouterr()
    assert (kernels._NOTICE in err) is (seconds > 0.2)
    assert "C++ CPU kernels: AVX2, OpenMP, LTO (loaded in " in out
    time.sleep(0.3)  # the notice's timer was cancelled, not merely late
    assert capsys.readouterr().err == ""


def _counting_build(monkeypatch, fail: bool):
    """``_cpp._build`` replaced: returns the list its calls are appended to; raises where ``fail``."""
    calls = []

    def build(banner=None):
        calls.append(banner)
        if fail:
            raise RuntimeError("Error building extension 'spatialattn_sam_cpu_avx2_omp':\nsam_cpu.cpp:1: error: no C++20")
        return "module", {"isa": "AVX2", "openmp": True, "lto": False}

    monkeypatch.delenv("SPATIALATTN_DISABLE_CPP", raising=False)
    monkeypatch.setattr(_cpp, "_built", None)
    monkeypatch.setattr(_cpp, "_build", build)
    _cpp.reset()
    return calls


def test_a_failed_build_is_not_tried_again_for_a_while(monkeypatch, capsys, cpp_reloaded_after):
    # a build that failed in every variant (minutes with a compiler that fails on the source) is
    # recorded, and the next processes fall back at once until the record is _RETRY_AFTER_S old;
    # the error is still reported, with the record's path
    calls = _counting_build(monkeypatch, fail=True)
    assert _cpp.get() is None and len(calls) == 1
    records = list(Path(_cpp._RECORD_DIR).glob("spatialattn_build_failed.*.json"))
    assert len(records) == 1 and "no C++20" in json.loads(records[0].read_text())["error"]
    _cpp.reset()  # (a new process)
    assert _cpp.get() is None and len(calls) == 1
    error = ops.backend_report()["cpp"]["error"]
    assert error.startswith("not built: the same build failed 0 min ago") and str(records[0]) in error
    assert error.endswith("RuntimeError: Error building extension 'spatialattn_sam_cpu_avx2_omp':\nsam_cpu.cpp:1: error: no C++20")
    key = _cpp._build_key
    monkeypatch.setattr(_cpp, "_build_key", lambda banner: "another")  # an edited source, a new compiler, ...
    _cpp.reset()
    assert _cpp.get() is None and len(calls) == 2
    monkeypatch.setattr(_cpp, "_build_key", key)
    calls = _counting_build(monkeypatch, fail=False)
    monkeypatch.setattr(_cpp, "_RETRY_AFTER_S", 0.0)  # the record grown old: built again
    assert _cpp.get() == "module" and len(calls) == 1
    assert not records[0].exists()  # a build that works removes it


def test_the_kernels_command_builds_despite_a_record(monkeypatch, capsys, cpp_reloaded_after):
    calls = _counting_build(monkeypatch, fail=True)
    assert _cpp.get() is None and len(calls) == 1
    monkeypatch.setattr(_cpp, "_build", lambda banner=None: ("module", {"isa": "AVX2", "openmp": True, "lto": False}))
    _cpp.reset()
    assert main(["kernels", "--require", "cpp"]) == 0
    assert "C++ CPU kernels: AVX2, OpenMP (loaded in " in capsys.readouterr().out


def test_a_record_that_cannot_be_written_or_read(monkeypatch, tmp_path, cpp_reloaded_after):
    # a folder that cannot hold the record (here a file), and a damaged record: the build goes on as before
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(_cpp, "_RECORD_DIR", str(tmp_path / "file"))
    calls = _counting_build(monkeypatch, fail=True)
    assert _cpp.get() is None and _cpp._error.startswith("RuntimeError")
    monkeypatch.setattr(_cpp, "_RECORD_DIR", str(tmp_path))
    monkeypatch.setattr(_cpp, "_build_key", lambda banner: "k")
    (tmp_path / "spatialattn_build_failed.k.json").write_text("{not json")
    _cpp.reset()
    assert _cpp.get() is None and len(calls) == 2
    assert "the same build failed" in _cpp._recent_failure(tmp_path / "spatialattn_build_failed.k.json")  # (rewritten)


def test_the_build_key_follows_what_the_build_depends_on(monkeypatch):
    base = _cpp._build_key("g++ (GCC) 12.2.0")
    assert _cpp._build_key("g++ (GCC) 12.2.0") == base
    assert _cpp._build_key("g++ (GCC) 13.1.0") != base
    monkeypatch.setenv("CXX", "clang++")
    assert _cpp._build_key("g++ (GCC) 12.2.0") != base
    monkeypatch.delenv("CXX")
    monkeypatch.setattr(_cpp, "_parts_hash", lambda: "edited")
    assert _cpp._build_key("g++ (GCC) 12.2.0") != base


def test_a_record_that_cannot_be_removed(monkeypatch, tmp_path, cpp_reloaded_after):
    # a working build whose old record cannot be removed (a folder shared read-only, say) still loads
    calls = _counting_build(monkeypatch, fail=False)
    monkeypatch.setattr(_cpp, "_RECORD_DIR", str(tmp_path))
    monkeypatch.setattr(_cpp, "_build_key", lambda banner: "k")
    record = tmp_path / "spatialattn_build_failed.k.json"
    record.write_text(json.dumps({"time": 0.0, "error": "old"}))  # long past the retry time

    def unlink(self, missing_ok=False):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", unlink)
    assert _cpp.get() == "module" and len(calls) == 1 and _cpp._error is None
    _cpp.forget_failure()  # the command's removal, likewise
    assert record.exists()


def test_the_ninja_beside_this_python_is_put_on_path(monkeypatch, tmp_path):
    # cpp_extension runs plain `ninja`: a virtual environment's Python run without activating it
    # (an IDE, a service, `venv/bin/python train.py`) has the ninja pip installed beside it but
    # not on PATH, and fell back to the PyTorch ops. Within the build, its folder comes first on
    # PATH; PATH is as it was after, set or unset.
    import os
    import shutil

    folder = _cpp._ninja_dir()
    if folder is None:
        pytest.skip("no ninja beside this Python or in the ninja package")
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without ninja
    assert shutil.which("ninja") is None
    with _cpp._ninja_on_path() as found:
        assert found and Path(shutil.which("ninja")).parent == Path(folder)
    assert os.environ["PATH"] == str(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{folder}")  # on PATH already: PATH untouched
    with _cpp._ninja_on_path() as found:
        assert found and os.environ["PATH"] == f"{tmp_path}{os.pathsep}{folder}"
    # no PATH at all (the search then takes os.defpath, which may hold a system ninja: not here)
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, path=None: which(name, path=path or str(tmp_path)))
    monkeypatch.delenv("PATH")
    with _cpp._ninja_on_path() as found:
        assert found and os.environ["PATH"] == folder
    assert "PATH" not in os.environ


def test_without_ninja_nothing_is_built_or_recorded(monkeypatch, tmp_path, cpp_reloaded_after):
    # torch fails at once without ninja; recording that as a failed build would keep every process
    # from building for an hour after ninja is installed (the record's key does not know ninja)
    calls = _counting_build(monkeypatch, fail=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(_cpp, "_ninja_dir", lambda: None)
    assert _cpp.get() is None and calls == []
    assert "ninja" in _cpp._error and "pip install ninja" in ops.backend_report()["cpp"]["error"]
    assert not Path(_cpp._RECORD_DIR).exists()
    (tmp_path / "ninja").write_text("#!/bin/sh\n")  # ninja installed
    (tmp_path / "ninja").chmod(0o755)
    _cpp.reset()
    assert _cpp.get() == "module" and len(calls) == 1


def test_the_kernels_load_with_ninja_off_path(tmp_path):
    # the real extension (built by this run, loaded from the cache) in a process whose PATH has
    # everything it had but ninja, as a virtual environment's Python not activated
    import os
    import subprocess
    import sys

    if _cpp.get() is None:
        pytest.skip(f"the C++ kernels are not available here ({_cpp._error})")
    bare = tmp_path / "bin"
    bare.mkdir()
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for entry in os.listdir(folder):
            if entry != "ninja" and not (bare / entry).exists():
                (bare / entry).symlink_to(os.path.join(folder, entry))
    env = {**os.environ, "PATH": str(bare)}
    code = (f"from spatialattn.ops import _cpp; _cpp._RECORD_DIR = {str(tmp_path)!r}; m = _cpp.get(); "
            "print(_cpp._error); raise SystemExit(m is None)")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
