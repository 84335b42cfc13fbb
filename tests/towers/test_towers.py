"""Context tower on preset("tiny") (pattern M*EM-E: every layer kind) with random weights: the three ways
of reading a sequence agree, ragged batches equal rows run alone, the ContextState plumbing round-trips,
and a block extension matches the explicit float64 stack in reference.py."""

from __future__ import annotations

import pytest
import torch

from tests.towers import reference as ref
from twotower.towers.config import preset
from twotower.towers.context import ContextTower
from twotower.towers.denoiser import DenoiserTower, timestep_sinusoid
from twotower.towers.init import init_random_
from twotower.towers.state import ContextState

TOL = 1e-5


@pytest.fixture(scope="module")
def tower() -> ContextTower:
    cfg = preset("tiny")
    assert set(cfg.pattern) == set("M*E-")
    return init_random_(ContextTower(cfg), seed=1).eval()


def ids_for(b, l, seed=0, vocab=256):
    return torch.randint(0, vocab, (b, l), generator=torch.Generator().manual_seed(seed))


def assert_close(a, b, tol=TOL):
    """max |a - b| <= tol * max |b|: relative to the tensor's own scale (SSM states are ~1e-3 here)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.numel() == 0:
        return
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol * max(b.abs().max().item(), 1e-6), f"max err {err:.3g} vs scale {b.abs().max().item():.3g}"


def assert_states_close(s1: ContextState, s2: ContextState, tol=TOL):
    """Same lengths, Mamba conv/ssm close, KV close up to each row's length (past it: garbage by design)."""
    f1, f2 = s1.to_flat(), s2.to_flat()
    assert f1.keys() == f2.keys()
    assert torch.equal(f1["lengths"], f2["lengths"])
    for key in f1:
        if key.endswith(".k") or key.endswith(".v"):
            for r, n in enumerate(f1["lengths"].tolist()):
                assert_close(f1[key][r, :n], f2[key][r, :n], tol)
        else:
            assert_close(f1[key], f2[key], tol)


def all_logits(tower, ids, state):
    with torch.no_grad():
        return tower.logits(tower(ids, state))


# ---- decode == prefill == block-wise extension -----------------------------------------------------------


def test_decode_prefill_and_blocks_agree(tower):
    blocks = [20, 16, 5, 1, 16, 3]  # prefill 20, then blocks (longer than, shorter than, equal to a chunk)
    total = sum(blocks)
    ids = ids_for(2, total)

    one = tower.new_state(2, capacity=total)
    logits_one = all_logits(tower, ids, one)

    tok = tower.new_state(2, capacity=4)  # small: the KV cache has to grow along the way
    logits_tok = torch.stack([tower.decode(ids[:, t], tok) for t in range(total)], dim=1)

    blk = tower.new_state(2, capacity=8)
    pieces, start = [], 0
    for n in blocks:
        pieces.append(all_logits(tower, ids[:, start : start + n], blk))
        start += n
    logits_blk = torch.cat(pieces, dim=1)

    # the decode logits at t predict token t+1: the same as the full forward's row t
    assert_close(logits_tok, logits_one)
    assert_close(logits_blk, logits_one)
    for state in (tok, blk):
        assert state.lengths.tolist() == [total, total]
        assert_states_close(state, one)


def test_prefill_and_extend_return_last_logits(tower):
    ids = ids_for(2, 30, seed=3)
    state, last = tower.prefill(ids[:, :20])
    full = all_logits(tower, ids, tower.new_state(2, 32))
    assert_close(last, full[:, 19])
    assert_close(tower.extend(ids[:, 20:], state), full[:, 29])


# ---- ragged rows -------------------------------------------------------------------------------------------


def test_ragged_prefill_equals_rows_alone(tower):
    n_valid = torch.tensor([20, 7, 1, 13])
    ids = ids_for(4, 20, seed=5)
    ids[torch.arange(20)[None, :] >= n_valid[:, None]] = 0  # right padding (any token: must not matter)
    state, last = tower.prefill(ids, n_valid=n_valid)
    assert state.lengths.tolist() == n_valid.tolist()
    for r, n in enumerate(n_valid.tolist()):
        alone, last_alone = tower.prefill(ids[r : r + 1, :n])
        assert_close(last[r : r + 1], last_alone)
        assert_states_close(state.select([r]), alone)


