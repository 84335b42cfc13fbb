"""A tower's state for every sequence it serves, preallocated once: a pool of slots.

Each sequence owns one slot from admission to finish; a batch is a tensor of slot indices. Admitting a
sequence resets its slot, finishing one frees it: nothing else moves (ContextState, by contrast, is one
tensor per batch, and every join or leave copies every row). The last slot (`scratch`) is never handed
out: padding rows of a bucketed batch read and write it, so real slots are untouched by them.

Layouts (S = slots + 1 including scratch; capacity = longest sequence + the longest block):
    AttentionState.k / .v   [S, capacity, kv_heads, head_dim]   model dtype   (contiguous per slot)
    MambaState.conv         [S, conv_dim, conv_kernel]          model dtype
    MambaState.ssm          [S, heads, head_dim, state_size]    mamba_ssm_cache_dtype
    lengths                 [S] int64: tokens the slot has read; KV past it is garbage, always masked

Why contiguous KV per slot rather than paged: for the real TwoTower-30B config a token's KV is
6 attention layers x 2 x 2 kv heads x 128 x 2 bytes = 6 KiB, so a slot at 4096 tokens holds 24 MiB of
KV, half of its 48 MiB of Mamba state (23 layers x 64 heads x 64 x 128 x 4 bytes, fixed whatever the
length). Paging would save at most the unused part of the smaller half; a prefix cache that shares
blocks between slots (a later step) is where block tables pay for themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import ATTENTION, MAMBA, NemotronHConfig
from .state import AttentionState, ContextState, LayerState, MambaState


def bytes_per_token(cfg: NemotronHConfig, dtype: torch.dtype) -> int:
    """KV bytes one token of one sequence takes in a pool."""
    item = torch.empty((), dtype=dtype).element_size()
    return cfg.pattern.count(ATTENTION) * 2 * cfg.num_key_value_heads * cfg.head_dim * item


def mamba_bytes_per_slot(cfg: NemotronHConfig, dtype: torch.dtype) -> int:
    """Conv + SSM state bytes of one sequence (independent of its length)."""
    item = torch.empty((), dtype=dtype).element_size()
    ssm_item = torch.empty((), dtype=getattr(torch, cfg.mamba_ssm_cache_dtype)).element_size()
    per_layer = cfg.conv_dim * cfg.conv_kernel * item + cfg.mamba_num_heads * cfg.mamba_head_dim * \
        cfg.ssm_state_size * ssm_item  # fmt: skip
    return cfg.pattern.count(MAMBA) * per_layer


@dataclass
class StatePool:
    layers: list[LayerState]  # one entry per layer of the pattern, leading dim = slots + 1
    lengths: Tensor  # [slots + 1] int64
    capacity: int  # KV positions per slot

    @staticmethod
    def allocate(cfg: NemotronHConfig, slots: int, capacity: int, device, dtype: torch.dtype) -> StatePool:
        if slots < 1 or capacity < 1:
            raise ValueError(f"StatePool: slots and capacity must be >= 1 (got {slots}, {capacity})")
        n = slots + 1
        ssm_dtype = getattr(torch, cfg.mamba_ssm_cache_dtype)
        layers: list[LayerState] = []
        for kind in cfg.pattern:
            if kind == MAMBA:
                layers.append(MambaState(
                    torch.zeros(n, cfg.conv_dim, cfg.conv_kernel, dtype=dtype, device=device),
                    torch.zeros(n, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, dtype=ssm_dtype,
                                device=device),
                ))  # fmt: skip
            elif kind == ATTENTION:
                shape = (n, capacity, cfg.num_key_value_heads, cfg.head_dim)
                layers.append(AttentionState(torch.zeros(shape, dtype=dtype, device=device),
                                             torch.zeros(shape, dtype=dtype, device=device)))  # fmt: skip
            else:
                layers.append(None)
        return StatePool(layers, torch.zeros(n, dtype=torch.long, device=device), capacity)

    @property
    def slots(self) -> int:
        """Slots that can be handed out (scratch excluded)."""
        return self.lengths.shape[0] - 1

    @property
    def scratch(self) -> int:
        return self.lengths.shape[0] - 1

    def tensors(self) -> list[Tensor]:
        out = [self.lengths]
        for s in self.layers:
            if isinstance(s, AttentionState):
                out += [s.k, s.v]
            elif isinstance(s, MambaState):
                out += [s.conv, s.ssm]
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def gather(self, slots: Tensor) -> ContextState:
        """A ContextState copy of these slots (KV cropped to their longest length): tests, debugging."""
        lengths = self.lengths[slots].clone()
        upto = int(lengths.max()) if len(slots) else 0
        layers: list[LayerState] = []
        for s in self.layers:
            if isinstance(s, AttentionState):
                layers.append(AttentionState(s.k[slots, :upto].clone(), s.v[slots, :upto].clone()))
            elif isinstance(s, MambaState):
                layers.append(MambaState(s.conv[slots].clone(), s.ssm[slots].clone()))
            else:
                layers.append(None)
        return ContextState(layers, lengths)

    def reset(self, slots: Tensor) -> None:
        """Empty these slots for new sequences: length 0, zero Mamba state (KV past length 0 is masked)."""
        self.lengths[slots] = 0
        for s in self.layers:
            if isinstance(s, MambaState):
                s.conv[slots] = 0
                s.ssm[slots] = 0


# ---- deltas: what a mirror pool needs after a write -----------------------------------------------------


def export_slot_delta(pool: StatePool, slots: Tensor, since: Tensor, changed: Tensor) -> dict[str, Tensor]:
    """New data of `slots` [b] for a mirror whose lengths for them are `since` [b]:
        slots, since, lengths [b]; changed [c]: slots whose Mamba state changed (new slots included);
        per attention layer the K/V at positions [since, length) of each slot, packed [new, kv_heads, dim];
        per Mamba layer the conv and SSM state of the changed slots.
    Header: 8 x (3b + c) bytes; the rest is new K/V rows and changed Mamba states, nothing else."""
    lengths = pool.lengths[slots]
    n_new = (lengths - since).clamp(min=0)
    out = {"slots": slots.clone(), "since": since.clone(), "lengths": lengths.clone(), "changed": changed.clone()}
    row, pos = _new_positions(slots, since, n_new)
    for i, s in enumerate(pool.layers):
        if isinstance(s, AttentionState):
            out[f"layers.{i}.k"] = s.k[row, pos]
            out[f"layers.{i}.v"] = s.v[row, pos]
        elif isinstance(s, MambaState):
            out[f"layers.{i}.conv"] = s.conv[changed]
            out[f"layers.{i}.ssm"] = s.ssm[changed]
    return out


def apply_slot_delta(pool: StatePool, delta: dict[str, Tensor]) -> None:
    """Bring a mirror pool up to date with `export_slot_delta`'s output."""
    dev = pool.lengths.device
    slots, since, lengths, changed = (delta[k].to(dev) for k in ("slots", "since", "lengths", "changed"))
    mine = pool.lengths[slots]
    if not torch.equal(mine, since):
        raise ValueError(f"apply_slot_delta: mirror lengths {mine.tolist()} != since {since.tolist()}")
    row, pos = _new_positions(slots, since, (lengths - since).clamp(min=0))
    for i, s in enumerate(pool.layers):
        if isinstance(s, AttentionState):
            s.k[row, pos] = delta[f"layers.{i}.k"].to(dev, s.k.dtype)
            s.v[row, pos] = delta[f"layers.{i}.v"].to(dev, s.v.dtype)
        elif isinstance(s, MambaState) and len(changed):
            s.conv[changed] = delta[f"layers.{i}.conv"].to(dev, s.conv.dtype)
            s.ssm[changed] = delta[f"layers.{i}.ssm"].to(dev, s.ssm.dtype)
    pool.lengths[slots] = lengths


