from __future__ import annotations

import pytest
import torch
import yaml

from spatialattn.cli import main as cli_main
from spatialattn.data import (CocoDataset, DatasetError, DatasetSubset, SyntheticShapes, VocDataset,
                              YoloDataset, build_dataset, export_dataset)
from spatialattn.engine.metrics import evaluate_coco

N = 12


@pytest.fixture(scope="module")
def synth():
    return SyntheticShapes("val", num_images=N, image_size=96, seed=11)


def _assert_same(ds, back, atol):
    assert back.classes == ds.classes and len(back) == len(ds)
    for i in range(len(ds)):
        a, ta = ds[i]
        b, tb = back[i]
        assert torch.equal(a, b)  # PNG is lossless
        assert torch.allclose(ta["boxes"], tb["boxes"], atol=atol, rtol=0)
        assert torch.equal(ta["labels"], tb["labels"])


def test_coco_round_trip(tmp_path, synth):
    ann = export_dataset(synth, tmp_path, "coco", split="val")
    assert ann == tmp_path / "annotations" / "instances_val.json"
    back = CocoDataset(ann, tmp_path / "images" / "val")
    _assert_same(synth, back, atol=1e-3)
    assert [back[i][1]["image_id"] for i in range(N)] == list(range(N))
    # the exported ground truth scores the original targets perfectly
    preds = {t["image_id"]: {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))}
             for t in (synth[i][1] for i in range(N))}
    m = evaluate_coco(preds, back)
    assert m["AP"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(1.0)


def test_yolo_round_trip_and_yaml_merge(tmp_path, synth):
    y = export_dataset(synth, tmp_path, "yolo", split="val")
    export_dataset(SyntheticShapes("train", num_images=3, image_size=96), tmp_path, "yolo", split="train")
    cfg = yaml.safe_load(y.read_text())
    assert cfg["val"] == "images/val" and cfg["train"] == "images/train" and cfg["names"] == synth.classes
    _assert_same(synth, YoloDataset(y, "val"), atol=1e-3)  # 6 decimals of 96 px
    assert len(YoloDataset(y, "train")) == 3


def test_voc_round_trip(tmp_path, synth):
    root = export_dataset(synth, tmp_path, "voc", split="val", num_images=5)
    back = VocDataset(root, "val")
    _assert_same(DatasetSubset(synth, range(5)), back, atol=0)


def test_build_dataset_detects_formats(tmp_path, synth):
    export_dataset(synth, tmp_path / "c", "coco", split="val", num_images=4)
    export_dataset(synth, tmp_path / "y", "yolo", split="val", num_images=4)
    export_dataset(synth, tmp_path / "v", "voc", split="val", num_images=4)
    assert isinstance(build_dataset(tmp_path / "c", "val"), CocoDataset)
    assert isinstance(build_dataset(tmp_path / "c" / "annotations" / "instances_val.json", "val",
                                    image_dir=tmp_path / "c" / "images" / "val"), CocoDataset)
    assert isinstance(build_dataset(tmp_path / "y", "val"), YoloDataset)
    assert isinstance(build_dataset(tmp_path / "y" / "data.yaml", "val"), YoloDataset)
    assert isinstance(build_dataset(tmp_path / "v", "val"), VocDataset)
    sub = build_dataset(tmp_path / "v", "val", num_images=2)
    assert len(sub) == 2 and sub.coco_gt().getImgIds() == [0, 1]
    syn = build_dataset("synthetic", "train", num_images=5, image_size=64, seed=2)
    assert isinstance(syn, SyntheticShapes) and len(syn) == 5 and syn.image_size == 64
    with pytest.raises(DatasetError, match="no such file"):
        build_dataset(tmp_path / "nothing", "val")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="cannot tell the format"):
        build_dataset(tmp_path / "empty", "val")
    with pytest.raises(ValueError, match="format must be one of"):
        export_dataset(synth, tmp_path, "pascal")


@pytest.mark.parametrize("fmt", ["coco", "yolo", "voc"])
def test_cli_export(tmp_path, fmt, capsys):
    rc = cli_main(["dataset", "export", "--format", fmt, "--out", str(tmp_path), "--num-images", "3",
                   "--split", "val", "--image-size", "64"])
    assert rc == 0 and "wrote 3 val images" in capsys.readouterr().out
    back = build_dataset(tmp_path, "val")
    _assert_same(SyntheticShapes("val", num_images=3, image_size=64), back, atol=1e-3)
    assert cli_main(["dataset", "info", str(tmp_path), "--split", "val", "--check-images"]) == 0
    assert "images: 3" in capsys.readouterr().out


def test_cli_reports_bad_data_in_one_line(tmp_path, capsys):
    (tmp_path / "data.yaml").write_text("val: images\nnames: [a]\n")
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "x.png")
    (tmp_path / "labels" / "x.txt").write_text("3 0.5 0.5 0.1 0.1\n")
    assert cli_main(["dataset", "info", str(tmp_path), "--split", "val"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "x.txt, line 1: class id 3 out of range" in err
