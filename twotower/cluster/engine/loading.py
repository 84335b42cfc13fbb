"""Checkpoint directories (config.json, safetensors, tokenizer.json) -> model facts, towers, an engine.

The one home of: which model a config's `model: null` means (`resolve_model`), the CPU dtype default
(`resolve_dtype`), and what a checkpoint tells the engine (`ModelFiles`: config, layout, tokenizer,
limits, EOS ids)."""

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
from .executor import InProcessExecutor, TowerExecutor
from .params import MODES, ModelLimits
from .tokenizer import ByteTokenizer, Tokenizer, TokenizerLike


def _bundled_model() -> Path:
    """The model `twotower` serves by default: package data of twotower.models (twotower/models/ of a source
    checkout, inside site-packages for an installed wheel)."""
    import importlib.util

    spec = importlib.util.find_spec("twotower.models")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))) / "twotower-tiny"
    return Path(__file__).resolve().parents[2] / "models" / "twotower-tiny"  # twotower/models of a source tree


BUNDLED_MODEL = _bundled_model()


def resolve_model(path: str | Path | None) -> Path:
    """The checkpoint directory a config names; None = the bundled model. Raises FileNotFoundError
    naming the directory when it holds no config.json."""
    p = Path(path) if path else BUNDLED_MODEL
    if not (p / "config.json").is_file():
        what = "the bundled model" if not path else "model"
        raise FileNotFoundError(f"{what}: no config.json in {p}" + ("; pass --model PATH" if not path else ""))
    return p


def resolve_dtype(device: str, dtype: str | None) -> str | None:
    """dtype None: the checkpoint's torch_dtype on GPUs, float32 on CPU (bf16 matmuls are slow on CPU,
    and bf16 rounding makes batched and single-row forwards disagree on near-ties far more often)."""
    return "float32" if dtype is None and str(device).startswith("cpu") else dtype


@dataclass
class ModelFiles:
    """What a checkpoint directory holds, read without loading any weights."""

    path: Path
    config: NemotronHConfig
    has_denoiser: bool  # False for a plain NemotronH (AR-only) checkpoint
    tokenizer: TokenizerLike

    @staticmethod
    def inspect(path: str | Path) -> ModelFiles:
        root = Path(path)
        cfg = read_config(root)
        has_denoiser = detect_layout(shard_map(root)) == TWOTOWER
        tok = Tokenizer.from_dir(root) if (root / "tokenizer.json").is_file() else ByteTokenizer(cfg.vocab_size)
        return ModelFiles(root, cfg, has_denoiser, tok)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.config.eos_token_id
        return tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))

    def limits(self, cfg: EngineConfig) -> ModelLimits:
        return ModelLimits(
            vocab_size=self.config.vocab_size,
            max_model_len=min(cfg.max_model_len, self.config.max_position_embeddings),
            max_block_size=cfg.max_block_size,
            modes=MODES if self.has_denoiser else ("ar",),
        )

    def engine(self, executor: TowerExecutor, cfg: EngineConfig, micro_batches: int = 1,
               hooks: EngineHooks | None = None) -> Engine:  # fmt: skip
        """The engine over `executor`; with compiled steps and cfg.warmup, the start-up step set is built
        first (a progress bar on stderr)."""
        if not cfg.eager and cfg.warmup:
            executor.warm_up(cfg.warmup_block_sizes)
        return Engine(executor, self.limits(cfg), eos_token_ids=self.eos_token_ids, tokenizer=self.tokenizer,
                      max_num_seqs=cfg.max_num_seqs, max_prefills_per_step=cfg.max_prefills_per_step,
                      micro_batches=micro_batches, hooks=hooks)  # fmt: skip


@dataclass
class LoadedModel:
    files: ModelFiles
    context: ContextTower
    denoiser: DenoiserTower | None  # None for a plain NemotronH (AR-only) checkpoint

    @property
    def config(self) -> NemotronHConfig:
        return self.files.config

    @property
    def tokenizer(self) -> TokenizerLike:
        return self.files.tokenizer


def load_model(path: str | Path | None, device: str = "cpu", dtype: str | None = None) -> LoadedModel:
    """Both towers (see resolve_dtype for the default dtype) and the tokenizer; path None = the bundled model."""
    files = ModelFiles.inspect(resolve_model(path))
    dtype = resolve_dtype(device, dtype)
    ctx = load_tower(files.path, "context", device, dtype)
    den = load_tower(files.path, "denoiser", device, dtype) if files.has_denoiser else None
    return LoadedModel(files, ctx, den)


def build_engine(model: LoadedModel, cfg: EngineConfig, hooks: EngineHooks | None = None) -> Engine:
    executor = InProcessExecutor(model.context, model.denoiser, cfg.pool_limits(), compile=not cfg.eager)
    return model.files.engine(executor, cfg, hooks=hooks)


def torch_threads(n: int | None) -> None:
    """Pin intra-op threads. Default: half the cores (at least 1): oversubscribing cores that other
    processes use is 10-100x slower on CPU."""
    import os

    torch.set_num_threads(n or max(1, (os.cpu_count() or 2) // 2))
