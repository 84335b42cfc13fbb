"""RMS norms of NemotronH."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, in float32; the weight multiply happens in float32 before
    the cast back (the hub code's order; transformers 5.x casts first: a bf16 rounding difference)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)


class GatedGroupRMSNorm(nn.Module):
    """Mamba-2 output norm, gate before norm: y = rmsnorm_per_group(y * silu(z)) * weight.

    Groups of `group_size` channels (d_inner / n_groups) are normalised separately. All in float32,
    the weight multiplied before the cast back (as mamba-ssm's fused rmsnorm kernel)."""

    def __init__(self, dim: int, group_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        h = y.float() * torch.nn.functional.silu(z.float())
        g = h.view(*h.shape[:-1], -1, self.group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return (g.view_as(h) * self.weight.float()).to(y.dtype)
