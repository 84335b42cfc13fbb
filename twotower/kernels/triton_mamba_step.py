"""Fused Triton Mamba-2 decode step: conv update + silu + selective state update, one launch.

Contract: twotower/kernels/mamba_step.py (`mamba_decode_step_ref` is the tested twin). Like
twotower/kernels/triton_ssd.py this module imports triton at import time and is imported only on CUDA
tensors or by the tests (after TRITON_INTERPRET=1 on a CPU machine).

Grid: one program per (batch row, B/C group). A group's program owns every conv channel that group's
heads read: the x channels of its h/g heads and the group's own B and C channels. So each conv-state
channel is read and rewritten by exactly one program, and the in-place conv update needs no second
launch; B and C are convolved once and kept in registers for all of the group's heads. Inside, the
program walks its heads and blocks of BLOCK_P head-dim rows; the state tile is [BLOCK_P, n] (whole n).
Parallelism is b * g programs: at b = 1 with few groups the SMs are not all busy (decode at b = 1 is
launch-latency bound anyway); the alternative, a head-parallel grid, would race on the B/C conv state.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from .mamba_step import decode_step_dims


@triton.jit
def _conv_silu_channels(xbc_row_ptr, sxbc_c, cs_row_ptr, scs_c, scs_k, w_ptr, sw_c, sw_k, bias_ptr, ch, mask_ch,
                        KW: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
    """silu(conv) of channels ch [BC] of one row, float32 [BC]; shifts the new raw column into the state."""
    offs_k = tl.arange(0, BLOCK_K)
    mask_ck = mask_ch[:, None] & (offs_k < KW)[None, :]
    # new window column k = old column k + 1 for k < KW - 1; column KW - 1 = this token's raw value
    old = tl.load(cs_row_ptr + ch[:, None] * scs_c + (offs_k[None, :] + 1) * scs_k,
                  mask=mask_ch[:, None] & (offs_k < KW - 1)[None, :], other=0.0).to(tl.float32)  # fmt: skip
    new_col = tl.load(xbc_row_ptr + ch * sxbc_c, mask=mask_ch, other=0.0).to(tl.float32)
    window = tl.where((offs_k == KW - 1)[None, :], new_col[:, None], old)  # [BC, BLOCK_K]
    w = tl.load(w_ptr + ch[:, None] * sw_c + offs_k[None, :] * sw_k, mask=mask_ck, other=0.0).to(tl.float32)
    out = tl.sum(window * w, 1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + ch, mask=mask_ch, other=0.0).to(tl.float32)
    out = out * tl.sigmoid(out)
    # new column k comes from old column k + 1, which another thread of this program may be about to
    # overwrite (with old column k + 2): a barrier orders every read of the old state before any write
    tl.debug_barrier()
    tl.store(cs_row_ptr + ch[:, None] * scs_c + offs_k[None, :] * scs_k,
             window.to(cs_row_ptr.dtype.element_ty), mask=mask_ck)  # fmt: skip
    return out


@triton.jit
def _mamba_decode_step_kernel(
    xbc_ptr, cs_ptr, w_ptr, bias_ptr, dt_ptr, A_ptr, D_ptr, ssm_ptr, slots_ptr, y_ptr,
    hdim, dstate, heads_per_group, ngroups,
    sxbc_b, sxbc_c, scs_b, scs_c, scs_k, sw_c, sw_k, sdt_b, sdt_h,
    sssm_b, sssm_h, sssm_p, sssm_n, sy_b, sy_h, sy_p,
    KW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, HAS_SLOTS: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    state_row = row
    if HAS_SLOTS:
        state_row = tl.load(slots_ptr + row).to(tl.int64)
    xbc_row = xbc_ptr + row * sxbc_b
    cs_row = cs_ptr + state_row * scs_b
    d_inner = ngroups * heads_per_group * hdim
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < dstate
    # channel layout of xBC / conv_state: x [h*p] | B [g*n] | C [g*n]
    B = _conv_silu_channels(xbc_row, sxbc_c, cs_row, scs_c, scs_k, w_ptr, sw_c, sw_k, bias_ptr,
                            d_inner + group * dstate + offs_n, mask_n, KW, BLOCK_K, HAS_BIAS)  # fmt: skip
    C = _conv_silu_channels(xbc_row, sxbc_c, cs_row, scs_c, scs_k, w_ptr, sw_c, sw_k, bias_ptr,
                            d_inner + (ngroups + group) * dstate + offs_n, mask_n, KW, BLOCK_K, HAS_BIAS)  # fmt: skip
    for head_in_group in range(heads_per_group):
        head = group * heads_per_group + head_in_group
        dt = tl.load(dt_ptr + row * sdt_b + head * sdt_h).to(tl.float32)
        decay = tl.exp(dt * tl.load(A_ptr + head).to(tl.float32))
        for p0 in range(0, hdim, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            mask_p = offs_p < hdim
            x = _conv_silu_channels(xbc_row, sxbc_c, cs_row, scs_c, scs_k, w_ptr, sw_c, sw_k, bias_ptr,
                                    head * hdim + offs_p, mask_p, KW, BLOCK_K, HAS_BIAS)  # fmt: skip
            mask_pn = mask_p[:, None] & mask_n[None, :]
            s_ptrs = ssm_ptr + state_row * sssm_b + head * sssm_h + offs_p[:, None] * sssm_p + offs_n[None, :] * sssm_n
            S = tl.load(s_ptrs, mask=mask_pn, other=0.0).to(tl.float32)  # [P, N]
            S = S * decay + (dt * x)[:, None] * B[None, :]
            tl.store(s_ptrs, S.to(ssm_ptr.dtype.element_ty), mask=mask_pn)
            y = tl.sum(S * C[None, :], 1)  # from the float32 state, before any cast on store
            if HAS_D:
                y += tl.load(D_ptr + head).to(tl.float32) * x
            tl.store(y_ptr + row * sy_b + head * sy_h + offs_p * sy_p, y, mask=mask_p)


def mamba_decode_step(
    xBC: Tensor,
    conv_state: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    dt: Tensor,
    A: Tensor,
    D: Tensor | None,
    ssm_state: Tensor,
    state_slots: Tensor | None = None,
    *,
    block_p: int | None = None,
) -> Tensor:
    """Triton twin of `mamba_decode_step_ref` (same arguments, in-place updates and return; see
    twotower/kernels/mamba_step.py). Any strides are accepted. `block_p` (a power of 2) overrides the head-dim
    tile, for tests and tuning; by default the state tile is about 4096 elements."""
    nheads, hdim, ngroups, dstate, width = decode_step_dims(xBC, conv_state, conv_weight, dt, ssm_state, state_slots)
    bsz = xBC.shape[0]
    y = torch.empty(bsz, nheads, hdim, device=xBC.device, dtype=torch.float32)
    BLOCK_N = triton.next_power_of_2(dstate)
    BLOCK_P = block_p or min(triton.next_power_of_2(hdim), max(16, 4096 // BLOCK_N))
    dummy = y  # stands in for absent pointers (pruned by the constexpr flags)
    on_device = torch.cuda.device(xBC.device) if xBC.is_cuda else contextlib.nullcontext()  # launch on xBC's GPU
    with on_device:
        _mamba_decode_step_kernel[(bsz, ngroups)](
            xBC, conv_state, conv_weight, conv_bias if conv_bias is not None else dummy, dt, A,
            D if D is not None else dummy, ssm_state, state_slots if state_slots is not None else dummy, y,
            hdim, dstate, nheads // ngroups, ngroups,
            *xBC.stride(), *conv_state.stride(), *conv_weight.stride(), *dt.stride(), *ssm_state.stride(),
            *y.stride(),
            KW=width, HAS_BIAS=conv_bias is not None, HAS_D=D is not None, HAS_SLOTS=state_slots is not None,
            BLOCK_K=triton.next_power_of_2(width), BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N,
            num_warps=4,
        )  # fmt: skip
    return y
