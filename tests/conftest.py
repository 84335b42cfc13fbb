"""Shared test setup: one torch thread (the CI machine has 2 shared cores; oversubscription is 10-100x
slower), deterministic seeds, and small configs."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)
# Triton kernels run under the interpreter on CPU machines. It has to be on before anything imports
# triton (torch.compile does): triton reads the variable once and caches it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
