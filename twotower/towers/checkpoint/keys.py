"""Names and shapes of checkpoint tensors, and their mapping onto our module keys.

Module keys are `ContextTower` / `DenoiserTower` state-dict names: `model.<sub>`, `lm_head.weight`, and
for the denoiser `t_embedder.mlp.{0,2}.*`, `t_block.1.*`, `scale_shift_tables.{i}`. Routed experts are
stacked in memory: `model.layers.{i}.mixer.experts.up_proj` [E, I, H] and `.down_proj` [E, H, I].

Checkpoint layouts (see docs in the model spec, sections 1.3 and 2.1):
    twotower      context_tower.<sub>, context_lm_head.weight                       -> context role
                  denoiser_tower.<sub>, lm_head.weight, t_embedder.*, t_block.*,
                  scale_shift_tables.{i}                                            -> denoiser role
    nemotron_h    backbone.<sub>, lm_head.weight                                    -> context role only
    transformers  model.<sub>, lm_head.weight (transformers 5.x in-memory names)  -> context role only
Backbone sub-keys <sub> are ours, except that these are also accepted on read:
    embedding.weight                                   for embeddings.weight
    layers.{i}.mixer.experts.{k}.up_proj.weight  [I, H]  slice k of layers.{i}.mixer.experts.up_proj
    layers.{i}.mixer.experts.{k}.down_proj.weight [H, I] slice k of layers.{i}.mixer.experts.down_proj
    layers.{i}.mixer.experts.up_proj.weight (stacked, with a trailing .weight), same for down_proj
Writers use `per_expert` (the released checkpoints' layout) or `stacked` (transformers' names).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..config import ATTENTION, MAMBA, MLP, MOE, NemotronHConfig
from ..denoiser import FREQ_DIM
from .errors import CheckpointError

TWOTOWER, NEMOTRON_H, TRANSFORMERS = "twotower", "nemotron_h", "transformers"
CONTEXT, DENOISER = "context", "denoiser"
PER_EXPERT, STACKED = "per_expert", "stacked"
EXPERT_LAYOUTS = (PER_EXPERT, STACKED)

Shape = tuple[int, ...]

# (checkpoint name, module name) per layout and role. A name ending in "." is a prefix, any other name
# is an exact key. The entry mapping onto "model." is the backbone: its sub-keys get normalised.
_ROUTES: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {
    (TWOTOWER, CONTEXT): (("context_tower.", "model."), ("context_lm_head.weight", "lm_head.weight")),
    (TWOTOWER, DENOISER): (
        ("denoiser_tower.", "model."),
        ("lm_head.weight", "lm_head.weight"),
        ("t_embedder.", "t_embedder."),
        ("t_block.", "t_block."),
        ("scale_shift_tables.", "scale_shift_tables."),
    ),
    (NEMOTRON_H, CONTEXT): (("backbone.", "model."), ("lm_head.weight", "lm_head.weight")),
    (TRANSFORMERS, CONTEXT): (("model.", "model."), ("lm_head.weight", "lm_head.weight")),
}
ROLES_OF = {TWOTOWER: (CONTEXT, DENOISER), NEMOTRON_H: (CONTEXT,), TRANSFORMERS: (CONTEXT,)}

_PER_EXPERT_RE = re.compile(r"^(layers\.\d+\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$")
_STACKED_WEIGHT_RE = re.compile(r"^(layers\.\d+\.mixer\.experts\.(?:up_proj|down_proj))\.weight$")
_STACKED_MODULE_RE = re.compile(r"^model\.layers\.\d+\.mixer\.experts\.(?:up_proj|down_proj)$")


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: a module key, or slice `expert` of a stacked expert tensor."""

    module_key: str
    expert: int | None = None

    def __str__(self) -> str:
        return self.module_key if self.expert is None else f"{self.module_key}[{self.expert}]"


def is_stacked_expert(module_key: str) -> bool:
    return _STACKED_MODULE_RE.match(module_key) is not None


