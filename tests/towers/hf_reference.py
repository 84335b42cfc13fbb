"""transformers' native NemotronH as an independent reference for parity tests.

Builds a tiny `NemotronHForCausalLM` (pure-PyTorch path when mamba-ssm / causal-conv1d are absent) and
overwrites every parameter and buffer with seeded random values in realistic ranges. transformers'
default init would hide bugs: `e_score_correction_bias = 0`, every norm weight = 1, `D = 1`,
`A_log = log(1..H)` and a near-zero router.

Only imported by tests that have already done `pytest.importorskip("transformers")`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# softplus(dt_raw + dt_bias) must stay above transformers' prefill clamp `time_step_min` (1e-3), which our
# tower (like the CUDA kernels) does not apply. dt_bias is the inverse softplus of a value in
# [DT_LOW, DT_HIGH] and the dt rows of in_proj give dt_raw a standard deviation of DT_RAW_STD, so the
# smallest dt is ~softplus(log(expm1(DT_LOW)) - 5 * DT_RAW_STD) ~ 4.5e-3 even at a 5-sigma draw.
DT_LOW, DT_HIGH, DT_RAW_STD = 0.02, 0.2, 0.3

# Shared by every parity config: hidden 64, dims multiples of 8 (grouped_mm alignment), fp32.
BASE: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=16,
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=64,
    routed_scaling_factor=2.5, n_group=1, topk_group=1, norm_topk_prob=True,
    intermediate_size=96, mlp_hidden_act="relu2", layer_norm_epsilon=1e-5,
    max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip


def build_hf_model(pattern: str, seed: int, **overrides: Any):
    """A randomised fp32 `NemotronHForCausalLM` in eval mode (sdpa attention, default experts impl)."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    cfg = NemotronHConfig(hybrid_override_pattern=pattern, **{**BASE, **overrides})
    torch.manual_seed(seed)
    model = NemotronHForCausalLM(cfg).eval()
    randomize_(model, seed)
    return model


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter and buffer of an HF NemotronH with seeded values of realistic ranges."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)

    def normal(shape, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std + mean

    seen = set()
    for name, p in model.named_parameters():
        shape, leaf = p.shape, name.rsplit(".", 1)[-1]
        if name.endswith("A_log"):
            v = torch.log(torch.empty(shape).uniform_(1.0, 16.0, generator=g))  # A in [-16, -1]
        elif name.endswith("dt_bias"):
            dt = torch.exp(torch.empty(shape).uniform_(math.log(DT_LOW), math.log(DT_HIGH), generator=g))
            v = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
        elif name.endswith("mixer.D"):
            v = normal(shape, 0.3, 1.0)
        elif "norm" in name and leaf == "weight":  # block norms, norm_f, the Mamba gated norm
            v = normal(shape, 0.2, 1.0)
        elif name.endswith("conv1d.weight"):
            v = normal(shape, 0.3)
        elif name.endswith("gate.weight"):  # router: wide score spread, so top-k has no near-ties
            v = normal(shape, 0.3)
        elif p.dim() == 1:  # conv1d bias and any other bias
            v = normal(shape, 0.1)
        elif name.endswith("embeddings.weight"):
            v = normal(shape, 1.0)
        elif name.endswith("in_proj.weight"):
            v = normal(shape, 1.0 / math.sqrt(shape[-1]))
            v[-cfg.mamba_num_heads :] *= DT_RAW_STD  # dt rows: see DT_RAW_STD
        else:  # linear / expert weights [..., out, in]: unit-variance outputs, residual branches damped
            damp = 0.5 if leaf in ("out_proj", "o_proj", "down_proj") or "down_proj" in name else 1.0
            v = normal(shape, damp / math.sqrt(shape[-1]))
        p.copy_(v.to(p.dtype))
        seen.add(name)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(normal(b.shape, 0.1).to(b.dtype))
        elif b.is_floating_point():
            raise AssertionError(f"randomize_: unexpected float buffer {name}; extend the test")
    assert seen, "no parameters"


def hf_min_prefill_dt(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Smallest softplus(dt_raw + dt_bias) over every Mamba layer in a no-cache forward of `ids`."""
    found: list[float] = []
    hooks = []
    for mod in model.modules():
        if type(mod).__name__ == "NemotronHMamba2Mixer":

            def hook(m, inp, out, mixer=mod):
                dt_raw = out[..., -mixer.num_heads :]
                found.append(torch.nn.functional.softplus(dt_raw.float() + mixer.dt_bias.float()).min().item())

            hooks.append(mod.in_proj.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return min(found)
