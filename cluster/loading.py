"""Build an in-process engine from a checkpoint directory (config.json, safetensors, tokenizer.json)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from twotower.towers.checkpoint import load_tower
from twotower.towers.checkpoint.keys import TWOTOWER, detect_layout
from twotower.towers.checkpoint.loader import read_config, shard_map
from twotower.towers.config import NemotronHConfig
from twotower.towers.context import ContextTower
from twotower.towers.denoiser import DenoiserTower

from .config import EngineConfig
from .engine import Engine, EngineHooks
from .executor import InProcessExecutor
from .sampling import MODES, ModelLimits
from .tokenizer import ByteTokenizer, Tokenizer, TokenizerLike


@dataclass
class LoadedModel:
    path: Path
    config: NemotronHConfig
    context: ContextTower
    denoiser: DenoiserTower | None  # None for a plain NemotronH (AR-only) checkpoint
    tokenizer: TokenizerLike


def load_model(path: str | Path, device: str = "cpu", dtype: str | None = None) -> LoadedModel:
    """Both towers and the tokenizer. dtype None: the checkpoint's torch_dtype on GPUs, float32 on CPU
    (bf16 matmuls are slow on CPU, and bf16 rounding makes batched and single-row forwards disagree on
    near-ties far more often)."""
    root = Path(path)
    if dtype is None and str(device).startswith("cpu"):
        dtype = "float32"
    cfg = read_config(root)
    has_denoiser = detect_layout(shard_map(root)) == TWOTOWER
    ctx = load_tower(root, "context", device, dtype)
    den = load_tower(root, "denoiser", device, dtype) if has_denoiser else None
    tok: TokenizerLike = (
        Tokenizer.from_dir(root) if (root / "tokenizer.json").is_file() else ByteTokenizer(cfg.vocab_size)
    )
    return LoadedModel(root, cfg, ctx, den, tok)


def build_engine(model: LoadedModel, cfg: EngineConfig, hooks: EngineHooks | None = None) -> Engine:
    limits = ModelLimits(
        vocab_size=model.config.vocab_size,
        max_model_len=min(cfg.max_model_len, model.config.max_position_embeddings),
        max_block_size=cfg.max_block_size,
        modes=MODES if model.denoiser is not None else ("ar",),
    )
    eos = model.config.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    executor = InProcessExecutor(model.context, model.denoiser, kv_capacity=cfg.kv_capacity)
    return Engine(executor, limits, eos_token_ids=eos_ids, tokenizer=model.tokenizer,
                  max_num_seqs=cfg.max_num_seqs, max_prefills_per_step=cfg.max_prefills_per_step,
                  hooks=hooks)  # fmt: skip


def torch_threads(n: int | None) -> None:
    """Pin intra-op threads. Default: half the cores (at least 1): oversubscribing cores that other
    processes use is 10-100x slower on CPU."""
    import os

    torch.set_num_threads(n or max(1, (os.cpu_count() or 2) // 2))
