"""Checkpoints: save/load round trips (TwoTower and plain NemotronH, both expert layouts, sharded or not),
accepted key spellings, precise errors, streaming that never reads the other tower, dtype handling, and
the key layout of the real 30B checkpoint."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from twotower.towers.checkpoint import (
    CheckpointError,
    load_tower,
    nemotron_h_key_layout,
    save_nemotron_h,
    save_twotower,
    twotower_key_layout,
)
from twotower.towers.checkpoint import loader as loader_mod
from twotower.towers.checkpoint.keys import tower_shapes
from twotower.towers.config import preset
from twotower.towers.context import ContextTower
from twotower.towers.denoiser import DenoiserTower
from twotower.towers.init import init_random_

MASK = 3
SMALL_SHARDS = 60_000  # bytes: splits the tiny TwoTower checkpoint (~1.2 MB) into ~20 shards


@pytest.fixture(scope="module")
def towers() -> tuple[ContextTower, DenoiserTower]:
    cfg = preset("tiny")
    return init_random_(ContextTower(cfg), seed=1), init_random_(DenoiserTower(cfg), seed=2)


@pytest.fixture(scope="module")
def single_ckpt(towers, tmp_path_factory) -> Path:
    """One-file TwoTower checkpoint, per-expert layout (copy it before modifying)."""
    return save_twotower(tmp_path_factory.mktemp("ckpt") / "tt", *towers)


@pytest.fixture
def ckpt(single_ckpt, tmp_path) -> Path:
    return Path(shutil.copytree(single_ckpt, tmp_path / "tt"))


def _rewrite(path: Path, edit) -> None:
    """Apply `edit(tensors)` to the single-file checkpoint at `path`."""
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _outputs(ctx: ContextTower, den: DenoiserTower | None = None) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(4, 256, (2, 9), generator=g)
    state, logits = ctx.prefill(ids)
    out = [logits]
    if den is not None:
        xt = torch.randint(4, 256, (2, 4), generator=g)
        xt[:, 1:3] = MASK
        out.append(den.denoise(xt, (xt == MASK).float().mean(1), state))
    return out


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)


# ---- round trips ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("expert_layout", ["per_expert", "stacked"])
@pytest.mark.parametrize("max_shard_bytes", [2 * 1024**3, SMALL_SHARDS])
def test_twotower_round_trip_is_bitwise(towers, tmp_path, expert_layout, max_shard_bytes):
    ctx, den = towers
    path = save_twotower(tmp_path / "tt", ctx, den, expert_layout=expert_layout, max_shard_bytes=max_shard_bytes)
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if max_shard_bytes == SMALL_SHARDS:
        assert len(files) > 3 and (path / "model.safetensors.index.json").is_file()
        assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    else:
        assert files == ["model.safetensors"] and not (path / "model.safetensors.index.json").exists()
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["NemotronHTwoTowerForCausalLM"]
    ctx2, den2 = load_tower(path, "context"), load_tower(path, role="denoiser")
    assert isinstance(ctx2, ContextTower) and isinstance(den2, DenoiserTower)
    _assert_same(_outputs(ctx, den), _outputs(ctx2, den2))


def test_nemotron_h_round_trip_and_no_denoiser(towers, tmp_path):
    ctx = towers[0]
    path = save_nemotron_h(tmp_path / "nh", ctx, max_shard_bytes=SMALL_SHARDS)
    with open(path / "model.safetensors.index.json") as f:
        keys = set(json.load(f)["weight_map"])
    assert keys == set(nemotron_h_key_layout(ctx.cfg))
    assert all(k.startswith("backbone.") or k == "lm_head.weight" for k in keys)
    assert json.loads((path / "config.json").read_text())["architectures"] == ["NemotronHForCausalLM"]
    _assert_same(_outputs(ctx), _outputs(load_tower(path)))
    with pytest.raises(CheckpointError, match="denoiser"):
        load_tower(path, "denoiser")


def test_transformers_names_and_stacked_weight_suffix(towers, tmp_path):
    """transformers 5.x in-memory names: model.* with stacked experts (here spelled with `.weight`)."""
    ctx = towers[0]
    path = save_nemotron_h(tmp_path / "hf", ctx, expert_layout="stacked")

    def rename(t: dict) -> None:
        for k in list(t):
            new = "model." + k.removeprefix("backbone.") if k.startswith("backbone.") else k
            t[new + (".weight" if k.endswith(("experts.up_proj", "experts.down_proj")) else "")] = t.pop(k)

    _rewrite(path, rename)
    _assert_same(_outputs(ctx), _outputs(load_tower(path)))


def test_embedding_spelling(towers, ckpt):
    _rewrite(ckpt, lambda t: t.__setitem__("context_tower.embedding.weight", t.pop("context_tower.embeddings.weight")))
    _assert_same(_outputs(towers[0]), _outputs(load_tower(ckpt)))
    # both spellings at once fill one parameter twice
    _rewrite(
        ckpt, lambda t: t.__setitem__("context_tower.embeddings.weight", t["context_tower.embedding.weight"].clone())
    )
    with pytest.raises(CheckpointError, match="given twice"):
        load_tower(ckpt)


# ---- precise errors ------------------------------------------------------------------------------------


def test_missing_shard_names_the_file(towers, tmp_path):
    path = save_twotower(tmp_path / "tt", *towers, max_shard_bytes=SMALL_SHARDS)
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    shard = weight_map["context_tower.layers.0.mixer.A_log"]
    (path / shard).unlink()
    with pytest.raises(CheckpointError, match=f"{shard}.*absent"):
        load_tower(path, "context")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: t.__setitem__("context_tower.layers.0.mixer.A_log", torch.zeros(9)),
         r"context_tower\.layers\.0\.mixer\.A_log has shape \[9\], expected \[8\]"),
        (lambda t: t.__setitem__("context_tower.layers.0.mixer.bogus", torch.zeros(2)),
         r"unexpected.*context_tower\.layers\.0\.mixer\.bogus"),
        (lambda t: t.__setitem__("vision_tower.weight", torch.zeros(2)), r"unexpected.*vision_tower\.weight"),
        (lambda t: t.pop("context_tower.norm_f.weight"),
         r"1 tensors .* missing: model\.norm_f\.weight \(checkpoint key context_tower\.norm_f\.weight\)"),
        (lambda t: t.pop("context_tower.layers.2.mixer.experts.5.up_proj.weight"),
         r"missing: model\.layers\.2\.mixer\.experts\.up_proj\[5\]"),
        (lambda t: t.__setitem__("context_tower.layers.0.mixer.A_log", torch.zeros(8, dtype=torch.int64)),
         r"context_tower\.layers\.0\.mixer\.A_log has unsupported dtype I64"),
        (lambda t: t.__setitem__("context_tower.layers.0.mixer.D", torch.zeros(8, dtype=torch.float8_e4m3fn)),
         r"context_tower\.layers\.0\.mixer\.D has unsupported dtype F8_E4M3"),
        (lambda t: t.__setitem__("context_tower.layers.2.mixer.experts.8.up_proj.weight", torch.zeros(32, 64)),
         r"expert count mismatch.*experts\.8\.up_proj"),
    ],
)  # fmt: skip
def test_bad_tensor_is_named(ckpt, edit, match):
    _rewrite(ckpt, edit)
    with pytest.raises(CheckpointError, match=match):
        load_tower(ckpt, "context")


def test_stacked_expert_count_mismatch(towers, tmp_path):
    path = save_nemotron_h(tmp_path / "nh", towers[0], expert_layout="stacked")
    key = "backbone.layers.2.mixer.experts.down_proj"
    _rewrite(path, lambda t: t.__setitem__(key, torch.zeros(9, 64, 32)))
    with pytest.raises(CheckpointError, match=f"{key}: expert count mismatch, 9 stacked experts.*=8"):
        load_tower(path)


@pytest.mark.parametrize("keep", [100, 6])  # cut inside the tensor data / inside the header
def test_truncated_file_names_the_file(ckpt, keep):
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - keep] if keep > 50 else data[:keep])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_tower(ckpt, "denoiser")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_tower(ckpt)


# ---- streaming: only this role's shards and tensors are read ----------------------------------------


class _Spy:
    """Wraps a safe_open handle, recording every tensor name whose header or data is requested."""

    def __init__(self, inner, log: list[str]) -> None:
        self.inner, self.log = inner, log

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def get_slice(self, key):
        self.log.append(key)
        return self.inner.get_slice(key)

    def get_tensor(self, key):
        self.log.append(key)
        return self.inner.get_tensor(key)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_loader_reads_only_its_role(towers, tmp_path, monkeypatch):
    path = save_twotower(tmp_path / "tt", *towers, max_shard_bytes=SMALL_SHARDS)
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    opened, read = [], []

    def spy_open(file, *args, **kwargs):
        opened.append(Path(file).name)
        return _Spy(safe_open(file, *args, **kwargs), read)

    monkeypatch.setattr(loader_mod, "safe_open", spy_open)
    load_tower(path, "context")
    ctx_keys = {k for k in weight_map if k.startswith("context_")}
    assert set(read) == ctx_keys  # every context tensor, nothing else
    assert set(opened) == {weight_map[k] for k in ctx_keys}
    assert len(opened) == len(set(opened))  # each shard opened once

    opened.clear(), read.clear()
    load_tower(path, "denoiser")
    assert read and not any(k.startswith("context_") for k in read)
    # a shard holding only denoiser tensors is not needed for the context tower
    only_den = sorted(set(weight_map.values()) - {weight_map[k] for k in ctx_keys})
    assert only_den
    (path / only_den[0]).unlink()
    load_tower(path, "context")


# ---- dtypes --------------------------------------------------------------------------------------------


def test_bf16_load_keeps_router_fp32(towers, single_ckpt):
    ref = towers[0]
    ctx = load_tower(single_ckpt, "context", dtype=torch.bfloat16)
    gate = ctx.model.layers[2].mixer.gate
    assert ctx.model.embeddings.weight.dtype == torch.bfloat16
    assert ctx.model.layers[2].mixer.experts.up_proj.dtype == torch.bfloat16
    assert gate.weight.dtype == torch.float32 and gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(gate.weight, ref.model.layers[2].mixer.gate.weight)
    assert torch.equal(ctx.model.embeddings.weight, ref.model.embeddings.weight.bfloat16())
    assert _outputs(ctx)[0].isfinite().all()


def test_bf16_save_stores_router_fp32_and_sets_config_dtype(towers, tmp_path):
    path = save_twotower(tmp_path / "tt", *towers, dtype=torch.bfloat16, expert_layout="stacked")
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert f.get_slice("denoiser_tower.layers.2.mixer.gate.weight").get_dtype() == "F32"
        assert f.get_slice("denoiser_tower.layers.2.mixer.gate.e_score_correction_bias").get_dtype() == "F32"
        assert f.get_slice("denoiser_tower.layers.2.mixer.experts.up_proj").get_dtype() == "BF16"
    den = load_tower(path, "denoiser")  # dtype from config.json
    assert den.t_block[1].weight.dtype == torch.bfloat16
    assert den.model.layers[2].mixer.gate.weight.dtype == torch.float32


def test_refuses_to_mix_with_an_existing_checkpoint(towers, single_ckpt):
    with pytest.raises(FileExistsError):
        save_twotower(single_ckpt, *towers)


# ---- key layouts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        preset("tiny"),
        preset("tiny-grouped"),
        preset("tiny").replace(attention_bias=True, mlp_bias=True, mamba_proj_bias=True, use_conv_bias=False,
                               n_shared_experts=0),
    ],
)  # fmt: skip
def test_shape_table_matches_the_modules(cfg):
    with torch.device("meta"):
        built = {"context": ContextTower(cfg), "denoiser": DenoiserTower(cfg)}
    for role, tower in built.items():
        assert tower_shapes(cfg, role) == {k: tuple(v.shape) for k, v in tower.state_dict().items()}


def test_key_layout_matches_what_is_written(towers, single_ckpt):
    with safe_open(str(single_ckpt / "model.safetensors"), framework="pt") as f:
        written = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert written == twotower_key_layout(towers[0].cfg)


def test_real_30b_key_layout():
    cfg = preset("nemotron-3-nano-30b-a3b")
    layout = twotower_key_layout(cfg)
    # per tower: embeddings, norm_f, head, 52 norms, 23 Mamba x 8, 6 attention x 4, 23 MoE x (2 + 2*128 + 2)
    per_tower = 3 + 52 + 23 * 8 + 6 * 4 + 23 * (2 + 2 * 128 + 2)
    assert len(layout) == 2 * per_tower + 6 + 52
    expected = {
        "context_tower.embeddings.weight": (131072, 2688),
        "context_lm_head.weight": (131072, 2688),
        "lm_head.weight": (131072, 2688),
        "context_tower.layers.0.mixer.in_proj.weight": (10304, 2688),
        "context_tower.layers.0.mixer.conv1d.weight": (6144, 1, 4),
        "denoiser_tower.layers.0.mixer.A_log": (64,),
        "denoiser_tower.layers.0.mixer.norm.weight": (4096,),
        "context_tower.layers.1.mixer.gate.weight": (128, 2688),
        "context_tower.layers.1.mixer.gate.e_score_correction_bias": (128,),
        "context_tower.layers.1.mixer.experts.0.up_proj.weight": (1856, 2688),
        "denoiser_tower.layers.51.mixer.experts.127.down_proj.weight": (2688, 1856),
        "context_tower.layers.1.mixer.shared_experts.up_proj.weight": (3712, 2688),
        "context_tower.layers.5.mixer.k_proj.weight": (256, 2688),
        "denoiser_tower.layers.42.mixer.o_proj.weight": (2688, 4096),
        "denoiser_tower.norm_f.weight": (2688,),
        "t_embedder.mlp.0.weight": (2688, 256),
        "t_embedder.mlp.2.bias": (2688,),
        "t_block.1.weight": (8064, 2688),
        "scale_shift_tables.51": (3, 2688),
    }
    assert {k: layout[k] for k in expected} == expected
    numel = {k: math.prod(s) for k, s in layout.items()}
    n_ctx = sum(v for k, v in numel.items() if k.startswith("context_"))
    n_adaln = sum(v for k, v in numel.items() if k.startswith(("t_embedder.", "t_block.", "scale_shift_tables.")))
    assert abs(n_ctx - 31.578e9) / 31.578e9 < 1e-3 and n_adaln == 30_022_272
    assert sum(numel.values()) == 2 * n_ctx + n_adaln
    plain = nemotron_h_key_layout(cfg)
    assert len(plain) == per_tower and plain["backbone.layers.1.mixer.experts.0.up_proj.weight"] == (1856, 2688)
    stacked = twotower_key_layout(cfg, expert_layout="stacked")
    assert stacked["context_tower.layers.1.mixer.experts.up_proj"] == (128, 1856, 2688)


def _spec_30b_keys() -> dict[str, tuple[int, ...]]:
    """The TwoTower key set written out from model-spec.md sections 1.3 and 2.1, independently of the
    loader's own shape table."""
    pattern = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
    keys: dict[str, tuple[int, ...]] = {}
    for tower in ("context_tower", "denoiser_tower"):
        keys[f"{tower}.embeddings.weight"] = (131072, 2688)
        keys[f"{tower}.norm_f.weight"] = (2688,)
        for i, kind in enumerate(pattern):
            p = f"{tower}.layers.{i}"
            keys[f"{p}.norm.weight"] = (2688,)
            if kind == "M":
                keys.update({f"{p}.mixer.in_proj.weight": (10304, 2688), f"{p}.mixer.conv1d.weight": (6144, 1, 4),
                             f"{p}.mixer.conv1d.bias": (6144,), f"{p}.mixer.dt_bias": (64,), f"{p}.mixer.A_log": (64,),
                             f"{p}.mixer.D": (64,), f"{p}.mixer.norm.weight": (4096,),
                             f"{p}.mixer.out_proj.weight": (2688, 4096)})  # fmt: skip
            elif kind == "*":
                keys.update({f"{p}.mixer.q_proj.weight": (4096, 2688), f"{p}.mixer.k_proj.weight": (256, 2688),
                             f"{p}.mixer.v_proj.weight": (256, 2688),
                             f"{p}.mixer.o_proj.weight": (2688, 4096)})  # fmt: skip
            else:
                keys[f"{p}.mixer.gate.weight"] = (128, 2688)
                keys[f"{p}.mixer.gate.e_score_correction_bias"] = (128,)
                for k in range(128):
                    keys[f"{p}.mixer.experts.{k}.up_proj.weight"] = (1856, 2688)
                    keys[f"{p}.mixer.experts.{k}.down_proj.weight"] = (2688, 1856)
                keys[f"{p}.mixer.shared_experts.up_proj.weight"] = (3712, 2688)
                keys[f"{p}.mixer.shared_experts.down_proj.weight"] = (2688, 3712)
    keys["context_lm_head.weight"] = (131072, 2688)
    keys["lm_head.weight"] = (131072, 2688)
    keys.update({"t_embedder.mlp.0.weight": (2688, 256), "t_embedder.mlp.0.bias": (2688,),
                 "t_embedder.mlp.2.weight": (2688, 2688), "t_embedder.mlp.2.bias": (2688,),
                 "t_block.1.weight": (8064, 2688), "t_block.1.bias": (8064,)})  # fmt: skip
    keys.update({f"scale_shift_tables.{i}": (3, 2688) for i in range(52)})
    return keys


def test_real_30b_modules_write_exactly_the_spec_key_set():
    """Both towers built on the meta device, named as the writer names them, equal the spec's key set."""
    from twotower.towers.checkpoint.keys import TWOTOWER, checkpoint_entries
    from twotower.towers.context import ContextTower
    from twotower.towers.denoiser import DenoiserTower

    cfg = preset("nemotron-3-nano-30b-a3b")
    with torch.device("meta"):
        towers = {"context": ContextTower(cfg), "denoiser": DenoiserTower(cfg)}
    written: dict[str, tuple[int, ...]] = {}
    for role, tower in towers.items():
        shapes = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
        written.update({key: shape for key, _, shape in checkpoint_entries(shapes, TWOTOWER, role)})
    spec = _spec_30b_keys()
    assert set(written) - set(spec) == set() and set(spec) - set(written) == set()
    assert written == spec