def test_ragged_state_keeps_going_like_rows_alone(tower):
    # after a ragged prefill: a uniform block, a ragged block and decode steps, still row-exact
    n_valid = torch.tensor([9, 3, 17])
    ids = ids_for(3, 17, seed=6)
    state, _ = tower.prefill(ids, n_valid=n_valid)
    alone = [tower.prefill(ids[r : r + 1, : int(n)])[0] for r, n in enumerate(n_valid)]

    blk = ids_for(3, 16, seed=7)
    out = all_logits(tower, blk, state)
    for r in range(3):
        assert_close(out[r : r + 1], all_logits(tower, blk[r : r + 1], alone[r]))

    rag, rag_valid = ids_for(3, 5, seed=8), torch.tensor([5, 2, 4])
    last = tower.extend(rag, state, n_valid=rag_valid)
    for r in range(3):
        assert_close(last[r : r + 1], tower.extend(rag[r : r + 1, : int(rag_valid[r])], alone[r]))

    step = ids_for(3, 1, seed=9)[:, 0]
    dec = tower.decode(step, state)
    for r in range(3):
        assert_close(dec[r : r + 1], tower.decode(step[r : r + 1], alone[r]))
        assert_states_close(state.select([r]), alone[r])


# ---- ContextState plumbing --------------------------------------------------------------------------------


def ragged_state(tower):
    n_valid = torch.tensor([6, 19, 11])
    state, _ = tower.prefill(ids_for(3, 19, seed=10), n_valid=n_valid, capacity=40)
    return state


def test_select_cat_round_trip(tower):
    state = ragged_state(tower)
    again = ContextState.cat([state.select([0]), state.select([1, 2])])
    assert_states_close(again, state, tol=0)
    swapped = ContextState.cat([state.select([2]), state.select([0])])
    assert_states_close(swapped, ContextState.cat([state.select([2, 0])]), tol=0)
    assert swapped.lengths.tolist() == [11, 6]
    # select crops KV to the longest selected row
    assert state.select([0]).to_flat()["layers.1.k"].shape[1] == 6


def test_to_flat_from_flat_round_trip_and_continue(tower):
    state = ragged_state(tower)
    flat = state.to_flat()
    restored = ContextState.from_flat({k: v.clone() for k, v in flat.items()}, len(state.layers))
    assert [type(s) for s in restored.layers] == [type(s) for s in state.layers]
    assert_states_close(restored, state, tol=0)
    # the restored (capacity-cropped) state continues exactly like the original
    nxt = ids_for(3, 4, seed=11)
    assert_close(all_logits(tower, nxt, restored), all_logits(tower, nxt, state), tol=0)
    assert_states_close(restored, state, tol=0)


def test_clone_is_independent(tower):
    state = ragged_state(tower)
    before = {k: v.clone() for k, v in state.to_flat().items()}
    copy = state.clone()
    tower.decode(ids_for(3, 1)[:, 0], copy)
    for k, v in state.to_flat().items():
        assert torch.equal(v, before[k]), k


# ---- block extension against the explicit stack -------------------------------------------------------------


def test_block_extension_matches_explicit_recurrence(tower):
    # the context tower consumes a 16-token block after a ragged prefill: per row, every Mamba layer's
    # conv/ssm state is the recurrence over the block from the previous state, KV is appended, and the
    # logits are those of the explicit causal stack
    n_valid = torch.tensor([20, 9])
    state, _ = tower.prefill(ids_for(2, 20, seed=12), n_valid=n_valid)
    before = [ref.row_state(state, r) for r in range(2)]
    block = ids_for(2, 16, seed=13)
    logits = all_logits(tower, block, state)
    for r in range(2):
        hidden, layers = ref.stack(tower.model, block[r], before[r], causal=True)
        assert_close(logits[r], ref.linear(hidden, tower.lm_head))
        after = ref.row_state(state, r)
        for i, kind in enumerate(tower.cfg.pattern):
            if kind == "M":
                assert_close(after[i]["conv"], layers[i]["conv"])
                assert_close(after[i]["ssm"], layers[i]["ssm"])
            elif kind == "*":
                assert_close(after[i]["k"], layers[i]["k"])
                assert_close(after[i]["v"], layers[i]["v"])


# ---- denoiser and mock-AR against the explicit stack ----------------------------------------------------------


