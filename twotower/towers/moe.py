"""MoE and dense MLP layers of NemotronH (squared-ReLU, non-gated).

Router (DeepSeek-V3 "noaux_tc" style), per token, in float32 (or float64, `router_dtype`):
    s = sigmoid(x W^T); choice = s + e_score_correction_bias
    group-limited top-k on `choice` (per group: sum of its top-2; keep topk_group groups)
    weights = s at the chosen experts, / (their sum + 1e-20) if norm_topk_prob, * routed_scaling_factor
Output = sum_k w_k expert_k(x) + shared_expert(x).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twotower import kernels

from .config import NemotronHConfig


class MLP(nn.Module):
    """down(relu(up(x))^2)."""

    def __init__(self, hidden: int, inter: int, bias: bool) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(torch.square(F.relu(self.up_proj(x))))


class TopkRouter(nn.Module):
    # Router tensors stay float32 whatever the model dtype (see towers.init.cast_model).
    keep_fp32 = True

    def __init__(self, cfg: NemotronHConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [n, d] -> (topk_idx [n, k] int64, topk_w [n, k] float32)."""
        cfg = self.cfg
        rd = getattr(torch, cfg.router_dtype)
        s = torch.sigmoid(F.linear(x.to(rd), self.weight.to(rd)))  # [n, e]
        choice = s + self.e_score_correction_bias.to(rd)
        if cfg.n_group > 1:
            grouped = choice.view(-1, cfg.n_group, cfg.n_routed_experts // cfg.n_group)
            group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [n, groups]
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(cfg.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)
        idx = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
        w = s.gather(1, idx)
        if cfg.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, (w * cfg.routed_scaling_factor).float()


class Experts(nn.Module):
    """Stacked expert weights: up_proj [e, inter, hidden], down_proj [e, hidden, inter]."""

    def __init__(self, cfg: NemotronHConfig) -> None:
        super().__init__()
        e, i, d = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.up_proj = nn.Parameter(torch.empty(e, i, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, i))

    def forward(self, x: Tensor, idx: Tensor, w: Tensor, static: bool = False) -> Tensor:
        return kernels.moe_experts(x, idx, w, self.up_proj, self.down_proj, impl="static" if static else "auto")


class MoE(nn.Module):
    def __init__(self, cfg: NemotronHConfig) -> None:
        super().__init__()
        self.gate = TopkRouter(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_shared_expert_intermediate_size, cfg.mlp_bias)
            if cfg.n_shared_experts
            else None
        )

    def forward(self, x: Tensor, static: bool = False) -> Tensor:
        """static: shapes that do not depend on the routing (kernels.moe_experts_static), for compiled steps."""
        flat = x.reshape(-1, x.shape[-1])  # [n, d]
        idx, w = self.gate(flat)
        out = self.experts(flat, idx, w, static).view_as(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
