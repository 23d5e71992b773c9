"""Export of models containing the attention modules: ONNX (checked with onnxruntime),
``torch.jit.trace``, ``torch.export`` + AOTInductor; ``torch.jit.script`` is refused clearly."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from spatialattn.nn import create_attention


@pytest.fixture
def onnx_and_ort():
    """Skip the ONNX tests where onnx / onnxruntime are not installed (the dev extras have them)."""
    return pytest.importorskip("onnx"), pytest.importorskip("onnxruntime")


class Net(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.attn = create_attention(kind, 16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.attn(torch.relu(self.stem(x))))


def _export(model, path, dynamo, opset):
    x = torch.randn(2, 3, 24, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch, h, w = (torch.export.Dim(n, min=1, max=512) for n in ("batch", "h", "w"))
            torch.onnx.export(
                model, (x,), str(path), dynamo=True, opset_version=opset,
                dynamic_shapes={"x": {0: batch, 2: h, 3: w}}, input_names=["x"], output_names=["y"],
            )
        else:
            torch.onnx.export(
                model, (x,), str(path), dynamo=False, opset_version=opset, input_names=["x"],
                output_names=["y"], dynamic_axes={"x": {0: "batch", 2: "h", 3: "w"}, "y": {0: "batch", 2: "h", 3: "w"}},
            )


def _check_graph_and_run(model, path, onnx_and_ort):
    onnx, ort = onnx_and_ort
    proto = onnx.load(str(path))
    ops = {n.op_type for n in proto.graph.node}
    assert "ArgMax" not in ops and "MaxPool" not in ops, ops  # amax -> ReduceMax, never an index
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 17, 29)  # not the export size
    (y_ort,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        y = model(x).numpy()
    np.testing.assert_allclose(y_ort, y, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("kind", ["sam", "cbam", "sam_pointwise", "cam", "nonlocal"])
@pytest.mark.parametrize("opset", [17, 18])
def test_onnx_torchscript_exporter(tmp_path, kind, opset, onnx_and_ort):
    torch.manual_seed(0)
    model = Net(kind).eval()
    path = tmp_path / f"{kind}.onnx"
    _export(model, path, dynamo=False, opset=opset)
    _check_graph_and_run(model, path, onnx_and_ort)


@pytest.mark.parametrize("kind,opset", [("cbam", 17), ("cbam", 18), ("sam", 18), ("sam_pointwise", 18)])
def test_onnx_dynamo_exporter(tmp_path, kind, opset, onnx_and_ort):
    pytest.importorskip("onnxscript")
    if opset < 18 and torch.__version__ < (2, 9):  # (a TorchVersion: compares with tuples)
        # torch 2.8's exporter finds no function for the aten.sym_size.int of a dynamic batch
        # below opset 18 ("No decompositions registered for the real-valued input"; onnxscript
        # 0.4.0 and 0.7.2 tried); torch 2.9.1 and 2.14.1 convert it
        pytest.skip("torch < 2.9: the dynamo ONNX exporter cannot convert aten.sym_size below opset 18")
    torch.manual_seed(0)
    model = Net(kind).eval()
    path = tmp_path / f"{kind}.onnx"
    _export(model, path, dynamo=True, opset=opset)
    _check_graph_and_run(model, path, onnx_and_ort)


@pytest.mark.parametrize("kind", ["sam", "cbam"])
def test_jit_trace_records_torch_ops(kind):
    # The TorchScript tracer records torch operators only: while it runs, the modules take
    # the plain decomposition (the C++ kernels would run untraced and leave uninitialised
    # outputs in the graph), and the eval BatchNorm's affine pair is computed, not taken
    # from the inference cache (a call before the trace fills it).
    torch.manual_seed(0)
    model = Net(kind).eval()
    x = torch.randn(2, 3, 12, 10)
    with torch.no_grad():
        model(x)
        traced = torch.jit.trace(model, x)
        x2 = torch.randn(2, 3, 12, 10)
        torch.testing.assert_close(traced(x2), model(x2), rtol=1e-5, atol=1e-6)
        model.attn.spatial.bn.running_mean.fill_(0.7) if kind == "cbam" else model.attn.bn.running_mean.fill_(0.7)
        torch.testing.assert_close(traced(x2), model(x2), rtol=1e-5, atol=1e-6)


_RUN_PACKAGE = """
import sys
sys.modules["spatialattn"] = None  # the package must run where the library is absent
import torch
runner = torch._inductor.aoti_load_package(sys.argv[1])
x = torch.load(sys.argv[2], weights_only=True)
torch.save(runner(x), sys.argv[3])
"""


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="AOTInductor needs a C++ compiler")
def test_aot_inductor_package_runs_without_the_library(tmp_path):
    # the deployment path PyTorch recommends in place of TorchScript: torch.export (the
    # modules give plain aten operators while exporting) -> an AOTInductor .pt2 package,
    # loaded in a process that cannot import spatialattn, at another batch and height
    torch.manual_seed(0)
    model = nn.Sequential(Net("cbam"), nn.Conv2d(4, 8, 1), create_attention("sam_pointwise", 8),
                          create_attention("sam", 8)).eval()
    x = torch.randn(2, 3, 12, 10)
    dims = {0: torch.export.Dim("batch", min=1, max=64), 2: torch.export.Dim("h", min=4, max=256)}
    exported = torch.export.export(model, (x,), dynamic_shapes={"input": dims})
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert not any("spatialattn" in t for t in targets), targets
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        package = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "model.pt2"))
    x2 = torch.randn(5, 3, 20, 10)
    torch.save(x2, tmp_path / "x.pt")
    script = tmp_path / "run.py"
    script.write_text(_RUN_PACKAGE)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run([sys.executable, str(script), package, str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, env=env, cwd=tmp_path, timeout=300)
    y = torch.load(tmp_path / "y.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(y, model(x2), rtol=1e-5, atol=1e-6)


def test_torch_jit_script_says_why_it_cannot():
    # TorchScript cannot compile the modules' Python dispatch; without the refusal the error
    # came from deep inside (e.g. "builtin cannot be used as a value" in _fast_eval.py)
    import torchvision

    from spatialattn import insert_attention
    from spatialattn.darknet import bundled_model

    resnet, _ = insert_attention(torchvision.models.resnet18(), "cbam")
    for model in (Net("sam"), Net("nonlocal"), resnet, bundled_model("sam-tiny")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own FutureWarning: torch.jit.script is deprecated
            with pytest.raises(RuntimeError, match="cannot be compiled with torch.jit.script.*torch.export"):
                torch.jit.script(model)
