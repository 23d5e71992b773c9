"""Smoke test of ``benchmarks/bench_model.py`` (the attention layers' cost inside a ResNet)."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torchvision

from spatialattn.ops import _cpp
from spatialattn.surgery import insert_attention

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_model.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_model", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_probe_times_forward_and_backward_and_leaves_the_model_as_it_was():
    bench = _load()
    torch.manual_seed(0)
    m, names = insert_attention(torchvision.models.resnet18(weights=None), "sam")
    mods = [m.get_submodule(n) for n in names]
    x = torch.randn(2, 3, 32, 32)
    m.eval()
    with torch.no_grad():
        ref = m(x)
    clock = bench.Clock(torch, torch.device("cpu"))
    for what in ("attention", "clone"):
        p = bench.Probe(mods, clock, what)
        with torch.no_grad():
            out = m(x)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)  # hooks change nothing
        t = p.times()
        kind = "fwd" if what == "attention" else "clone"
        assert sorted(t) == [(i, kind) for i in range(len(mods))]
        assert all(len(v) == 1 and v[0] > 0 for v in t.values())
        # ResNet-18 at 32x32: two blocks per stage, 64 -> 512 channels on 8x8 -> 1x1 maps
        assert [p.shapes[i] for i in range(len(mods))] == [(2, c, s, s) for c, s in
                                                          ((64, 8), (64, 8), (128, 4), (128, 4), (256, 2), (256, 2),
                                                           (512, 1), (512, 1))]
        p.remove()
    assert all(not mod._forward_pre_hooks and not mod._forward_hooks for mod in mods)

    m.train()
    p = bench.Probe(mods, clock, "attention")
    m(x).square().mean().backward()
    t = p.times()
    p.remove()
    assert sorted(t) == sorted([(i, k) for i in range(len(mods)) for k in ("fwd", "bwd")])
    assert all(len(v) == 1 and v[0] > 0 for v in t.values())


def test_small_run_reports_both_backends_and_restores_the_kernels(tmp_path):
    bench = _load()
    had_cpp = _cpp.get() is not None
    rows = bench.main(["--model", "resnet18", "--kinds", "sam", "--batch", "2", "--size", "32", "--rounds", "1",
                       "--reps", "1", "--layouts", "NCHW", "--modes", "eval,train", "--out", str(tmp_path)])
    assert (_cpp.get() is not None) == had_cpp  # the torch backend's switch is undone
    assert {(r["mode"], r["backend"]) for r in rows} == {(m, b) for m in ("eval", "train") for b in ("fused", "torch")}
    for r in rows:
        assert r["layers"] == 8
        assert set(r["per_size"]) == {"8x8", "4x4", "2x2", "1x1"}  # ResNet-18 stages at 32x32 input
        for key in ("attention_ms", "clone_ms", "copies", "model_ms", "share"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        # one round: the medians are the round's figures, and the ratios are theirs
        assert r["copies"] == pytest.approx(r["attention_ms"] / r["clone_ms"])
        assert r["copies_min"] == r["copies"] == r["copies_max"]
        assert r["share"] == pytest.approx(r["attention_ms"] / r["model_ms"])
    md = (tmp_path / "model_resnet18_cpu.md").read_text()
    assert md.count("| sam | 8 |") == 4
    assert (tmp_path / "model_resnet18_cpu.csv").read_text().count("\n") == 5


def test_unknown_attention_kind_fails_loudly(tmp_path):
    bench = _load()
    with pytest.raises(ValueError):
        bench.main(["--model", "resnet18", "--batch", "1", "--size", "32", "--rounds", "1", "--reps", "1",
                    "--layouts", "NCHW", "--modes", "eval", "--kinds", "nope", "--out", str(tmp_path)])


def test_cuda_clock_uses_events_and_synchronises():
    """The CUDA branch of the clock, with stand-ins for CUDA events (no GPU here)."""
    bench = _load()
    calls = []

    class Event:
        n = 0

        def __init__(self, enable_timing):
            assert enable_timing
            Event.n += 1
            self.t = Event.n * 2.5  # ms

        def record(self):
            calls.append("record")

        def elapsed_time(self, other):
            return other.t - self.t

    class Cuda:
        @staticmethod
        def synchronize():
            calls.append("sync")

    Cuda.Event = Event

    class FakeTorch:
        cuda = Cuda

    clock = bench.Clock(FakeTorch, torch.device("cuda"))
    a, b = clock.mark(), clock.mark()
    clock.resolve()
    assert calls == ["record", "record", "sync"]
    assert clock.span(a, b) == pytest.approx(2.5e-3)
