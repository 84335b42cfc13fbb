"""Chunked SSD scan (twotower/kernels/ssd.py) against an explicit token-by-token recurrence written here.

The oracle is the spec's recurrence, per head h with state S [p, n]:
    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t (outer) B_t      y_t = S_t @ C_t + D_h * x_t
with head h reading B/C group h // (heads / groups). Everything in float64 so the oracle's own rounding
is negligible against the 1e-4 tolerance on the float32 scan.
"""

from __future__ import annotations

import math

import pytest
import torch

from twotower.kernels import ssd_recurrence_ref, ssd_scan_ref, ssd_step_ref

LENGTHS = [1, 2, 7, 16, 17, 63, 128, 129, 255, 300]
CHUNKS = [16, 48, 128]
# (heads, groups): one group per head, several heads per group, a single group
HEAD_GROUPS = [(4, 4), (6, 2), (4, 1)]


def make_inputs(b, l, h, g, p=4, n=8, seed=0, initial=False, dtype=torch.float32):
    """Realistic ranges (dt in [1e-3, 0.1], A in [-16, -1] as after init) and O(1) values."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen)
    dt = torch.exp(torch.empty(b, l, h).uniform_(math.log(1e-3), math.log(0.1), generator=gen))
    A = -torch.empty(h).uniform_(1.0, 16.0, generator=gen)
    B = torch.randn(b, l, g, n, generator=gen) / math.sqrt(n)
    C = torch.randn(b, l, g, n, generator=gen) / math.sqrt(n)
    D = 1.0 + 0.1 * torch.randn(h, generator=gen)
    s0 = torch.randn(b, h, p, n, generator=gen) if initial else None
    cast = lambda t: t.to(dtype)
    return cast(x), cast(dt), A, cast(B), cast(C), D, s0


def naive(x, dt, A, B, C, D=None, s0=None):
    """Explicit loop over time and heads, float64. Returns (y [b,l,h,p], states [b,l,h,p,n], final)."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    per_group = h // g
    S = torch.zeros(b, h, p, n, dtype=torch.float64) if s0 is None else s0.double().clone()
    ys, states = [], []
    for t in range(l):
        y_t = torch.empty(b, h, p, dtype=torch.float64)
        for hh in range(h):
            gg = hh // per_group
            decay = torch.exp(dt[:, t, hh] * A[hh])[:, None, None]  # [b, 1, 1]
            inject = dt[:, t, hh, None, None] * x[:, t, hh, :, None] * B[:, t, gg, None, :]  # [b, p, n]
            S[:, hh] = decay * S[:, hh] + inject
            y_t[:, hh] = torch.einsum("bpn,bn->bp", S[:, hh], C[:, t, gg])
            if D is not None:
                y_t[:, hh] += D[hh].double() * x[:, t, hh]
        ys.append(y_t)
        states.append(S.clone())
    return torch.stack(ys, 1), torch.stack(states, 1), S


