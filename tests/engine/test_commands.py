"""CLI paths: eval with known AP (1, 0.1, 0), compare writes its table/CSV/PNG, attention maps."""
from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch
from PIL import Image

import spatialattn.engine.models as models
from spatialattn.cli import main
from spatialattn.data import SyntheticShapes, build_transforms
from spatialattn.engine.checkpoint import atomic_save
from spatialattn.engine.config import load_config

N_VAL, SIZE = 6, 64


class OracleDetector(torch.nn.Module):
    """Finds each input image among the val images and returns its boxes, shrunk by ``f`` per side
    (IoU = f**2 with the truth), or nothing."""

    def __init__(self, f):
        super().__init__()
        ds = SyntheticShapes("val", num_images=N_VAL, image_size=SIZE)
        tf = build_transforms(False, SIZE)
        self.known = [tf(*ds[i]) for i in range(N_VAL)]
        self.f = f

    def forward(self, images, targets=None):
        out = []
        for im in images:
            hit = [t for x, t in self.known if torch.equal(x, im)]
            assert len(hit) == 1
            b = hit[0]["boxes"].clone()
            if self.f is None:
                b = b[:0]
            c, wh = (b[:, :2] + b[:, 2:]) / 2, (b[:, 2:] - b[:, :2]) * (self.f or 1) / 2
            out.append({"boxes": torch.cat([c - wh, c + wh], 1), "scores": torch.ones(len(b)),
                        "labels": hit[0]["labels"][: len(b)]})
        return out


@pytest.mark.parametrize("f,expected", [(1.0, (1.0, 1.0, 1.0)), (0.7246, (0.1, 1.0, 0.0)), (None, (0.0, 0.0, 0.0))])
def test_eval_cli_known_ap(tmp_path, monkeypatch, capsys, f, expected):
    cfg = load_config(None, {"image_size": SIZE, "val_images": N_VAL})
    spec = {"model": "darknet", "classes": list(SyntheticShapes("val", 1).classes), "num_classes": 5}
    atomic_save({"model": {}, "spec": spec, "config": cfg}, str(tmp_path / "best.pt"))
    monkeypatch.setattr(models, "build_model", lambda s: OracleDetector(f))
    out_json = tmp_path / "m.json"
    assert main(["eval", "--weights", str(tmp_path / "best.pt"), "--json", str(out_json)]) == 0
    import json

    m = json.loads(out_json.read_text())
    assert (m["AP"], m["AP50"], m["AP75"]) == pytest.approx(expected, abs=1e-6)
    assert m["images"] == N_VAL
    assert "AP50" in capsys.readouterr().out


def test_eval_cli_errors(tmp_path, capsys):
    assert main(["eval", "--weights", str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().out


def test_compare_tiny_writes_csv_md_png(tmp_path, capsys):
    rc = main(["compare", "--attention", "none,sam", "--seeds", "0,1", "--epochs", "1", "--train-images", "4",
               "--val-images", "2", "--image-size", "64", "--batch-size", "4", "--out", str(tmp_path),
               "--no-progress", "--latency-runs", "2"])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "compare.csv")))
    assert [r["attention"] for r in rows] == ["none", "sam"] and all(r["seeds"] == "2" for r in rows)
    assert float(rows[1]["params_M"]) > float(rows[0]["params_M"])  # the SAM convs add parameters
    assert float(rows[0]["GFLOPs"]) > 0 and float(rows[0]["latency_ms"]) > 0
    md = (tmp_path / "compare.md").read_text()
    assert md.startswith("| attention | seeds | AP | AP50 | AP75 |") and "±" in md
    assert Image.open(tmp_path / "compare.png").size[0] > 100
    assert len(list(csv.DictReader(open(tmp_path / "runs.csv")))) == 4


def test_attention_cli_writes_grid_and_npy(tmp_path, capsys):
    img = np.zeros((48, 64, 3), np.uint8)
    img[10:30, 10:40] = 200
    Image.fromarray(img).save(tmp_path / "x.png")
    for att in ("cfg", "cbam"):
        out = tmp_path / att
        assert main(["attention", str(tmp_path / "x.png"), "--attention", att, "--out-dir", str(out),
                     "--image-size", "64"]) == 0
        assert (out / "x_attention.png").is_file()
        npys = sorted(os.listdir(out / "x_maps"))
        assert len(npys) == 2
        m = np.load(out / "x_maps" / npys[0])
        assert m.ndim == 3 and m.shape[0] in (1, 96, 192)
    assert main(["attention", str(tmp_path / "nope.png"), "--out-dir", str(tmp_path)]) == 2
