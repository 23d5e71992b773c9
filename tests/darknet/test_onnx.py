"""ONNX export of a Darknet model with [sam] / [scale_channels], checked with onnxruntime."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from spatialattn.darknet import DarknetModel

from ._data import set_paths, write_weights

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _model(tmp_path):
    cfg, folder = set_paths("sam_small")
    m = DarknetModel.from_cfg(cfg).load_darknet_weights(write_weights("sam_small", tmp_path))
    return m, torch.from_numpy(np.load(folder / "input.npy"))


class _Wrap(torch.nn.Module):
    """Flat outputs: the two [yolo] outputs and the [sam] layer outputs 4, 20, 27."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        o = self.m(x, return_layers=[4, 20, 27, 29, 36])
        return o[29], o[36], o[4], o[20], o[27]


def _check(path, wrapped, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        ref = wrapped(x)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r.numpy(), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("opset", [17, pytest.param(18, marks=pytest.mark.slow)])
def test_onnx_torchscript_exporter(tmp_path, opset):
    m, x = _model(tmp_path)
    w = _Wrap(m).eval()
    path = tmp_path / "sam_small.onnx"
    torch.onnx.export(w, (x,), str(path), opset_version=opset, dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})
    onnx.checker.check_model(onnx.load(str(path)))
    _check(path, w, x)
    _check(path, w, torch.cat([x, x.flip(-1)]))  # dynamic batch


def test_onnx_dynamo_exporter(tmp_path):
    m, x = _model(tmp_path)
    w = _Wrap(m).eval()
    path = tmp_path / "sam_small_dynamo.onnx"
    torch.onnx.export(w, (x,), str(path), dynamo=True, opset_version=18)
    _check(path, w, x)
