"""Every stored Darknet layer output is reproduced within max|out-ref| <= 1e-4 * max|ref|."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from spatialattn.darknet import DarknetModel

from ._data import manifest, set_paths, write_weights

SETS = [
    "sam_small",
    "yolov4-tiny",
    "yolov4-sam-mish-csp-reorg-bfm",
    # ~1.1 GB weights file (276 M parameters): ~12-25 s, 1.1 GB temp disk, ~2.5 GB RAM
    pytest.param("cspx-p7-mish", marks=pytest.mark.slow),
]


def run_set(name, tmp_path):
    cfg, folder = set_paths(name)
    man = manifest(name)
    wpath = write_weights(name, tmp_path)
    assert wpath.stat().st_size == man["weights"]["bytes"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = DarknetModel.from_cfg(cfg)
    model.load_darknet_weights(wpath)
    wpath.unlink()
    assert len(model.layers) == man["num_layers"]
    # every layer's inferred shape equals Darknet's
    for entry in man["layers"]:
        assert (1,) + model.infos[entry["index"]].out_shape == tuple(entry["out_shape"]), entry
    x = torch.from_numpy(np.load(folder / "input.npy"))
    idx = [o["index"] for o in man["stored_outputs"]]
    with torch.no_grad():
        outs = model(x, return_layers=idx)
        yolo = model(x)
    errors = {}
    for o in man["stored_outputs"]:
        ref = np.load(folder / o["file"])
        out = outs[o["index"]].numpy()
        assert out.shape == ref.shape
        err = float(np.abs(out - ref).max() / np.abs(ref).max())
        errors[o["index"]] = err
        assert err <= 1e-4, f"{name} layer {o['index']} ({o['type']}): max|out-ref|/max|ref| = {err:.3g}"
    # without return_layers: the [yolo] outputs, in order
    assert len(yolo) == len(model.yolo_indices)
    for i, y in zip(model.yolo_indices, yolo):
        if i in outs:
            torch.testing.assert_close(y, outs[i], rtol=0, atol=0)
    return errors


@pytest.mark.parametrize("name", SETS)
def test_parity(name, tmp_path):
    errors = run_set(name, tmp_path)
    print(name, {k: f"{v:.2e}" for k, v in errors.items()})


def test_attention_maps_are_the_gates(tmp_path):
    """The gate of each [sam]/[scale_channels] is layers[i-1]'s output and out == act(gate * from)."""
    cfg, folder = set_paths("sam_small")
    model = DarknetModel.from_cfg(cfg).load_darknet_weights(write_weights("sam_small", tmp_path))
    x = torch.from_numpy(np.load(folder / "input.npy"))
    with torch.no_grad():
        outs = model(x, return_layers=list(range(len(model.layers))))
        yolo, gates = model(x, return_attention=True)
    assert sorted(gates) == model.attention_indices == [4, 14, 16, 20, 27]
    for i, g in gates.items():
        torch.testing.assert_close(g, outs[i - 1], rtol=0, atol=0)
    assert gates[14].shape == (1, 64, 1, 1) and gates[16].shape == (1, 1, 32, 32)
    torch.testing.assert_close(outs[4], gates[4] * outs[2], rtol=0, atol=0)
    torch.testing.assert_close(outs[20], torch.nn.functional.leaky_relu(gates[20] * outs[10], 0.1))
    torch.testing.assert_close(model.attention_maps(x)[27], gates[27])
    ref = np.load(folder / "L004_sam.npy")
    assert np.abs(outs[4].numpy() - ref).max() <= 1e-4 * np.abs(ref).max()
