"""Single layers of preset("tiny") against the explicit float64 oracles in reference.py: the Mamba-2 mixer
(sequence scan, one-token step, ragged rows), attention (causal / full, ragged cache, KV write), MoE, the
norms, and the timestep embedding."""

from __future__ import annotations

import math

import pytest
import torch

from tests.towers import reference as ref
from twotower.towers.attention import Attention
from twotower.towers.config import preset
from twotower.towers.denoiser import DenoiserTower, timestep_sinusoid
from twotower.towers.init import init_random_
from twotower.towers.mamba2 import Mamba2Mixer
from twotower.towers.moe import MLP, MoE
from twotower.towers.norm import GatedGroupRMSNorm, RMSNorm
from twotower.towers.state import AttentionState, MambaState

CFG = preset("tiny")


def assert_close(a, b, tol=1e-5):
    """max |a - b| <= tol * max |b|."""
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol * max(b.abs().max().item(), 1e-6), f"max err {err:.3g} vs scale {b.abs().max().item():.3g}"


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- Mamba-2 ---------------------------------------------------------------------------------------------


def mamba_setup(b, seed=0):
    mixer = init_random_(Mamba2Mixer(CFG), seed=seed)
    g = gen(seed + 100)
    state = MambaState(
        conv=torch.randn(b, CFG.conv_dim, CFG.conv_kernel, generator=g),
        ssm=0.5 * torch.randn(b, CFG.mamba_num_heads, CFG.mamba_head_dim, CFG.ssm_state_size, generator=g),
    )
    return mixer, state


@pytest.mark.parametrize("length,inplace", [(1, False), (1, True), (5, False), (16, False), (37, False)])
def test_mamba_mixer_matches_reference(length, inplace):
    # length 1 with inplace=True takes the recurrent step kernels; otherwise the chunked scan (chunk 16)
    mixer, state = mamba_setup(2, seed=length)
    u = torch.randn(2, length, CFG.hidden_size, generator=gen(1))
    snapshot = (state.conv.clone(), state.ssm.clone())
    expected = [ref.mamba(u[r].double(), mixer, CFG, state.conv[r], state.ssm[r]) for r in range(2)]
    with torch.no_grad():
        out, new = mixer(u, state, inplace=inplace)
    for r, (o, conv, ssm) in enumerate(expected):
        assert_close(out[r], o)
        assert_close(new.conv[r], conv)
        assert_close(new.ssm[r], ssm)
    if not inplace:
        assert torch.equal(state.conv, snapshot[0]) and torch.equal(state.ssm, snapshot[1])


def test_mamba_mixer_ragged_rows():
    # right-padded rows: the state stops at each row's last real token; outputs there equal the row alone
    mixer, state = mamba_setup(3, seed=3)
    n_valid = torch.tensor([7, 2, 5])
    u = torch.randn(3, 7, CFG.hidden_size, generator=gen(2))
    with torch.no_grad():
        out, new = mixer(u, state, n_valid=n_valid)
    for r, n in enumerate(n_valid.tolist()):
        o, conv, ssm = ref.mamba(u[r, :n].double(), mixer, CFG, state.conv[r], state.ssm[r])
        assert_close(out[r, :n], o)
        assert_close(new.conv[r], conv)
        assert_close(new.ssm[r], ssm)


def test_mamba_dt_limit_clamps():
    # time_step_limit (lo, hi) clamps dt after softplus; default (0, inf) does nothing
    cfg = CFG.replace(time_step_limit=(0.01, 0.05))
    mixer = Mamba2Mixer(cfg)
    raw = torch.linspace(-10, 10, 8)[None, :].expand(3, -1)
    dt = mixer._dt(raw)
    assert dt.min().item() == pytest.approx(0.01) and dt.max().item() == pytest.approx(0.05)
    assert torch.allclose(Mamba2Mixer(CFG)._dt(raw), torch.nn.functional.softplus(raw))


