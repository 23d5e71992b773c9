"""Darknet ``.weights`` files: strict loading and byte-exact saving.

Layout (Darknet ``load_weights_upto``): ``int32 major, int32 minor, int32 revision``, then
``seen`` as ``uint64`` when ``major*10 + minor >= 2`` (and both < 1000), else ``uint32``; then
float32 parameters layer by layer in cfg order:

* ``[convolutional]``: biases[n]; with BN (and not ``dontloadscales``) scales[n],
  rolling_mean[n], rolling_variance[n]; then weights[n*(C/groups)*size*size]
  (stored transposed if ``flipped=1``);
* ``[shortcut]`` with ``weights_type``: its ``n_from+1`` (per feature) or ``(n_from+1)*C``
  (per channel) weights;
* every other layer: nothing. Layers with ``dontload=1`` are skipped.

Darknet stops silently at the end of a short file and ignores trailing bytes; here a short
or long file raises :class:`DarknetWeightsError` with the expected and found float counts and
the layer where the data ran out. ``cutoff=N`` (backbone files such as ``yolov4.conv.137``)
loads layers ``< N`` only; the bytes after them are then allowed.
"""
from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from .model import DarknetModel

__all__ = ["DarknetWeightsError", "load_darknet_weights", "save_darknet_weights", "weight_plan",
           "DEFAULT_HEADER"]

DEFAULT_HEADER = (0, 2, 5, 0)  # what Darknet writes: major, minor, revision, seen


class DarknetWeightsError(ValueError):
    """A ``.weights`` file that does not fit the cfg (counts, header)."""


def _seen_is_64bit(major: int, minor: int) -> bool:
    return (major * 10 + minor) >= 2 and major < 1000 and minor < 1000


def weight_plan(model: "DarknetModel", cutoff: Optional[int] = None) -> List[Tuple[int, str, Tensor, bool]]:
    """``[(layer index, parameter name, tensor, transposed)]`` in file order for layers ``< cutoff``."""
    n = len(model.layers) if cutoff is None else min(cutoff, len(model.layers))
    plan = []
    for i in range(n):
        info = model.infos[i]
        if info.dontload:
            continue
        layer = model.layers[i]
        getter = getattr(layer, "darknet_params", None)
        if getter is None:
            continue
        flipped = bool(getattr(layer, "flipped", False))
        for name, t in getter():
            plan.append((i, name, t, flipped and name == "weights"))
    return plan


def _layer_desc(model: "DarknetModel", i: int) -> str:
    info = model.infos[i]
    sec = info.section
    return f"layer {i} ([{sec.raw_type}] at {sec.source}:{sec.line})"


def load_darknet_weights(model: "DarknetModel", path: Union[str, os.PathLike], cutoff: Optional[int] = None) -> None:
    """Load ``path`` into ``model`` in place (see the module docstring for the rules)."""
    path = os.fspath(path)
    if cutoff is not None and cutoff < 0:
        raise ValueError(f"cutoff: expected a layer count >= 0, got {cutoff}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        blob = f.read(20)
    if len(blob) < 12:
        raise DarknetWeightsError(f"{path}: {len(blob)} bytes, too short for the 12-byte header (major, minor, revision)")
    major, minor, revision = struct.unpack_from("<iii", blob, 0)
    if _seen_is_64bit(major, minor):
        if len(blob) < 20:
            raise DarknetWeightsError(f"{path}: header {major}.{minor}.{revision} needs a uint64 'seen', file has {len(blob)} bytes")
        (seen,) = struct.unpack_from("<Q", blob, 12)
        offset = 20
    else:
        if len(blob) < 16:
            raise DarknetWeightsError(f"{path}: header {major}.{minor}.{revision} needs a uint32 'seen', file has {len(blob)} bytes")
        (seen,) = struct.unpack_from("<I", blob, 12)
        offset = 16
    if major > 1000 or minor > 1000:
        raise DarknetWeightsError(f"{path}: header {major}.{minor} marks transposed [connected] weights, "
                                  "which this port does not support")
    data_bytes = size - offset
    if data_bytes % 4:
        raise DarknetWeightsError(f"{path}: {data_bytes} bytes after the {offset}-byte header is not a whole number of float32")
    found = data_bytes // 4
    # memory-mapped: a 1 GB file is not read into memory twice
    floats = np.memmap(path, dtype="<f4", mode="r", offset=offset, shape=(found,)) if found else np.zeros(0, "<f4")
    plan = weight_plan(model, cutoff)
    expected = sum(t.numel() for _, _, t, _ in plan)
    scope = "the cfg" if cutoff is None else f"layers 0..{min(cutoff, len(model.layers)) - 1} (cutoff={cutoff})"
    pos = 0
    with torch.no_grad():
        for i, name, t, transposed in plan:
            count = t.numel()
            if pos + count > found:
                raise DarknetWeightsError(
                    f"{path}: file too short: {scope} needs {expected} floats after the header, the file has "
                    f"{found}; ran out in {_layer_desc(model, i)} reading '{name}' ({count} floats needed, "
                    f"{found - pos} left)")
            src = torch.from_numpy(np.array(floats[pos:pos + count], dtype=np.float32))
            if transposed:  # Darknet stores (C/groups*size*size, n) when flipped=1
                src = src.view(-1, t.shape[0]).t().contiguous()
            t.copy_(src.view(t.shape).to(t.dtype))
            pos += count
    if cutoff is None and pos != found:
        raise DarknetWeightsError(
            f"{path}: file too long: the cfg needs {expected} floats after the header, the file has {found} "
            f"({found - expected} extra; pass cutoff=N to load only the first N layers of a longer file)")
    del floats
    model.weights_header = (major, minor, revision, seen)


def save_darknet_weights(model: "DarknetModel", path: Union[str, os.PathLike], cutoff: Optional[int] = None) -> None:
    """Write ``model``'s parameters as a Darknet ``.weights`` file (layers ``< cutoff``).

    The header is the one of the last loaded file (so load + save round-trips byte for byte),
    else Darknet's own ``0.2.5`` with ``seen=0``.
    """
    major, minor, revision, seen = model.weights_header or DEFAULT_HEADER
    chunks = [struct.pack("<iii", major, minor, revision)]
    chunks.append(struct.pack("<Q", seen) if _seen_is_64bit(major, minor) else struct.pack("<I", seen & 0xFFFFFFFF))
    for _, _, t, transposed in weight_plan(model, cutoff):
        a = t.detach().to("cpu", torch.float32)
        if transposed:
            a = a.reshape(a.shape[0], -1).t()
        chunks.append(a.contiguous().numpy().astype("<f4", copy=False).tobytes())
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        for c in chunks:
            f.write(c)
    os.replace(tmp, path)
