"""Tests of RoI attention in torchvision Faster / Mask R-CNN and of the builders."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN

from spatialattn.detection.rcnn import (
    attention_state_keys,
    fasterrcnn_resnet18_fpn,
    fasterrcnn_resnet50_fpn,
    load_detection_checkpoint,
    maskrcnn_resnet18_fpn,
    maskrcnn_resnet50_fpn,
)
from spatialattn.detection.roi_heads import (
    RoIAlignWithAttention,
    RoIHeadsWithAttention,
    add_roi_attention,
    roi_attention_maps,
    roi_attention_names,
)
from spatialattn.nn import CBAM, SpatialAttention

SIZE = 64
SMALL = dict(
    num_classes=3, min_size=SIZE, max_size=SIZE,
    rpn_pre_nms_top_n_train=60, rpn_post_nms_top_n_train=30,
    rpn_pre_nms_top_n_test=60, rpn_post_nms_top_n_test=30,
    rpn_batch_size_per_image=32, box_batch_size_per_image=16, box_detections_per_img=12,
)


def _nparams(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _images(n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(n)]


def _targets(masks: bool = False):
    """Image 0: two boxes; image 1: no box (empty targets, boxes [0, 4])."""
    boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [28.0, 20.0, 60.0, 58.0]])
    t0 = {"boxes": boxes, "labels": torch.tensor([1, 2])}
    t1 = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    if masks:
        m = torch.zeros(2, SIZE, SIZE, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            m[i, y0:y1, x0:x1] = 1
        t0["masks"] = m
        t1["masks"] = torch.zeros(0, SIZE, SIZE, dtype=torch.uint8)
    return [t0, t1]


def _total(losses):
    return sum(losses.values())


# ----------------------------------------------------------------------------- structure


def test_add_roi_attention_structure_and_keys():
    torch.manual_seed(0)
    plain = fasterrcnn_resnet18_fpn(**SMALL)
    plain_keys = list(plain.state_dict())
    model = add_roi_attention(copy.deepcopy(plain), "cbam")
    assert type(model.roi_heads) is RoIHeadsWithAttention
    assert isinstance(model.roi_heads.box_roi_pool, RoIAlignWithAttention)
    assert isinstance(model.roi_heads.box_roi_pool.attention, CBAM)
    assert model.roi_heads.box_roi_pool.attention.channels == 256
    assert roi_attention_names(model) == ["roi_heads.box_roi_pool.attention"]
    keys = list(model.state_dict())
    assert set(plain_keys) <= set(keys)
    assert {k for k in keys if k not in plain_keys} == set(attention_state_keys(model))
    assert all(k.startswith("roi_heads.box_roi_pool.attention.") for k in attention_state_keys(model))
    assert _nparams(model) - _nparams(plain) == _nparams(CBAM(256))


def test_mask_rcnn_heads_selection_and_errors():
    model = add_roi_attention(maskrcnn_resnet18_fpn(**SMALL), "sam")
    assert roi_attention_names(model) == ["roi_heads.box_roi_pool.attention", "roi_heads.mask_roi_pool.attention"]
    only_mask = add_roi_attention(maskrcnn_resnet18_fpn(**SMALL), "sam", heads=("mask",))
    assert roi_attention_names(only_mask) == ["roi_heads.mask_roi_pool.attention"]
    faster = fasterrcnn_resnet18_fpn(**SMALL)
    with pytest.raises(ValueError, match="has no mask head"):
        add_roi_attention(faster, "sam", heads=("mask",))
    assert not isinstance(faster.roi_heads.box_roi_pool, RoIAlignWithAttention)  # untouched on error
    with pytest.raises(ValueError, match="unknown head"):
        add_roi_attention(faster, "sam", heads=("keypoint",))
    with pytest.warns(UserWarning, match="has no mask head.*added to \\('box',\\) only"):
        add_roi_attention(faster, "sam", heads=("box", "mask"))  # the default: the heads it has
    assert roi_attention_names(faster) == ["roi_heads.box_roi_pool.attention"]
    faster = add_roi_attention(fasterrcnn_resnet18_fpn(**SMALL), "sam")  # default heads, no warning needed
    with pytest.raises(ValueError, match="already have RoI attention"):
        add_roi_attention(faster, "cbam")
    with pytest.raises(ValueError, match="two-stage detector"):
        add_roi_attention(torchvision.models.resnet18(), "sam")


def test_user_roi_heads_subclass_keeps_its_class():
    from torchvision.models.detection.roi_heads import RoIHeads

    class MyHeads(RoIHeads):
        pass

    model = fasterrcnn_resnet18_fpn(**SMALL)
    model.roi_heads.__class__ = MyHeads
    with pytest.raises(ValueError, match="attach_maps needs torchvision's RoIHeads.*MyHeads"):
        add_roi_attention(model, "sam", attach_maps=True)
    assert not isinstance(model.roi_heads.box_roi_pool, RoIAlignWithAttention)  # untouched on error
    add_roi_attention(model, "sam")
    assert type(model.roi_heads) is MyHeads
    assert isinstance(model.roi_heads.box_roi_pool, RoIAlignWithAttention)


# ----------------------------------------------------------------------------- values


def test_box_head_receives_attended_roi_features():
    torch.manual_seed(0)
    model = fasterrcnn_resnet18_fpn(roi_attention="sam", box_score_thresh=0.0, **SMALL).eval()
    with torch.no_grad():
        model.roi_heads.box_roi_pool.attention.conv.weight.normal_()
    seen = {}
    model.roi_heads.box_roi_pool.pool.register_forward_hook(lambda m, i, o: seen.__setitem__("pooled", o))
    model.roi_heads.box_head.register_forward_hook(lambda m, i, o: seen.__setitem__("head_in", i[0]))
    with torch.no_grad():
        model(_images(1))
        pooled = seen["pooled"]
        assert pooled.shape[1:] == (256, 7, 7) and pooled.shape[0] > 0
        # reference SAM on the pooled RoIs: [max, mean] -> 7x7 conv -> BN (eval) -> sigmoid -> multiply
        att = model.roi_heads.box_roi_pool.attention
        p = torch.cat([pooled.amax(1, keepdim=True), pooled.mean(1, keepdim=True)], 1)
        logit = nn.functional.conv2d(p, att.conv.weight, padding=3)
        logit = (logit - att.bn.running_mean) / torch.sqrt(att.bn.running_var + att.bn.eps) * att.bn.weight + att.bn.bias
        torch.testing.assert_close(seen["head_in"], pooled * torch.sigmoid(logit), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- training


def test_train_forward_backward_faster_with_empty_image():
    torch.manual_seed(0)
    model = fasterrcnn_resnet18_fpn(roi_attention="cbam", backbone_attention="sam", backbone_stages=(4,), **SMALL)
    model.train()
    losses = model(_images(), _targets())
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    _total(losses).backward()
    roi_att = model.roi_heads.box_roi_pool.attention
    assert roi_att.spatial.conv.weight.grad.abs().sum() > 0
    assert roi_att.channel.fc1.weight.grad.abs().sum() > 0
    assert model.backbone.body.layer4[0].attention.conv.weight.grad.abs().sum() > 0


def test_sgd_steps_reduce_loss_on_fixed_batch():
    torch.manual_seed(0)
    model = fasterrcnn_resnet18_fpn(roi_attention="cbam", backbone_attention="sam", backbone_stages=(3, 4), **SMALL)
    model.train()
    images, targets = _images(), _targets()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def loss_at(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)  # same RPN / RoI sampling for the before / after comparison
        return _total(model(images, targets))

    with torch.no_grad():
        before = float(loss_at(123))
    for step in range(4):
        opt.zero_grad()
        loss = loss_at(step)
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(loss_at(123))
    assert math.isfinite(after) and after < 0.8 * before, (before, after)


def test_mask_rcnn_train_reaches_both_attentions():
    torch.manual_seed(0)
    model = maskrcnn_resnet18_fpn(roi_attention="sam", **SMALL).train()
    losses = model(_images(), _targets(masks=True))
    assert "loss_mask" in losses and all(torch.isfinite(v) for v in losses.values())
    _total(losses).backward()
    assert model.roi_heads.box_roi_pool.attention.conv.weight.grad.abs().sum() > 0
    assert model.roi_heads.mask_roi_pool.attention.conv.weight.grad.abs().sum() > 0


def test_zero_rois_in_training_and_zero_proposals_in_eval():
    torch.manual_seed(0)
    kw = dict(SMALL, rpn_post_nms_top_n_train=0, rpn_post_nms_top_n_test=0)
    model = maskrcnn_resnet18_fpn(roi_attention="cbam", **kw).train()
    empty = [dict(t) for t in _targets(masks=True)[1:]] * 2  # two images without boxes
    losses = model(_images(), empty)  # no proposal, no ground truth: zero RoIs
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert losses["loss_classifier"].item() == 0.0 and losses["loss_box_reg"].item() == 0.0
    _total(losses).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with roi_attention_maps(model), torch.no_grad():
        dets = model(_images())
    for d in dets:
        assert d["boxes"].shape == (0, 4)
        assert d["attention"].shape == (0, 1, 7, 7) and d["mask_attention"].shape == (0, 1, 14, 14)


# ----------------------------------------------------------------------------- per-detection maps


def test_per_detection_maps_are_aligned_with_final_boxes():
    torch.manual_seed(0)
    model = maskrcnn_resnet18_fpn(roi_attention="cbam", box_score_thresh=0.0, **SMALL).eval()
    images = _images()
    with torch.no_grad():
        plain = model(images)
        assert "attention" not in plain[0]  # off by default
        with roi_attention_maps(model):
            dets = model(images)
    assert model.roi_heads.attach_attention_maps is False  # restored
    for d, p in zip(dets, plain):
        n = d["boxes"].shape[0]
        assert n > 0
        torch.testing.assert_close(d["boxes"], p["boxes"])  # detections themselves unchanged
        assert d["attention"].shape == (n, 1, 7, 7)
        assert d["mask_attention"].shape == (n, 1, 14, 14)
    # reference: pool each final box of image 1 alone and apply the attention (images are SIZE x SIZE,
    # so the resize is the identity and the final boxes are in the frame of the features)
    with torch.no_grad():
        batch, _ = model.transform(images)
        assert batch.image_sizes[0] == (SIZE, SIZE)
        feats = {k: v[1:2] for k, v in model.backbone(batch.tensors).items()}  # image 1 only
        rh = model.roi_heads
        box = dets[1]["boxes"][3:4]
        _, ref = rh.box_roi_pool.attention(rh.box_roi_pool.pool(feats, [box], batch.image_sizes[1:]),
                                           return_attention=True)
        torch.testing.assert_close(dets[1]["attention"][3:4], ref)
        _, ref_m = rh.mask_roi_pool.attention(rh.mask_roi_pool.pool(feats, [box], batch.image_sizes[1:]),
                                              return_attention=True)
        torch.testing.assert_close(dets[1]["mask_attention"][3:4], ref_m)


def test_zero_detections_give_empty_maps():
    torch.manual_seed(0)
    model = fasterrcnn_resnet18_fpn(roi_attention="sam", box_score_thresh=1.0, **SMALL).eval()
    model.roi_heads.attach_attention_maps = True
    with torch.no_grad():
        dets = model(_images())
    for d in dets:
        assert d["boxes"].shape == (0, 4) and d["attention"].shape == (0, 1, 7, 7)
        assert "mask_attention" not in d


def test_roi_attention_maps_needs_attention():
    with pytest.raises(ValueError, match="add_roi_attention first"):
        with roi_attention_maps(fasterrcnn_resnet18_fpn(**SMALL)):
            pass


# ----------------------------------------------------------------------------- checkpoints


def test_plain_torchvision_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    plain = fasterrcnn_resnet18_fpn(**SMALL)  # no attention: a plain torchvision FasterRCNN
    assert type(plain) is FasterRCNN and type(plain.roi_heads).__name__ == "RoIHeads"
    path = tmp_path / "plain.pth"
    torch.save(plain.state_dict(), path)
    torch.manual_seed(1)
    model = fasterrcnn_resnet18_fpn(roi_attention="cbam", backbone_attention="sam", **SMALL)
    report = load_detection_checkpoint(model, path)
    assert report.ok and report.missing_keys == [] and report.unexpected_keys == []
    assert report.attention_keys and all(k in attention_state_keys(model) for k in report.attention_keys)
    sd = model.state_dict()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(sd[k], v, rtol=0, atol=0)
    # with "none" attention everywhere the loaded model computes exactly what the plain one does
    twin = fasterrcnn_resnet18_fpn(roi_attention="none", backbone_attention="none", box_score_thresh=0.0, **SMALL)
    assert load_detection_checkpoint(twin, {"model": {f"module.{k}": v for k, v in plain.state_dict().items()}}).ok
    plain.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        a, b = twin.eval()(_images(1)), plain.eval()(_images(1))
    torch.testing.assert_close(a[0]["boxes"], b[0]["boxes"])
    torch.testing.assert_close(a[0]["scores"], b[0]["scores"])


def test_checkpoint_mismatch_is_reported():
    model = fasterrcnn_resnet18_fpn(roi_attention="sam", **SMALL)
    sd = fasterrcnn_resnet18_fpn(**SMALL).state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["roi_heads.box_head.fc6.bias"]
    with pytest.raises(RuntimeError, match=r"missing keys \(not attention\): roi_heads.box_head.fc6.bias.*extra.weight"):
        load_detection_checkpoint(model, sd)
    report = load_detection_checkpoint(model, sd, strict=False)
    assert report.missing_keys == ["roi_heads.box_head.fc6.bias"] and report.unexpected_keys == ["extra.weight"]
    with pytest.raises(RuntimeError, match="size mismatch"):  # other num_classes
        load_detection_checkpoint(model, fasterrcnn_resnet18_fpn(**dict(SMALL, num_classes=5)).state_dict())


def test_resnet50_builders_match_torchvision_and_load_its_checkpoint():
    with torch.device("meta"):  # structure, counts and key matching only: no weight initialisation
        _check_resnet50_builders()


def _check_resnet50_builders():
    tv = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    model = fasterrcnn_resnet50_fpn(roi_attention="cbam", backbone_attention="sam", num_classes=3)
    extra = _nparams(CBAM(256)) + 16 * _nparams(SpatialAttention(1))  # 16 Bottlenecks in ResNet-50
    assert _nparams(model) - _nparams(tv) == extra == 10164
    report = load_detection_checkpoint(model, tv.state_dict())  # torchvision builder's checkpoint
    assert report.ok and len(report.attention_keys) > 0
    mask = maskrcnn_resnet50_fpn(roi_attention="sam", num_classes=3)
    assert type(mask) is MaskRCNN
    assert roi_attention_names(mask) == ["roi_heads.box_roi_pool.attention", "roi_heads.mask_roi_pool.attention"]
    tv_mask = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    assert _nparams(mask) - _nparams(tv_mask) == 2 * _nparams(SpatialAttention(256))
    assert load_detection_checkpoint(mask, tv_mask.state_dict()).ok


# ----------------------------------------------------------------------------- copy / pickle


def test_detector_deepcopy_and_pickle():
    torch.manual_seed(0)
    model = maskrcnn_resnet18_fpn(roi_attention="cbam", backbone_attention="sam", box_score_thresh=0.0, **SMALL)
    model.eval()
    images = _images(1)
    with torch.no_grad(), roi_attention_maps(model):
        ref = model(images)
    buf = io.BytesIO()
    torch.save(copy.deepcopy(model), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded.roi_heads) is RoIHeadsWithAttention
    with torch.no_grad(), roi_attention_maps(loaded):
        out = loaded(images)
    for k in ("boxes", "scores", "attention", "mask_attention"):
        torch.testing.assert_close(out[0][k], ref[0][k], rtol=0, atol=0)
