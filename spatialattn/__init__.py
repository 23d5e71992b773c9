"""spatialattn: spatial attention for convolutional networks in PyTorch.

Public API (kept small): the modules in :mod:`spatialattn.nn`, the functional
forms in :mod:`spatialattn.functional`, :func:`create_attention`,
:func:`convert_state_dict`, :func:`insert_attention` and
:func:`add_roi_attention`.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import functional  # noqa: F401