# ---- attention ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths,length", [([6, 6], 4), ([9, 3], 5), ([4, 0], 1), ([7, 2], 1)])
def test_attention_layer_matches_reference(causal, lengths, length):
    attn = init_random_(Attention(CFG), seed=4)
    lengths = torch.tensor(lengths)
    ctx_len, cap = int(lengths.max()), 16
    g = gen(5)
    cache = AttentionState(torch.randn(2, cap, 2, 16, generator=g), torch.randn(2, cap, 2, 16, generator=g))
    u = torch.randn(2, length, CFG.hidden_size, generator=g)
    rows = [
        ref.attention(u[r].double(), attn, CFG, cache.k[r, :n], cache.v[r, :n], causal)
        for r, n in enumerate(lengths.tolist())
    ]
    uniform = bool((lengths == ctx_len).all())
    with torch.no_grad():
        out = attn(u, cache, lengths, ctx_len, uniform, causal, write=True)
    for r, n in enumerate(lengths.tolist()):
        o, K, V = rows[r]
        assert_close(out[r], o)
        # the chunk's K/V were written right after the row's own length
        assert_close(cache.k[r, : n + length], K)
        assert_close(cache.v[r, : n + length], V)


# ---- MoE / MLP / norms ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "tiny-grouped"])
def test_moe_layer_matches_reference(name):
    cfg = preset(name)
    moe = init_random_(MoE(cfg), seed=6)
    x = torch.randn(2, 9, cfg.hidden_size, generator=gen(7))
    with torch.no_grad():
        out = moe(x)
    expected = ref.moe(x.reshape(-1, cfg.hidden_size).double(), moe, cfg).view(2, 9, -1)
    assert_close(out, expected)


def test_mlp_layer():
    mlp = init_random_(MLP(CFG.hidden_size, CFG.intermediate_size, False), seed=8)
    x = torch.randn(5, CFG.hidden_size)
    with torch.no_grad():
        assert_close(mlp(x), ref.relu2_mlp(x.double(), mlp.up_proj.weight, mlp.down_proj.weight))


def test_norms():
    x, z = torch.randn(3, 4, 64), torch.randn(3, 4, 64)
    norm = RMSNorm(64, 1e-5)
    norm.weight.data = torch.randn(64)
    with torch.no_grad():
        assert_close(norm(x), ref.rmsnorm(x.double(), norm.weight, 1e-5))
    gated = GatedGroupRMSNorm(64, 16, 1e-5)  # 4 groups, normalised separately, gate before the norm
    gated.weight.data = torch.randn(64)
    h = (x.double() * ref.silu(z.double())).view(3, 4, 4, 16)
    expected = (h / torch.sqrt((h * h).mean(-1, keepdim=True) + 1e-5)).view(3, 4, 64) * gated.weight.double()
    with torch.no_grad():
        assert_close(gated(x, z), expected)


# ---- timestep embedding -------------------------------------------------------------------------------------


def test_timestep_sinusoid_layout():
    t = torch.tensor([0.0, 0.0625, 0.3, 1.0])
    emb = timestep_sinusoid(t)
    assert emb.shape == (4, 256) and emb.dtype == torch.float32
    # cos half first: at t = 0 it is [1]*128 + [0]*128
    assert torch.equal(emb[0], torch.cat([torch.ones(128), torch.zeros(128)]))
    # t is scaled by 1000; frequency i is 10000^(-i/128) (i = 0: 1, i = 127: about 1e-4)
    for row, tv in enumerate(t.tolist()):
        assert emb[row, 0].item() == pytest.approx(math.cos(1000 * tv), abs=1e-4)
        assert emb[row, 128].item() == pytest.approx(math.sin(1000 * tv), abs=1e-4)
        assert emb[row, 127].item() == pytest.approx(math.cos(1000 * tv * 10000 ** (-127 / 128)), abs=1e-6)
        # float32 arguments up to 1000 rad: absolute error a few 1e-5
        torch.testing.assert_close(emb[row].double(), ref.timestep_sinusoid(tv), rtol=0, atol=2e-4)


def test_time_embedding_matches_reference():
    den = init_random_(DenoiserTower(CFG), seed=9)
    t = torch.tensor([1.0, 0.4375, 0.0])
    with torch.no_grad():
        got = den.time_embedding(t)
    assert got.shape == (3, 3, CFG.hidden_size)
    for r in range(3):
        assert_close(got[r], ref.time_embedding(den, float(t[r])), tol=1e-4)
