"""``spatialattn kernels``: which implementation the ops use on this machine, and why.

    spatialattn kernels [--require cpp|triton ...] [--json]

Loads the C++ CPU kernels, compiling them if this machine has not yet (about 1-2 minutes, cached
in ``TORCH_EXTENSIONS_DIR``), and prints what every device and dtype runs on. Run it in a
container image or on a new cluster node to build the kernels ahead of their first use;
``--require cpp`` exits with status 1 where they cannot be built (the compiler's error is
printed), so such a build fails instead of a job quietly running on the slower PyTorch path.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time

_ERROR_LINES = 40  # of a build error shown (a compiler's output can be long)
_NOTICE_AFTER_S = 2.0  # loading that takes longer is a build: say so
_NOTICE = "compiling the C++ CPU kernels for this machine (once, then cached: about 1-2 minutes) ..."


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("kernels", help="show which kernels (C++, Triton, PyTorch) the ops use here; build the C++ ones")
    p.add_argument("--require", nargs="+", choices=["cpp", "triton"], default=[], metavar="KIND",
                   help="exit with status 1 unless these kernels are usable: cpp (C++ CPU kernels), "
                        "triton (Triton on a CUDA device)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def _format(report: dict) -> str:
    cpp, triton = report["cpp"], report["triton"]
    lines = [f"torch {report['torch']}, CPU capability {report['cpu_capability']}, {report['threads']} threads"]
    if cpp["available"]:
        lines.append(f"C++ CPU kernels: {cpp['isa']}, {'OpenMP' if cpp['openmp'] else 'without OpenMP (one thread)'}"
                     f"{', LTO' if cpp['lto'] else ''} (loaded in {cpp['seconds']:.1f} s)")
        lines.append(f"  {cpp['path']}")
    else:
        error = (cpp["error"] or "unknown reason").splitlines() or ["unknown reason"]
        lines.append(f"C++ CPU kernels: not used (PyTorch ops instead): {error[0]}")
        lines += [f"  {line}" for line in error[1:_ERROR_LINES]]
        if len(error) > _ERROR_LINES:
            lines.append(f"  ... ({len(error) - _ERROR_LINES} more lines)")
    devices = ", ".join(report["cuda_devices"]) or "none"
    lines.append(f"Triton: {triton['version'] if triton['available'] else 'not installed'}; CUDA devices: {devices}")
    lines.append("implementation per device and dtype:")
    for device, table in report["backends"].items():
        lines.append(f"  {device:7s} " + ", ".join(f"{dtype} {impl}" for dtype, impl in table.items()))
    return "\n".join(lines)


def _missing(report: dict, required: list) -> list:
    missing = []
    if "cpp" in required and not report["cpp"]["available"]:
        missing.append("cpp")
    if "triton" in required and not any("triton" in t.values() for t in report["backends"].values()):
        missing.append("triton")
    return missing


def _load_announcing_a_build() -> float:
    """Load the C++ kernels (:func:`spatialattn.ops._cpp.get`), saying on stderr that they are
    being compiled where that takes longer than ``_NOTICE_AFTER_S``: a cached build loads in
    well under a second, where a notice of minutes would be wrong. Returns the seconds taken."""
    from spatialattn.ops import _cpp

    notice = threading.Timer(_NOTICE_AFTER_S, print, args=(_NOTICE,), kwargs={"file": sys.stderr, "flush": True})
    notice.daemon = True
    t0 = time.perf_counter()
    notice.start()
    try:
        _cpp.get()
    finally:
        notice.cancel()
    return round(time.perf_counter() - t0, 3)


def run(args: argparse.Namespace) -> int:
    from spatialattn import ops
    from spatialattn.ops import _cpp

    loaded_in = None
    if not _cpp.disabled():
        _cpp.forget_failure()  # a build that failed in an earlier process is tried again here
        if not args.json:
            loaded_in = _load_announcing_a_build()
    report = ops.backend_report()
    if loaded_in is not None:
        report["cpp"]["seconds"] = loaded_in  # (the report's own load found them loaded)
    print(json.dumps(report, indent=2) if args.json else _format(report))
    missing = _missing(report, args.require)
    for kind in missing:
        print(f"error: required {'C++ CPU' if kind == 'cpp' else 'Triton (CUDA)'} kernels are not usable here",
              file=sys.stderr)
    return 1 if missing else 0
