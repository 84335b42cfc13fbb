"""Attention kernels (twotower/kernels/attention.py): SDPA entry point vs the float32 reference vs an explicit
per-(row, head, query) softmax, with masks from key_mask, whose semantics are checked separately."""

from __future__ import annotations

import math

import pytest
import torch

from twotower.kernels import attention, attention_ref, key_mask


def explicit_mask(lengths, ctx_len, n_new, causal):
    """mask[r, i, j]: context key j < ctx_len is visible iff j < lengths[r]; chunk key j >= ctx_len is
    visible always (causal=False) or iff j - ctx_len <= i (causal=True, bottom-right aligned)."""
    b = len(lengths)
    m = torch.zeros(b, n_new, ctx_len + n_new, dtype=torch.bool)
    for r in range(b):
        for i in range(n_new):
            for j in range(ctx_len + n_new):
                m[r, i, j] = (j < int(lengths[r])) if j < ctx_len else (not causal or j - ctx_len <= i)
    return m


def explicit_attention(q, k, v, mask):
    """Loop over rows, heads and queries; softmax over the visible keys only; float64."""
    b, lq, hq, d = q.shape
    rep = hq // k.shape[2]
    out = torch.zeros(b, lq, hq, d, dtype=torch.float64)
    for r in range(b):
        for h in range(hq):
            for i in range(lq):
                vis = torch.ones(k.shape[1], dtype=torch.bool) if mask is None else mask[r, i]
                s = (k[r, vis, h // rep].double() @ q[r, i, h].double()) / math.sqrt(d)
                p = torch.softmax(s, dim=0)
                out[r, i, h] = p @ v[r, vis, h // rep].double()
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths,ctx_len,n_new", [([5, 5], 5, 3), ([0, 4, 7], 7, 4), ([3, 9], 9, 1), ([0], 0, 6)])
def test_key_mask_semantics(lengths, ctx_len, n_new, causal):
    lengths = torch.tensor(lengths)
    got = key_mask(lengths, ctx_len, n_new, causal)
    assert got.dtype == torch.bool and got.shape == (len(lengths), n_new, ctx_len + n_new)
    assert torch.equal(got, explicit_mask(lengths, ctx_len, n_new, causal))


def test_key_mask_spelled_out():
    # one row, context length 2 of capacity 3, a chunk of 2, causal
    m = key_mask(torch.tensor([2]), 3, 2, causal=True)[0].int().tolist()
    assert m == [[1, 1, 0, 1, 0], [1, 1, 0, 1, 1]]
    m = key_mask(torch.tensor([2]), 3, 2, causal=False)[0].int().tolist()
    assert m == [[1, 1, 0, 1, 1], [1, 1, 0, 1, 1]]


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("causal", [True, False, None])  # None: no mask at all
@pytest.mark.parametrize("lengths,n_new", [([6, 6], 4), ([0, 3, 6], 5), ([2, 6], 1)])
def test_attention_matches_reference(hq, hkv, causal, lengths, n_new):
    g = torch.Generator().manual_seed(hq * 10 + hkv + n_new)
    lengths = torch.tensor(lengths)
    b, ctx_len, d = len(lengths), int(lengths.max()), 16
    q = torch.randn(b, n_new, hq, d, generator=g)
    k = torch.randn(b, ctx_len + n_new, hkv, d, generator=g)
    v = torch.randn(b, ctx_len + n_new, hkv, d, generator=g)
    mask = None if causal is None else key_mask(lengths, ctx_len, n_new, causal)
    ref = attention_ref(q, k, v, mask)
    torch.testing.assert_close(attention(q, k, v, mask), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref.double(), explicit_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_masked_keys_are_ignored():
    # garbage (huge) values in padded context positions must not leak into the output
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([2, 5])
    q, k, v = (torch.randn(2, 3, 4, 8, generator=g) for _ in range(3))
    k = torch.cat([torch.randn(2, 5, 4, 8, generator=g), k], 1)
    v = torch.cat([torch.randn(2, 5, 4, 8, generator=g), v], 1)
    mask = key_mask(lengths, 5, 3, causal=True)
    base = attention(q, k, v, mask)
    k2, v2 = k.clone(), v.clone()
    k2[0, 2:5], v2[0, 2:5] = 1e4, 1e4
    torch.testing.assert_close(attention(q, k2, v2, mask), base)


def test_bf16_output_dtype_and_closeness():
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 3, 4, 16, generator=g),
        torch.randn(2, 7, 2, 16, generator=g),
        torch.randn(2, 7, 2, 16, generator=g),
    )
    mask = key_mask(torch.tensor([4, 2]), 4, 3, causal=True)
    for fn in (attention, attention_ref):
        out = fn(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), attention_ref(q, k, v, mask), rtol=3e-2, atol=3e-2)
