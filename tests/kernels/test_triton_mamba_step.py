"""Fused Triton decode step (twotower/kernels/triton_mamba_step.py) against its twin `mamba_decode_step_ref`, the
twin against explicit float64 loops, and a run of decode steps against the sequence path (conv over the
whole block + SSD scan from the same states).

The Triton entry point is called directly; without CUDA it runs under the Triton interpreter
(TRITON_INTERPRET=1 set below, before the kernel module is imported). Sizes are tiny.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton", reason="triton is not installed: the Triton kernels are not tested")

from twotower import kernels  # noqa: E402
from twotower.kernels import causal_conv1d_ref, mamba_decode_step_ref, ssd_scan_ref  # noqa: E402
from twotower.kernels import triton_mamba_step as tk  # noqa: E402

from .test_ssd import assert_rel, naive  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TWIN_TOL = 1e-5


def make_step(b, h, g, p=4, n=8, k=4, rows=None, seed=0, dtype=torch.float32, bias=True, with_d=True):
    """One decode step's inputs (CPU); `rows` = number of state rows (a slot pool when > b)."""
    gen = torch.Generator().manual_seed(seed)
    rows = rows or b
    conv_dim = h * p + 2 * g * n
    xBC = torch.randn(b, conv_dim, generator=gen).to(dtype)
    conv_state = torch.randn(rows, conv_dim, k, generator=gen).to(dtype)
    weight = (torch.randn(conv_dim, k, generator=gen) / math.sqrt(k)).to(dtype)
    conv_bias = (0.1 * torch.randn(conv_dim, generator=gen)).to(dtype) if bias else None
    dt = torch.exp(torch.empty(b, h).uniform_(math.log(1e-3), math.log(0.1), generator=gen))
    A = -torch.empty(h).uniform_(1.0, 16.0, generator=gen)
    D = 1.0 + 0.1 * torch.randn(h, generator=gen) if with_d else None
    ssm_state = torch.randn(rows, h, p, n, generator=gen)
    return xBC, conv_state, weight, conv_bias, dt, A, D, ssm_state


def run_both(xBC, conv_state, weight, conv_bias, dt, A, D, ssm_state, slots=None, block_p=None):
    """Kernel (on DEVICE, on copies of the states) and twin (on CPU copies): (y, conv, ssm) for each."""
    dev = [t.to(DEVICE) if t is not None else None for t in (xBC, weight, conv_bias, dt, A, D, slots)]
    conv_k, ssm_k = conv_state.clone().to(DEVICE), ssm_state.clone().to(DEVICE)
    y_k = tk.mamba_decode_step(dev[0], conv_k, dev[1], dev[2], dev[3], dev[4], dev[5], ssm_k, dev[6],
                               block_p=block_p)  # fmt: skip
    conv_r, ssm_r = conv_state.clone(), ssm_state.clone()
    y_r = mamba_decode_step_ref(xBC, conv_r, weight, conv_bias, dt, A, D, ssm_r, slots)
    return (y_k.cpu(), conv_k.cpu(), ssm_k.cpu()), (y_r, conv_r, ssm_r)


def assert_twins(got, ref):
    assert got[0].dtype == torch.float32 and got[0].shape == ref[0].shape
    assert_rel(got[0], ref[0], TWIN_TOL)
    assert torch.equal(got[1], ref[1]), "the conv state update is a copy: it must match exactly"
    assert_rel(got[2], ref[2], TWIN_TOL)


def test_runs_the_triton_kernel():
    if DEVICE == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        assert isinstance(tk._mamba_decode_step_kernel, InterpretedFunction)


@pytest.mark.parametrize("h,g,k,bias,with_d,block_p", [
    (4, 4, 4, True, True, None), (4, 2, 4, False, True, 2), (4, 1, 3, True, False, None), (6, 3, 2, True, True, None),
])  # fmt: skip
def test_matches_twin(h, g, k, bias, with_d, block_p):
    # groupings, conv widths (3: a masked tap), no bias / no D, several head-dim tiles (block_p = 2)
    inp = make_step(3, h, g, k=k, seed=h + g + k, bias=bias, with_d=with_d)
    assert_twins(*run_both(*inp, block_p=block_p))


def test_twin_matches_explicit_float64_step():
    b, h, g, p, n, k = 2, 4, 2, 4, 8, 4
    xBC, conv_state, weight, bias, dt, A, D, ssm_state = make_step(b, h, g, p, n, k, seed=3)
    conv_r, ssm_r = conv_state.clone(), ssm_state.clone()
    y = mamba_decode_step_ref(xBC, conv_r, weight, bias, dt, A, D, ssm_r)
    window = torch.cat([conv_state[..., 1:], xBC[..., None]], -1).double()  # [b, conv_dim, k]
    conv = torch.zeros(b, xBC.shape[1], dtype=torch.float64)
    for j in range(k):
        conv += window[..., j] * weight[:, j].double()
    act = F.silu(conv + bias.double())
    x, B, C = torch.split(act, [h * p, g * n, g * n], dim=-1)
    y_o, _, final_o = naive(x.view(b, 1, h, p), dt[:, None], A, B.view(b, 1, g, n), C.view(b, 1, g, n), D, ssm_state)
    assert_rel(y, y_o[:, 0])
    assert_rel(ssm_r, final_o)
    assert torch.equal(conv_r, window.float())


