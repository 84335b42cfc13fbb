"""Training checkpoints (twotower/towers/train/common.py) round-trip tensors and plain data, and loading one runs
no pickled code (weights_only=True)."""

from __future__ import annotations

import pickle

import pytest
import torch

from twotower.towers.train.common import load_checkpoint, rng_state, save_checkpoint


class Payload:
    """Any class: a checkpoint holding one would run its reduction on load."""


def test_round_trip_of_model_optimiser_and_rng(tmp_path):
    m = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(2, 3)).sum().backward()
    opt.step()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model=m.state_dict(), optim=opt.state_dict(), rng=rng_state(torch.Generator()),
                    step=3, history=[{"step": 3, "loss": 1.5}])  # fmt: skip
    ck = load_checkpoint(path)
    assert ck["step"] == 3 and ck["history"][0]["loss"] == 1.5
    assert torch.equal(ck["model"]["weight"], m.state_dict()["weight"])


def test_a_checkpoint_with_an_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path)
