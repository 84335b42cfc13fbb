"""The state pool (twotower/towers/pool.py): the static-shape passes over slots equal the ContextState passes, and a
mirror pool kept with slot deltas equals the original for the slots it was sent."""

from __future__ import annotations

import torch

from twotower.towers.config import preset
from twotower.towers.context import ContextTower
from twotower.towers.denoiser import DenoiserTower
from twotower.towers.init import init_random_
from twotower.towers.pool import StatePool, apply_slot_delta, bytes_per_token, export_slot_delta

CFG = preset("tiny").replace(vocab_size=260)
TOL = 1e-4


def _towers():
    return init_random_(ContextTower(CFG).eval(), 0), init_random_(DenoiserTower(CFG).eval(), 1)


@torch.no_grad()
def test_slot_passes_equal_context_state_passes():
    ctx, den = _towers()
    ids = torch.randint(4, 260, (3, 11))
    n_valid = torch.tensor([11, 6, 9])
    state, want = ctx.prefill(ids, n_valid)
    pool = StatePool.allocate(CFG, 6, 64, "cpu", torch.float32)
    slots = torch.tensor([4, 0, 2])  # any slots, any order
    pool.reset(slots)
    hidden = ctx.forward_slots(ids, pool, slots, 32, n_valid)
    got = ctx.logits(hidden[torch.arange(3), n_valid - 1])
    assert (got - want).abs().max() < TOL
    assert pool.lengths[slots].tolist() == [11, 6, 9]
    tok = torch.tensor([5, 6, 7])
    step = ctx.logits(ctx.forward_slots(tok[:, None], pool, slots, 32)[:, 0])
    assert (step - ctx.decode(tok, state)).abs().max() < TOL
    xt = torch.full((3, 4), 3)
    xt[:, 0] = 9
    t = torch.tensor([0.75, 0.75, 0.75])
    assert (den.denoise_slots(xt, t, pool, slots, 32) - den.denoise(xt, t, state)).abs().max() < TOL
    assert (den.mock_ar_slots(tok, pool, slots, 32) - den.mock_ar_step(tok, state)).abs().max() < TOL
    # the pool's copy of the slots is the ContextState
    back = pool.gather(slots)
    assert torch.equal(back.lengths, state.lengths)


@torch.no_grad()
def test_slot_deltas_keep_a_mirror_equal():
    ctx, _ = _towers()
    src = StatePool.allocate(CFG, 5, 64, "cpu", torch.float32)
    dst = StatePool.allocate(CFG, 5, 64, "cpu", torch.float32)
    slots = torch.tensor([3, 1])
    src.reset(slots)
    ctx.forward_slots(torch.randint(4, 260, (2, 7)), src, slots, 32, torch.tensor([7, 5]))
    d1 = export_slot_delta(src, slots, torch.zeros(2, dtype=torch.long), slots)
    apply_slot_delta(dst, d1)
    since = src.lengths[slots].clone()
    ctx.forward_slots(torch.randint(4, 260, (2, 4)), src, slots, 32, torch.tensor([4, 0]))  # one row reads
    d2 = export_slot_delta(src, slots, since, slots[:1])
    n_attn = CFG.pattern.count("*")
    assert d2["layers.1.k"].shape[0] == 4 and len(d2["changed"]) == 1  # only the new rows, only what changed
    apply_slot_delta(dst, d2)
    a, b = src.gather(slots), dst.gather(slots)
    assert torch.equal(a.lengths, b.lengths)
    for x, y in zip(a.layers, b.layers, strict=True):
        for name in ("k", "v", "conv", "ssm"):
            if hasattr(x, name):
                t1, t2 = getattr(x, name), getattr(y, name)
                if name in ("k", "v"):  # only positions below each length are state
                    for r, n in enumerate(a.lengths.tolist()):
                        assert torch.equal(t1[r, :n], t2[r, :n])
                else:
                    assert torch.equal(t1, t2)
    assert bytes_per_token(CFG, torch.float32) == n_attn * 2 * CFG.num_key_value_heads * CFG.head_dim * 4
