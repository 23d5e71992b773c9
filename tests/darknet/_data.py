"""Locate the Darknet reference data (``SPATIALATTN_DARKNET_DATA`` or ``<repo>/../shared/darknet``)."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    env = os.environ.get("SPATIALATTN_DARKNET_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "darknet"


def require_data() -> Path:
    d = data_dir()
    if not (d / "make_weights.py").is_file():
        pytest.skip(f"Darknet reference data not found at {d} (set SPATIALATTN_DARKNET_DATA)")
    return d


def make_weights_module():
    d = require_data()
    spec = importlib.util.spec_from_file_location("_darknet_make_weights", d / "make_weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def set_paths(name: str):
    d = require_data()
    return d / name / f"{name}.cfg", d / name


def manifest(name: str) -> dict:
    return json.loads((require_data() / name / "manifest.json").read_text())


def write_weights(name: str, tmp_path: Path) -> Path:
    cfg, _ = set_paths(name)
    out = tmp_path / f"{name}.weights"
    make_weights_module().write_weights(str(cfg), 0, str(out))
    return out