def _new_positions(slots: Tensor, since: Tensor, n_new: Tensor) -> tuple[Tensor, Tensor]:
    """(slot, position) of every new KV row: since[r] + j for j < n_new[r], rows in order."""
    dev = slots.device
    row = torch.repeat_interleave(slots, n_new)
    first = torch.repeat_interleave(since, n_new)
    offsets = torch.cumsum(n_new, 0) - n_new
    j = torch.arange(int(n_new.sum()), device=dev) - torch.repeat_interleave(offsets, n_new)
    return row, first + j


# ---- prefix-cache payloads: one grid block of a slot, copied out and back -----------------------------


def prefix_entry_bytes(cfg: NemotronHConfig, grid: int, dtype: torch.dtype) -> int:
    """Bytes of one prefix-cache entry: `grid` tokens of KV plus one sequence's Mamba state."""
    return grid * bytes_per_token(cfg, dtype) + mamba_bytes_per_slot(cfg, dtype)


def snapshot_block(pool: StatePool, slot: int, start: int, end: int) -> list[LayerState]:
    """Copies of slot's K/V at positions [start, end) ([end - start, kv_heads, dim] per attention layer)
    and of its Mamba states, which must be those after exactly `end` tokens (the caller's contract)."""
    out: list[LayerState] = []
    for s in pool.layers:
        if isinstance(s, AttentionState):
            out.append(AttentionState(s.k[slot, start:end].clone(), s.v[slot, start:end].clone()))
        elif isinstance(s, MambaState):
            out.append(MambaState(s.conv[slot].clone(), s.ssm[slot].clone()))
        else:
            out.append(None)
    return out


def seat_prefix(pool: StatePool, slot: int, blocks: list[list[LayerState]], length: int) -> None:
    """Seat `slot` after the first `length` tokens from consecutive snapshot blocks (the first one from
    position 0): their K/V laid end to end, the last block's Mamba states."""
    for i, s in enumerate(pool.layers):
        if isinstance(s, AttentionState):
            s.k[slot, :length] = torch.cat([b[i].k for b in blocks])
            s.v[slot, :length] = torch.cat([b[i].v for b in blocks])
        elif isinstance(s, MambaState):
            s.conv[slot] = blocks[-1][i].conv
            s.ssm[slot] = blocks[-1][i].ssm
    pool.lengths[slot] = length
