"""The Triton kernels compiled for real GPUs on a machine without one.

Triton's interpreter (``test_triton_interp.py``) checks the kernels' numbers on CPU; these
tests check what only a GPU build shows: that every specialisation the library launches
compiles for sm_90 (H100 / H200) and sm_80 (A100) through Triton's compiler and the
``ptxas`` it ships, without register spills, and that accesses along the contiguous axis
are vector loads and stores wherever the shapes allow them. The launches are recorded from
the public API (``spatialattn.ops._triton_aot``), specialised as Triton's JIT would on a GPU.
"""
from __future__ import annotations

import collections
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from spatialattn import ops  # noqa: E402
from spatialattn.nn import SpatialAttention  # noqa: E402
from spatialattn.ops import _triton  # noqa: E402
from spatialattn.ops import _triton_aot as aot  # noqa: E402

from ._interpreter_numpy import interpreter_blocker  # noqa: E402

_ok, _why = aot.supported()
pytestmark = pytest.mark.skipif(not _ok, reason=_why)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (shape, dtype, programs per SM): C = 24 / HW = 108 (multiples of 8 / 4, as 26 x 26 maps
# are), loops split; C = 16 / HW = 64 (multiples of 16), not split
CASES = [((2, 24, 9, 12), F32, 8), ((2, 24, 9, 12), BF16, 8), ((1, 16, 8, 8), F16, 0), ((1, 16, 8, 8), F32, 0)]
ORDERS = (("max", "mean"), ("mean",))
# kernels on the small [N, P, H, W] maps, one program per _BP_SMALL pixels
_SMALL_MAP_KERNELS = {"_pool_combine_kernel", "_gate_kernel", "_bn_attn_kernel", "_gate_backward_kernel",
                      "_conv_backward_kernel"}
# on CBAM's [N, C] channel-gate vectors (the pooling's combine, the channel-scale gradient's rows)
_GATE_VECTOR_KERNELS = {"_gpool_combine_kernel", "_sum_rows_kernel"}
# CBAM's channel MLP: a program per image (the second layer needs the whole hidden vector),
# the weight gradients a program per channel tile; the whole MLP is a few 100k multiply-adds
_MLP_IMAGE_KERNELS = {"_mlp_gate_kernel", "_mlp_gate_backward_kernel"}
# the sums of the parameter gradients' partials (a program per parameter), the fold of a training
# BatchNorm's partial rows (one program)
_ONE_SHOT_KERNELS = {"_column_sums_kernel", "_fold_kernel"}
WRITERS = ("_mul_kernel", "_gradx_kernel", "_gpool_backward_kernel")  # kernels that write x-sized tensors
# the band kernels write y / grad_x and small maps (one-pixel-per-lane rows of the maps, 4 bytes)
BAND_WRITERS = ("_sam_band_kernel", "_sam_band_bn_kernel", "_sam_band_backward_kernel")


@pytest.fixture(scope="module")
def launches():
    return aot.record_launches(aot.api_workload(CASES, ORDERS))


@pytest.fixture(scope="module")
def sm90(launches):
    return [aot.compile_launch(launch, 90) for launch in launches]


def _variants(launches, kernel, name):
    return {launch.constants().get(name) for launch in launches if launch.kernel == kernel}


def test_workload_launches_every_kernel_and_variant(launches):
    launched = {name for name in aot.kernels() if name.endswith("_kernel")}
    assert {launch.kernel for launch in launches} == launched
    for kernel in launched:  # both layouts of every kernel that has a layout flag (those over x)
        has_layout = "CL" in aot.kernels()[kernel].arg_names
        assert _variants(launches, kernel, "CL") == ({False, True} if has_layout else {None}), kernel
    for kernel, flag in [("_pool_kernel", "PARTIAL"), ("_pool_kernel", "HAS_S"), ("_gpool_kernel", "PARTIAL"),
                         ("_gpool_kernel", "COUNT"), ("_gpool_backward_kernel", "ACC"), ("_gradx_kernel", "USE_IX"),
                         ("_gradx_kernel", "NEED_GS"), ("_reduce_kernel", "HAS_IX"), ("_reduce_kernel", "HAS_G"),
                         ("_gate_kernel", "HAS_B"), ("_gate_kernel", "HAS_NORM"), ("_gate_kernel", "STATS"),
                         ("_sam_band_kernel", "HAS_S"), ("_sam_band_kernel", "HAS_NORM"), ("_sam_band_kernel", "BN_STATS"),
                         ("_sam_band_backward_kernel", "NEED_GS"), ("_sam_band_backward_kernel", "HAS_GATTN"),
                         ("_gate_backward_kernel", "BN"), ("_conv_backward_kernel", "BN"), ("_fold_kernel", "STATS")]:
        assert _variants(launches, kernel, flag) == {False, True}, (kernel, flag)
    assert _variants(launches, "_sam_band_backward_kernel", "BN_PHASE") == {0, 1, 2}
    dtypes = {launch.signature["x_ptr"] for launch in launches if "x_ptr" in launch.signature}
    assert dtypes == {"*fp32", "*fp16", "*bf16"}


def test_compile_for_sm90_without_spills(sm90):
    assert len(sm90) > 100
    for c in sm90:
        assert c.local_bytes == 0, f"{c.launch.describe()}: {c.local_bytes} bytes of local memory (spills)"
        # (the conv backward with its tap rows unrolled had held 168-255)
        assert c.registers <= 128, f"{c.launch.describe()}: {c.registers} registers"
        assert c.num_warps == _triton._NUM_WARPS


@triton.jit
def _add_kernel(ptr, v):  # module level: Triton reads a kernel's source and globals
    tl.atomic_add(ptr + tl.arange(0, 16), v)


def test_no_atomics(sm90):
    """No kernel adds through atomics, whose order (and so the float32 result) changes from
    run to run on a GPU: split reductions, the channel-scale gradient included, write
    partials that the host sums in a fixed order."""
    assert any(c.launch.constants().get("NEED_GS") for c in sm90)
    for c in sm90:
        assert c.atomics == 0, f"{c.launch.describe()}: {c.atomics} atomic instructions"


def test_atomics_are_seen(monkeypatch):
    """The PTX scan behind test_no_atomics finds an atomic add where there is one."""
    monkeypatch.setattr(aot, "kernels", lambda: {"_add_kernel": _add_kernel})
    launch = aot.Launch("_add_kernel", {"ptr": "*fp32", "v": "fp32"}, {}, {}, {"num_warps": 1}, [(1,)])
    assert aot.compile_launch(launch, 90).atomics >= 1


def test_vector_accesses_where_the_shape_allows(sm90):
    """Where ``x`` is aligned, the accesses along its contiguous axis move as many bytes as
    the shape allows (16 for float32 rows of a multiple of 4 elements): the widest load of
    every kernel, and every store of the kernels that write ``x``-sized tensors (besides, in
    the gradient pass, the one store of a row of channel-scale partials, ``[C]`` values); the
    band kernels' ``y`` / ``grad_x`` stores (their small maps' rows are stored a pixel per lane)."""
    checked = {16: 0, 8: 0, "band": 0}
    for c in sm90:
        want = aot.contiguous_alignment(c.launch)
        if want >= 8:
            checked[want] += 1
            assert c.widest_load() >= want, f"{c.launch.describe()}: loads {dict(c.loads)}, want {want} bytes"
            if c.launch.kernel in WRITERS:
                narrow = sum(k for width, k in c.stores.items() if width < want)
                allowed = 1 if c.launch.constants().get("NEED_GS") else 0
                assert c.stores and narrow <= allowed, f"{c.launch.describe()}: stores {dict(c.stores)}"
            k = c.launch.constants()
            if c.launch.kernel in BAND_WRITERS and not k.get("BN_STATS") and k.get("BN_PHASE") != 1:
                checked["band"] += 1  # y / grad_x stored in vectors of the shape's width
                assert max(c.stores) >= want, f"{c.launch.describe()}: stores {dict(c.stores)}, want {want} bytes"
    assert checked[16] > 20 and checked[8] > 5 and checked["band"] > 30, checked


def test_26x26_maps_move_16_bytes_per_access():
    """The case the compiled code showed: a 26 x 26 map (676 pixels, a multiple of 4 but not
    of 16) in float32 NCHW had only 4-byte loads and stores before the kernels were told
    the divisibility of ``HW``."""

    def workload():
        x = torch.randn(2, 32, 26, 26, requires_grad=True)
        y = ops.spatial_attention_fused(x, torch.randn(1, 2, 7, 7))
        torch.autograd.grad(y, x, torch.ones_like(y))

    launches = aot.record_launches(workload)
    assert {launch.kernel for launch in launches} >= {"_pool_kernel", "_mul_kernel", "_reduce_kernel", "_gradx_kernel"}
    for launch in launches:
        if "x_ptr" not in launch.signature:  # the small-map kernels (gathers for the conv)
            continue
        c = aot.compile_launch(launch, 90)
        assert aot.contiguous_alignment(launch) == 16
        assert c.widest_load() == 16, f"{launch.describe()}: {dict(c.loads)}"
        if launch.kernel in WRITERS:
            assert set(c.stores) == {16}, f"{launch.describe()}: {dict(c.stores)}"


@pytest.mark.parametrize("shape", [(8, 512, 26, 26), (8, 128, 104, 104), (1, 1024, 13, 13)])
def test_grids_fill_the_gpu(shape):
    """Every kernel of a CBAM training step launches at least ``_PROGRAMS_PER_SM`` programs
    per SM of an H100 where the work allows it (the reductions split their loops; before,
    the channel pooling of 8 x 512 x 26 x 26 had 88 programs and the global pooling of
    8 x 128 x 104 x 104 had 64)."""
    target = _triton._PROGRAMS_PER_SM * 132
    n, c, h, w = shape

    def workload():
        from spatialattn.nn import CBAM

        x = torch.randn(shape, requires_grad=True)
        y = CBAM(c, preset="official")(x)
        torch.autograd.grad(y, x, torch.ones_like(y))

    for launch in aot.record_launches(workload):
        if launch.kernel in _ONE_SHOT_KERNELS:  # a program per parameter; one program
            continue
        for grid in launch.grids:
            programs = math.prod(grid)
            if launch.kernel in _SMALL_MAP_KERNELS:  # [N, 1 or P, H, W] maps
                tiles = n * math.ceil(h * w / _triton._BP_SMALL)
            elif launch.kernel in _GATE_VECTOR_KERNELS:
                tiles = math.ceil(n * c / _triton._BP_SMALL)
            elif launch.kernel in _MLP_IMAGE_KERNELS:
                tiles = n
            elif launch.kernel == "_mlp_weight_grads_kernel":
                tiles = math.ceil(c / launch.constants()["BC"])
            else:
                bc, bp = (_triton._MUL_TILE[launch.constants()["CL"]] if launch.kernel == "_mul_kernel"
                          else (_triton._BC, _triton._BP))
                tiles = n * math.ceil(c / bc) * math.ceil(h * w / bp)  # one program per tile at most
            assert programs >= min(target, tiles), f"{launch.kernel} {shape}: grid {grid}"
            assert max(grid[1:], default=1) <= 65535, f"{launch.kernel}: grid {grid} (CUDA caps axes 1, 2)"


def test_split_rule():
    # (per, chunks): whole blocks, enough chunks to reach the target, every element covered once
    assert _triton._split(512, 16, 88, 1056) == (32, 16)
    assert _triton._split(512, 16, 8, 1056) == (16, 32)
    assert _triton._split(512, 16, 2000, 1056) == (512, 1)
    assert _triton._split(10, 16, 1, 1056) == (16, 1)
    assert _triton._split(0, 16, 1, 1056) == (16, 1)
    for extent in (1, 17, 100, 676, 1024):
        for programs in (1, 7, 88):
            per, chunks = _triton._split(extent, 16, programs, 1056)
            assert per % 16 == 0 and (chunks - 1) * per < extent <= chunks * per
            assert programs * chunks >= min(1056, programs * -(-extent // 16))


def test_compile_for_sm80(launches):
    """The bfloat16 launches for an A100 (sm_80: bfloat16 conversions without sm_90's instructions)."""
    bf16 = [launch for launch in launches if launch.signature.get("x_ptr") == "*bf16"]
    assert len(bf16) > 20
    for launch in bf16:
        c = aot.compile_launch(launch, 80)
        assert c.local_bytes == 0, launch.describe()


def _report(tmp_path, *args, **env):
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "triton_report.py"
    proc = subprocess.run([sys.executable, str(script), *args, "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, **env))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_report_script(tmp_path):
    """``benchmarks/triton_report.py``: the static report, and the sweep's code through the
    interpreter (its figures mean nothing there; on a GPU it is the tuning run). The report's
    shape is the API workload's first case, whose launches the tests above have compiled: Triton's
    cache then serves them (a shape of its own took about 4 minutes of compiling on 2 cores)."""
    out = _report(tmp_path, "--shapes", "x".join(map(str, CASES[0][0])))
    rows = [line for line in (tmp_path / "triton_sm90_float32.md").read_text().splitlines()
            if line.startswith(f"| {'x'.join(map(str, CASES[0][0]))} |")]
    assert len(rows) >= 12 and "local memory anywhere: 0 B" in out
    if interpreter_blocker():
        pytest.skip(f"the static report passed; the sweep runs through the interpreter: {interpreter_blocker()}")
    _report(tmp_path, "--sweep", "--device", "cpu", "--shapes", "1x16x8x8", "--iters", "1", TRITON_INTERPRET="1")
    sweep = (tmp_path / "triton_sweep_float32.md").read_text()
    assert sweep.count("| gate multiply [2] |") == 6 and sweep.count("| pool [1] |") == 10
    # the whole SAM at the default settings; the one launch also at 1 and 16 programs per SM
    for direction, default in (("forward", "three launches [2]"), ("backward", "five launches [3]")):
        assert sweep.count(f"| SAM {direction}, {default} |") == 1
        assert sweep.count(f"| SAM {direction}, one launch [{default[-2]}] |") == 3


@pytest.mark.parametrize("shape", [(8, 256, 52, 52), (2, 16, 8, 8)])
def test_kernel_launches_of_the_fused_sam(shape, monkeypatch):
    """On a GPU every launch costs microseconds of host time, as much as a copy of a whole
    8 x 256 x 52 x 52 map takes at H200 bandwidth. The fused SAM launches: the channel
    pooling (and, where its loop is split, one combine of the partial maps), the gate (conv,
    norm, sigmoid) and the product; the backward pass A, the sigmoid / norm backward and the
    conv backward on the small maps, one sum of the parameter gradients' partials, the
    gradient pass. Before: 9 launches forward and 27 forward + backward (torch ops on the
    small maps, the partials combined with torch, zero maps made for unused gradients)."""
    tiles = shape[0] * math.ceil(shape[2] * shape[3] / _triton._BP)
    split = int(_triton._split(shape[1], _triton._BC, tiles, _triton._PROGRAMS_PER_SM * 132)[1] > 1)
    assert split == (shape[1] > 16)
    x, w = torch.randn(shape), torch.randn(1, 2, 7, 7)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()

    def forward():
        with torch.no_grad():
            ops.spatial_attention_fused(x, w)

    def training_step():
        y = ops.spatial_attention_fused(xg, wg)
        torch.autograd.grad(y, (xg, wg), y)  # y as its own upstream gradient: no extra tensor

    fwd = aot.kernel_launches(forward)
    assert sum(fwd.values()) == 3 + split, dict(fwd)
    assert fwd["_gate_kernel"] == 1 and fwd["_mul_kernel"] == 1 and fwd["_pool_combine_kernel"] == split
    both = aot.kernel_launches(training_step)
    assert sum(both.values()) == 8 + split, dict(both)
    assert not [name for name in both if name.startswith("aten.")], dict(both)

    # SpatialAttention in training: its BatchNorm with batch statistics (partial statistics
    # with the conv, one kernel for the attention and the running statistics' update; the
    # update was a launch of its own until the forty-fourth session); was 72
    from spatialattn.nn import SpatialAttention

    module = SpatialAttention(shape[1]).train()

    def module_step():
        y = module(xg)
        torch.autograd.grad(y, [xg] + list(module.parameters()), y)

    step = aot.kernel_launches(module_step)
    assert sum(step.values()) == 9 + split, dict(step)
    assert step["_bn_attn_kernel"] == 1, dict(step)
    assert not [name for name in step if name.startswith("aten.")], dict(step)
    # above _FOLD_ROWS partial rows (one per 128-pixel tile), one more launch each way folds them
    rows = shape[0] * math.ceil(shape[2] * shape[3] / _triton._BP_SMALL)
    monkeypatch.setattr(_triton, "_FOLD_ROWS", rows)
    assert aot.kernel_launches(module_step) == step
    monkeypatch.setattr(_triton, "_FOLD_ROWS", rows - 1)
    folded = aot.kernel_launches(module_step)
    assert folded == step + collections.Counter({"_fold_kernel": 2}), dict(folded)


@pytest.mark.parametrize("shape", [(8, 256, 52, 52), (2, 16, 8, 8)])
def test_band_forward_and_backward_launches(shape, monkeypatch):
    """With ``_BAND_FORWARD`` and ``_BAND_BACKWARD`` the SAM forward is one launch whatever the
    shape (the pooling's split and combine, the gate and the product in one program per band of
    rows) and a training step 3 (the backward's pass A, small-map kernels and gradient pass in
    one, then the parameter gradients' column sums; a fourth, the scale gradient's sum over the
    bands, where it is wanted); the grid aims at ``_BAND_PROGRAMS_PER_SM`` programs per SM,
    bands of whole 16-byte vectors where the map allows."""
    monkeypatch.setattr(_triton, "_BAND_FORWARD", True)
    monkeypatch.setattr(_triton, "_BAND_BACKWARD", True)
    n, c, h, w_ = shape
    x, w = torch.randn(shape), torch.randn(1, 2, 7, 7)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    sg = torch.rand(n, c, 1, 1, requires_grad=True)

    def forward():
        with torch.no_grad():
            ops.spatial_attention_fused(x, w)

    def training_step(scale):
        def run():
            y = ops.spatial_attention_fused(xg, wg, channel_scale=sg if scale else None)
            torch.autograd.grad(y, (xg, wg, sg) if scale else (xg, wg), y)
        return run

    assert aot.kernel_launches(forward) == {"_sam_band_kernel": 1}
    step = aot.kernel_launches(training_step(False))
    assert step == {"_sam_band_kernel": 1, "_sam_band_backward_kernel": 1, "_column_sums_kernel": 1}, dict(step)
    step = aot.kernel_launches(training_step(True))
    th = math.ceil(h / min(h, math.ceil(_triton._BAND_PROGRAMS_PER_SM * 132 / n)))
    th = min(h, math.ceil(th / (4 // min(4, w_ & -w_))) * (4 // min(4, w_ & -w_)))  # float32: 4 per vector
    bands = math.ceil(h / th)
    assert sum(step.values()) == 3 + (bands > 1) and step["_sum_rows_kernel"] == (bands > 1), dict(step)
    (launch,) = aot.record_launches(forward)
    assert launch.grids == [(n * bands,)], (launch.grids, th)
    # a training-mode BatchNorm on the logits: two launches forward (the second also updates the
    # running statistics), two backward (its batch sums need every band's pass A first), the
    # column sums
    module = SpatialAttention(c).train()

    def batchnorm_step():
        y = module(xg)
        torch.autograd.grad(y, (xg,) + tuple(module.parameters()), y)

    step = aot.kernel_launches(batchnorm_step)
    assert step == {"_sam_band_kernel": 1, "_sam_band_bn_kernel": 1, "_sam_band_backward_kernel": 2,
                    "_column_sums_kernel": 1}, dict(step)
    monkeypatch.setattr(_triton, "_FOLD_ROWS", n * bands)  # the bands' partial rows: folded above _FOLD_ROWS
    assert aot.kernel_launches(batchnorm_step) == step
    monkeypatch.setattr(_triton, "_FOLD_ROWS", n * bands - 1)
    assert aot.kernel_launches(batchnorm_step) == step + collections.Counter({"_fold_kernel": 2})


def test_kernel_launches_counts_torch_ops():
    """The counter sees torch kernels inside a custom op, and not views or no-op conversions."""
    x = torch.randn(2, 3, 4, 4)

    def workload():
        y = ops.channel_pool(x.double(), ("max",))  # the double: a conversion (CPU dispatch: torch path)
        y.reshape(-1).to(y.dtype).contiguous()  # no kernels

    counts = aot.kernel_launches(workload)
    assert counts["aten._to_copy"] + counts["aten.to"] == 1 and counts["aten.amax"] >= 1, dict(counts)
    assert "aten.reshape" not in counts and "aten.view" not in counts, dict(counts)


def test_kernel_launches_of_cbam():
    """CBAM's channel MLP on the Triton path: one launch forward, two backward (it was about
    19 torch launches per training step: the matrix products, relu, sigmoid and their
    autograd). The channel-scale gradient's partial rows are summed by a kernel, and the global
    pooling's backward divides by the tie counts and the pixel count in its kernel (3 torch ops
    before): a CBAM training step launches 17 kernels, all Triton (33 in the tenth session; 18
    until the running statistics' update joined the BatchNorm's attention kernel)."""
    from spatialattn.nn import CBAM

    x = torch.randn(8, 512, 26, 26, requires_grad=True)
    module = CBAM(512, preset="official").train()

    def step():
        y = module(x)
        torch.autograd.grad(y, [x] + list(module.parameters()), y)

    counts = aot.kernel_launches(step)
    assert counts["_mlp_gate_kernel"] == 1 and counts["_mlp_gate_backward_kernel"] == 1, dict(counts)
    assert counts["_mlp_weight_grads_kernel"] == 1, dict(counts)
    torch_ops = {name: k for name, k in counts.items() if name.startswith("aten.")}
    assert torch_ops == {}, torch_ops
    assert counts["_sum_rows_kernel"] == 1, dict(counts)
    assert sum(counts.values()) == 17, dict(counts)

    module.eval()

    def infer():
        with torch.no_grad():
            module(x)

    aot.kernel_launches(infer)  # the folded BatchNorm is cached from the second call (keyed as on a GPU)
    counts = aot.kernel_launches(infer)
    assert sum(counts.values()) == 7 and not [n for n in counts if n.startswith("aten.")], dict(counts)
