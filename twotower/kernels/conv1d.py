"""Causal depthwise conv1d over a sequence, and its one-step update.

Layouts: activations [b, d, l] (channels first, as the conv weights), state [b, d, w] holding the last w
raw (pre-conv) input columns, newest at index -1; weight [d, w].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Up to this many columns the conv is computed as w shifted multiply-adds (a block or prefill chunk: on CPU
# several times faster than a depthwise conv1d call, and fusable); longer inputs use conv1d.
SHIFTED_SUM_MAX_LEN = 128


def causal_conv1d_ref(x: Tensor, weight: Tensor, bias: Tensor | None, history: Tensor | None) -> Tensor:
    """y[:, :, t] = bias + sum_k weight[:, k] * xx[:, :, t + k] over xx = [history | x].

    x [b, d, l]; history [b, d, w-1] of earlier raw columns (zeros when None). Returns [b, d, l], no
    activation. Computed in x's dtype (float32 accumulation inside conv1d on CPU)."""
    d, w = weight.shape
    if history is None:
        history = x.new_zeros(x.shape[0], d, w - 1)
    xx = torch.cat([history[..., -(w - 1) :].to(x.dtype), x], dim=-1)
    if x.shape[-1] <= SHIFTED_SUM_MAX_LEN:  # w shifted multiply-adds: one fused loop when compiled
        wt = weight.to(x.dtype)
        y = sum(wt[:, k, None] * xx[..., k : k + x.shape[-1]] for k in range(w))
        return y + bias.to(x.dtype)[:, None] if bias is not None else y
    return F.conv1d(xx, weight[:, None, :].to(x.dtype), bias.to(x.dtype) if bias is not None else None, groups=d)


def causal_conv1d_update_ref(x: Tensor, state: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """One step: x [b, d]; state [b, d, w]. Returns (y [b, d], new state [b, d, w]); input not modified.

    A multiply-sum, not conv1d: for one column it is several times faster on CPU."""
    new_state = torch.cat([state[..., 1:], x[..., None].to(state.dtype)], dim=-1)
    y = (new_state.to(weight.dtype) * weight).sum(-1)
    if bias is not None:
        y = y + bias
    return y.to(x.dtype), new_state


def conv_state_after(state: Tensor, x: Tensor, n_valid: Tensor | None) -> Tensor:
    """The last w raw columns after appending x [b, d, l] to state [b, d, w].

    With n_valid [b] (ragged rows, right-padded x), row r keeps the w columns ending at its last valid
    input column."""
    w = state.shape[-1]
    full = torch.cat([state, x.to(state.dtype)], dim=-1)  # [b, d, w + l]
    if n_valid is None:
        return full[..., -w:].contiguous()
    idx = n_valid.to(torch.long)[:, None] + torch.arange(w, device=x.device)[None, :]  # [b, w]
    idx = idx[:, None, :].expand(-1, full.shape[1], -1)
    return torch.gather(full, 2, idx)