def test_decode_steps_equal_the_sequence_path():
    # T kernel steps from a state == conv over [history | block] + silu + one seeded SSD scan
    T, b, h, g, p, n, k = 5, 2, 4, 2, 4, 8, 4
    _, conv0, weight, bias, _, A, D, ssm0 = make_step(b, h, g, p, n, k, seed=8)
    gen = torch.Generator().manual_seed(9)
    xs = torch.randn(b, T, conv0.shape[1], generator=gen)
    dts = torch.exp(torch.empty(b, T, h).uniform_(math.log(1e-3), math.log(0.1), generator=gen))
    conv_k, ssm_k = conv0.clone().to(DEVICE), ssm0.clone().to(DEVICE)
    dev = [t.to(DEVICE) for t in (weight, bias, A, D)]
    ys = [tk.mamba_decode_step(xs[:, t].to(DEVICE), conv_k, dev[0], dev[1], dts[:, t].to(DEVICE), dev[2], dev[3],
                               ssm_k).cpu() for t in range(T)]  # fmt: skip
    act = F.silu(causal_conv1d_ref(xs.transpose(1, 2), weight, bias, history=conv0[..., 1:])).transpose(1, 2)
    x, B, C = torch.split(act, [h * p, g * n, g * n], dim=-1)
    y_seq, final_seq = ssd_scan_ref(x.reshape(b, T, h, p), dts, A, B.reshape(b, T, g, n), C.reshape(b, T, g, n), D,
                                    ssm0, chunk_size=16)  # fmt: skip
    assert_rel(torch.stack(ys, 1), y_seq)
    assert_rel(ssm_k.cpu(), final_seq)
    assert torch.equal(conv_k.cpu(), torch.cat([conv0, xs.transpose(1, 2)], -1)[..., -k:])


def test_slot_pool_in_place():
    # 3 rows in shuffled slots of a 7-slot pool; slots not named stay bit-identical in both state pools
    b, rows, slots = 3, 7, torch.tensor([4, 0, 6])
    inp = make_step(b, 4, 2, rows=rows, seed=5)
    got, ref = run_both(*inp, slots=slots)
    assert_twins(got, ref)
    conv0, ssm0 = inp[1], inp[7]
    untouched = torch.tensor([1, 2, 3, 5])
    assert torch.equal(got[1][untouched], conv0[untouched]) and torch.equal(got[2][untouched], ssm0[untouched])
    # and the named slots equal a plain (slot-free) step on the gathered rows
    plain = list(inp)
    plain[1], plain[7] = conv0[slots].clone(), ssm0[slots].clone()
    y_plain = mamba_decode_step_ref(*plain)
    assert_rel(got[0], y_plain, TWIN_TOL)
    assert torch.equal(got[1][slots], plain[1])
    assert_rel(got[2][slots], plain[7], TWIN_TOL)


def test_bf16_inputs_compute_in_fp32():
    # bf16 activations, conv weights and conv state; float32 SSM state and dt
    inp = make_step(2, 4, 2, seed=6, dtype=torch.bfloat16)
    got, ref = run_both(*inp)
    assert got[1].dtype == torch.bfloat16
    assert_twins(got, ref)
    as32 = [t.float() if t is not None and t.dtype == torch.bfloat16 else t for t in inp]
    got32, _ = run_both(*as32)
    torch.testing.assert_close(got[0], got32[0], rtol=1e-6, atol=1e-6)  # no bf16 arithmetic inside
    torch.testing.assert_close(got[2], got32[2], rtol=1e-6, atol=1e-6)


def test_public_name_uses_the_twin_on_cpu_and_updates_in_place():
    inp = make_step(2, 4, 2, seed=7)
    conv, ssm = inp[1].clone(), inp[7].clone()
    y = kernels.mamba_decode_step(inp[0], conv, inp[2], inp[3], inp[4], inp[5], inp[6], ssm)
    conv_r, ssm_r = inp[1].clone(), inp[7].clone()
    y_r = mamba_decode_step_ref(inp[0], conv_r, inp[2], inp[3], inp[4], inp[5], inp[6], ssm_r)
    assert_rel(y, y_r, TWIN_TOL)
    assert torch.equal(conv, conv_r)
    assert_rel(ssm, ssm_r, TWIN_TOL)
    assert not torch.equal(ssm, inp[7]), "the state must have been updated in place"
