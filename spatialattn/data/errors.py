"""Errors raised by the dataset readers.

Every reader raises :class:`DatasetError` for bad data, with a message that names the file and,
where there is one, the line (YOLO txt, YAML), the annotation (COCO JSON) or the object (VOC XML),
followed by what was expected and what was found.
"""
from __future__ import annotations

import os
from typing import Optional, Union

__all__ = ["DatasetError", "BOX_TOLERANCE_PX"]

#: How far (in pixels) a box may reach outside the image before it is an error. Annotation tools
#: and float round-trips often put ``x + w`` a fraction of a pixel past the border; such boxes are
#: clipped to the image. A box further outside than this raises :class:`DatasetError`.
BOX_TOLERANCE_PX = 1.0


class DatasetError(ValueError):
    """Bad or unreadable dataset content.

    Args:
        message: what was expected and what was found.
        path: the file at fault (annotation file, label file or image).
        where: position inside the file, e.g. ``"line 3"`` or ``"annotations[12] (id=40)"``.
    """

    def __init__(self, message: str, path: Optional[Union[str, os.PathLike]] = None,
                 where: Optional[str] = None) -> None:
        self.path = None if path is None else os.fspath(path)
        self.where = where
        self.reason = message
        prefix = ""
        if self.path is not None:
            prefix = self.path + (f", {where}" if where else "") + ": "
        elif where:
            prefix = where + ": "
        super().__init__(prefix + message)