def assert_rel(actual, expected, tol=1e-4):
    """max |a - e| <= tol * max |e| (values are O(1) by construction)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max().clamp_min(1e-6)
    err = (actual.double() - expected.double()).abs().max()
    assert err <= tol * scale, f"max err {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("h,g", HEAD_GROUPS)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("length", LENGTHS)
def test_chunked_scan_equals_recurrence(length, chunk, h, g):
    for initial in (False, True):
        x, dt, A, B, C, D, s0 = make_inputs(2, length, h, g, seed=length, initial=initial)
        y, final = ssd_scan_ref(x, dt, A, B, C, D, initial_state=s0, chunk_size=chunk)
        y_ref, _, final_ref = naive(x, dt, A, B, C, D, s0)
        assert y.dtype == torch.float32 and final.dtype == torch.float32
        assert_rel(y, y_ref)
        assert_rel(final, final_ref)


def test_without_D():
    x, dt, A, B, C, _, s0 = make_inputs(2, 37, 4, 2, initial=True)
    y, final = ssd_scan_ref(x, dt, A, B, C, None, initial_state=s0, chunk_size=16)
    y_ref, _, final_ref = naive(x, dt, A, B, C, None, s0)
    assert_rel(y, y_ref)
    assert_rel(final, final_ref)


def test_library_recurrence_matches_oracle():
    # ssd_recurrence_ref is what other code may use as its definition; it must agree with ours
    x, dt, A, B, C, D, s0 = make_inputs(2, 23, 6, 2, initial=True)
    y, final = ssd_recurrence_ref(x, dt, A, B, C, D, s0)
    y_ref, _, final_ref = naive(x, dt, A, B, C, D, s0)
    assert_rel(y, y_ref, 1e-5)
    assert_rel(final, final_ref, 1e-5)


@pytest.mark.parametrize("split", [1, 5, 16, 20, 47])
def test_split_scan_with_carried_state_equals_one_scan(split):
    # chunked prefill / block extension: scanning [0, split) then [split, L) from the carried state
    x, dt, A, B, C, D, s0 = make_inputs(2, 48, 4, 2, seed=3, initial=True)
    y_all, f_all = ssd_scan_ref(x, dt, A, B, C, D, initial_state=s0, chunk_size=16)
    y1, f1 = ssd_scan_ref(x[:, :split], dt[:, :split], A, B[:, :split], C[:, :split], D, s0, 16)
    y2, f2 = ssd_scan_ref(x[:, split:], dt[:, split:], A, B[:, split:], C[:, split:], D, f1, 16)
    assert_rel(torch.cat([y1, y2], 1), y_all, 1e-5)
    assert_rel(f2, f_all, 1e-5)


@pytest.mark.parametrize("length,chunk", [(1, 16), (16, 16), (37, 16), (130, 48), (60, 128)])
def test_return_all_states(length, chunk):
    x, dt, A, B, C, D, s0 = make_inputs(2, length, 4, 2, seed=length, initial=True)
    y, states = ssd_scan_ref(x, dt, A, B, C, D, initial_state=s0, chunk_size=chunk, return_all_states=True)
    y_ref, states_ref, _ = naive(x, dt, A, B, C, D, s0)
    assert states.shape == (2, length, 4, 4, 8)
    assert_rel(y, y_ref)
    assert_rel(states, states_ref)
    _, final = ssd_scan_ref(x, dt, A, B, C, D, initial_state=s0, chunk_size=chunk)
    torch.testing.assert_close(states[:, -1], final, rtol=1e-5, atol=1e-6)


def test_dt_zero_positions_are_identity_steps():
    # ragged rows are padded with dt = 0: such a position must neither decay nor inject
    x, dt, A, B, C, D, s0 = make_inputs(2, 40, 4, 2, seed=11, initial=True)
    zero = torch.zeros(40, dtype=torch.bool)
    zero[[0, 5, 6, 17, 31]] = True
    zero[35:] = True  # a padded tail
    dt = dt.masked_fill(zero[None, :, None], 0.0)
    y, states = ssd_scan_ref(x, dt, A, B, C, D, initial_state=s0, chunk_size=16, return_all_states=True)
    prev = torch.cat([s0[:, None], states[:, :-1]], 1)  # state entering each position
    torch.testing.assert_close(states[:, zero], prev[:, zero], rtol=0, atol=1e-6)
    # the output there reads the unchanged state: y = S_prev @ C + D x
    Ch = C.repeat_interleave(2, dim=2)  # 4 heads over 2 groups
    y_expect = torch.einsum("blhpn,blhn->blhp", prev, Ch) + x * D[:, None]
    torch.testing.assert_close(y[:, zero], y_expect[:, zero], rtol=1e-5, atol=1e-5)
    # and the state is the same as scanning only the real positions
    keep = ~zero
    _, f_compact = ssd_scan_ref(x[:, keep], dt[:, keep], A, B[:, keep], C[:, keep], D, s0, chunk_size=16)
    assert_rel(states[:, -1], f_compact, 1e-5)


def test_step_equals_one_scan_step():
    x, dt, A, B, C, D, s0 = make_inputs(3, 1, 6, 3, seed=5, initial=True)
    s0_copy = s0.clone()
    y_step, s_step = ssd_step_ref(s0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    y_scan, s_scan = ssd_scan_ref(x, dt, A, B, C, D, initial_state=s0, chunk_size=16)
    torch.testing.assert_close(y_step, y_scan[:, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_step, s_scan, rtol=1e-5, atol=1e-6)
    assert torch.equal(s0, s0_copy), "ssd_step_ref must not modify its input state"
    y_ref, _, f_ref = naive(x, dt, A, B, C, D, s0)
    assert_rel(y_step, y_ref[:, 0], 1e-5)
    assert_rel(s_step, f_ref, 1e-5)


def test_bf16_inputs_compute_in_fp32():
    x, dt, A, B, C, D, s0 = make_inputs(2, 33, 4, 2, seed=9, initial=True, dtype=torch.bfloat16)
    y, final = ssd_scan_ref(x, dt, A, B, C, D, initial_state=s0, chunk_size=16)
    assert y.dtype == torch.float32 and final.dtype == torch.float32
    # same as feeding the (already rounded) values in float32: no bf16 arithmetic inside
    y32, f32 = ssd_scan_ref(x.float(), dt.float(), A, B.float(), C.float(), D, s0, chunk_size=16)
    torch.testing.assert_close(y, y32, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(final, f32, rtol=1e-6, atol=1e-6)
    y_step, s_step = ssd_step_ref(s0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    assert y_step.dtype == torch.float32 and s_step.dtype == torch.float32
    assert_rel(y_step, naive(x[:, :1], dt[:, :1], A, B[:, :1], C[:, :1], D, s0)[0][:, 0], 1e-5)
