"""Shared test setup: one torch thread (the CI machine has 2 shared cores; oversubscription is 10-100x
slower), deterministic seeds, and small configs."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
