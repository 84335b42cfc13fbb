"""The training forward of the denoiser is the serving forward.

`denoiser_forward` (all blocks of a window in one pass, conditioned on one frozen context pass) must give
the logits `DenoiserTower.denoise` gives block by block on `ContextTower.prefill` states: that is the
guarantee that what is trained is what the engine serves. Also: the denoiser initialised from the context
tower computes exactly the context tower's layers (adaLN identity), and the loss/corruption contracts."""

from __future__ import annotations

import pytest
import torch

from twotower.towers.config import preset
from twotower.towers.context import ContextTower
from twotower.towers.denoiser import DenoiserTower
from twotower.towers.init import init_random_
from twotower.towers.train.ar import ar_loss
from twotower.towers.train.denoiser import (
    MASK_ID,
    BlockLayout,
    block_attention_mask,
    context_features,
    corrupt,
    denoiser_forward,
    denoiser_from_context,
    denoiser_loss,
    greedy_continuations,
    mock_ar_forward,
    mock_ar_kl,
)
from twotower.towers.train.evaluate import mock_ar_generate

TOL = 1e-5


def _close(a, b, tol=TOL):
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol * max(b.abs().max().item(), 1e-6), f"max err {err:.3g} vs scale {b.abs().max().item():.3g}"


@pytest.fixture(scope="module")
def towers():
    cfg = preset("tiny")  # M*EM-E: every layer kind
    ctx = init_random_(ContextTower(cfg), seed=1).eval()
    den = init_random_(DenoiserTower(cfg), seed=2).eval()  # random adaLN too: modulation is exercised
    return ctx, den


@pytest.mark.parametrize("prefix,block,nblocks", [(5, 4, 3), (1, 8, 2), (3, 1, 4), (16, 16, 2)])
def test_one_pass_equals_blockwise_denoise(towers, prefix, block, nblocks):
    ctx, den = towers
    layout = BlockLayout(prefix, block, nblocks)
    g = torch.Generator().manual_seed(prefix * 100 + block)
    b = 3
    ids = torch.randint(4, 256, (b, layout.length), generator=g)
    x = ids[:, prefix:]
    masked, t = corrupt(x, block, g)
    xt = torch.where(masked, torch.full_like(x, MASK_ID), x)
    with torch.no_grad():
        got = denoiser_forward(den, xt, t, context_features(ctx, ids, layout), layout)
    for j, s in enumerate(layout.starts()):
        state, _ = ctx.prefill(ids[:, :s])
        want = den.denoise(xt[:, j * block : (j + 1) * block], t[:, j], state)
        _close(got[:, j * block : (j + 1) * block], want)


def test_one_pass_gradients_flow_and_context_frozen(towers):
    ctx, den = towers
    layout = BlockLayout(4, 4, 2)
    ids = torch.randint(4, 256, (2, layout.length), generator=torch.Generator().manual_seed(0))
    den.zero_grad()
    parts = denoiser_loss(den, ctx, ids, layout, torch.Generator().manual_seed(1), mock_ar_weight=0.5)
    loss, count = parts.total, parts.count
    loss.backward()
    assert count > 0 and torch.isfinite(loss) and parts.mock_ar > 0
    _close(loss.detach(), parts.diffusion.detach() + 0.5 * parts.mock_ar.detach())
    assert all(p.grad is None for p in ctx.parameters())
    assert den.t_block[1].weight.grad is not None and den.t_block[1].weight.grad.abs().sum() > 0
    assert all(den.model.layers[i].mixer.in_proj.weight.grad is not None for i in (0, 3))  # Mamba layers
    den.zero_grad()


@pytest.mark.parametrize("prefix,block,nblocks", [(5, 4, 3), (1, 8, 2), (16, 16, 2)])
def test_mock_ar_forward_equals_mock_ar_step(towers, prefix, block, nblocks):
    """The mock-AR term trains what the engine's mock-AR serves: at each block start s_j, the unmodulated
    one-pass forward == `mock_ar_step(ids[s_j])` over the context of ids[:s_j]; and its target is the
    context tower's next-token distribution after reading ids[:s_j + 1]."""
    ctx, den = towers
    layout = BlockLayout(prefix, block, nblocks)
    ids = torch.randint(4, 256, (3, layout.length), generator=torch.Generator().manual_seed(prefix + block))
    with torch.no_grad():
        feats = context_features(ctx, ids, layout, teacher=True)
        got = mock_ar_forward(den, ids, feats, layout)
        assert got.shape == (3, nblocks, ctx.cfg.vocab_size)
        for j, s in enumerate(layout.starts()):
            state, _ = ctx.prefill(ids[:, :s])
            _close(got[:, j], den.mock_ar_step(ids[:, s], state))
            _, logits = ctx.prefill(ids[:, : s + 1])
            _close(feats.teacher[:, j], torch.log_softmax(logits, -1))


