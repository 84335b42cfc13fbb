"""Kernels the towers call. Each op has a plain-PyTorch `*_ref` twin (the tested reference); the public
name dispatches to mamba-ssm / causal-conv1d on CUDA when they import, otherwise to the reference.
Our own Triton kernels (triton_ssd.py: `ssd_block_scan`; triton_mamba_step.py: `mamba_decode_step`) are
used on CUDA tensors when triton imports; those modules are imported only then, never at package import.

`use_reference(True)` forces the references everywhere (tests, debugging)."""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from .attention import attention as attention_sdpa
from .attention import attention_ref, key_mask, kvcache_attention_ref
from .conv1d import causal_conv1d_ref, causal_conv1d_update_ref, conv_state_after
from .mamba_step import mamba_decode_step_ref
from .moe import moe_experts, moe_experts_ref
from .ssd import ssd_recurrence_ref, ssd_scan_ref, ssd_step_ref
from .ssd_block import MAX_BLOCK_LEN, ssd_block_scan_ref

__all__ = [
    "attention", "attention_ref", "key_mask", "causal_conv1d", "causal_conv1d_ref", "causal_conv1d_update",
    "causal_conv1d_update_ref", "conv_state_after", "moe_experts", "moe_experts_ref", "ssd_scan",
    "ssd_scan_ref", "ssd_step", "ssd_step_ref", "ssd_recurrence_ref", "use_reference", "fast_paths",
    "ssd_block_scan", "ssd_block_scan_ref", "mamba_decode_step", "mamba_decode_step_ref", "MAX_BLOCK_LEN",
    "kvcache_attention", "kvcache_attention_ref",
]  # fmt: skip

_FORCE_REF = False
_MODULES: dict[str, object | None] = {}


def use_reference(flag: bool = True) -> None:
    global _FORCE_REF
    _FORCE_REF = flag


def _optional(name: str):
    if name not in _MODULES:
        try:
            _MODULES[name] = importlib.import_module(name)
        except Exception:  # ImportError, or a CUDA extension failing to load on a CPU machine
            _MODULES[name] = None
    return _MODULES[name]


def _fast(t: Tensor, module: str):
    if _FORCE_REF or not t.is_cuda:
        return None
    return _optional(module)


def _triton_kernels(t: Tensor, module: str):
    """Our Triton kernel module `module` (e.g. "triton_ssd") for CUDA tensors when triton imports, else None."""
    if _FORCE_REF or not t.is_cuda or _optional("triton") is None:
        return None
    return _optional(f"{__name__}.{module}")


def fast_paths() -> dict[str, bool]:
    """Which optional GPU packages imported (for logs and the GPU check script)."""
    names = ("mamba_ssm.ops.triton.ssd_combined", "mamba_ssm.ops.triton.selective_state_update",
             "causal_conv1d", "flash_attn", "triton")  # fmt: skip
    return {n: _optional(n) is not None for n in names}


def ssd_scan(x, dt, A, B, C, D=None, initial_state=None, chunk_size=128, return_all_states=False):
    """Chunked SSD: see `ssd_scan_ref`. Returns (y float32 [b,l,h,p], final state float32 [b,h,p,n]),
    or with `return_all_states` the state after every position [b,l,h,p,n] in place of the final one.

    mamba-ssm's combined kernel is used only without an initial state: with a seeded state and a block
    shorter than the chunk it is reported to decay the initial state wrongly (mamba-ssm 2.3.2). A seeded
    (or all-states) scan of at most min(chunk_size, 64) positions is one chunk: our Triton block scan on
    CUDA (the same maths as the chunked reference), else the reference."""
    if (initial_state is not None or return_all_states) and 0 < x.shape[1] <= min(chunk_size, MAX_BLOCK_LEN):
        mod = _triton_kernels(x, "triton_ssd")
        if mod is not None:
            return mod.ssd_block_scan(x, dt, A, B, C, D, initial_state, return_all_states=return_all_states)
    use_fast = initial_state is None and not return_all_states
    mod = _fast(x, "mamba_ssm.ops.triton.ssd_combined") if use_fast else None
    if mod is not None:
        y, final = mod.mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D, return_final_states=True)
        return y.float(), final.float()
    return ssd_scan_ref(x, dt, A, B, C, D, initial_state, chunk_size, return_all_states)


