"""Routed-expert computation for MoE layers: tokens dispatched by expert.

Layouts: x [n, hid] (flattened tokens); topk_idx, topk_w [n, k]; stacked expert weights
up [e, inter, hid] and down [e, hid, inter] (nn.Linear orientation, as transformers stacks them).
Experts are squared-ReLU MLPs: down(relu(up(x))^2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _relu2(t: Tensor) -> Tensor:
    return torch.square(F.relu(t))


def moe_experts_ref(x: Tensor, topk_idx: Tensor, topk_w: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """Dense reference: every expert on every token, combined with a dense [n, e] weight matrix."""
    n_experts = up.shape[0]
    dense_w = torch.zeros(x.shape[0], n_experts, dtype=torch.float32, device=x.device)
    dense_w.scatter_add_(1, topk_idx, topk_w.float())
    h = _relu2(torch.einsum("nd,eid->nei", x, up))
    y = torch.einsum("nei,edi->ned", h, down)  # [n, e, hid]
    return torch.einsum("ned,ne->nd", y.float(), dense_w).to(x.dtype)


def _sort_by_expert(topk_idx: Tensor, n_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    flat = topk_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)  # positions in the flattened [n * k] list, grouped by expert
    counts = torch.bincount(flat, minlength=n_experts)
    return order, counts, order // topk_idx.shape[1]  # last: the token each sorted row came from


def moe_experts(x: Tensor, topk_idx: Tensor, topk_w: Tensor, up: Tensor, down: Tensor, impl: str = "auto") -> Tensor:
    """Sort (token, expert) pairs by expert, run each expert on its contiguous rows, scatter back.

    impl: "segments" (one matmul per expert that received tokens), "grouped" (torch grouped_mm, one call
    for all experts, no host sync), "auto" (grouped on CUDA when available, else segments), or "static"
    (shapes that depend only on the input's: `moe_experts_static`)."""
    if impl == "static":
        return moe_experts_static(x, topk_idx, topk_w, up, down)
    n_experts = up.shape[0]
    order, counts, token_of = _sort_by_expert(topk_idx, n_experts)
    xs = x[token_of]  # [n * k, hid], rows grouped by expert
    w_sorted = topk_w.reshape(-1)[order].float()
    if impl == "auto":
        impl = "grouped" if x.is_cuda and hasattr(F, "grouped_mm") else "segments"
    if impl == "grouped":
        offs = torch.cumsum(counts, 0).to(torch.int32)
        h = _relu2(F.grouped_mm(xs, up.transpose(-2, -1), offs=offs))
        ys = F.grouped_mm(h, down.transpose(-2, -1), offs=offs)
    elif impl == "segments":
        ys = torch.empty_like(xs)
        start = 0
        for e, c in enumerate(counts.tolist()):
            if c:
                seg = xs[start : start + c]
                ys[start : start + c] = _relu2(seg @ up[e].T) @ down[e].T
                start += c
    else:
        raise ValueError(f"moe_experts: impl must be auto, segments or grouped (got {impl!r})")
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, token_of, ys.float() * w_sorted[:, None])
    return out.to(x.dtype)


def moe_experts_static(x: Tensor, topk_idx: Tensor, topk_w: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """Routed experts with static shapes and no host sync, for compiled and graph-captured steps.

    On CUDA in bf16: grouped_mm over the (token, expert) pairs sorted by expert, with per-expert counts
    from a one-hot sum (bincount's output length would be data-dependent). Elsewhere every expert runs
    on every token and a dense [n, e] weight matrix combines them (`moe_experts_ref`'s maths): e / k
    times the routed FLOPs, but for the few tokens of a decode or denoise step on CPU it is faster than
    per-expert segments (measured at e = 8, k = 2: 339 vs 360 us at 1 token, 783 vs 1391 us at 16)."""
    n_experts = up.shape[0]
    if x.is_cuda and x.dtype == torch.bfloat16 and hasattr(F, "grouped_mm"):
        flat = topk_idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = F.one_hot(flat, n_experts).sum(0)
        token_of = order // topk_idx.shape[1]
        offs = torch.cumsum(counts, 0).to(torch.int32)
        h = _relu2(F.grouped_mm(x[token_of], up.transpose(-2, -1), offs=offs))
        ys = F.grouped_mm(h, down.transpose(-2, -1), offs=offs)
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        out.index_add_(0, token_of, ys.float() * topk_w.reshape(-1)[order].float()[:, None])
        return out.to(x.dtype)
    if torch.compiler.is_compiling():
        return moe_experts_gathered(x, topk_idx, topk_w, up, down)
    return moe_experts_ref(x, topk_idx, topk_w, up, down)


def moe_experts_gathered(x: Tensor, topk_idx: Tensor, topk_w: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """Each token through its own k experts, indexing the stacked weights by topk_idx: the routed FLOPs
    only, with static shapes. Compiled, the gather fuses into the reductions (no [n, k, inter, hid] copy):
    measured on CPU at e = 8, k = 2, hid 256, inter 128, 1 thread: 143 vs 291 us for 16 tokens, 77 vs 64
    us for 1, 866 vs 1512 us for 128 against the dense form. Eagerly it would copy the weights per token,
    so eager steps keep the dense form."""
    h = _relu2(torch.einsum("nh,nkih->nki", x, up[topk_idx]))
    y = torch.einsum("nki,nkhi->nkh", h, down[topk_idx])  # [n, k, hid]
    return (y.float() * topk_w.float()[..., None]).sum(1).to(x.dtype)
