"""The training pipeline's dataset: its in-memory cache, and DataLoader worker processes started
by pickling the dataset.

``spawn`` (macOS, Windows) and ``forkserver`` (Linux from Python 3.14) send the dataset to each
worker by pickling it; ``fork`` copies it. The pipeline must pickle, whatever the dataset format,
and give the same batches in workers as in the main process (augmentation is seeded from
``(seed, epoch, index)``, not from a worker's random state).
"""
from __future__ import annotations

import pickle

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from spatialattn.data import detection_collate
from spatialattn.engine.config import DEFAULTS
from spatialattn.engine.evaluator import CachedDataset, open_dataset

from ..data._helpers import write_png
from ..data.test_coco import _coco as _coco_json
from ..data.test_voc import _obj, _voc
from ..data.test_yolo import _yolo


def _coco(tmp_path):
    """The COCO tests' two-image annotation file, with its images."""
    write_png(tmp_path / "a.png", 40, 30, seed=1)
    write_png(tmp_path / "sub" / "b.png", 20, 20, seed=2)
    return _coco_json(tmp_path)


def _cfg(data, split, **over):
    return {**DEFAULTS, "data": data, "train_split": split, "val_split": split, "image_size": 64,
            "train_images": 6, "val_images": 6, "seed": 5, **over}


def _samples(ds):
    return [ds[i] for i in range(len(ds))]


def _assert_same(a, b):
    assert len(a) == len(b)
    for (ia, ta), (ib, tb) in zip(a, b):
        assert torch.equal(ia, ib)
        assert ta.keys() == tb.keys()
        for k in ta:
            if isinstance(ta[k], torch.Tensor):
                assert torch.equal(ta[k], tb[k]), k
            else:
                assert ta[k] == tb[k], k


@pytest.mark.parametrize("fmt", ["synthetic", "coco", "voc", "yolo"])
@pytest.mark.parametrize("train", [True, False])
def test_pipeline_pickles(tmp_path, fmt, train):
    data, split = {"synthetic": ("synthetic", "train"), "coco": (str(_coco(tmp_path)), "train"),
                   "voc": (str(_voc(tmp_path, objects=[_obj("dog", (1, 2, 10, 20))])), "val"),
                   "yolo": (str(_yolo(tmp_path)), "val")}[fmt]
    ds = open_dataset(_cfg(data, split), "train_split", "train_images", train=train)
    ds.set_epoch(2)
    before = _samples(ds)  # (also fills the cache, which travels with the pickle)
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.epoch == 2 and copy.classes == ds.classes
    _assert_same(_samples(copy), before)


def _batches(ds, workers, epoch):
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=5)
    sampler.set_epoch(epoch)
    ds.set_epoch(epoch)
    loader = DataLoader(ds, batch_size=2, sampler=sampler, num_workers=workers, collate_fn=detection_collate,
                        multiprocessing_context="spawn" if workers else None)
    return [(images, targets) for images, targets in loader]


def test_spawned_workers_give_the_main_process_batches():
    """Two ``spawn`` workers (each a new interpreter: another hash seed, no inherited random
    state) load epoch 1 of the augmented training set as the main process does."""
    ds = open_dataset(_cfg("synthetic", "train"), "train_split", "train_images", train=True)
    here, there = _batches(ds, 0, 1), _batches(ds, 2, 1)
    assert len(here) == len(there) == 3
    for (ia, ta), (ib, tb) in zip(here, there):
        _assert_same(list(zip(ia, ta)), list(zip(ib, tb)))
    ds.set_epoch(0)
    image0 = ds[0][0]
    ds.set_epoch(1)
    assert not torch.equal(image0, ds[0][0])  # the epoch changes the augmentation: the workers saw 1


def test_cache_keeps_images_up_to_its_limit():
    ds = open_dataset(_cfg("synthetic", "train", cache=False), "train_split", "train_images", train=False)
    plain = ds.dataset
    image_bytes = plain.sample(0)[0].nbytes  # 64x64x3: every synthetic image the same size
    cached = CachedDataset(plain, max_bytes=int(2.5 * image_bytes))
    expected = {i: plain[i] for i in (3, 1, 4, 5)}
    reads = []
    sample = plain.sample
    plain.sample = lambda i: reads.append(i) or sample(i)
    try:
        for _ in range(2):
            for i in (3, 1, 4, 5):
                _assert_same([cached[i]], [expected[i]])
    finally:
        del plain.sample
    assert sorted(cached._cache) == [1, 3] and cached.cached_bytes == 2 * image_bytes
    assert reads == [3, 1, 4, 5, 4, 5]  # the two kept are not read again; the rest are
    with pytest.raises(ValueError, match="max_bytes: expected >= 0"):
        CachedDataset(plain, max_bytes=-1)


@pytest.mark.parametrize("over, cached", [({}, True), ({"workers": 2}, False), ({"cache": False}, False),
                                          ({"cache_gb": 0.0}, False)])
def test_which_datasets_are_cached(over, cached):
    cfg = _cfg("synthetic", "train", **over)
    ds = open_dataset(cfg, "train_split", "train_images", train=True)
    assert isinstance(ds.dataset, CachedDataset) == cached
    if cached:
        assert ds.dataset.max_bytes == int(cfg["cache_gb"] * 1e9)
    assert not isinstance(open_dataset(cfg, "val_split", "val_images", train=False, cache=False).dataset,
                          CachedDataset)


def test_the_run_log_says_when_a_file_dataset_is_cut(tmp_path):
    from spatialattn.engine.trainer import _image_count

    coco = str(_coco(tmp_path))
    for over, text in [({"train_images": 1}, "1 of 2 (train_images)"), ({"train_images": None}, "2"),
                       ({"train_images": 1, "workers": 1}, "1 of 2 (train_images)")]:
        ds = open_dataset(_cfg(coco, "train", **over), "train_split", "train_images", train=True)
        assert _image_count(ds, "train_images") == text
    synthetic = open_dataset(_cfg("synthetic", "train"), "train_split", "train_images", train=True)
    assert _image_count(synthetic, "train_images") == "6"
