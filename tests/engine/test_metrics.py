from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp_mp

from spatialattn.data import SyntheticShapes
from spatialattn.engine.metrics import METRIC_NAMES, CocoEvaluator, evaluate_coco, merge_predictions


def _t(image_id, boxes, labels):
    return {"image_id": image_id, "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64)}


def _p(boxes, labels, scores):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64), "scores": torch.tensor(scores, dtype=torch.float32)}


GT = [_t(0, [[10, 10, 50, 50]], [0]), _t(1, [], [])]  # a 40x40 (medium) box and an empty image


def test_perfect_predictions_ap_one():
    preds = {0: _p([[10, 10, 50, 50]], [0], [0.9]), 1: _p([], [], [])}
    m = evaluate_coco(preds, GT)
    for k in ("AP", "AP50", "AP75", "APm", "AR100"):
        assert m[k] == pytest.approx(1.0, abs=1e-12), k
    assert m["APs"] == -1 and m["APl"] == -1  # no ground truth in those ranges
    assert m["num_images"] == 2 and m["num_detections"] == 1


def test_shifted_box_between_050_and_075():
    # shift by 8 px: IoU = 32*40 / (48*40) = 2/3 -> matched at IoU 0.50, 0.55, 0.60, 0.65 only
    m = evaluate_coco({0: _p([[18, 10, 58, 50]], [0], [0.9]), 1: _p([], [], [])}, GT)
    assert m["AP50"] == pytest.approx(1.0, abs=1e-12)
    assert m["AP75"] == 0.0
    assert m["AP"] == pytest.approx(0.4, abs=1e-12)


def test_zero_detections_and_wrong_class():
    empty = {0: _p([], [], []), 1: _p([], [], [])}
    m = evaluate_coco(empty, GT)
    assert (m["AP"], m["AP50"], m["AP75"], m["APm"]) == (0.0, 0.0, 0.0, 0.0)
    assert evaluate_coco({}, GT)["AP50"] == 0.0  # no entries at all: every GT image, no crash
    wrong = evaluate_coco({0: _p([[10, 10, 50, 50]], [1], [0.9]), 1: _p([], [], [])}, GT,
                          classes=["a", "b"])
    assert wrong["AP50"] == 0.0


def test_half_recall_101_point_interpolation():
    gt = [_t(0, [[0, 0, 20, 20], [40, 40, 60, 60]], [0, 0])]
    m = evaluate_coco({0: _p([[0, 0, 20, 20]], [0], [1.0])}, gt)
    assert m["AP50"] == pytest.approx(51 / 101, abs=1e-12)  # precision 1 at recall 0.00 ... 0.50
    assert m["APs"] == pytest.approx(51 / 101, abs=1e-12) and m["APm"] == -1
    # a false positive on an image without ground truth ranked first halves precision
    gt2 = gt + [_t(5, [], [])]
    m2 = evaluate_coco({0: _p([[0, 0, 20, 20]], [0], [0.5]), 5: _p([[1, 1, 9, 9]], [0], [0.9])}, gt2)
    assert m2["AP50"] == pytest.approx(0.5 * 51 / 101, abs=1e-12)


def test_matches_official_pycocotools_on_random_case(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ds = SyntheticShapes("val", num_images=15, seed=4)
    rng = np.random.default_rng(0)
    preds, results = {}, []
    for i in range(len(ds)):
        t = ds[i][1]
        b = t["boxes"].numpy() + rng.normal(0, 3, size=t["boxes"].shape)
        b = np.concatenate([b, rng.uniform(0, 80, size=(2, 2)).repeat(2, 1) + [0, 0, 30, 30]])
        lab = np.concatenate([t["labels"].numpy(), rng.integers(0, 5, 2)])
        lab[rng.random(len(lab)) < 0.2] = rng.integers(0, 5)
        sc = rng.random(len(lab))
        preds[i] = {"boxes": torch.tensor(b), "labels": torch.tensor(lab), "scores": torch.tensor(sc)}
        results += [{"image_id": i, "category_id": int(l) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                     "score": float(s)} for (x1, y1, x2, y2), l, s in zip(b.tolist(), lab, sc)]
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(ds.coco_gt().dataset))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate(); ev.accumulate(); ev.summarize()
    m = evaluate_coco(preds, ds)
    assert [m[k] for k in METRIC_NAMES] == pytest.approx(list(ev.stats), abs=1e-12)
    assert 0 < m["AP75"] < m["AP50"] < 1


