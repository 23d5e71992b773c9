"""Batching for detection: images stacked when they share a size, targets kept as a list."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple, Union

import torch

__all__ = ["detection_collate"]


def detection_collate(batch: Sequence[Tuple[torch.Tensor, Dict[str, Any]]]
                      ) -> Tuple[Union[torch.Tensor, List[torch.Tensor]], List[Dict[str, Any]]]:
    """Collate ``(image, target)`` samples.

    Args:
        batch: samples with ``image`` ``Tensor[3, H, W]`` and a target dict.

    Returns:
        ``(images, targets)``: ``images`` is ``Tensor[B, 3, H, W]`` when every image has the same
        size (e.g. after :class:`~spatialattn.data.transforms.Letterbox`), otherwise the list of
        images (as torchvision detection models take them); ``targets`` is the list of dicts.
    """
    if len(batch) == 0:
        raise ValueError("detection_collate got an empty batch")
    images = [s[0] for s in batch]
    targets = [s[1] for s in batch]
    if all(im.shape == images[0].shape for im in images):
        return torch.stack(images, 0), targets
    return images, targets
