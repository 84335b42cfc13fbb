"""Mamba-2 SSD (state-space duality) scans.

Axis legend: b batch, l sequence, h heads, p head dim, g B/C groups, n state size, c chunks, q chunk len.

Recurrence every function here computes, per head h (state S of shape [p, n]):
    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t (outer) B_t
    y_t = S_t @ C_t + D_h * x_t
`dt` is already discretised (softplus + bias + clamp done by the caller). All maths in float32.
A position with dt = 0 leaves the state unchanged and adds nothing: callers use that to pad ragged rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _heads_from_groups(t: Tensor, nheads: int) -> Tensor:
    """[..., g, n] -> [..., h, n]: head j reads group j // (h // g)."""
    g = t.shape[-2]
    return t.repeat_interleave(nheads // g, dim=-2) if g != nheads else t


def ssd_scan_ref(
    x: Tensor,  # [b, l, h, p]
    dt: Tensor,  # [b, l, h]
    A: Tensor,  # [h]          (negative)
    B: Tensor,  # [b, l, g, n]
    C: Tensor,  # [b, l, g, n]
    D: Tensor | None = None,  # [h]
    initial_state: Tensor | None = None,  # [b, h, p, n]
    chunk_size: int = 128,
    return_all_states: bool = False,
) -> tuple[Tensor, Tensor]:
    """Chunked SSD scan. Returns y [b, l, h, p] (float32) and the final state [b, h, p, n] (float32),
    or, with `return_all_states`, the state after every position [b, l, h, p, n].

    Any length works with any chunk size (the tail chunk is padded with dt = 0), and the initial state
    is honoured whatever the length, including blocks shorter than one chunk.
    """
    bsz, seqlen, nheads, hdim = x.shape
    nstate = B.shape[-1]
    x, dt, A = x.float(), dt.float(), A.float()
    Bh = _heads_from_groups(B.float(), nheads)  # [b, l, h, n]
    Ch = _heads_from_groups(C.float(), nheads)
    q = max(1, min(chunk_size, seqlen))
    pad = (-seqlen) % q
    if pad:
        x, Bh, Ch = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, Bh, Ch))
        dt = F.pad(dt, (0, 0, 0, pad))  # dt = 0: identity step
    nc = (seqlen + pad) // q
    # chunked views: [b, c, q, h, ...]
    xc = x.view(bsz, nc, q, nheads, hdim)
    Bc = Bh.view(bsz, nc, q, nheads, nstate)
    Cc = Ch.view(bsz, nc, q, nheads, nstate)
    dtc = dt.view(bsz, nc, q, nheads)
    dA_cum = torch.cumsum(dtc * A, dim=2)  # [b, c, q, h], non-increasing along q
    # decay[i, j] = exp(cum_i - cum_j) for j <= i (within a chunk), 0 above the diagonal
    seg = dA_cum.unsqueeze(3) - dA_cum.unsqueeze(2)  # [b, c, q(i), q(j), h]
    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(seg.masked_fill(~causal[None, None, :, :, None], float("-inf")))
    xdt = xc * dtc.unsqueeze(-1)  # [b, c, q, h, p]
    # 1) outputs from inputs of the same chunk
    scores = torch.einsum("bcihn,bcjhn->bcijh", Cc, Bc) * decay
    y = torch.einsum("bcijh,bcjhp->bcihp", scores, xdt)
    # 2) each chunk's own contribution to the state at its end
    to_end = torch.exp(dA_cum[:, :, -1:, :] - dA_cum)  # [b, c, q, h]
    local = torch.einsum("bcjh,bcjhp,bcjhn->bchpn", to_end, xdt, Bc)
    # 3) pass states across chunks (sequential in c)
    state = initial_state.float() if initial_state is not None else x.new_zeros(bsz, nheads, hdim, nstate)
    chunk_decay = torch.exp(dA_cum[:, :, -1, :])  # [b, c, h]
    starts = []
    for c in range(nc):
        starts.append(state)
        state = chunk_decay[:, c, :, None, None] * state + local[:, c]
    start = torch.stack(starts, dim=1)  # [b, c, h, p, n]: state entering each chunk
    # 4) outputs from the state entering the chunk
    y = y + torch.einsum("bcihn,bchpn,bcih->bcihp", Cc, start, torch.exp(dA_cum))
    y = y.reshape(bsz, nc * q, nheads, hdim)[:, :seqlen]
    if D is not None:
        y = y + x[:, :seqlen] * D.float()[:, None]
    if not return_all_states:
        return y, state
    # state after position i of chunk c = exp(cum_i) * start_c + sum_{j<=i} decay[i, j] dt_j x_j B_j
    inner = torch.einsum("bcijh,bcjhp,bcjhn->bcihpn", decay, xdt, Bc)
    allst = inner + torch.exp(dA_cum)[..., None, None] * start.unsqueeze(2)
    return y, allst.reshape(bsz, nc * q, nheads, hdim, nstate)[:, :seqlen]


def ssd_recurrence_ref(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Token-by-token recurrence: the executable definition the chunked scan is tested against."""
    bsz, seqlen, nheads, hdim = x.shape
    state = (
        initial_state.float().clone()
        if initial_state is not None
        else x.new_zeros(bsz, nheads, hdim, B.shape[-1], dtype=torch.float32)
    )
    ys = []
    for t in range(seqlen):
        y, state = ssd_step_ref(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    return torch.stack(ys, dim=1), state


def ssd_step_ref(
    state: Tensor,  # [b, h, p, n]
    x: Tensor,  # [b, h, p]
    dt: Tensor,  # [b, h]
    A: Tensor,  # [h]
    B: Tensor,  # [b, g, n]
    C: Tensor,  # [b, g, n]
    D: Tensor | None = None,  # [h]
) -> tuple[Tensor, Tensor]:
    """One decode step. Returns y [b, h, p] and the new state (float32; the input is not modified)."""
    nheads = x.shape[1]
    x, dt = x.float(), dt.float()
    Bh = _heads_from_groups(B.float(), nheads)  # [b, h, n]
    Ch = _heads_from_groups(C.float(), nheads)
    dA = torch.exp(dt * A.float())  # [b, h]
    new = state.float() * dA[..., None, None] + (dt[..., None] * x)[..., None] * Bh[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", new, Ch)
    if D is not None:
        y = y + x * D.float()[:, None]
    return y, new
