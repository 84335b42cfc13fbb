"""Shared training machinery: AdamW groups, the WSD learning-rate schedule, resumable checkpoints (model,
optimiser, step, RNG states) and step calibration for wall-clock budgets."""

from __future__ import annotations

import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import NemotronHConfig


def bundled_config(vocab_size: int = 4096) -> NemotronHConfig:
    """The bundled twotower-tiny tower: every layer kind of the real model (Mamba-2, attention, MoE) in the
    pattern the issue suggests, at hidden 256. 5.1M parameters per tower (embeddings and head are 2.1M of
    it; the denoiser adds 0.33M of adaLN), both towers in bf16 ~21 MB (the repository limit is 25 MB)."""
    return NemotronHConfig(
        vocab_size=vocab_size, hidden_size=256, pattern="M*EMEM*E",
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        mamba_num_heads=8, mamba_head_dim=32, n_groups=1, ssm_state_size=32, conv_kernel=4, chunk_size=64,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
        moe_shared_expert_intermediate_size=256, routed_scaling_factor=1.0, n_group=1, topk_group=1,
        intermediate_size=512, max_position_embeddings=4096, torch_dtype="float32",
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


@dataclass
class OptimConfig:
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    decay_fraction: float = 0.25  # WSD: constant after warmup, then linear decay over the last fraction
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0


def wsd_lr(step: int, total: int, oc: OptimConfig) -> float:
    """Warmup-stable-decay: linear warmup, constant, then a linear decay to min_lr over the last
    `decay_fraction` of the steps."""
    if step < oc.warmup_steps:
        return oc.lr * (step + 1) / oc.warmup_steps
    decay_start = int(total * (1.0 - oc.decay_fraction))
    if step < decay_start:
        return oc.lr
    frac = min(1.0, (step - decay_start) / max(1, total - decay_start))
    return oc.lr * (1.0 - (1.0 - oc.min_lr_ratio) * frac)


def make_optimizer(params: list[tuple[str, nn.Parameter]], oc: OptimConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms, biases, 1-D Mamba parameters (A_log, D, dt_bias) and the adaLN tables."""
    decay, no_decay = [], []
    for name, p in params:
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "scale_shift_tables" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": oc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=oc.lr, betas=oc.betas, eps=1e-8)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state(gen: torch.Generator) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "gen": gen.get_state()}


def set_rng_state(st: dict[str, Any], gen: torch.Generator) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    gen.set_state(st["gen"])


def save_checkpoint(path: Path, **payload: Any) -> None:
    """Atomic write (tmp + rename), so a kill mid-save keeps the previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only: no code runs


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class Budget:
    """Turns a wall-clock budget into a fixed step count after timing a few calibration steps, so the LR
    schedule has a known end (and a resumed run keeps the same schedule)."""

    minutes: float
    calib_steps: int = 8
    safety: float = 0.92  # evaluation and checkpoint time

    def steps_for(self, seconds_per_step: float, done: int, elapsed: float) -> int:
        remaining = self.minutes * 60.0 * self.safety - elapsed
        return max(done + 1, done + int(remaining / max(seconds_per_step, 1e-6)))

    def replan(self, total: int, done: int, elapsed: float, seconds_per_step: float, decay_fraction: float) -> int:
        """While the WSD schedule is still in its constant phase, move its end to fit the remaining budget
        at the recent speed (the machine is shared: speed drifts). The decay phase, once started, is kept."""
        if done >= int(total * (1.0 - decay_fraction)) - 1:
            return total
        new = self.steps_for(seconds_per_step, done, elapsed)
        if int(new * (1.0 - decay_fraction)) <= done + 1:  # would start the decay in the past: start it now
            new = int((done + 2) / (1.0 - decay_fraction)) + 1
        return new


@torch.no_grad()
def init_for_training_(model: nn.Module, seed: int, std: float = 0.02) -> nn.Module:
    """Weights for training from scratch: N(0, std) matrices (output projections scaled by
    1/sqrt(2 * layers), GPT-2 style), unit norms, zero biases, Mamba A in [1, 16], dt in
    [time_step_min, time_step_max] (inverse-softplus bias), D = 1, zero router correction bias."""
    from ..mamba2 import Mamba2Mixer
    from ..moe import Experts

    g = torch.Generator().manual_seed(seed)
    n_layers = getattr(getattr(model, "cfg", None), "num_hidden_layers", 1)
    out_std = std / math.sqrt(2 * n_layers)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.dim() == 1:
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.fill_(1.0)
            else:
                p.zero_()
            continue
        s = out_std if any(k in name for k in ("out_proj", "o_proj", "down_proj")) else std
        p.copy_(torch.randn(p.shape, generator=g) * s)
    for mod in model.modules():
        if isinstance(mod, Mamba2Mixer):
            h, cfg = mod.nheads, mod.cfg
            mod.A_log.copy_(torch.log(torch.empty(h).uniform_(1.0, 16.0, generator=g)))
            dt = torch.exp(torch.empty(h).uniform_(math.log(cfg.time_step_min), math.log(cfg.time_step_max),
                                                   generator=g)).clamp(min=cfg.time_step_floor)  # fmt: skip
            mod.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            mod.D.fill_(1.0)
            k = mod.conv1d.weight.shape[-1]
            mod.conv1d.weight.copy_(torch.empty_like(mod.conv1d.weight).uniform_(-1, 1, generator=g) / math.sqrt(k))
        elif isinstance(mod, Experts):
            mod.up_proj.copy_(torch.randn(mod.up_proj.shape, generator=g) * std)
            mod.down_proj.copy_(torch.randn(mod.down_proj.shape, generator=g) * out_std)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.zero_()
    return model


class RouterBalancer:
    """Auxiliary-loss-free load balancing (DeepSeek-V3): after each optimiser step, every router's
    e_score_correction_bias moves by `rate` towards under-used experts (sign of mean load - load). The
    bias only changes which experts are picked, never the mixing weights, so it is part of the model."""

    def __init__(self, model: nn.Module, rate: float = 1e-3) -> None:
        from ..moe import TopkRouter

        self.rate = rate
        self.counts: dict[TopkRouter, torch.Tensor] = {}
        self.handles = []
        for mod in model.modules():
            if isinstance(mod, TopkRouter):
                self.counts[mod] = torch.zeros(mod.cfg.n_routed_experts)
                self.handles.append(mod.register_forward_hook(self._hook))

    def _hook(self, mod, _inp, out) -> None:
        if torch.is_grad_enabled():
            idx = out[0]
            self.counts[mod] += torch.bincount(idx.reshape(-1).cpu(), minlength=len(self.counts[mod])).float()

    @torch.no_grad()
    def step(self) -> None:
        for mod, c in self.counts.items():
            if c.sum() > 0:
                mod.e_score_correction_bias += self.rate * torch.sign(c.mean() - c).to(
                    mod.e_score_correction_bias.device
                )
            c.zero_()

    def max_load(self) -> float:
        """Largest expert share over mean share, over routers (1.0 = perfectly balanced), since last step."""
        vals = [float(c.max() / c.mean()) for c in self.counts.values() if c.sum() > 0]
        return max(vals) if vals else 0.0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _NoBar:
    total: int | None = None

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *a, **k) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int | None, desc: str, initial: int = 0):
    """A tqdm bar on stderr (refreshed at most every 20 s, so logs stay small), or a no-op without tqdm
    (tqdm is not a runtime dependency of the package; training is an optional, offline activity)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, mininterval=20, ncols=110, disable=None)
