"""Triton block scan (twotower/kernels/triton_ssd.py) against its twin `ssd_block_scan_ref` and, where useful, the
float64 token-by-token oracle of test_ssd.py.

The Triton entry point is called directly (the public dispatcher picks the reference on CPU). Without
CUDA the kernel runs under the Triton interpreter: TRITON_INTERPRET=1 is set below, before the kernel
module is imported (triton.jit reads it when decorating). The interpreter is slow, so sizes are tiny.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton", reason="triton is not installed: the Triton kernels are not tested")

from twotower import kernels  # noqa: E402
from twotower.kernels import ssd_block_scan_ref, ssd_scan_ref  # noqa: E402
from twotower.kernels import triton_ssd as tk  # noqa: E402

from .test_ssd import assert_rel, make_inputs, naive  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TWIN_TOL = 1e-5  # kernel vs reference, both float32 (the oracle comparisons use test_ssd's 1e-4)


def inputs(b, l, h, g, p=4, n=8, seed=0, initial=True, dtype=torch.float32):
    return make_inputs(b, l, h, g, p=p, n=n, seed=seed, initial=initial, dtype=dtype)


def on_device(*ts):
    return [t.to(DEVICE) if t is not None else None for t in ts]


def run_both(x, dt, A, B, C, D, s0, **kw):
    """(kernel result, reference result), the kernel on DEVICE, results back on the CPU."""
    got = tk.ssd_block_scan(*on_device(x, dt, A, B, C, D, s0), **kw)
    ref = ssd_block_scan_ref(x, dt, A, B, C, D, s0, **{k: v for k, v in kw.items() if not k.startswith("block")})
    return [t.cpu() for t in got], ref


def test_runs_the_triton_kernel():
    # the point of these tests: on a CPU machine the interpreter runs the kernel's own code
    if DEVICE == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        assert isinstance(tk._ssd_block_scan_kernel, InterpretedFunction)


def test_every_length_matches_twin_and_oracle():
    # every l in 1..8 and a few longer ones up to the 64 limit, seeded: the short-block decay case
    for l in [*range(1, 9), 16, 33, 64]:
        x, dt, A, B, C, D, s0 = inputs(2, l, 4, 2, seed=l)
        (y, final), (y_ref, final_ref) = run_both(x, dt, A, B, C, D, s0)
        assert y.dtype == final.dtype == torch.float32 and final.shape == (2, 4, 4, 8)
        assert_rel(y, y_ref, TWIN_TOL)
        assert_rel(final, final_ref, TWIN_TOL)
        y_o, _, final_o = naive(x, dt, A, B, C, D, s0)
        assert_rel(y, y_o)
        assert_rel(final, final_o)


@pytest.mark.parametrize("h,g,with_d,initial", [(4, 4, True, True), (4, 1, False, True), (6, 3, True, False)])
def test_head_groupings_d_and_zero_state(h, g, with_d, initial):
    for l in (1, 5, 17):
        x, dt, A, B, C, D, s0 = inputs(2, l, h, g, seed=10 + l, initial=initial)
        D = D if with_d else None
        (y, final), (y_ref, final_ref) = run_both(x, dt, A, B, C, D, s0)
        assert_rel(y, y_ref, TWIN_TOL)
        assert_rel(final, final_ref, TWIN_TOL)
        assert_rel(y, naive(x, dt, A, B, C, D, s0)[0])


def test_several_p_and_n_tiles():
    # p = 20, n = 24 with 16-wide tiles: two head-dim programs per head, two state blocks in the n loop
    for l, all_states in ((3, False), (16, False), (5, True)):
        x, dt, A, B, C, D, s0 = inputs(1, l, 2, 1, p=20, n=24, seed=l)
        (y, st), (y_ref, st_ref) = run_both(x, dt, A, B, C, D, s0, return_all_states=all_states, block_p=16,
                                            block_n=16)  # fmt: skip
        assert_rel(y, y_ref, TWIN_TOL)
        assert_rel(st, st_ref, TWIN_TOL)


def test_strided_inputs():
    # views as the mixer passes them (split of a wider projection): no .contiguous() needed
    x, dt, A, B, C, D, s0 = inputs(2, 6, 4, 2, seed=3)
    wide = torch.cat([x.flatten(2), B.flatten(2), C.flatten(2)], -1)  # [b, l, h*p + 2*g*n]
    xs, Bs, Cs = torch.split(wide, [16, 16, 16], dim=-1)
    xv, Bv, Cv = xs.view(2, 6, 4, 4), Bs.view(2, 6, 2, 8), Cs.view(2, 6, 2, 8)
    assert not xv.is_contiguous()
    dt_v = dt.transpose(1, 2).contiguous().transpose(1, 2)  # [b, l, h] with non-standard strides
    (y, final), (y_ref, final_ref) = run_both(xv, dt_v, A, Bv, Cv, D, s0)
    assert_rel(y, y_ref, TWIN_TOL)
    assert_rel(final, final_ref, TWIN_TOL)


def test_return_all_states():
    for l in (1, 4, 8, 13):
        x, dt, A, B, C, D, s0 = inputs(2, l, 4, 2, seed=20 + l)
        (y, states), (y_ref, states_ref) = run_both(x, dt, A, B, C, D, s0, return_all_states=True)
        assert states.shape == (2, l, 4, 4, 8)
        assert_rel(y, y_ref, TWIN_TOL)
        assert_rel(states, states_ref, TWIN_TOL)
        assert_rel(states, naive(x, dt, A, B, C, D, s0)[1])


def test_ragged_rows_padded_with_zero_dt():
    # row r has n_valid[r] real positions; dt = 0 past them must leave its state where it stopped
    l, n_valid = 8, torch.tensor([3, 8, 1])
    x, dt, A, B, C, D, s0 = inputs(3, l, 4, 2, seed=7)
    dt = dt * (torch.arange(l)[None, :] < n_valid[:, None])[..., None]
    (y, states), (y_ref, states_ref) = run_both(x, dt, A, B, C, D, s0, return_all_states=True)
    assert_rel(y, y_ref, TWIN_TOL)
    assert_rel(states, states_ref, TWIN_TOL)
    (_, final), _ = run_both(x, dt, A, B, C, D, s0)
    for r, nv in enumerate(n_valid.tolist()):
        _, _, final_o = naive(x[r : r + 1, :nv], dt[r : r + 1, :nv], A, B[r : r + 1, :nv], C[r : r + 1, :nv], D,
                              s0[r : r + 1])  # fmt: skip
        assert_rel(final[r : r + 1], final_o)
        torch.testing.assert_close(states[r, nv:], states[r, nv - 1 : nv].expand(l - nv, -1, -1, -1), rtol=0, atol=0)


def test_slot_pool_in_place():
    # pool of 7 slots, 3 rows in shuffled slots; out_state = initial_state = pool: updated in place
    b, l, slots = 3, 5, torch.tensor([5, 0, 3])
    x, dt, A, B, C, D, _ = inputs(b, l, 4, 2, seed=31)
    pool = torch.randn(7, 4, 4, 8, generator=torch.Generator().manual_seed(1))
    pool_dev, slots_dev = pool.clone().to(DEVICE), slots.to(DEVICE)  # (.to alone would alias on CPU)
    y, ret = tk.ssd_block_scan(*on_device(x, dt, A, B, C, D), pool_dev, state_slots=slots_dev, out_state=pool_dev)
    assert ret is pool_dev
    y_ref, final_ref = ssd_block_scan_ref(x, dt, A, B, C, D, pool[slots])  # plain rows, gathered by hand
    assert_rel(y.cpu(), y_ref, TWIN_TOL)
    assert_rel(pool_dev[slots_dev].cpu(), final_ref, TWIN_TOL)
    untouched = torch.tensor([1, 2, 4, 6])
    assert torch.equal(pool_dev.cpu()[untouched], pool[untouched]), "slots not named must stay bit-identical"
    # the twin's pool path agrees
    pool_ref = pool.clone()
    ssd_block_scan_ref(x, dt, A, B, C, D, pool_ref, state_slots=slots, out_state=pool_ref)
    assert_rel(pool_dev.cpu(), pool_ref, TWIN_TOL)


def test_slot_pool_gather_only_and_separate_out_pool_with_all_states():
    b, l, slots = 2, 4, torch.tensor([2, 0])
    x, dt, A, B, C, D, _ = inputs(b, l, 4, 2, seed=41)
    pool = torch.randn(3, 4, 4, 8, generator=torch.Generator().manual_seed(2))
    pool_dev = pool.clone().to(DEVICE)
    # no out_state: per-row final states come back, the pool is only read
    y, final = tk.ssd_block_scan(*on_device(x, dt, A, B, C, D), pool_dev, state_slots=slots.to(DEVICE))
    assert final.shape == (b, 4, 4, 8) and torch.equal(pool_dev.cpu(), pool)
    y_ref, final_ref = ssd_block_scan_ref(x, dt, A, B, C, D, pool[slots])
    assert_rel(y.cpu(), y_ref, TWIN_TOL)
    assert_rel(final.cpu(), final_ref, TWIN_TOL)
    # all states plus the final ones written into another pool (float32 and bfloat16 storage)
    for out_dtype in (torch.float32, torch.bfloat16):
        out_pool = torch.full((3, 4, 4, 8), 7.0, dtype=out_dtype, device=DEVICE)
        _, states = tk.ssd_block_scan(*on_device(x, dt, A, B, C, D), pool_dev, state_slots=slots.to(DEVICE),
                                      out_state=out_pool, return_all_states=True)  # fmt: skip
        assert_rel(states.cpu(), ssd_block_scan_ref(x, dt, A, B, C, D, pool[slots], return_all_states=True)[1],
                   TWIN_TOL)  # fmt: skip
        # the stored final state is the last of the returned ones, cast to the pool's dtype (the interpreter
        # truncates float32 -> bfloat16 where the GPU rounds to nearest: allow one bf16 ulp)
        ulp = 0.0 if out_dtype == torch.float32 else 2.0**-7
        torch.testing.assert_close(out_pool[slots.to(DEVICE)].float().cpu(), states[:, -1].cpu(), rtol=ulp, atol=0)
        assert (out_pool[1] == 7.0).all()


def test_bf16_inputs_compute_in_fp32():
    x, dt, A, B, C, D, s0 = inputs(2, 6, 4, 2, seed=9, dtype=torch.bfloat16)
    dt = dt.float()  # the mixer's dt is float32
    (y, final), (y_ref, final_ref) = run_both(x, dt, A, B, C, D, s0)
    assert y.dtype == final.dtype == torch.float32
    assert_rel(y, y_ref, TWIN_TOL)
    assert_rel(final, final_ref, TWIN_TOL)
    (y32, f32), _ = run_both(x.float(), dt, A, B.float(), C.float(), D, s0)
    torch.testing.assert_close(y, y32, rtol=1e-6, atol=1e-6)  # no bf16 arithmetic inside
    torch.testing.assert_close(final, f32, rtol=1e-6, atol=1e-6)


def test_ssd_scan_routes_short_seeded_blocks_to_the_block_scan(monkeypatch):
    # pretend the Triton path is available (on CPU the dispatcher would pick the reference)
    calls = []

    def fake(t, module):
        calls.append(module)
        return tk

    monkeypatch.setattr(kernels, "_triton_kernels", fake)
    x, dt, A, B, C, D, s0 = inputs(2, 7, 4, 2, seed=5)
    x, dt, A, B, C, D, s0 = on_device(x, dt, A, B, C, D, s0)
    y, final = kernels.ssd_scan(x, dt, A, B, C, D, initial_state=s0, chunk_size=16)
    assert calls == ["triton_ssd"]
    y_ref, final_ref = ssd_scan_ref(x, dt, A, B, C, D, s0, chunk_size=16)
    assert_rel(y.cpu(), y_ref.cpu(), TWIN_TOL)
    assert_rel(final.cpu(), final_ref.cpu(), TWIN_TOL)
    kernels.ssd_scan(x, dt, A, B, C, D, initial_state=s0, chunk_size=4)  # longer than the chunk: not routed
    assert calls == ["triton_ssd"]
    _, st = kernels.ssd_block_scan(x, dt, A, B, C, D, s0, return_all_states=True)  # the public name
    assert calls == ["triton_ssd"] * 2 and st.shape == (2, 7, 4, 4, 8)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA: the dispatcher uses the reference on CPU tensors")
def test_public_dispatch_on_cuda():
    x, dt, A, B, C, D, s0 = on_device(*inputs(4, 16, 8, 2, p=16, n=16, seed=2))
    y, final = kernels.ssd_scan(x, dt, A, B, C, D, initial_state=s0, chunk_size=64)
    y_ref, final_ref = ssd_scan_ref(x, dt, A, B, C, D, s0, chunk_size=64)
    assert_rel(y, y_ref, TWIN_TOL)
    assert_rel(final, final_ref, TWIN_TOL)
