"""Kernels the towers call. Each op has a plain-PyTorch `*_ref` twin (the tested reference); the public
name dispatches to mamba-ssm / causal-conv1d on CUDA when they import, otherwise to the reference.

`use_reference(True)` forces the references everywhere (tests, debugging)."""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from .attention import attention as attention_sdpa
from .attention import attention_ref, key_mask
from .conv1d import causal_conv1d_ref, causal_conv1d_update_ref, conv_state_after
from .moe import moe_experts, moe_experts_ref
from .ssd import ssd_recurrence_ref, ssd_scan_ref, ssd_step_ref

__all__ = [
    "attention", "attention_ref", "key_mask", "causal_conv1d", "causal_conv1d_ref", "causal_conv1d_update",
    "causal_conv1d_update_ref", "conv_state_after", "moe_experts", "moe_experts_ref", "ssd_scan",
    "ssd_scan_ref", "ssd_step", "ssd_step_ref", "ssd_recurrence_ref", "use_reference", "fast_paths",
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


def fast_paths() -> dict[str, bool]:
    """Which optional GPU packages imported (for logs and the GPU check script)."""
    names = ("mamba_ssm.ops.triton.ssd_combined", "mamba_ssm.ops.triton.selective_state_update",
             "causal_conv1d", "flash_attn")  # fmt: skip
    return {n: _optional(n) is not None for n in names}


def ssd_scan(x, dt, A, B, C, D=None, initial_state=None, chunk_size=128, return_all_states=False):
    """Chunked SSD: see `ssd_scan_ref`. Returns (y float32 [b,l,h,p], final state float32 [b,h,p,n]),
    or with `return_all_states` the state after every position [b,l,h,p,n] in place of the final one.

    mamba-ssm's combined kernel is used only without an initial state: with a seeded state and a block
    shorter than the chunk it is reported to decay the initial state wrongly (mamba-ssm 2.3.2)."""
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


def attention(q, k, v, mask):
    """GQA attention, layout [b, l, h, d]: see `kernels.attention`. flash-attn (which takes this layout
    and fewer KV heads natively) when nothing is masked on CUDA in half precision, else SDPA."""
    if mask is None and q.dtype in (torch.float16, torch.bfloat16):
        mod = _fast(q, "flash_attn")
        if mod is not None:
            return mod.flash_attn_func(q, k, v, causal=False)
    return attention_sdpa(q, k, v, mask)


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
