"""Triton SSD scan of one short block (l <= 64) from a seeded state: `ssd_block_scan`.

Contract (shapes, slot pool, out_state, return values): twotower/kernels/ssd_block.py, whose `ssd_block_scan_ref`
is the tested twin. This module imports triton at import time; twotower/kernels/__init__.py imports it only on
CUDA tensors, and the tests import it after setting TRITON_INTERPRET=1 on a CPU machine (the decorator
reads that variable when it runs, i.e. when this module is imported).

One program per (batch row, head, block of BLOCK_P head-dim rows). The whole block is one chunk, so the
quadratic ("dual") form applies directly, per head with cum_i = sum_{j<=i} dt_j A:
    y_i   = sum_{j<=i} exp(cum_i - cum_j) dt_j (C_i . B_j) x_j + exp(cum_i) C_i . S0 + D x_i
    S_end = exp(cum_end) S0 + sum_j exp(cum_end - cum_j) dt_j x_j B_j^T
The state size n is walked in blocks of BLOCK_N (C.B^T and C.S0 accumulate over them; each block of
S_end is complete on its own), which keeps the register tiles at most [64, 64]. Positions past l and
positions with dt = 0 decay by exp(0) = 1 and inject 0, which is why one formula serves every l, short
blocks included (cum_end is read at position l - 1, never at the padded tile end).
With return_all_states the states after each position are produced by the recurrence itself
(S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T, p*n work per position instead of p*l*n); y still comes
from the quadratic form. All dots use input_precision="ieee": tf32 would cost ~1e-3 relative error.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from .ssd_block import check_block_args


@triton.jit
def _ssd_block_scan_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, s0_ptr, slots_ptr, y_ptr, out_ptr, all_ptr,
    seqlen, hdim, dstate, heads_per_group,
    sx_b, sx_l, sx_h, sx_p,
    sdt_b, sdt_l, sdt_h,
    sB_b, sB_l, sB_g, sB_n,
    sC_b, sC_l, sC_g, sC_n,
    s0_b, s0_h, s0_p, s0_n,
    sy_b, sy_l, sy_h, sy_p,
    so_b, so_h, so_p, so_n,
    sa_b, sa_l, sa_h, sa_p, sa_n,
    HAS_D: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SLOTS: tl.constexpr, WRITE_OUT: tl.constexpr,
    OUT_IS_POOL: tl.constexpr, RETURN_ALL: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    group = head // heads_per_group
    state_row = row
    if HAS_SLOTS:
        state_row = tl.load(slots_ptr + row).to(tl.int64)  # pool row read (and written) by this row
    out_row = row
    if OUT_IS_POOL:
        out_row = state_row

    offs_l = tl.arange(0, BLOCK_L)
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_l = offs_l < seqlen
    mask_p = offs_p < hdim
    mask_lp = mask_l[:, None] & mask_p[None, :]

    # per-position decay: cum [L] non-increasing; dt = 0 past seqlen (identity steps)
    dt = tl.load(dt_ptr + row * sdt_b + offs_l * sdt_l + head * sdt_h, mask=mask_l, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + head).to(tl.float32)
    cum = tl.cumsum(dt * A, 0)
    cum_end = tl.sum(tl.where(offs_l == seqlen - 1, cum, 0.0), 0)
    x = tl.load(x_ptr + row * sx_b + offs_l[:, None] * sx_l + head * sx_h + offs_p[None, :] * sx_p,
                mask=mask_lp, other=0.0).to(tl.float32)  # fmt: skip  # [L, P]
    x_to_end = x * (dt * tl.exp(cum_end - cum))[:, None]  # [L, P]: x_j dt_j exp(cum_end - cum_j)

    B_base = B_ptr + row * sB_b + group * sB_g + offs_l[:, None] * sB_l
    C_base = C_ptr + row * sC_b + group * sC_g + offs_l[:, None] * sC_l
    s0_base = s0_ptr + state_row * s0_b + head * s0_h + offs_p[:, None] * s0_p
    out_base = out_ptr + out_row * so_b + head * so_h + offs_p[:, None] * so_p
    CB = tl.zeros((BLOCK_L, BLOCK_L), dtype=tl.float32)  # C_i . B_j
    CS0 = tl.zeros((BLOCK_L, BLOCK_P), dtype=tl.float32)  # C_i . S0[p]
    for n0 in range(0, dstate, BLOCK_N):
        nn = n0 + offs_n
        mask_ln = mask_l[:, None] & (nn < dstate)[None, :]
        mask_pn = mask_p[:, None] & (nn < dstate)[None, :]
        Bm = tl.load(B_base + nn[None, :] * sB_n, mask=mask_ln, other=0.0).to(tl.float32)  # [L, N]
        Cm = tl.load(C_base + nn[None, :] * sC_n, mask=mask_ln, other=0.0).to(tl.float32)  # [L, N]
        CB += tl.dot(Cm, tl.trans(Bm), input_precision="ieee")
        if HAS_INIT:
            S0 = tl.load(s0_base + nn[None, :] * s0_n, mask=mask_pn, other=0.0).to(tl.float32)  # [P, N]
            CS0 += tl.dot(Cm, tl.trans(S0), input_precision="ieee")
        if WRITE_OUT and not RETURN_ALL:  # (with RETURN_ALL the recurrence below writes it)
            S_end = tl.dot(tl.trans(x_to_end), Bm, input_precision="ieee")  # [P, N]
            if HAS_INIT:
                S_end += tl.exp(cum_end) * S0
            tl.store(out_base + nn[None, :] * so_n, S_end.to(out_ptr.dtype.element_ty), mask=mask_pn)

    # outputs: intra-block term + seeded-state term + skip
    causal = offs_l[:, None] >= offs_l[None, :]
    decay = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))  # [L(i), L(j)]
    y = tl.dot(CB * decay * dt[None, :], x, input_precision="ieee")  # [L, P]
    if HAS_INIT:
        y += tl.exp(cum)[:, None] * CS0
    if HAS_D:
        y += tl.load(D_ptr + head).to(tl.float32) * x
    tl.store(y_ptr + row * sy_b + offs_l[:, None] * sy_l + head * sy_h + offs_p[None, :] * sy_p, y, mask=mask_lp)

    if RETURN_ALL:
        for n0 in range(0, dstate, BLOCK_N):
            nn = n0 + offs_n
            mask_n = nn < dstate
            mask_pn = mask_p[:, None] & mask_n[None, :]
            S = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
            if HAS_INIT:
                S = tl.load(s0_base + nn[None, :] * s0_n, mask=mask_pn, other=0.0).to(tl.float32)
            for t in range(seqlen):
                dt_t = tl.load(dt_ptr + row * sdt_b + t * sdt_l + head * sdt_h).to(tl.float32)
                x_t = tl.load(x_ptr + row * sx_b + t * sx_l + head * sx_h + offs_p * sx_p, mask=mask_p, other=0.0)
                B_t = tl.load(B_ptr + row * sB_b + t * sB_l + group * sB_g + nn * sB_n, mask=mask_n, other=0.0)
                S = S * tl.exp(dt_t * A) + (dt_t * x_t.to(tl.float32))[:, None] * B_t.to(tl.float32)[None, :]
                all_off = row * sa_b + t * sa_l + head * sa_h + offs_p[:, None] * sa_p + nn[None, :] * sa_n
                tl.store(all_ptr + all_off, S, mask=mask_pn)
            if WRITE_OUT:
                tl.store(out_base + nn[None, :] * so_n, S.to(out_ptr.dtype.element_ty), mask=mask_pn)


def _pow2_at_least_16(v: int) -> int:
    return max(16, triton.next_power_of_2(v))  # tl.dot needs every tile dim >= 16


def ssd_block_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    *,
    state_slots: Tensor | None = None,
    out_state: Tensor | None = None,
    return_all_states: bool = False,
    block_p: int | None = None,
    block_n: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Triton twin of `ssd_block_scan_ref` (same arguments and returns; see twotower/kernels/ssd_block.py).

    Any strides are accepted (views from torch.split/reshape need no copy); l in 1..64. `block_p` and
    `block_n` (powers of 2, >= 16) override the head-dim / state tiles, for tests and tuning."""
    check_block_args(x, dt, A, B, C, D, initial_state, state_slots, out_state)
    bsz, seqlen, nheads, hdim = x.shape
    ngroups, dstate = B.shape[-2:]
    dev = x.device
    y = torch.empty(bsz, seqlen, nheads, hdim, device=dev, dtype=torch.float32)
    all_states = None
    if return_all_states:
        all_states = torch.empty(bsz, seqlen, nheads, hdim, dstate, device=dev, dtype=torch.float32)
    final = out_state
    if final is None and not return_all_states:
        final = torch.empty(bsz, nheads, hdim, dstate, device=dev, dtype=torch.float32)
    dummy = y  # stands in for absent pointers (never dereferenced: the constexpr flags prune those loads)
    s0 = initial_state if initial_state is not None else dummy
    out = final if final is not None else dummy
    allst = all_states if all_states is not None else dummy
    s0_strides = initial_state.stride() if initial_state is not None else (0, 0, 0, 0)
    out_strides = out.stride() if final is not None else (0, 0, 0, 0)
    all_strides = allst.stride() if all_states is not None else (0, 0, 0, 0, 0)
    BLOCK_P = block_p or _pow2_at_least_16(min(hdim, 32))
    BLOCK_N = block_n or _pow2_at_least_16(min(dstate, 64))
    BLOCK_L = _pow2_at_least_16(seqlen)
    grid = (bsz, nheads, triton.cdiv(hdim, BLOCK_P))
    on_device = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()  # launch on x's GPU
    with on_device:
        _ssd_block_scan_kernel[grid](
            x, dt, A, B, C, D if D is not None else dummy, s0,
            state_slots if state_slots is not None else dummy, y, out, allst,
            seqlen, hdim, dstate, nheads // ngroups,
            *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *s0_strides, *y.stride(), *out_strides,
            *all_strides,
            HAS_D=D is not None, HAS_INIT=initial_state is not None, HAS_SLOTS=state_slots is not None,
            WRITE_OUT=final is not None, OUT_IS_POOL=out_state is not None and state_slots is not None,
            RETURN_ALL=return_all_states, BLOCK_L=BLOCK_L, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N,
            num_warps=4 if BLOCK_L <= 32 else 8,  # the [64, 64] tiles of l = 33..64 want more registers
        )  # fmt: skip
    if return_all_states:
        return y, all_states
    return y, final
