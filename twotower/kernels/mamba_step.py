"""One Mamba-2 decode step (conv update + silu + selective state update), updating the states in place.

Plain-PyTorch reference (`mamba_decode_step_ref`) of the fused Triton kernel in
twotower/kernels/triton_mamba_step.py; both share this contract (axis legend as in twotower/kernels/ssd.py,
k = conv width):

    xBC         [b, conv_dim]       raw (pre-conv) column of this token; conv_dim = h*p + 2*g*n
    conv_state  [b | slots, conv_dim, k]   last k raw columns, newest at index -1 (twotower/kernels/conv1d.py)
    conv_weight [conv_dim, k], conv_bias [conv_dim] or None
    dt          [b, h]  float32, already softplus + bias + clamp
    A [h] (negative), D [h] or None
    ssm_state   [b | slots, h, p, n]   (float32 normally; another float dtype is cast on store)
    state_slots [b] int or None: row r reads and writes conv_state[state_slots[r]] and
                ssm_state[state_slots[r]] (a slot pool; slots must be distinct); rows not named are
                left bit-identical. Without it row r uses row r of both states.
  Semantics, per row:
    new_conv = cat(conv_state[..., 1:], xBC)            (written back to conv_state)
    conv_out = silu(sum(new_conv * conv_weight, -1) + conv_bias);  x | B | C = split(conv_out, [h*p, g*n, g*n])
    y, new_ssm = ssd_step_ref(ssm_state, x, dt, A, B, C, D)      (new_ssm written back to ssm_state)
  Returns y [b, h, p] float32. g is derived from the shapes: g = (conv_dim - h*p) / (2n).

The conv and the state update are computed in float32 whatever the input dtypes (the mixer's unfused
decode path rounds the conv output to the activation dtype before silu; this one does not).

Mixer decode branch (twotower/towers/mamba2.py, seqlen == 1 ... inplace) would read:
    y = kernels.mamba_decode_step(xBC[:, 0], state.conv, weight, self.conv1d.bias, dt[:, 0], A, self.D,
                                  state.ssm)                      # y [b, h, p]; state updated in place
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .conv1d import causal_conv1d_update_ref
from .ssd import ssd_step_ref


def decode_step_dims(xBC: Tensor, conv_state: Tensor, conv_weight: Tensor, dt: Tensor, ssm_state: Tensor,
                     state_slots: Tensor | None) -> tuple[int, int, int, int, int]:  # fmt: skip
    """Checks the shapes; returns (h, p, g, n, k)."""
    bsz, conv_dim = xBC.shape
    nheads, hdim, dstate = ssm_state.shape[1:]
    width = conv_weight.shape[1]
    d_inner = nheads * hdim
    ngroups = (conv_dim - d_inner) // (2 * dstate)
    assert d_inner + 2 * ngroups * dstate == conv_dim and ngroups >= 1, (conv_dim, nheads, hdim, dstate)
    assert nheads % ngroups == 0, (nheads, ngroups)
    assert conv_weight.shape == (conv_dim, width) and conv_state.shape[1:] == (conv_dim, width), conv_state.shape
    assert dt.shape == (bsz, nheads), dt.shape
    if state_slots is None:
        assert conv_state.shape[0] == ssm_state.shape[0] == bsz, (conv_state.shape, ssm_state.shape)
    else:
        assert state_slots.shape == (bsz,) and not state_slots.is_floating_point(), state_slots
    return nheads, hdim, ngroups, dstate, width


def mamba_decode_step_ref(
    xBC: Tensor,  # [b, conv_dim]
    conv_state: Tensor,  # [b | slots, conv_dim, k]   updated in place
    conv_weight: Tensor,  # [conv_dim, k]
    conv_bias: Tensor | None,  # [conv_dim]
    dt: Tensor,  # [b, h]
    A: Tensor,  # [h]
    D: Tensor | None,  # [h]
    ssm_state: Tensor,  # [b | slots, h, p, n]   updated in place
    state_slots: Tensor | None = None,  # [b] int
) -> Tensor:
    """See the module docstring. Returns y [b, h, p] float32; updates conv_state and ssm_state in place."""
    nheads, hdim, ngroups, dstate, _ = decode_step_dims(xBC, conv_state, conv_weight, dt, ssm_state, state_slots)
    bsz = xBC.shape[0]
    rows = state_slots.long() if state_slots is not None else None
    conv_rows = conv_state.index_select(0, rows) if rows is not None else conv_state
    ssm_rows = ssm_state.index_select(0, rows) if rows is not None else ssm_state
    bias = conv_bias.float() if conv_bias is not None else None
    conv_out, new_conv = causal_conv1d_update_ref(xBC.float(), conv_rows.float(), conv_weight.float(), bias)
    x, B, C = torch.split(F.silu(conv_out), [nheads * hdim, ngroups * dstate, ngroups * dstate], dim=-1)
    y, new_ssm = ssd_step_ref(ssm_rows, x.reshape(bsz, nheads, hdim), dt, A, B.reshape(bsz, ngroups, dstate),
                              C.reshape(bsz, ngroups, dstate), D)  # fmt: skip
    if rows is not None:
        conv_state.index_copy_(0, rows, new_conv.to(conv_state.dtype))
        ssm_state.index_copy_(0, rows, new_ssm.to(ssm_state.dtype))
    else:
        conv_state.copy_(new_conv)
        ssm_state.copy_(new_ssm)
    return y