def test_mock_ar_term_is_zero_at_init(towers):
    """The denoiser copied from the context tower IS the context tower in mock-AR (no modulation): KL 0.
    A trained (here: random) denoiser is not."""
    ctx, den = towers
    layout = BlockLayout(3, 4, 3)
    ids = torch.randint(4, 256, (2, layout.length), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        feats = context_features(ctx, ids, layout, teacher=True)
        assert abs(float(mock_ar_kl(denoiser_from_context(ctx).eval(), ids, feats, layout))) < 1e-5
        assert float(mock_ar_kl(den, ids, feats, layout)) > 1e-3  # 100x the bound above
    with pytest.raises(ValueError, match="teacher"):
        mock_ar_kl(den, ids, context_features(ctx, ids, layout), layout)


def test_attention_mask_layout():
    m = block_attention_mask(BlockLayout(2, 3, 2))  # L = 8: context keys 0..4 (< last start), queries 6
    assert m.shape == (6, 11)
    assert m[0, :2].all() and not m[0, 2:5].any() and m[0, 5:8].all() and not m[0, 8:].any()
    assert m[5, :5].all() and not m[5, 5:8].any() and m[5, 8:].all()
    m1 = block_attention_mask(BlockLayout(2, 3, 2), per_block=1)  # mock-AR: each block's first token
    assert m1.tolist() == [[True, True] + [False] * 3 + [True, False], [True] * 5 + [False, True]]


def test_denoiser_init_is_the_context_tower(towers):
    """adaLN identity at any t, same weights: a one-token block reproduces the context tower's next-token
    logits after that token (S = 1: non-causal == causal, Mamba seeded == continued)."""
    ctx, _ = towers
    den = denoiser_from_context(ctx, seed=3).eval()
    ids = torch.randint(4, 256, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for t in (1.0, 0.37, 0.0):
            state, _ = ctx.prefill(ids[:, :-1])
            got = den.denoise(ids[:, -1:], torch.full((2,), t), state)[:, 0]
            want = ctx.extend(ids[:, -1:], state)
            _close(got, want)
        temb = den.time_embedding(torch.tensor([0.3, 0.9]))
        assert temb.abs().max() == 0
        for table in den.scale_shift_tables:
            assert torch.equal(table, torch.tensor([[0.0], [0.0], [1.0]]).expand_as(table))


def test_corrupt_contract():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(4, 100, (64, 5 * 8), generator=g)
    masked, t = corrupt(x, 8, g)
    per_block = masked.view(64, 5, 8)
    assert per_block.any(-1).all()  # at least one masked token per block
    assert torch.equal(t, per_block.float().mean(-1))  # t = realised masked fraction
    assert 0.3 < masked.float().mean() < 0.7  # E[t] ~ 0.51


def test_ar_loss_is_next_token_ce(towers):
    ctx, _ = towers
    ids = torch.randint(4, 256, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        loss = ar_loss(ctx, ids)
        state = ctx.new_state(2, 8)
        lp = []
        for j in range(6):
            logits = ctx.extend(ids[:, j : j + 1], state)
            lp.append(torch.log_softmax(logits, -1).gather(1, ids[:, j + 1 : j + 2]))
    _close(loss, -torch.cat(lp, 1).mean())


def test_greedy_continuations_match_stepwise(towers):
    ctx, _ = towers
    pre = torch.randint(4, 256, (2, 5), generator=torch.Generator().manual_seed(4))
    out = greedy_continuations(ctx, pre, 4)
    seq = pre
    with torch.no_grad():
        for _ in range(4):
            state, logits = ctx.prefill(seq)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_mock_ar_generate_of_the_initial_denoiser_is_greedy_ar(towers):
    """The training-time mock-AR loop (used in the model card) reads the denoiser exactly as the engine
    does: with the denoiser copied from the context tower, it reproduces greedy AR token for token."""
    ctx, den = towers
    prompts = torch.randint(4, 256, (2, 6), generator=torch.Generator().manual_seed(7))
    ar = greedy_continuations(ctx, prompts, 8)[:, 6:]
    assert torch.equal(mock_ar_generate(ctx, denoiser_from_context(ctx).eval(), prompts, 8), ar)
    assert not torch.equal(mock_ar_generate(ctx, den, prompts, 8), ar)  # a different denoiser: not AR
