"""Smoke test of ``benchmarks/bench_nonlocal.py`` (torch's fused attention against bmm + softmax)."""
import importlib.util
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_nonlocal.py"


def test_quick_run_prints_a_row_per_input(capsys):
    spec = importlib.util.spec_from_file_location("bench_nonlocal", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        bench.main(["--quick", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)  # (the script sets the process's thread count)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1x16")]
    assert len(rows) == 2
    above, below = ([float(v) for v in r.strip("|").split("|")[6:8]] for r in rows)
    assert above[1] < above[0]  # saved MB: the fused attention keeps no [N, L, M] map
    assert below[1] == below[0]  # below the threshold both are bmm + softmax
