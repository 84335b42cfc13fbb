"""Validated configuration of one NemotronH tower and of the TwoTower runtime.

`NemotronHConfig` holds every field a NemotronH `config.json` carries that changes the maths or the
checkpoint layout (both TwoTower towers share one). It is read from the JSON written by NVIDIA's hub
code (`hybrid_override_pattern`, `mamba_*` aliases, literal `Infinity`) or by transformers 5.x
(`layers_block_type` list, `{"__float__": "Infinity"}`), and validated at construction.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Layer kinds of the hybrid pattern string.
MAMBA, ATTENTION, MOE, MLP = "M", "*", "E", "-"
LAYER_KINDS = (MAMBA, ATTENTION, MOE, MLP)

# transformers 5.x writes the pattern as a list of names; older remote code used other names.
_LIST_NAME_TO_KIND = {
    "linear_attention": MAMBA,
    "mamba": MAMBA,
    "full_attention": ATTENTION,
    "attention": ATTENTION,
    "moe": MOE,
    "mlp": MLP,
}
_KIND_TO_LIST_NAME = {MAMBA: "linear_attention", ATTENTION: "full_attention", MOE: "moe", MLP: "mlp"}

# Alternative spellings found in NVIDIA configs, renamed on read.
_ALIASES = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_expand": "expand",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
    "layer_types": "layers_block_type",
    "num_local_experts": "n_routed_experts",
}


def _decode_float(v: Any) -> float:
    """JSON floats, including transformers' `{"__float__": "Infinity"}` and string infinities."""
    if isinstance(v, dict) and "__float__" in v:
        v = v["__float__"]
    if isinstance(v, str):
        return float(v)  # float() accepts "Infinity", "inf", "-Infinity", "nan"
    return float(v)


