"""Checkpoints: atomic writes (temp file in the same folder + ``os.replace``), safe loading.

A checkpoint holds only tensors and primitive containers, so it loads with
``torch.load(path, weights_only=True)``: model / optimizer / scheduler / grad-scaler states, the
epoch to start from, the resolved config and model spec, metrics, and the RNG states of torch,
numpy and Python (numpy's state array stored as a tensor).
"""
from __future__ import annotations

import os
import random
import tempfile
from typing import Any, Dict, Mapping

import numpy as np
import torch

__all__ = ["atomic_save", "atomic_write_text", "load_checkpoint", "rng_state", "set_rng_state"]


def _atomic(path: str, write) -> None:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file: on any failure the previous
    ``path`` (if any) is intact and the temp file is removed."""
    _atomic(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    _atomic(path, lambda f: f.write(text.encode("utf-8")))


def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no pickled code runs)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{path}: not a loadable spatialattn checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "spec" not in ckpt:
        raise ValueError(f"{path}: not a spatialattn training checkpoint (expected keys 'model' and 'spec')")
    return ckpt


def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    st: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(np_state[0]), "key": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Mapping[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    v, inner, g = st["python"]
    random.setstate((v, tuple(inner), g))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
