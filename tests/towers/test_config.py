"""NemotronHConfig: reading hub and transformers config.json variants, validation, presets, and the real
30B shape on the meta device."""

from __future__ import annotations

import json
import math

import pytest
import torch

from twotower.towers.config import NemotronHConfig, preset
from twotower.towers.context import ContextTower
from twotower.towers.denoiser import DenoiserTower

REAL_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"


def _hub_json(**over) -> dict:
    raw = preset("tiny").to_hf_dict()
    raw.update(over)
    return raw


def test_real_defaults_match_the_published_config():
    cfg = preset("nemotron-3-nano-30b-a3b")
    assert cfg.pattern == REAL_PATTERN and cfg.num_hidden_layers == 52
    assert (cfg.hidden_size, cfg.vocab_size, cfg.d_inner, cfg.conv_dim, cfg.in_proj_dim) == (
        2688, 131072, 4096, 6144, 10304)  # fmt: skip
    assert len(cfg.layer_indices("M")) == 23 and len(cfg.layer_indices("E")) == 23
    assert cfg.layer_indices("*") == [5, 12, 19, 26, 33, 42]


def test_pattern_from_hub_string_or_transformers_list(tmp_path):
    cfg = preset("tiny")
    hub = cfg.to_hf_dict()
    tf = dict(hub)
    del tf["hybrid_override_pattern"]
    tf["layers_block_type"] = cfg.layers_block_type()
    for raw in (hub, tf):
        assert NemotronHConfig.from_hf_dict(raw).pattern == cfg.pattern
    legacy = dict(tf, layers_block_type=["mamba", "attention", "moe", "mamba", "mlp", "moe"])
    assert NemotronHConfig.from_hf_dict(legacy).pattern == "M*EM-E"


@pytest.mark.parametrize(
    "text",
    [
        "[0.0, Infinity]",  # hub configs: a bare JavaScript literal, not strict JSON
        '[0.0, {"__float__": "Infinity"}]',  # transformers 5.x serialisation
        '[0.0, "inf"]',
    ],
)
def test_time_step_limit_infinity_forms(tmp_path, text):
    raw = json.dumps(_hub_json()).replace('"time_step_limit": [0.0, {"__float__": "Infinity"}]',
                                          f'"time_step_limit": {text}')  # fmt: skip
    assert text in raw
    path = tmp_path / "config.json"
    path.write_text(raw)
    cfg = NemotronHConfig.from_json_file(path)
    assert cfg.time_step_limit == (0.0, math.inf)


def test_round_trip_and_aliases():
    cfg = preset("tiny")
    again = NemotronHConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict())))
    assert again == cfg
    raw = _hub_json(mamba_d_conv=3, mamba_chunk_size=32)
    raw.pop("conv_kernel")
    raw.pop("chunk_size")
    aliased = NemotronHConfig.from_hf_dict(raw)
    assert (aliased.conv_kernel, aliased.chunk_size) == (3, 32)
    assert NemotronHConfig.from_hf_dict(_hub_json(architectures=["X"])).extra["architectures"] == ["X"]


@pytest.mark.parametrize(
    "over, field",
    [
        ({"hybrid_override_pattern": "MX*"}, "pattern"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"n_groups": 3}, "n_groups"),
        ({"num_experts_per_tok": 99}, "num_experts_per_tok"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"router_dtype": "float16"}, "router_dtype"),
        ({"time_step_limit": [1.0, 0.5]}, "time_step_limit"),
        ({"num_hidden_layers": 7}, "num_hidden_layers"),
        ({"layers_block_type": ["mamba", "conv"], "hybrid_override_pattern": None}, "layers_block_type"),
    ],
)
def test_invalid_values_name_the_field(over, field):
    with pytest.raises(ValueError, match=field):
        NemotronHConfig.from_hf_dict(_hub_json(**over))


def test_bad_json_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        NemotronHConfig.from_json_file(path)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown name"):
        preset("nope")


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())


def test_real_30b_parameter_count_on_meta():
    """Published figures: 31.58B per tower, ~63.2B for both towers with the adaLN tensors."""
    cfg = preset("nemotron-3-nano-30b-a3b")
    with torch.device("meta"):
        ctx, den = ContextTower(cfg), DenoiserTower(cfg)
    n_ctx = _count(ctx)
    n_adaln = _count(den.t_embedder) + _count(den.t_block) + sum(p.numel() for p in den.scale_shift_tables)
    assert abs(n_ctx - 31.578e9) / 31.578e9 < 1e-3, n_ctx
    assert n_adaln == 30_022_272
    assert _count(den) == n_ctx + n_adaln
    assert abs(n_ctx + _count(den) - 63.19e9) / 63.19e9 < 1e-3
