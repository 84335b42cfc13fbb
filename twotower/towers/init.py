"""Building towers on a device/dtype, random initialisation for tests, and dtype casting that keeps the
router in float32."""

from __future__ import annotations

import math

import torch
from torch import nn

from .mamba2 import Mamba2Mixer
from .moe import Experts


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating parameters/buffers to `dtype`, except modules marked `keep_fp32` (the router)."""
    for mod in model.modules():
        keep = getattr(mod, "keep_fp32", False)
        for p in list(mod.parameters(recurse=False)):
            if p.is_floating_point():
                p.data = p.data.to(torch.float32 if keep else dtype)
        for name, b in list(mod.named_buffers(recurse=False)):
            if b.is_floating_point():
                setattr(mod, name, b.to(torch.float32 if keep else dtype))
    return model


@torch.no_grad()
def init_random_(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Seeded random weights in ranges that exercise every code path (norm weights != 1, non-zero
    correction bias, realistic A and dt). Used by tests and for untrained models."""
    g = torch.Generator().manual_seed(seed)

    def rnd(t: torch.Tensor, scale: float, mean: float = 0.0) -> None:
        t.copy_((torch.randn(t.shape, generator=g) * scale + mean).to(t.dtype))

    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            rnd(p, 0.1, 1.0)
        elif name.endswith("bias"):
            rnd(p, std)
        else:
            rnd(p, std if p.dim() > 1 else 0.1)
    for mod in model.modules():
        if isinstance(mod, Mamba2Mixer):
            h = mod.nheads
            mod.A_log.copy_(torch.log(torch.empty(h).uniform_(1.0, 16.0, generator=g)).to(mod.A_log.dtype))
            cfg = mod.cfg
            dt = torch.exp(torch.empty(h).uniform_(math.log(cfg.time_step_min), math.log(cfg.time_step_max),
                                                   generator=g)).clamp(min=cfg.time_step_floor)  # fmt: skip
            mod.dt_bias.copy_((dt + torch.log(-torch.expm1(-dt))).to(mod.dt_bias.dtype))  # inverse softplus
            mod.D.copy_((1.0 + 0.1 * torch.randn(h, generator=g)).to(mod.D.dtype))
            rnd(mod.conv1d.weight, 0.3)
        elif isinstance(mod, Experts):
            rnd(mod.up_proj, std)
            rnd(mod.down_proj, std)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            rnd(buf, 0.05)
    return model
