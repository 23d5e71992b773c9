""".weights I/O: both header forms, strict counts, cutoff, byte-exact save."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from spatialattn.darknet import DarknetModel, DarknetWeightsError

from ._data import make_weights_module, set_paths, write_weights

NET = "[net]\nwidth=8\nheight=8\nchannels=2\n"
TINY = (NET + "[convolutional]\nbatch_normalize=1\nfilters=3\nsize=3\npad=1\nactivation=leaky\n"
        "[convolutional]\nfilters=4\nsize=1\ngroups=1\nactivation=linear\n"
        "[shortcut]\nfrom=-1\nweights_type=per_channel\nweights_normalization=softmax\n")
# floats: conv0 3 + 3*3 + 3*2*9 = 66; conv1 4 + 4*3 = 16; shortcut (1+1)*4 = 8
TINY_COUNTS = [66, 16, 8]


def tiny_blob(header=(0, 2, 5, 7), extra=0, missing=0):
    major, minor, rev, seen = header
    head = struct.pack("<iii", major, minor, rev)
    head += struct.pack("<Q", seen) if major * 10 + minor >= 2 else struct.pack("<I", seen)
    vals = np.arange(sum(TINY_COUNTS) + extra - missing, dtype="<f4") / 100 + 0.5
    return head + vals.tobytes(), vals


def test_values_land_in_darknet_order(tmp_path):
    blob, vals = tiny_blob()
    p = tmp_path / "t.weights"
    p.write_bytes(blob)
    m = DarknetModel.from_cfg_text(TINY).load_darknet_weights(p)
    c0, c1, sc = m.layers[0], m.layers[1], m.layers[2]
    v = torch.from_numpy(vals)
    torch.testing.assert_close(c0.bn.bias, v[0:3])
    torch.testing.assert_close(c0.bn.weight, v[3:6])
    torch.testing.assert_close(c0.bn.running_mean, v[6:9])
    torch.testing.assert_close(c0.bn.running_var, v[9:12])
    torch.testing.assert_close(c0.conv.weight, v[12:66].view(3, 2, 3, 3))
    assert c0.conv.bias is None
    torch.testing.assert_close(c1.conv.bias, v[66:70])
    torch.testing.assert_close(c1.conv.weight, v[70:82].view(4, 3, 1, 1))
    torch.testing.assert_close(sc.weight, v[82:90])
    assert m.weights_header == (0, 2, 5, 7)


@pytest.mark.parametrize("header", [(0, 2, 5, 7), (0, 1, 0, 7), (0, 0, 1, 3)])
def test_header_forms_round_trip(tmp_path, header):
    blob, _ = tiny_blob(header)
    p, q = tmp_path / "a.weights", tmp_path / "b.weights"
    p.write_bytes(blob)
    m = DarknetModel.from_cfg_text(TINY).load_darknet_weights(p)
    m.save_darknet_weights(q)
    assert q.read_bytes() == blob
    assert len(blob) == (20 if header[1] >= 2 else 16) + 4 * sum(TINY_COUNTS)


def test_short_file_names_layer_and_counts(tmp_path):
    blob, _ = tiny_blob(missing=10)
    p = tmp_path / "short.weights"
    p.write_bytes(blob)
    with pytest.raises(DarknetWeightsError, match=r"file too short: the cfg needs 90 floats after the header, "
                       r"the file has 80; ran out in layer 1 \(\[convolutional\] at <string>:11\) reading 'weights' "
                       r"\(12 floats needed, 10 left\)"):
        DarknetModel.from_cfg_text(TINY).load_darknet_weights(p)


def test_long_file_and_cutoff(tmp_path):
    blob, vals = tiny_blob(extra=5)
    p = tmp_path / "long.weights"
    p.write_bytes(blob)
    with pytest.raises(DarknetWeightsError, match=r"file too long: the cfg needs 90 floats after the header, the file has 95 \(5 extra"):
        DarknetModel.from_cfg_text(TINY).load_darknet_weights(p)
    # cutoff: only layers < 2 are read, the rest of the file is allowed (backbone files)
    m = DarknetModel.from_cfg_text(TINY)
    before = m.layers[2].weight.detach().clone()
    m.load_darknet_weights(p, cutoff=2)
    torch.testing.assert_close(m.layers[1].conv.weight, torch.from_numpy(vals[70:82]).view(4, 3, 1, 1))
    torch.testing.assert_close(m.layers[2].weight, before)
    # cutoff with a file too short for the layers it covers is still an error
    q = tmp_path / "short.weights"
    q.write_bytes(tiny_blob(missing=30)[0])
    with pytest.raises(DarknetWeightsError, match=r"layers 0\.\.1 \(cutoff=2\) needs 82 floats"):
        DarknetModel.from_cfg_text(TINY).load_darknet_weights(q, cutoff=2)
    # save with cutoff writes only those layers
    r = tmp_path / "backbone.weights"
    m.save_darknet_weights(r, cutoff=2)
    assert r.read_bytes() == blob[: 20 + 4 * 82]


def test_bad_files(tmp_path):
    p = tmp_path / "x.weights"
    p.write_bytes(b"\x00" * 8)
    with pytest.raises(DarknetWeightsError, match="too short for the 12-byte header"):
        DarknetModel.from_cfg_text(TINY).load_darknet_weights(p)
    blob, _ = tiny_blob()
    p.write_bytes(blob + b"\x00\x01")
    with pytest.raises(DarknetWeightsError, match="not a whole number of float32"):
        DarknetModel.from_cfg_text(TINY).load_darknet_weights(p)


def test_flipped_and_dontload(tmp_path):
    cfg = NET + "[convolutional]\nfilters=3\nsize=1\nflipped=1\n[convolutional]\nfilters=2\nsize=1\ndontload=1\n"
    vals = np.arange(3 + 6, dtype="<f4")
    p = tmp_path / "f.weights"
    p.write_bytes(struct.pack("<iiiQ", 0, 2, 5, 0) + vals.tobytes())
    m = DarknetModel.from_cfg_text(cfg).load_darknet_weights(p)
    # stored as (C*size*size, n) = (2, 3): transposed into PyTorch's (n, C, 1, 1)
    torch.testing.assert_close(m.layers[0].conv.weight.view(3, 2), torch.from_numpy(vals[3:]).view(2, 3).t())
    q = tmp_path / "g.weights"
    m.save_darknet_weights(q)
    assert q.read_bytes() == p.read_bytes()


def test_sam_small_round_trip_byte_for_byte(tmp_path):
    w = write_weights("sam_small", tmp_path)
    cfg, _ = set_paths("sam_small")
    m = DarknetModel.from_cfg(cfg).load_darknet_weights(w)
    out = tmp_path / "saved.weights"
    m.save_darknet_weights(out)
    assert out.read_bytes() == w.read_bytes()
    # and the arrays match make_weights_arrays (names in file order)
    arrays = make_weights_module().make_weights_arrays(str(cfg), 0)
    np.testing.assert_array_equal(m.layers[3].bn.weight.detach().numpy(), arrays[3]["scales"])
    np.testing.assert_array_equal(m.layers[28].conv.bias.detach().numpy(), arrays[28]["biases"])