def detect_layout(keys: Iterable[str]) -> str:
    """The checkpoint layout from its key set; CheckpointError when no known prefix is present."""
    keys = list(keys)
    if any(k.startswith(("context_tower.", "denoiser_tower.")) for k in keys):
        return TWOTOWER
    if any(k.startswith("backbone.") for k in keys):
        return NEMOTRON_H
    if any(k.startswith("model.") for k in keys):
        return TRANSFORMERS
    sample = sorted(keys)[:5]
    raise CheckpointError(
        f"unrecognised checkpoint layout: no key starts with context_tower./denoiser_tower. (TwoTower), "
        f"backbone. (NemotronH) or model. (transformers); first keys: {sample}"
    )


def _backbone_target(sub: str) -> Target:
    if sub == "embedding.weight":  # NVIDIA's hub load hook accepts this older spelling too
        return Target("model.embeddings.weight")
    m = _PER_EXPERT_RE.match(sub)
    if m:
        return Target(f"model.{m[1]}.{m[3]}", int(m[2]))
    m = _STACKED_WEIGHT_RE.match(sub)
    if m:
        return Target(f"model.{m[1]}")
    return Target(f"model.{sub}")


def route(key: str, layout: str, role: str) -> Target | None:
    """Checkpoint key -> Target in `role`'s tower, or None when `role` does not claim the key.

    The Target's module key may still not exist in the tower (the caller reports it as unexpected)."""
    for ckpt, mod in _ROUTES.get((layout, role), ()):
        if ckpt.endswith("."):
            if key.startswith(ckpt):
                sub = key[len(ckpt) :]
                return _backbone_target(sub) if mod == "model." else Target(mod + sub)
        elif key == ckpt:
            return Target(mod)
    return None


def claimed_by_any_role(key: str, layout: str) -> bool:
    return any(route(key, layout, r) is not None for r in ROLES_OF[layout])


def checkpoint_key(target: Target, layout: str, role: str) -> str:
    """The name a writer gives `target`; a slice `expert` gets the per-expert name (inverse of `route`
    for the canonical spellings)."""
    mk = target.module_key
    for ckpt, mod in _ROUTES[(layout, role)]:
        if mod.endswith(".") and mk.startswith(mod):
            sub = mk[len(mod) :]
            if target.expert is not None:
                head, proj = sub.rsplit(".", 1)
                sub = f"{head}.{target.expert}.{proj}.weight"
            return ckpt + sub
        if mk == mod:
            return ckpt
    raise KeyError(f"module key {mk!r} has no checkpoint name in layout {layout!r}, role {role!r}")


def checkpoint_entries(
    module_shapes: Mapping[str, Shape], layout: str, role: str, expert_layout: str = PER_EXPERT
) -> list[tuple[str, Target, Shape]]:
    """(checkpoint key, target, checkpoint shape) for every tensor of a tower, in state-dict order.

    With `per_expert`, each stacked expert tensor [E, ...] becomes E keys of shape [...]."""
    if expert_layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert_layout: expected one of {EXPERT_LAYOUTS}, got {expert_layout!r}")
    out = []
    for mk, shape in module_shapes.items():
        shape = tuple(shape)
        if expert_layout == PER_EXPERT and is_stacked_expert(mk):
            for k in range(shape[0]):
                t = Target(mk, k)
                out.append((checkpoint_key(t, layout, role), t, shape[1:]))
        else:
            t = Target(mk)
            out.append((checkpoint_key(t, layout, role), t, shape))
    return out


# ---- shapes from a config, without building a model ---------------------------------------------------


def _linear(out: dict[str, Shape], name: str, n_out: int, n_in: int, bias: bool) -> None:
    out[f"{name}.weight"] = (n_out, n_in)
    if bias:
        out[f"{name}.bias"] = (n_out,)


