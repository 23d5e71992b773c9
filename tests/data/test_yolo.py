from __future__ import annotations

import pytest
import torch

from spatialattn.data import DatasetError, YoloDataset
from spatialattn.data.yolo import label_path_for

from ._helpers import write_png


def _yolo(tmp_path, labels="0 0.5 0.5 0.5 0.2\n\n1 0.25 0.75 0.1 0.5\n", yaml_text=None):
    root = tmp_path / "ds"
    write_png(root / "images" / "val" / "a.png", 40, 20, seed=1)
    write_png(root / "images" / "val" / "b.png", 10, 10, seed=2)  # no label file -> no objects
    (root / "labels" / "val").mkdir(parents=True)
    (root / "labels" / "val" / "a.txt").write_text(labels)
    y = root / "data.yaml"
    y.write_text(yaml_text if yaml_text is not None else
                 "path: .\ntrain: images/train\nval: images/val\nnames: [cat, dog]\n")
    return y


def test_reads_samples(tmp_path):
    ds = YoloDataset(_yolo(tmp_path), "val")
    assert len(ds) == 2 and ds.classes == ["cat", "dog"]
    image, t = ds[0]
    assert image.shape == (3, 20, 40)
    # cx=0.5 cy=0.5 w=0.5 h=0.2 on 40x20 -> [10, 8, 30, 12]; 0.25 0.75 0.1 0.5 -> [8, 10, 12, 20]
    assert torch.allclose(t["boxes"], torch.tensor([[10.0, 8, 30, 12], [8, 10, 12, 20]]))
    assert t["labels"].tolist() == [0, 1] and t["image_id"] == 0
    assert torch.equal(ds.record(0).target()["boxes"], t["boxes"])  # header-only path agrees
    image, t = ds[1]
    assert image.shape == (3, 10, 10) and t["boxes"].shape == (0, 4)


def test_names_dict_txt_list_and_absolute_path(tmp_path):
    y = _yolo(tmp_path)
    root = y.parent
    (root / "val.txt").write_text("./images/val/b.png\nimages/val/a.png\n")
    y.write_text(f"path: {root}\nval: val.txt\nnames:\n  0: cat\n  1: dog\nnc: 2\n")
    ds = YoloDataset(y, "val")
    assert ds.classes == ["cat", "dog"] and [p.name for p in ds._images] == ["b.png", "a.png"]
    assert ds[1][1]["labels"].tolist() == [0, 1]


def test_label_path_convention(tmp_path):
    assert label_path_for(tmp_path / "images" / "x" / "images" / "i.jpg") == tmp_path / "images" / "x" / "labels" / "i.txt"


@pytest.mark.parametrize("labels, line, match", [
    ("0 0.5 0.5 0.2\n", 1, "expected 5 fields"),
    ("0 0.5 0.5 0.2 0.2 0.1\n", 1, "expected 5 fields"),
    ("0 0.5 0.5 0.2 0.2\n1 0.5 1.2 0.2 0.2\n", 2, r"values in \[0, 1\]"),
    ("0 0.5 0.5 -0.1 0.2\n", 1, r"values in \[0, 1\]"),
    ("\n2 0.5 0.5 0.2 0.2\n", 2, "class id 2 out of range"),
    ("-1 0.5 0.5 0.2 0.2\n", 1, "class id -1 out of range"),
    ("0.5 0.5 0.5 0.2 0.2\n", 1, "integer class id"),
    ("0 0.5 abc 0.2 0.2\n", 1, "expected numbers"),
    ("0 0.5 0.5 0 0.2\n", 1, "width > 0"),
])
def test_bad_label_lines(tmp_path, labels, line, match):
    y = _yolo(tmp_path, labels)
    with pytest.raises(DatasetError, match=match) as e:
        YoloDataset(y, "val")
    assert e.value.path == str(y.parent / "labels" / "val" / "a.txt")
    assert e.value.where == f"line {line}"


def test_box_outside_image_fails_when_size_known(tmp_path):
    y = _yolo(tmp_path, "0 0.5 0.5 0.2 0.2\n1 0.9 0.5 0.5 0.2\n")  # x2 = 1.15 * 40 = 46 > 40 + 1
    ds = YoloDataset(y, "val")
    for get in (ds.__getitem__, ds.record):
        with pytest.raises(DatasetError, match="outside the 40x20 image") as e:
            get(0)
        assert e.value.where == "line 2" and e.value.path.endswith("a.txt")


@pytest.mark.parametrize("yaml_text, match", [
    ("val: images/val\n  bad: indent\nnames: [cat, dog]\n", "malformed YAML"),
    ("val: images/val\n", "'names' as a list"),
    ("val: images/val\nnames: {0: cat, 2: dog}\n", r"'names' keys 0..1"),
    ("val: images/val\nnames: [cat]\nnc: 3\n", "'nc' is 3"),
    ("train: images/val\nnames: [cat, dog]\n", "no 'val' entry"),
    ("val: images/nothere\nnames: [cat, dog]\n", "neither an image folder"),
    ("- just\n- a list\n", "mapping at the top level"),
])
def test_bad_yaml(tmp_path, yaml_text, match):
    y = _yolo(tmp_path, yaml_text=yaml_text)
    with pytest.raises(DatasetError, match=match) as e:
        YoloDataset(y, "val")
    assert e.value.path == str(y)
    if "malformed" in match:
        assert e.value.where.startswith("line 2")


def test_missing_image_in_list_and_unreadable_image(tmp_path):
    y = _yolo(tmp_path)
    (y.parent / "val.txt").write_text("images/val/a.png\nimages/val/zzz.png\n")
    y.write_text("val: val.txt\nnames: [cat, dog]\n")
    with pytest.raises(DatasetError, match="image file not found") as e:
        YoloDataset(y, "val")
    assert e.value.path == str(y.parent / "val.txt") and e.value.where == "line 2"
    y.write_text("val: images/val\nnames: [cat, dog]\n")
    ds = YoloDataset(y, "val")
    (y.parent / "images" / "val" / "b.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match="cannot read image") as e:
        ds[1]
    assert e.value.path.endswith("b.png")
