from __future__ import annotations

import numpy as np
import pytest
import torch

from spatialattn.data import BOX_TOLERANCE_PX, CocoDataset, DatasetError

from ._helpers import write_json, write_png


def _coco(tmp_path, **over):
    data = {
        "images": [{"id": 10, "file_name": "a.png", "width": 40, "height": 30},
                   {"id": 11, "file_name": "sub/b.png", "width": 20, "height": 20}],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [1, 2, 10, 5], "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [20.5, 0, 19.5, 30], "iscrowd": 1},
        ],
    }
    data.update(over)
    return write_json(tmp_path / "ann.json", data)


@pytest.fixture
def coco(tmp_path):
    a = write_png(tmp_path / "a.png", 40, 30, seed=1)
    b = write_png(tmp_path / "sub" / "b.png", 20, 20, seed=2)
    return _coco(tmp_path), a, b


def test_reads_samples(coco):
    path, a, b = coco
    ds = CocoDataset(path)
    assert len(ds) == 2 and ds.classes == ["cat", "dog"] and ds.category_ids == [3, 7]
    image, t = ds[0]
    assert torch.equal(image, torch.from_numpy(a).permute(2, 0, 1).float() / 255)
    assert t["image_id"] == 10 and t["orig_size"] == (30, 40)
    assert torch.equal(t["boxes"], torch.tensor([[1.0, 2, 11, 7], [20.5, 0, 40, 30]]))
    assert t["labels"].tolist() == [1, 0] and t["labels"].dtype == torch.int64
    assert t["iscrowd"].tolist() == [0, 1]
    image, t = ds[1]  # image without annotations is valid
    assert image.shape == (3, 20, 20) and t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)


def test_coco_gt_uses_label_plus_one(coco):
    ds = CocoDataset(coco[0])
    gt = ds.coco_gt()
    assert sorted(gt.getImgIds()) == [10, 11]
    anns = gt.loadAnns(gt.getAnnIds(imgIds=[10]))
    assert [(a["category_id"], a["bbox"], a["iscrowd"]) for a in anns] == [
        (2, [1.0, 2.0, 10.0, 5.0], 0), (1, [20.5, 0.0, 19.5, 30.0], 1)]


def test_box_within_tolerance_is_clipped(tmp_path):
    write_png(tmp_path / "a.png", 40, 30)
    path = _coco(tmp_path, annotations=[{"id": 5, "image_id": 10, "category_id": 3,
                                         "bbox": [-0.5, 1, 40.9, 29.5]}])
    assert BOX_TOLERANCE_PX == 1.0
    assert CocoDataset(path).record(0).boxes.tolist() == [[0.0, 1.0, 40.0, 30.0]]


@pytest.mark.parametrize("over, where, match", [
    ({"annotations": [{"id": 9, "image_id": 10, "category_id": 3, "bbox": [5, 5, 0, 4]}]},
     "annotations[0] (id=9)", "x2 > x1"),
    ({"annotations": [{"id": 9, "image_id": 10, "category_id": 3, "bbox": [5, 5, 4, -1]}]},
     "annotations[0] (id=9)", "y2 > y1"),
    ({"annotations": [{"id": 1, "image_id": 10, "category_id": 3, "bbox": [1, 1, 2, 2]},
                      {"id": 4, "image_id": 11, "category_id": 3, "bbox": [15, 0, 7, 5]}]},
     "annotations[1] (id=4)", "outside the 20x20 image"),
    ({"annotations": [{"id": 9, "image_id": 10, "category_id": 5, "bbox": [1, 1, 2, 2]}]},
     "annotations[0] (id=9)", "category_id 5 is not in 'categories'"),
    ({"annotations": [{"id": 9, "image_id": 99, "category_id": 3, "bbox": [1, 1, 2, 2]}]},
     "annotations[0] (id=9)", "image_id 99 is not in 'images'"),
    ({"annotations": [{"id": 9, "image_id": 10, "category_id": 3, "bbox": [1, 1, 2]}]},
     "annotations[0] (id=9)", "4 finite numbers"),
    ({"annotations": [{"id": 9, "image_id": 10, "category_id": 3, "bbox": [1, 1, "2", 2]}]},
     "annotations[0] (id=9)", "4 finite numbers"),
    ({"images": [{"id": 1, "file_name": "a.png", "width": 4, "height": 4},
                 {"id": 1, "file_name": "b.png", "width": 4, "height": 4}], "annotations": []},
     "images[1]", "duplicate image id 1"),
    ({"images": [{"id": 1, "file_name": "a.png", "width": 0, "height": 4}], "annotations": []},
     "images[0]", "positive integer 'width'"),
    ({"categories": [{"name": "x"}]}, "categories[0]", "integer 'id'"),
    ({"images": None}, None, "list under 'images'"),
])
def test_bad_annotations(tmp_path, over, where, match):
    path = _coco(tmp_path, **over)
    with pytest.raises(DatasetError, match=match) as e:
        CocoDataset(path)
    assert e.value.path == str(path) and e.value.where == where
    assert str(path) in str(e.value)


def test_malformed_json_names_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{\n "images": [],\n "categories": [,]\n}')
    with pytest.raises(DatasetError, match="malformed JSON") as e:
        CocoDataset(p)
    assert e.value.where.startswith("line 3")
    with pytest.raises(DatasetError, match="not found"):
        CocoDataset(tmp_path / "missing.json")


def test_missing_and_unreadable_images_fail_lazily(tmp_path):
    path = _coco(tmp_path)  # no image files written
    ds = CocoDataset(path)  # annotations are fine
    with pytest.raises(DatasetError, match="image file not found") as e:
        ds[0]
    assert e.value.path == str(tmp_path / "a.png")
    (tmp_path / "a.png").write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match="cannot read image") as e:
        ds[0]
    assert e.value.path == str(tmp_path / "a.png")


def test_image_size_mismatch(tmp_path):
    write_png(tmp_path / "a.png", 41, 30)
    with pytest.raises(DatasetError, match="annotation says the image is 40x30, the file is 41x30"):
        CocoDataset(_coco(tmp_path))[0]


def test_image_dir_argument(tmp_path):
    arr = write_png(tmp_path / "imgs" / "a.png", 40, 30, seed=4)
    write_png(tmp_path / "imgs" / "sub" / "b.png", 20, 20)
    ds = CocoDataset(_coco(tmp_path), image_dir=tmp_path / "imgs")
    assert np.array_equal(ds.load_image(0), arr)