@dataclass
class NemotronHConfig:
    """One NemotronH tower. Defaults are the real Nemotron-3-Nano-30B-A3B values."""

    vocab_size: int = 131072
    hidden_size: int = 2688
    # One character per layer: M = Mamba-2, * = attention, E = MoE, - = dense MLP.
    pattern: str = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
    # attention (GQA, no positional encoding)
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 128
    attention_bias: bool = False
    # Mamba-2; d_inner = mamba_num_heads * mamba_head_dim (not expand * hidden)
    mamba_num_heads: int = 64
    mamba_head_dim: int = 64
    n_groups: int = 8
    ssm_state_size: int = 128
    conv_kernel: int = 4
    chunk_size: int = 128
    expand: int = 2
    use_conv_bias: bool = True
    mamba_proj_bias: bool = False
    use_bias: bool = False  # what transformers (and the hub code) read for the Mamba in/out projections
    mamba_hidden_act: str = "silu"
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    # dt is clamped to this range after softplus (the CUDA kernels' semantics); (0, inf) = no clamp.
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    mamba_ssm_cache_dtype: str = "float32"
    # MoE: sigmoid router with correction bias, group-limited top-k, squared-ReLU experts, shared expert
    n_routed_experts: int = 128
    num_experts_per_tok: int = 6
    n_shared_experts: int = 1
    moe_intermediate_size: int = 1856
    moe_shared_expert_intermediate_size: int = 3712
    routed_scaling_factor: float = 2.5
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    # "float32" (hub code) or "float64" (TwoTower release); affects only top-k ties.
    router_dtype: str = "float32"
    # dense MLP ('-' layers)
    intermediate_size: int = 1856
    mlp_hidden_act: str = "relu2"
    mlp_bias: bool = False
    # norms, embeddings, misc
    layer_norm_epsilon: float = 1e-5
    residual_in_fp32: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 262144
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    torch_dtype: str = "bfloat16"
    model_type: str = "nemotron_h"
    # Unknown keys of the source config.json, written back unchanged.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    # ---- derived sizes ---------------------------------------------------------------------------
    @property
    def num_hidden_layers(self) -> int:
        return len(self.pattern)

    @property
    def d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels through the depthwise conv: x | B | C."""
        return self.d_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def in_proj_dim(self) -> int:
        """in_proj output: z (d_inner) | xBC (conv_dim) | dt (heads)."""
        return self.d_inner + self.conv_dim + self.mamba_num_heads

    @property
    def mamba_bias(self) -> bool:
        """Mamba in_proj / out_proj bias: configs spell it `use_bias` or `mamba_proj_bias`."""
        return self.use_bias or self.mamba_proj_bias

    def layer_indices(self, kind: str) -> list[int]:
        return [i for i, k in enumerate(self.pattern) if k == kind]

    # ---- validation ------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.time_step_limit = tuple(_decode_float(v) for v in self.time_step_limit)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, name: str, why: str) -> None:
            if not cond:
                raise ValueError(f"NemotronHConfig.{name}: {why} (got {getattr(self, name)!r})")

        need(isinstance(self.pattern, str) and len(self.pattern) > 0, "pattern", "must be a non-empty string")
        bad = sorted(set(self.pattern) - set(LAYER_KINDS))
        need(not bad, "pattern", f"unknown layer kinds {bad}; allowed M * E -")
        for name in (
            "vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size", "conv_kernel", "chunk_size",
            "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "intermediate_size",
            "n_group", "topk_group", "max_position_embeddings",
        ):  # fmt: skip
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, "must be a positive int")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             "must divide num_attention_heads")  # fmt: skip
        need(self.mamba_num_heads % self.n_groups == 0, "n_groups", "must divide mamba_num_heads")
        need(self.conv_kernel >= 2, "conv_kernel", "must be at least 2")
        need(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
             "must not exceed n_routed_experts")  # fmt: skip
        need(self.n_routed_experts % self.n_group == 0, "n_group", "must divide n_routed_experts")
        need(self.topk_group <= self.n_group, "topk_group", "must not exceed n_group")
        if self.n_group > 1:
            need(self.n_routed_experts // self.n_group >= 2, "n_group", "needs >= 2 experts per group")
            need(self.num_experts_per_tok <= self.topk_group * (self.n_routed_experts // self.n_group),
                 "num_experts_per_tok", "exceeds the experts in the kept groups")  # fmt: skip
        need(self.n_shared_experts in (0, 1), "n_shared_experts", "only 0 or 1 shared expert is supported")
        need(self.routed_scaling_factor > 0, "routed_scaling_factor", "must be positive")
        need(self.layer_norm_epsilon > 0, "layer_norm_epsilon", "must be positive")
        lo, hi = self.time_step_limit
        need(0.0 <= lo < hi, "time_step_limit", "must be (low, high) with 0 <= low < high")
        need(self.router_dtype in ("float32", "float64"), "router_dtype", "must be float32 or float64")
        need(self.mamba_hidden_act == "silu", "mamba_hidden_act", "only silu is supported")
        need(self.mlp_hidden_act == "relu2", "mlp_hidden_act", "only relu2 is supported")
        need(self.mamba_ssm_cache_dtype in ("float32", "bfloat16", "float16"), "mamba_ssm_cache_dtype",
             "must be float32, bfloat16 or float16")  # fmt: skip
        need(self.torch_dtype in ("float32", "bfloat16", "float16"), "torch_dtype",
             "must be float32, bfloat16 or float16")  # fmt: skip
        need(not self.tie_word_embeddings, "tie_word_embeddings", "tied embeddings are not supported")

    # ---- Hugging Face config.json ----------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> NemotronHConfig:
        raw = {_ALIASES.get(k, k): v for k, v in raw.items()}
        if "hybrid_override_pattern" in raw and raw["hybrid_override_pattern"] is not None:
            pattern = raw.pop("hybrid_override_pattern")
            raw.pop("layers_block_type", None)
        elif raw.get("layers_block_type") is not None:
            names = raw.pop("layers_block_type")
            unknown = sorted({n for n in names if n not in _LIST_NAME_TO_KIND})
            if unknown:
                raise ValueError(f"NemotronHConfig.layers_block_type: unknown layer types {unknown}")
            pattern = "".join(_LIST_NAME_TO_KIND[n] for n in names)
        else:
            raise ValueError("NemotronHConfig.pattern: config has neither hybrid_override_pattern "
                             "nor layers_block_type")  # fmt: skip
        if "num_hidden_layers" in raw and raw["num_hidden_layers"] != len(pattern):
            raise ValueError(f"NemotronHConfig.num_hidden_layers: {raw['num_hidden_layers']} does not match "
                             f"the pattern's {len(pattern)} layers")  # fmt: skip
        if "dtype" in raw and "torch_dtype" not in raw:
            raw["torch_dtype"] = raw["dtype"]
        names = {f.name for f in dataclasses.fields(cls)} - {"pattern", "extra"}
        kwargs = {k: raw[k] for k in names if k in raw and raw[k] is not None}
        if "time_step_limit" in kwargs:
            kwargs["time_step_limit"] = tuple(kwargs["time_step_limit"])
        extra = {k: v for k, v in raw.items() if k not in names and k != "num_hidden_layers"}
        return cls(pattern=pattern, extra=extra, **kwargs)

    @classmethod
    def from_json_file(cls, path: str | Path) -> NemotronHConfig:
        text = Path(path).read_text()
        try:
            raw = json.loads(text)  # Python's json accepts the non-standard Infinity / NaN literals
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from e
        return cls.from_hf_dict(raw)

    def to_hf_dict(self) -> dict[str, Any]:
        """The hub layout (`hybrid_override_pattern`), with strict JSON (no Infinity literal)."""
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name in ("pattern", "extra"):
                continue
            out[f.name] = getattr(self, f.name)
        out["hybrid_override_pattern"] = self.pattern
        out["num_hidden_layers"] = self.num_hidden_layers
        out["time_step_limit"] = [v if math.isfinite(v) else {"__float__": "Infinity"} for v in self.time_step_limit]
        return out

    def layers_block_type(self) -> list[str]:
        return [_KIND_TO_LIST_NAME[k] for k in self.pattern]

    def replace(self, **changes: Any) -> NemotronHConfig:
        return dataclasses.replace(self, **changes)


# ---- named presets ---------------------------------------------------------------------------------


def _nano_30b() -> NemotronHConfig:
    return NemotronHConfig()


def _tiny(pattern: str = "M*EM-E") -> NemotronHConfig:
    """A few hundred thousand parameters; every layer kind; dims aligned for grouped GEMM."""
    return NemotronHConfig(
        vocab_size=256, hidden_size=64, pattern=pattern,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=16, conv_kernel=4, chunk_size=16,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=64, routed_scaling_factor=2.5, intermediate_size=96,
        max_position_embeddings=4096, torch_dtype="float32",
    )  # fmt: skip


def _small() -> NemotronHConfig:
    """Mid-size random config for benchmarks and GPU checks (~0.3B parameters)."""
    return NemotronHConfig(
        vocab_size=32768, hidden_size=1024, pattern="MEM*EMEM*EMEM*E",
        num_attention_heads=16, num_key_value_heads=2, head_dim=64,
        mamba_num_heads=32, mamba_head_dim=64, n_groups=4, ssm_state_size=64, conv_kernel=4, chunk_size=128,
        n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=512,
        moe_shared_expert_intermediate_size=1024, routed_scaling_factor=2.5, intermediate_size=1024,
        max_position_embeddings=65536, torch_dtype="bfloat16",
    )  # fmt: skip


def _bench() -> NemotronHConfig:
    """CPU benchmark size (~20M parameters per tower): big enough that tower work outweighs overheads."""
    return NemotronHConfig(
        vocab_size=8192, hidden_size=384, pattern="MEM*EM*E",
        num_attention_heads=8, num_key_value_heads=2, head_dim=48,
        mamba_num_heads=12, mamba_head_dim=64, n_groups=2, ssm_state_size=64, conv_kernel=4, chunk_size=64,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=768,
        moe_shared_expert_intermediate_size=768, routed_scaling_factor=2.5, intermediate_size=1024,
        max_position_embeddings=8192, torch_dtype="float32",
    )  # fmt: skip


PRESETS = {
    "nemotron-3-nano-30b-a3b": _nano_30b,
    "tiny": _tiny,
    "tiny-grouped": lambda: _tiny("ME*E").replace(n_group=2, topk_group=1),
    "small": _small,
    "bench": _bench,
}


def preset(name: str) -> NemotronHConfig:
    if name not in PRESETS:
        raise ValueError(f"preset: unknown name {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()