def ssd_step(state, x, dt, A, B, C, D=None):
    """One recurrent step: see `ssd_step_ref`. Returns (y [b,h,p], new state); the fast path updates
    `state` in place and returns it."""
    mod = _fast(x, "mamba_ssm.ops.triton.selective_state_update")
    if mod is not None and state.dtype == torch.float32:
        p, n = x.shape[-1], state.shape[-1]
        y = mod.selective_state_update(
            state,
            x,
            dt[..., None].expand(-1, -1, p),
            A[:, None, None].expand(-1, p, n).float(),
            B,
            C,
            D=None if D is None else D[:, None].expand(-1, p),
        )
        return y.float(), state
    return ssd_step_ref(state, x, dt, A, B, C, D)


def ssd_block_scan(x, dt, A, B, C, D=None, initial_state=None, *, state_slots=None, out_state=None,
                   return_all_states=False):  # fmt: skip
    """SSD scan of one block of l <= 64 positions from a seeded state, optionally through a state-slot
    pool (`state_slots` [b]: row r reads initial_state[state_slots[r]]; `out_state`: the final states are
    written there in place, e.g. out_state=initial_state=pool). See twotower/kernels/ssd_block.py for the contract.
    Returns (y [b,l,h,p] float32, final state [b,h,p,n] float32 | out_state | all states [b,l,h,p,n])."""
    mod = _triton_kernels(x, "triton_ssd")
    fn = mod.ssd_block_scan if mod is not None else ssd_block_scan_ref
    return fn(x, dt, A, B, C, D, initial_state, state_slots=state_slots, out_state=out_state,
              return_all_states=return_all_states)  # fmt: skip


def mamba_decode_step(xBC, conv_state, conv_weight, conv_bias, dt, A, D, ssm_state, state_slots=None):
    """One Mamba-2 decode token per row: conv update + silu + selective state update (twotower/kernels/mamba_step.py).
    xBC [b, conv_dim] raw; conv_state [b|slots, conv_dim, k] and ssm_state [b|slots, h, p, n] are updated
    in place (at rows state_slots[r] when given); dt [b, h] float32 discretised. Returns y [b, h, p] float32.
    The fused Triton kernel on CUDA, else the reference (same contract)."""
    mod = _triton_kernels(xBC, "triton_mamba_step")
    fn = mod.mamba_decode_step if mod is not None else mamba_decode_step_ref
    return fn(xBC, conv_state, conv_weight, conv_bias, dt, A, D, ssm_state, state_slots)


def attention(q, k, v, mask):
    """GQA attention, layout [b, l, h, d]: see `kernels.attention`. flash-attn (which takes this layout
    and fewer KV heads natively) when nothing is masked on CUDA in half precision, else SDPA."""
    if mask is None and q.dtype in (torch.float16, torch.bfloat16):
        mod = _fast(q, "flash_attn")
        if mod is not None:
            return mod.flash_attn_func(q, k, v, causal=False)
    return attention_sdpa(q, k, v, mask)


def kvcache_attention(q, k, v, k_cache, v_cache, lengths, slots, window, causal, write):
    """Attention of a chunk over a KV pool (see `kvcache_attention_ref`). On CUDA in half precision with
    flash-attn: `flash_attn_with_kvcache`, which reads each row's pool slot up to its length directly
    (window unused) and stores the chunk's K/V at [length, length + l) of the slot even without `write`:
    positions past a slot's length are never read, so that store only costs bandwidth."""
    if q.dtype in (torch.float16, torch.bfloat16) and k_cache.dtype == q.dtype:
        mod = _fast(q, "flash_attn")
        if mod is not None:
            return mod.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=lengths.to(torch.int32),
                                               cache_batch_idx=slots.to(torch.int32), causal=causal)  # fmt: skip
    return kvcache_attention_ref(q, k, v, k_cache, v_cache, lengths, slots, window, causal, write)


def causal_conv1d(x, weight, bias, history):
    """Depthwise causal conv over [history | x]: see `causal_conv1d_ref`."""
    mod = _fast(x, "causal_conv1d")
    if mod is not None and history is not None and x.dtype == weight.dtype:
        hist = history[..., -(weight.shape[1] - 1) :].to(x.dtype)
        xx = torch.cat([hist, x], dim=-1).contiguous()
        return mod.causal_conv1d_fn(xx, weight, bias)[..., hist.shape[-1] :]
    return causal_conv1d_ref(x, weight, bias, history)


def causal_conv1d_update(x, state, weight, bias):
    """One conv step: see `causal_conv1d_update_ref`."""
    return causal_conv1d_update_ref(x, state, weight, bias)
