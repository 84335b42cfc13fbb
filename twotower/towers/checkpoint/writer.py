"""Write towers as a Hugging Face style checkpoint directory that `load_tower` (and NVIDIA's / transformers'
loaders, for the key names) read back.

Output:
    config.json                          NemotronHConfig.to_hf_dict() + "architectures"; torch_dtype is
                                         the stored dtype; "auto_map" is dropped (no remote code is written)
    model.safetensors                    when everything fits in one shard, else
    model-0000i-of-0000N.safetensors     shards of at most max_shard_bytes (a bigger tensor is alone)
    model.safetensors.index.json         {"metadata": {"total_size"}, "weight_map": {key: shard}}
Key layouts: `save_twotower` writes context_tower.* / context_lm_head.weight / denoiser_tower.* /
lm_head.weight / t_embedder.* / t_block.* / scale_shift_tables.*; `save_nemotron_h` writes backbone.* /
lm_head.weight. Experts are per-expert tensors by default (the released checkpoints), or stacked
[E, ...] tensors named like transformers' parameters. Router tensors are always stored float32.
Host memory: one shard's tensors at a time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..config import NemotronHConfig
from ..context import ContextTower
from ..denoiser import DenoiserTower
from .keys import CONTEXT, DENOISER, NEMOTRON_H, PER_EXPERT, TWOTOWER, checkpoint_entries
from .loader import CONFIG_NAME, INDEX_NAME, SINGLE_NAME

TWOTOWER_ARCHITECTURE = "NemotronHTwoTowerForCausalLM"
NEMOTRON_H_ARCHITECTURE = "NemotronHForCausalLM"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
_STORABLE = (torch.float32, torch.bfloat16, torch.float16)  # the dtypes config.json's torch_dtype can name


def save_twotower(
    path: str | Path,
    context: ContextTower,
    denoiser: DenoiserTower,
    *,
    expert_layout: str = PER_EXPERT,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write both towers as one TwoTower checkpoint. The towers must share one config. `dtype` casts every
    floating tensor except the router (default: keep each tensor's dtype). With `overwrite`, the model
    files of an earlier checkpoint in `path` are replaced; otherwise they raise FileExistsError."""
    if context.cfg != denoiser.cfg:
        diff = [k for k, v in context.cfg.to_hf_dict().items() if denoiser.cfg.to_hf_dict().get(k) != v]
        raise ValueError(f"save_twotower: the towers' configs differ (fields {diff}); a checkpoint has one config")
    towers = [(CONTEXT, context), (DENOISER, denoiser)]
    return _save(Path(path), context.cfg, TWOTOWER_ARCHITECTURE, TWOTOWER, towers, expert_layout,
                 max_shard_bytes, dtype, overwrite)  # fmt: skip


def save_nemotron_h(
    path: str | Path,
    context: ContextTower,
    *,
    expert_layout: str = PER_EXPERT,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a context tower as a plain NemotronH (autoregressive) checkpoint; arguments as save_twotower."""
    return _save(Path(path), context.cfg, NEMOTRON_H_ARCHITECTURE, NEMOTRON_H, [(CONTEXT, context)],
                 expert_layout, max_shard_bytes, dtype, overwrite)  # fmt: skip


@dataclass
class _Entry:
    key: str  # checkpoint key
    source: Tensor  # the module's tensor (the whole stacked tensor for an expert slice)
    expert: int | None
    dtype: torch.dtype
    nbytes: int

    def materialise(self) -> Tensor:
        t = self.source if self.expert is None else self.source[self.expert]
        # copy=True: safetensors refuses tensors sharing storage (expert slices of one parameter do)
        return t.detach().to(device="cpu", dtype=self.dtype, copy=True).contiguous()


def _fp32_keys(tower: nn.Module) -> set[str]:
    """State-dict names of the tensors of `keep_fp32` modules (the router)."""
    out = set()
    for prefix, mod in tower.named_modules():
        if getattr(mod, "keep_fp32", False):
            out.update(f"{prefix}.{n}" for n, _ in mod.named_parameters(recurse=False))
            out.update(f"{prefix}.{n}" for n, _ in mod.named_buffers(recurse=False))
    return out


def _entries(tower: nn.Module, layout: str, role: str, expert_layout: str, dtype: torch.dtype | None) -> list[_Entry]:
    sd = tower.state_dict()
    fp32 = _fp32_keys(tower)
    out = []
    for key, target, shape in checkpoint_entries({k: v.shape for k, v in sd.items()}, layout, role, expert_layout):
        src = sd[target.module_key]
        if target.module_key in fp32:
            dt = torch.float32
        else:
            dt = dtype if dtype is not None and src.is_floating_point() else src.dtype
        nbytes = math.prod(shape) * torch.empty((), dtype=dt).element_size()
        out.append(_Entry(key, src, target.expert, dt, nbytes))
    return out


def _shards(entries: list[_Entry], max_shard_bytes: int) -> list[list[_Entry]]:
    """Greedy, in key order: a new shard starts when the next tensor would overflow the current one."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def _clear(root: Path, overwrite: bool) -> None:
    old = [p for p in (root / INDEX_NAME, root / SINGLE_NAME) if p.exists()]
    old += sorted(root.glob("model-*-of-*.safetensors"))
    if old and not overwrite:
        raise FileExistsError(f"{old[0]}: a checkpoint is already there (pass overwrite=True to replace it)")
    for p in old:
        p.unlink()


def _save(
    root: Path,
    cfg: NemotronHConfig,
    architecture: str,
    layout: str,
    towers: list[tuple[str, nn.Module]],
    expert_layout: str,
    max_shard_bytes: int,
    dtype: torch.dtype | None,
    overwrite: bool,
) -> Path:
    if dtype is not None and dtype not in _STORABLE:
        raise ValueError(f"dtype: expected one of {_STORABLE} or None, got {dtype!r}")
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes: must be positive, got {max_shard_bytes}")
    entries = [e for role, tower in towers for e in _entries(tower, layout, role, expert_layout, dtype)]
    stored = dtype or towers[0][1].model.embeddings.weight.dtype
    if stored not in _STORABLE:
        raise ValueError(f"cannot store a {stored} model (config.json allows {_STORABLE}); pass dtype=")
    root.mkdir(parents=True, exist_ok=True)
    _clear(root, overwrite)

    shards = _shards(entries, max_shard_bytes)
    n = len(shards)
    names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for name, shard in zip(names, shards, strict=True):
        tensors = {e.key: e.materialise() for e in shard}
        save_file(tensors, str(root / name), metadata={"format": "pt"})
        del tensors
    if n > 1:
        index = {
            "metadata": {"total_size": sum(e.nbytes for e in entries)},
            "weight_map": {e.key: name for name, shard in zip(names, shards, strict=True) for e in shard},
        }
        (root / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    dtype_name = str(stored).removeprefix("torch.")
    raw = cfg.replace(torch_dtype=dtype_name).to_hf_dict()
    raw["architectures"] = [architecture]
    raw.pop("auto_map", None)
    if "dtype" in raw:  # transformers 5.x spelling carried over from a source config
        raw["dtype"] = dtype_name
    (root / CONFIG_NAME).write_text(json.dumps(raw, indent=2) + "\n")
    return root
