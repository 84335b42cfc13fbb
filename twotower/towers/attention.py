"""Grouped-query attention of NemotronH: no positional encoding, no biases by default.

q [b, l, hq, d], k/v [b, l, hkv, d]. Keys are [cached context (per-row lengths) || this chunk's keys]:
  causal=True  (context tower): chunk query i sees the context and chunk keys <= i;
  causal=False (denoiser block): every query sees the whole context and the whole block.
With write=True the chunk's K/V are stored in the cache at each row's length (context tower only).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from twotower import kernels

from .config import NemotronHConfig
from .state import AttentionState


class Attention(nn.Module):
    def __init__(self, cfg: NemotronHConfig) -> None:
        super().__init__()
        self.hq, self.hkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.hq * self.hd, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.hkv * self.hd, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.hkv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.hq * self.hd, cfg.hidden_size, bias=bias)

    @staticmethod
    def state_spec(
        cfg: NemotronHConfig, batch: int, capacity: int, dtype: torch.dtype
    ) -> dict[str, tuple[tuple, torch.dtype]]:
        shape = (batch, capacity, cfg.num_key_value_heads, cfg.head_dim)
        return {"k": (shape, dtype), "v": (shape, dtype)}

    def forward(
        self,
        u: Tensor,  # [b, l, hidden]
        cache: AttentionState,
        lengths: Tensor,  # [b] valid context positions per row
        ctx_len: int,  # max(lengths): how much of the cache to read
        uniform: bool,  # every row has length ctx_len (no key padding)
        causal: bool,
        write: bool,
    ) -> Tensor:
        bsz, seqlen, _ = u.shape
        q = self.q_proj(u).view(bsz, seqlen, self.hq, self.hd)
        k = self.k_proj(u).view(bsz, seqlen, self.hkv, self.hd)
        v = self.v_proj(u).view(bsz, seqlen, self.hkv, self.hd)
        keys = torch.cat([cache.k[:, :ctx_len], k], dim=1) if ctx_len else k
        vals = torch.cat([cache.v[:, :ctx_len], v], dim=1) if ctx_len else v
        if uniform and (not causal or seqlen == 1):
            mask = None  # everything visible
        else:
            mask = kernels.key_mask(lengths, ctx_len, seqlen, causal)
        out = kernels.attention(q, keys, vals, mask)
        if write:
            pos = lengths[:, None] + torch.arange(seqlen, device=u.device)[None, :]  # [b, l]
            rows = torch.arange(bsz, device=u.device)[:, None]
            cache.k[rows, pos] = k.to(cache.k.dtype)
            cache.v[rows, pos] = v.to(cache.v.dtype)
        return self.o_proj(out.reshape(bsz, seqlen, self.hq * self.hd))

    def forward_slots(
        self,
        u: Tensor,  # [b, l, hidden]
        cache: AttentionState,  # this layer's pool: k, v [slots, capacity, hkv, d]
        lengths: Tensor,  # [b] valid cached positions per row
        slots: Tensor,  # [b] each row's pool slot
        window: int,  # cached positions read per row (>= every length; static)
        causal: bool,
        write: bool,
    ) -> Tensor:
        """Static-shape form of `forward` over a state pool (kernels.kvcache_attention): no Python ints
        from tensors; with `write` the chunk's K/V are stored at each row's length."""
        bsz, seqlen, _ = u.shape
        q = self.q_proj(u).view(bsz, seqlen, self.hq, self.hd)
        k = self.k_proj(u).view(bsz, seqlen, self.hkv, self.hd)
        v = self.v_proj(u).view(bsz, seqlen, self.hkv, self.hd)
        out = kernels.kvcache_attention(q, k, v, cache.k, cache.v, lengths, slots, window, causal, write)
        return self.o_proj(out.reshape(bsz, seqlen, self.hq * self.hd))
