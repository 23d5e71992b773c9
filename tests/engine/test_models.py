"""Engine models: attention variants sit where the [sam] blocks were; R-CNN wrapper trains/detects."""
from __future__ import annotations

import pytest
import torch

from spatialattn.engine.models import build_model, resolve_spec


def test_variants_sites_and_maps():
    sam = build_model({"num_classes": 5, "attention": "cfg"})
    assert sam.spec["hook_sites"] == [] and len(sam.darknet.attention_indices) == 2
    pw = build_model({"num_classes": 5, "attention": "sam_pointwise"})
    assert pw.spec["cfg_text"] == sam.spec["cfg_text"]  # the cfg's own [sam] blocks
    none = build_model({"num_classes": 5, "attention": "none"})
    assert none.darknet.attention_indices == [] and len(none.attention) == 0
    cb = build_model({"num_classes": 5, "attention": "cbam"})
    assert cb.spec["hook_sites"] == [10, 17]
    # the sites are the features the [sam] blocks gated: same shapes
    feats = [sam.darknet.infos[i - 2].out_shape for i in sam.darknet.attention_indices]
    assert [cb.darknet.infos[i].out_shape for i in cb.spec["hook_sites"]] == feats
    x = torch.rand(1, 3, 160, 160)
    maps = cb.eval().attention_maps(x)
    assert sorted(maps) == ["layer10.cbam", "layer17.cbam"] and maps["layer10.cbam"].shape == (1, 1, 10, 10)
    # the hooked module is in the forward path: a zero gate zeroes the head feature -> constant outputs
    se = build_model({"num_classes": 5, "attention": "se"}).eval()
    for mod in se.attention.values():
        mod.register_forward_hook(lambda mod, inp, out: out * 0 if not isinstance(out, tuple) else (out[0] * 0, out[1]))
    raw = se.raw_outputs(torch.rand(2, 3, 160, 160))
    assert torch.allclose(raw[0][0], raw[0][1]) and torch.allclose(raw[1][0], raw[1][1])
    assert sum(p.numel() for p in cb.attention.parameters()) > 0
    assert "attention.10." in " ".join(cb.state_dict())
    with pytest.raises(ValueError):
        resolve_spec({"num_classes": 5, "attention": "bogus"})
    with pytest.raises(ValueError, match="num_classes"):
        resolve_spec({"num_classes": 0})


def test_rcnn_detector_trains_and_detects():
    torch.manual_seed(0)
    m = build_model({"model": "fasterrcnn_resnet18_fpn", "num_classes": 3, "roi_attention": "cbam",
                     "backbone_attention": "sam", "image_size": 64}).train()
    x = torch.rand(2, 3, 64, 64)
    tgt = [{"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0]]), "labels": torch.tensor([0])},
           {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    out = m(x, tgt)
    assert torch.isfinite(out["loss"]) and "loss_classifier" in out
    out["loss"].backward()
    m.eval()
    dets = m(x)
    assert len(dets) == 2 and all((d["labels"] >= 0).all() for d in dets)
    maps = m.attention_maps(x)
    assert maps and all(v.shape[0] == 2 for v in maps.values())