def test_quiet_unless_verbose(capsys):
    evaluate_coco({0: _p([[10, 10, 50, 50]], [0], [0.9])}, GT)
    assert capsys.readouterr().out == ""
    evaluate_coco({0: _p([[10, 10, 50, 50]], [0], [0.9])}, GT, verbose=True)
    assert "Average Precision" in capsys.readouterr().out


def test_per_class_and_input_errors():
    gt = [_t(0, [[0, 0, 20, 20], [30, 30, 60, 60]], [0, 1])]
    m = evaluate_coco([dict(_p([[0, 0, 20, 20]], [0], [1.0]), image_id=0)], gt, classes=["a", "b", "c"],
                      per_class=True)
    assert m["AP_per_class"] == {"a": pytest.approx(1.0), "b": 0.0, "c": -1.0}
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate_coco({7: _p([], [], [])}, gt)
    with pytest.raises(ValueError, match="out of range"):
        evaluate_coco({0: _p([[0, 0, 1, 1]], [3], [1.0])}, gt)
    with pytest.raises(ValueError, match="image_id"):
        evaluate_coco([_p([], [], [])], gt)
    with pytest.raises(ValueError, match="equal counts"):
        evaluate_coco({0: {"boxes": torch.zeros(2, 4), "labels": torch.zeros(1, dtype=torch.long),
                           "scores": torch.zeros(2)}}, gt)
    # mean over the classes with ground truth: (1 + 0) / 2
    assert evaluate_coco([_p([[0, 0, 20, 20]], [0], [1.0])], gt, image_ids=[0])["AP50"] == pytest.approx(0.5)


def test_evaluator_batches_duplicates_and_merge():
    ds = SyntheticShapes("val", num_images=6)
    targets = [ds[i][1] for i in range(6)]
    perfect = [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))} for t in targets]
    ev = CocoEvaluator(ds.classes)
    ev.update(perfect[:4], targets[:4])
    ev.update(perfect[3:], targets[3:])  # image 3 twice (as DistributedSampler pads)
    assert len(ev) == 6
    assert ev.compute()["AP"] == pytest.approx(1.0) and ev.compute(ds)["AP"] == pytest.approx(1.0)
    a, b = CocoEvaluator(), CocoEvaluator()
    a.update(perfect[0::2], targets[0::2])
    b.update(perfect[1::2] + perfect[:1], targets[1::2] + targets[:1])
    a.merge([b])
    assert sorted(a.predictions) == list(range(6)) and a.compute(ds)["AP"] == pytest.approx(1.0)
    assert merge_predictions([{1: "x"}, {1: "y", 2: "z"}]) == {1: "x", 2: "z"}
    ev.gather()  # not distributed: no-op
    assert len(ev) == 6
    with pytest.raises(ValueError, match="2 predictions for 1 targets"):
        ev.update(perfect[:2], targets[:1])


def _gather_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ds = SyntheticShapes("val", num_images=5)
    idx = [0, 2, 4] if rank == 0 else [1, 3, 0]  # padded like DistributedSampler: image 0 twice
    ev = CocoEvaluator()
    for i in idx:
        t = ds[i][1]
        box = t["boxes"] + (4.0 if i % 2 else 0.0)
        ev.update([{"boxes": box, "labels": t["labels"], "scores": torch.ones(len(box))}], [t])
    ev.gather()
    m = ev.compute(ds)
    with open(os.path.join(out_dir, f"r{rank}.json"), "w") as f:
        json.dump({"ids": sorted(ev.predictions), "AP": m["AP"]}, f)
    dist.destroy_process_group()


def test_gather_two_gloo_ranks(tmp_path):
    tmp_mp.start_processes(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                           join=True, start_method="fork")
    r0, r1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1 and r0["ids"] == [0, 1, 2, 3, 4]
    ds = SyntheticShapes("val", num_images=5)
    single = {}
    for i in range(5):
        t = ds[i][1]
        single[i] = {"boxes": t["boxes"] + (4.0 if i % 2 else 0.0), "labels": t["labels"],
                     "scores": torch.ones(len(t["labels"]))}
    assert r0["AP"] == evaluate_coco(single, ds)["AP"]