@pytest.fixture(scope="module")
def denoiser() -> DenoiserTower:
    den = init_random_(DenoiserTower(preset("tiny")), seed=2).eval()
    # init_random_ gives adaLN tensors of std 0.02, so t would barely matter; larger values make the
    # modulation (and a wrong norm order or a wrong t) clearly visible
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for table in den.scale_shift_tables:
            table.copy_(0.3 * torch.randn(table.shape, generator=g))
        for lin in (den.t_embedder.mlp[0], den.t_embedder.mlp[2], den.t_block[1]):
            lin.weight.mul_(10.0)
    return den


def context_for(tower, lengths, seed=20, then_block=True):
    """A context state after a (possibly ragged) prefill and, optionally, one committed 16-token block."""
    lengths = torch.tensor(lengths)
    state, _ = tower.prefill(ids_for(len(lengths), int(lengths.max()), seed=seed), n_valid=lengths)
    if then_block:
        tower.extend(ids_for(len(lengths), 16, seed=seed + 1), state)
    return state


def snapshot(state):
    """Every tensor of the state, whole buffers (not only the valid part)."""
    out = [state.lengths.clone()]
    for s in state.layers:
        if s is not None:
            out += [t.clone() for t in vars(s).values()]
    return out


def assert_unchanged(state, snap):
    assert all(torch.equal(a, b) for a, b in zip(snapshot(state), snap, strict=True))


@pytest.mark.parametrize("lengths,then_block", [([23, 9], True), ([12, 12], False), ([1, 5], False)])
def test_denoiser_matches_explicit_reference(tower, denoiser, lengths, then_block):
    ctx = context_for(tower, lengths, then_block=then_block)
    snap = snapshot(ctx)
    xt = ids_for(2, 16, seed=30)
    xt[0, ::2] = 3  # mask id at some positions
    xt[1, 5:] = 3
    t = torch.tensor([1.0, 0.4375])  # one t per row
    got = denoiser.denoise(xt, t, ctx)
    assert got.shape == (2, 16, 256) and got.dtype == torch.float32
    assert_unchanged(ctx, snap)  # the denoiser reads the context state, never writes it
    for r in range(2):
        # the float32 sinusoid (see reference.time_embedding; checked against the formula in test_layers)
        sin = timestep_sinusoid(t[r : r + 1])[0]
        expected = ref.denoise(denoiser, xt[r], float(t[r]), ref.row_state(ctx, r), sinusoid=sin)
        assert_close(got[r], expected)
        # the oracle can tell the norm orders apart: swapping them is far outside the tolerance
        swapped = ref.denoise(denoiser, xt[r], float(t[r]), ref.row_state(ctx, r), True, sinusoid=sin)
        assert (got[r].double() - swapped).abs().max() > 100 * TOL * expected.abs().max()


def test_denoiser_rows_use_their_own_t(denoiser, tower):
    # the same tokens and context in both rows, different t: row outputs differ, each matches its t alone
    ctx = context_for(tower, [10], then_block=False)
    ctx2 = ContextState.cat([ctx, ctx])
    xt = ids_for(1, 16, seed=31).expand(2, -1)
    both = denoiser.denoise(xt, torch.tensor([1.0, 0.0625]), ctx2)
    assert (both[0] - both[1]).abs().max() > 1e-3
    assert_close(both[1:], denoiser.denoise(xt[:1], torch.tensor([0.0625]), ctx))


@pytest.mark.parametrize("lengths", [[23, 9], [7, 7]])
def test_mock_ar_step_matches_explicit_reference(tower, denoiser, lengths):
    ctx = context_for(tower, lengths, then_block=False)
    snap = snapshot(ctx)
    last = torch.tensor([17, 200])
    got = denoiser.mock_ar_step(last, ctx)
    assert got.shape == (2, 256) and got.dtype == torch.float32
    assert_unchanged(ctx, snap)
    for r in range(2):
        assert_close(got[r], ref.mock_ar(denoiser, int(last[r]), ref.row_state(ctx, r)))


def test_denoiser_with_an_empty_context_row(tower, denoiser):
    # a row with nothing read yet (length 0, zero Mamba states) next to a row with context
    ctx = ContextState.cat([tower.new_state(1, 8), context_for(tower, [5], then_block=False)])
    assert ctx.lengths.tolist() == [0, 5]
    xt, t = ids_for(2, 16, seed=32), torch.tensor([1.0, 0.5])
    got = denoiser.denoise(xt, t, ctx)
    for r in range(2):
        sin = timestep_sinusoid(t[r : r + 1])[0]
        assert_close(got[r], ref.denoise(denoiser, xt[r], float(t[r]), ref.row_state(ctx, r), sinusoid=sin))
