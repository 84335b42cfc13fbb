"""Next-token sampling (twotower/decoding/sampler.py) and the denoiser's tempered x0 draw stay finite for every
temperature validation accepts: a tiny temperature is greedy in the limit, never inf - inf."""

from __future__ import annotations

import pytest
import torch

from twotower.decoding.sampler import RowSampling, sample
from twotower.decoding.unmask import x0_predict


def _logits(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 5


@pytest.mark.parametrize("temp", [1e-300, 1e-45, 1e-30, 1e-6])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.9), (3, 0.5)])
def test_tiny_temperatures_sample_the_argmax(temp, top_k, top_p):
    logits = _logits(0, 4, 50)
    rs = RowSampling([temp] * 4, [top_k] * 4, [top_p] * 4, seeds=[1, 2, 3, 4], logprobs=True)
    ids, lp = sample(logits, rs)
    assert torch.equal(ids, logits.argmax(-1))
    assert torch.isfinite(lp).all()


def test_a_tiny_temperature_splits_an_exact_tie_between_the_tied_tokens():
    logits = torch.zeros(1, 6)
    logits[0, 2] = logits[0, 4] = 3.0
    got = {int(sample(logits, RowSampling([1e-300], [0], [1.0], [s]))[0]) for s in range(40)}
    assert got == {2, 4}


@pytest.mark.parametrize("temp", [1e-300, 1e-40, 1e-8])
def test_tiny_temperature_x0_draw_is_the_greedy_prediction(temp):
    logits = _logits(1, 2, 8, 30)
    pred, conf = x0_predict(logits, 3, torch.tensor([temp, 0.0]), seeds=[7, 8])
    greedy, gconf = x0_predict(logits, 3, torch.zeros(2))
    assert torch.equal(pred, greedy) and torch.allclose(conf, gconf)
    assert torch.isfinite(conf).all()
