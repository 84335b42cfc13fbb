"""Attention entry point for both towers (GQA, no positional encoding).

Layouts: q [b, lq, hq, d]; k, v [b, lk, hkv, d] with hq % hkv == 0; mask [b, lq, lk] bool (True = may
attend) or None (everything visible). Output [b, lq, hq, d].

Block-diffusion layout: the denoiser's block queries see [context keys || block keys] with no causal
mask; the context tower uses a causal mask aligned bottom-right (query i of a new chunk sees every
cached key and the chunk's keys up to i). Both are expressed through `mask`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def attention_ref(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Explicit softmax(q k^T / sqrt(d)) v in float32 with repeated KV heads."""
    rep = q.shape[2] // k.shape[2]
    kf = k.float().repeat_interleave(rep, dim=2)
    vf = v.float().repeat_interleave(rep, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q.float(), kf) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhij,bjhd->bihd", p, vf).to(q.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """SDPA (flash / memory-efficient on CUDA, fused C++ on CPU)."""
    rep = q.shape[2] // k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, h, l, d]
    if rep > 1:
        kt = kt.repeat_interleave(rep, dim=1)
        vt = vt.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=None if mask is None else mask[:, None])
    return out.transpose(1, 2)


def key_mask(lengths: Tensor, ctx_len: int, n_new: int, causal: bool) -> Tensor:
    """Mask [b, n_new, ctx_len + n_new] for queries of a new chunk over [context (padded) || chunk].

    Row r's context is valid at positions < lengths[r]; chunk keys are all visible (`causal=False`,
    the denoiser's block) or visible up to the query (`causal=True`, the context tower)."""
    dev = lengths.device
    ctx_ok = torch.arange(ctx_len, device=dev)[None, :] < lengths[:, None]  # [b, ctx_len]
    ctx_ok = ctx_ok[:, None, :].expand(-1, n_new, -1)
    if causal:
        blk = torch.ones(n_new, n_new, dtype=torch.bool, device=dev).tril()
    else:
        blk = torch.ones(n_new, n_new, dtype=torch.bool, device=dev)
    return torch.cat([ctx_ok, blk[None].expand(lengths.shape[0], -1, -1)], dim=-1)


def kvcache_attention_ref(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor,
                          slots: Tensor, window: int, causal: bool, write: bool) -> Tensor:  # fmt: skip
    """A chunk's attention over a KV pool, static shapes.

    q [b, l, hq, d]; k, v [b, l, hkv, d] (the chunk's own keys); k_cache, v_cache [slots, capacity, hkv, d]
    the pool; lengths [b] cached positions of each row; slots [b] each row's pool slot; window: cached
    positions read per row (>= every length; the rest is masked). Keys are [slot's first `window`
    positions || the chunk], masked as `key_mask`. With `write` the chunk's K/V are stored at positions
    [length, length + l) of each slot. Returns [b, l, hq, d]."""
    keys = torch.cat([k_cache[slots, :window], k.to(k_cache.dtype)], dim=1)
    vals = torch.cat([v_cache[slots, :window], v.to(v_cache.dtype)], dim=1)
    out = attention(q, keys.to(q.dtype), vals.to(q.dtype), key_mask(lengths, window, q.shape[1], causal))
    if write:
        pos = lengths[:, None] + torch.arange(q.shape[1], device=q.device)[None, :]  # [b, l]
        k_cache[slots[:, None], pos] = k.to(k_cache.dtype)
        v_cache[slots[:, None], pos] = v.to(v_cache.dtype)
    return out
