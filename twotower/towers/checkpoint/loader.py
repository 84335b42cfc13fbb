"""Load one tower (context or denoiser) from a Hugging Face style checkpoint directory.

Directory contract:
    config.json                         NemotronHConfig.from_json_file (both TwoTower towers share it)
    model.safetensors.index.json        {"weight_map": {checkpoint key: shard file name}}, or else
    model.safetensors                   one file (or exactly one *.safetensors file of any name)
Key layouts and accepted spellings: see `keys.py`.

Memory: the tower is built on the meta device, materialised empty on `device` in the target dtype, and
tensors are then streamed one at a time from the shards (`safe_open`), each copied into its parameter
(per-expert tensors into their slice of the stacked expert parameter). Peak host memory is about one
checkpoint tensor. Only shards holding tensors of the requested role are opened, and the other role's
tensors are never read; shards of the other role only may even be absent.

Strictness: every parameter and persistent buffer is filled exactly once (each expert slice counts on
its own), or CheckpointError names what is missing, unexpected, duplicated, mis-shaped, of a
non-float dtype, or which file is absent or unreadable. Names and coverage are checked from the key set
before anything is allocated or read; each tensor's shape and dtype are checked from its safetensors
header before its data is read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from ..config import NemotronHConfig
from ..context import ContextTower
from ..denoiser import DenoiserTower
from ..init import cast_model
from .errors import CheckpointError
from .keys import (
    CONTEXT,
    DENOISER,
    ROLES_OF,
    Target,
    checkpoint_key,
    claimed_by_any_role,
    detect_layout,
    is_stacked_expert,
    route,
)

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# On-disk dtypes a floating parameter may be loaded from (copy_ converts to the parameter's dtype).
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
_MAX_NAMED = 8  # names quoted in an error message
_READ_ERRORS = (SafetensorError, OSError, RuntimeError, ValueError)


def load_tower(
    path: str | Path,
    role: str = CONTEXT,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> ContextTower | DenoiserTower:
    """The `role` tower ("context" or "denoiser") of the checkpoint at `path`, on `device`, in `dtype`
    (default: config.json's torch_dtype). Router weight and correction bias are always float32.
    Raises CheckpointError for any problem with the directory, its files or its tensors."""
    if role not in (CONTEXT, DENOISER):
        raise ValueError(f"role: expected 'context' or 'denoiser', got {role!r}")
    root = Path(path)
    cfg = read_config(root)
    dtype = _resolve_dtype(dtype, cfg)
    files = shard_map(root)
    layout = detect_layout(files)
    if role not in ROLES_OF[layout]:
        raise CheckpointError(
            f"{root}: a {layout} checkpoint holds only the context (autoregressive) tower; "
            f"role {role!r} needs a TwoTower checkpoint (context_tower.* / denoiser_tower.* keys)"
        )
    tower = _meta_tower(cfg, role, dtype)
    # Names and coverage are checked on the meta tower, so a bad checkpoint fails before any allocation.
    plan = _plan(root, files, layout, role, tower.state_dict(keep_vars=True))
    for file in plan:
        if not file.is_file():
            raise CheckpointError(f"{file}: shard named in {INDEX_NAME} is absent ({len(plan[file])} tensors "
                                  f"of the {role} tower, e.g. {plan[file][0][0]})")  # fmt: skip
    tower.to_empty(device=device)  # uninitialised storage: every tensor is overwritten below
    slots = tower.state_dict(keep_vars=True)
    with torch.no_grad():
        for file, items in plan.items():
            _stream(file, items, slots)
    return tower.eval()


# ---- directory ---------------------------------------------------------------------------------------


def read_config(root: Path) -> NemotronHConfig:
    file = root / CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(f"{file}: config.json is missing" if root.is_dir() else f"{root}: not a directory")
    try:
        return NemotronHConfig.from_json_file(file)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{file}: invalid config: {e}") from e


def shard_map(root: Path) -> dict[str, Path]:
    """Checkpoint key -> the file holding it, from the index or the single safetensors file."""
    index = root / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({e!r})") from e
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
        return {k: root / v for k, v in weight_map.items()}
    single = root / SINGLE_NAME
    if not single.is_file():
        found = sorted(root.glob("*.safetensors"))
        if len(found) != 1:
            why = "no *.safetensors file" if not found else f"{len(found)} *.safetensors files but no {INDEX_NAME}"
            raise CheckpointError(f"{root}: {why}")
        single = found[0]
    with _open(single) as f:
        return dict.fromkeys(f.keys(), single)


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except _READ_ERRORS as e:
        raise CheckpointError(f"{file}: cannot open as safetensors (truncated or corrupt?): {e}") from e


# ---- building the empty tower ------------------------------------------------------------------------


def _resolve_dtype(dtype: torch.dtype | str | None, cfg: NemotronHConfig) -> torch.dtype:
    if dtype is None:
        dtype = cfg.torch_dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating torch dtype, got {dtype!r}")
    return dtype


def _meta_tower(cfg: NemotronHConfig, role: str, dtype: torch.dtype) -> nn.Module:
    """The tower on the meta device (no memory, no init), cast to `dtype` there (cast_model keeps the
    router float32), so that `to_empty` later allocates every tensor directly in its final dtype."""
    with torch.device("meta"):
        tower = (ContextTower if role == CONTEXT else DenoiserTower)(cfg)
    cast_model(tower, dtype)
    volatile = {n for n, _ in tower.named_buffers()} - set(tower.state_dict())
    if volatile:  # would stay uninitialised garbage: no checkpoint tensor fills them
        raise RuntimeError(f"non-persistent buffers cannot be built on meta: {sorted(volatile)}")
    return tower


# ---- planning: names only, before any tensor data is read --------------------------------------------


def _plan(
    root: Path, files: dict[str, Path], layout: str, role: str, slots: dict[str, Tensor]
) -> dict[Path, list[tuple[str, Target]]]:
    """file -> [(checkpoint key, target)] for `role`; checks the key set covers every slot exactly once."""
    plan: dict[Path, list[tuple[str, Target]]] = {}
    filled: dict[tuple[str, int | None], str] = {}  # (module key, expert or None) -> checkpoint key
    unexpected, bad_expert = [], []
    for key, file in files.items():
        target = route(key, layout, role)
        if target is None:
            if not claimed_by_any_role(key, layout):
                unexpected.append(key)
            continue  # the other tower's tensor: not read
        slot = slots.get(target.module_key)
        if slot is None:
            unexpected.append(key)
            continue
        stacked = is_stacked_expert(target.module_key)
        if target.expert is not None and target.expert >= slot.shape[0]:
            bad_expert.append(key)
            continue
        if target.expert is not None or stacked:
            subs = [target.expert] if target.expert is not None else list(range(slot.shape[0]))
        else:
            subs = [None]
        for sub in subs:
            other = filled.setdefault((target.module_key, sub), key)
            if other != key:
                raise CheckpointError(f"{root}: {Target(target.module_key, sub)} is given twice, "
                                      f"by {other} and by {key}")  # fmt: skip
        plan.setdefault(file, []).append((key, target))
    if unexpected:
        raise CheckpointError(f"{root}: {len(unexpected)} unexpected tensors for the {role} tower of a {layout} "
                              f"checkpoint: {_names(sorted(unexpected))}")  # fmt: skip
    if bad_expert:
        n = slots[route(bad_expert[0], layout, role).module_key].shape[0]
        raise CheckpointError(f"{root}: expert count mismatch: config has n_routed_experts={n} but the checkpoint "
                              f"has {_names(sorted(bad_expert))}")  # fmt: skip
    n_missing, missing = _missing(slots, filled, layout, role)
    if n_missing:
        raise CheckpointError(f"{root}: {n_missing} tensors of the {role} tower are missing: {_names(missing)}")
    return plan


def _missing(slots: dict[str, Tensor], filled: dict, layout: str, role: str) -> tuple[int, list[str]]:
    """(number of unfilled slots, descriptions); a stacked expert tensor missing entirely is one line."""
    count, out = 0, []
    for mk, t in slots.items():
        subs = list(range(t.shape[0])) if is_stacked_expert(mk) else [None]
        gone = [sub for sub in subs if (mk, sub) not in filled]
        count += len(gone)
        if len(gone) > 1 and len(gone) == len(subs):
            first, last = Target(mk, 0), Target(mk, len(subs) - 1)
            out.append(f"{mk}[0..{last.expert}] (checkpoint keys {checkpoint_key(first, layout, role)} .. "
                       f"{checkpoint_key(last, layout, role)})")  # fmt: skip
            continue
        for sub in gone:
            target = Target(mk, sub)
            out.append(f"{target} (checkpoint key {checkpoint_key(target, layout, role)})")
    return count, out


def _names(items: list[str]) -> str:
    more = f", ... ({len(items) - _MAX_NAMED} more)" if len(items) > _MAX_NAMED else ""
    return ", ".join(items[:_MAX_NAMED]) + more


# ---- streaming -------------------------------------------------------------------------------------


def _stream(file: Path, items: list[tuple[str, Target]], slots: dict[str, Tensor]) -> None:
    """Check header shape and dtype of each planned tensor of `file`, then read and copy it, one at a
    time, in file order (sequential reads)."""
    with _open(file) as f:
        order = {k: i for i, k in enumerate(f.offset_keys())}
        for key, target in sorted(items, key=lambda kt: order.get(kt[0], -1)):
            param = slots[target.module_key]
            dest = param if target.expert is None else param[target.expert]
            try:
                header = f.get_slice(key)
                shape, disk_dtype = tuple(header.get_shape()), header.get_dtype()
            except _READ_ERRORS as e:
                raise CheckpointError(f"{file}: cannot read the header of tensor {key}: {e}") from e
            _check(file, key, target, shape, disk_dtype, dest)
            try:
                tensor = f.get_tensor(key)
            except _READ_ERRORS as e:
                raise CheckpointError(f"{file}: cannot read tensor {key} (truncated or corrupt?): {e}") from e
            dest.copy_(tensor)
            del tensor  # free it before the next read


def _check(file: Path, key: str, target: Target, shape: tuple, disk_dtype: str, dest: Tensor) -> None:
    if dest.is_floating_point() and disk_dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{file.name}: tensor {key} has unsupported dtype {disk_dtype}; "
                              f"expected one of {sorted(FLOAT_DTYPES)} for {target}")  # fmt: skip
    want = tuple(dest.shape)
    if shape == want:
        return
    is_stacked = target.expert is None and is_stacked_expert(target.module_key)
    if is_stacked and len(shape) == len(want) and shape[1:] == want[1:]:
        raise CheckpointError(f"{file.name}: tensor {key}: expert count mismatch, {shape[0]} stacked experts, "
                              f"config has n_routed_experts={want[0]}")  # fmt: skip
    raise CheckpointError(f"{file.name}: tensor {key} has shape {list(shape)}, expected {list(want)} for {target}")
