"""ONNX export of models containing the attention modules, checked with onnxruntime."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from spatialattn.nn import create_attention

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


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


def _check_graph_and_run(model, path):
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
def test_onnx_torchscript_exporter(tmp_path, kind, opset):
    torch.manual_seed(0)
    model = Net(kind).eval()
    path = tmp_path / f"{kind}.onnx"
    _export(model, path, dynamo=False, opset=opset)
    _check_graph_and_run(model, path)


@pytest.mark.parametrize("kind,opset", [("cbam", 17), ("cbam", 18), ("sam", 18), ("sam_pointwise", 18)])
def test_onnx_dynamo_exporter(tmp_path, kind, opset):
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
    _check_graph_and_run(model, path)


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
