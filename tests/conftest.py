"""Test-wide settings: every test starts from the same random state (no order-dependent flakes),
and hypothesis draws the same examples on every run (a CI failure can be reproduced; set
``HYPOTHESIS_PROFILE=explore`` to draw new ones)."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from hypothesis import settings

settings.register_profile("fixed", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fixed"))


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
