from __future__ import annotations

import pytest
import torch

from spatialattn.data import VOC_CLASSES, DatasetError, VocDataset

from ._helpers import write_png

XML = """<annotation>
  <filename>{fname}</filename>
  {size}
  {objects}
</annotation>
"""


def _obj(name, box, difficult=0):
    xmin, ymin, xmax, ymax = box
    return (f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin>"
            f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")


def _voc(tmp_path, objects=None, size="<size><width>40</width><height>30</height></size>",
         classes="cat\ndog\n", split_ids=("a", "b")):
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    write_png(root / "JPEGImages" / "a.png", 40, 30, seed=1)
    write_png(root / "JPEGImages" / "b.jpg", 12, 12, seed=2)
    objects = objects if objects is not None else [_obj("dog", (1, 2, 10, 20)), _obj("cat", (5, 5, 40, 30), 1)]
    (root / "Annotations" / "a.xml").write_text(XML.format(fname="a.png", size=size, objects="".join(objects)))
    (root / "Annotations" / "b.xml").write_text("<annotation></annotation>")  # no filename -> b.jpg
    if classes is not None:
        (root / "classes.txt").write_text(classes)
    if split_ids is not None:
        (root / "ImageSets" / "Main").mkdir(parents=True)
        (root / "ImageSets" / "Main" / "val.txt").write_text("".join(i + "\n" for i in split_ids))
    return root


def test_reads_samples(tmp_path):
    ds = VocDataset(_voc(tmp_path), "val")
    assert len(ds) == 2 and ds.classes == ["cat", "dog"]
    image, t = ds[0]
    assert image.shape == (3, 30, 40)
    # 1-based inclusive -> xyxy (xmin - 1, ymin - 1, xmax, ymax)
    assert torch.equal(t["boxes"], torch.tensor([[0.0, 1, 10, 20], [4, 4, 40, 30]]))
    assert t["labels"].tolist() == [1, 0] and t["iscrowd"].tolist() == [0, 1]
    image, t = ds[1]
    assert image.shape == (3, 12, 12) and t["boxes"].shape == (0, 4)
    ds = VocDataset(_voc(tmp_path / "2"), "val", keep_difficult=False)
    assert ds[0][1]["labels"].tolist() == [1]


def test_default_classes_no_imagesets_no_size(tmp_path):
    root = _voc(tmp_path, objects=[_obj("person", (1, 1, 40, 30))], size="", classes=None, split_ids=None)
    ds = VocDataset(root, "train")  # no ImageSets: every XML
    assert ds.classes == list(VOC_CLASSES) and len(ds) == 2
    assert ds.record(0).width == 40  # size from the image header
    assert ds[0][1]["labels"].tolist() == [VOC_CLASSES.index("person")]


@pytest.mark.parametrize("objects, where, match", [
    ([_obj("dog", (1, 1, 5, 5)), _obj("horse", (1, 1, 5, 5))], "object[1] (horse)", "class 'horse' is not one of"),
    (["<object><name>dog</name></object>"], "object[0] (dog)", "expected a <bndbox>"),
    (["<object><bndbox/></object>"], "object[0]", "expected a <name>"),
    ([_obj("dog", (10, 1, 5, 5))], "object[0] (dog)", "xmax >= xmin"),
    ([_obj("dog", (1, 8, 5, 5))], "object[0] (dog)", "ymax >= ymin"),
    ([_obj("dog", (1, 1, "x", 5))], "object[0] (dog)", "numeric"),
    ([_obj("dog", (1, 1, 45, 5))], "object[0] (dog)", "outside the 40x30 image"),
    ([_obj("dog", (1, 1, 5, 5), difficult=2)], "object[0] (dog)", "<difficult> 0 or 1"),
])
def test_bad_objects(tmp_path, objects, where, match):
    root = _voc(tmp_path, objects=objects)
    with pytest.raises(DatasetError, match=match) as e:
        VocDataset(root, "val")
    assert e.value.path == str(root / "Annotations" / "a.xml") and e.value.where == where


def test_malformed_xml_and_split_problems(tmp_path):
    root = _voc(tmp_path)
    (root / "Annotations" / "b.xml").write_text("<annotation>\n<filename>b.jpg</filename>\n<size>\n</annotation>")
    with pytest.raises(DatasetError, match="malformed XML") as e:
        VocDataset(root, "val")
    assert e.value.path.endswith("b.xml") and e.value.where.startswith("line 4")
    with pytest.raises(DatasetError, match="split file for 'test' not found"):
        VocDataset(root, "test")
    root2 = _voc(tmp_path / "2", split_ids=("a", "zz"))
    with pytest.raises(DatasetError, match="annotation file not found") as e:
        VocDataset(root2, "val")
    assert e.value.path.endswith("val.txt") and e.value.where == "line 2"


def test_missing_image_lazily(tmp_path):
    root = _voc(tmp_path)
    (root / "JPEGImages" / "b.jpg").unlink()
    ds = VocDataset(root, "val")
    with pytest.raises(DatasetError, match="image file not found") as e:
        ds[1]
    assert e.value.path == str(root / "JPEGImages" / "b.jpg")