def backbone_shapes(cfg: NemotronHConfig) -> dict[str, Shape]:
    """Backbone sub-key -> shape (stacked experts), the same set as `Backbone(cfg).state_dict()`."""
    d = cfg.hidden_size
    out: dict[str, Shape] = {"embeddings.weight": (cfg.vocab_size, d)}
    for i, kind in enumerate(cfg.pattern):
        p = f"layers.{i}.mixer"
        out[f"layers.{i}.norm.weight"] = (d,)
        if kind == MAMBA:
            h = cfg.mamba_num_heads
            _linear(out, f"{p}.in_proj", cfg.in_proj_dim, d, cfg.mamba_bias)
            out[f"{p}.conv1d.weight"] = (cfg.conv_dim, 1, cfg.conv_kernel)
            if cfg.use_conv_bias:
                out[f"{p}.conv1d.bias"] = (cfg.conv_dim,)
            out.update({f"{p}.dt_bias": (h,), f"{p}.A_log": (h,), f"{p}.D": (h,), f"{p}.norm.weight": (cfg.d_inner,)})
            _linear(out, f"{p}.out_proj", d, cfg.d_inner, cfg.mamba_bias)
        elif kind == ATTENTION:
            q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
            _linear(out, f"{p}.q_proj", q, d, cfg.attention_bias)
            _linear(out, f"{p}.k_proj", kv, d, cfg.attention_bias)
            _linear(out, f"{p}.v_proj", kv, d, cfg.attention_bias)
            _linear(out, f"{p}.o_proj", d, q, cfg.attention_bias)
        elif kind == MOE:
            e, inter = cfg.n_routed_experts, cfg.moe_intermediate_size
            out[f"{p}.gate.weight"] = (e, d)
            out[f"{p}.gate.e_score_correction_bias"] = (e,)
            out[f"{p}.experts.up_proj"] = (e, inter, d)
            out[f"{p}.experts.down_proj"] = (e, d, inter)
            if cfg.n_shared_experts:
                s = cfg.moe_shared_expert_intermediate_size
                _linear(out, f"{p}.shared_experts.up_proj", s, d, cfg.mlp_bias)
                _linear(out, f"{p}.shared_experts.down_proj", d, s, cfg.mlp_bias)
        elif kind == MLP:
            _linear(out, f"{p}.up_proj", cfg.intermediate_size, d, cfg.mlp_bias)
            _linear(out, f"{p}.down_proj", d, cfg.intermediate_size, cfg.mlp_bias)
    out["norm_f.weight"] = (d,)
    return out


def tower_shapes(cfg: NemotronHConfig, role: str) -> dict[str, Shape]:
    """Module key -> shape of a ContextTower (role "context") or DenoiserTower ("denoiser")."""
    d = cfg.hidden_size
    out = {f"model.{k}": s for k, s in backbone_shapes(cfg).items()}
    out["lm_head.weight"] = (cfg.vocab_size, d)
    if role == DENOISER:
        _linear(out, "t_embedder.mlp.0", d, FREQ_DIM, True)
        _linear(out, "t_embedder.mlp.2", d, d, True)
        _linear(out, "t_block.1", 3 * d, d, True)
        out.update({f"scale_shift_tables.{i}": (3, d) for i in range(cfg.num_hidden_layers)})
    elif role != CONTEXT:
        raise ValueError(f"role: expected 'context' or 'denoiser', got {role!r}")
    return out


def twotower_key_layout(cfg: NemotronHConfig, expert_layout: str = PER_EXPERT) -> dict[str, Shape]:
    """Checkpoint key -> shape of a TwoTower checkpoint for `cfg` (both towers and the adaLN tensors)."""
    out: dict[str, Shape] = {}
    for role in (CONTEXT, DENOISER):
        out.update((k, s) for k, _, s in checkpoint_entries(tower_shapes(cfg, role), TWOTOWER, role, expert_layout))
    return out


def nemotron_h_key_layout(cfg: NemotronHConfig, expert_layout: str = PER_EXPERT) -> dict[str, Shape]:
    """Checkpoint key -> shape of a plain NemotronH (AR) checkpoint for `cfg`."""
    entries = checkpoint_entries(tower_shapes(cfg, CONTEXT), NEMOTRON_H, CONTEXT, expert_layout)
    return {k: s for k, _, s in entries}
