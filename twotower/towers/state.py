"""Per-sequence context state: what the context tower has read so far.

For every attention layer a KV cache, for every Mamba layer the conv history and SSM state; MoE and MLP
layers hold nothing. Batch row r is one sequence whose first `lengths[r]` KV positions are valid (rows
may differ in length; positions past a row's length are garbage and always masked). The layers declare
the shapes (`Attention.state_spec`, `Mamba2Mixer.state_spec`); this file only stores and moves them.

Layouts:
    AttentionState.k / .v   [b, capacity, kv_heads, head_dim]   model dtype
    MambaState.conv         [b, conv_dim, conv_kernel]            last raw (pre-conv) xBC columns, newest last
    MambaState.ssm          [b, heads, head_dim, state_size]      mamba_ssm_cache_dtype (float32)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class AttentionState:
    k: Tensor
    v: Tensor

    def select(self, rows: Tensor, upto: int) -> AttentionState:
        return AttentionState(self.k[rows, :upto].clone(), self.v[rows, :upto].clone())


@dataclass
class MambaState:
    conv: Tensor
    ssm: Tensor

    def select(self, rows: Tensor, upto: int = 0) -> MambaState:
        return MambaState(self.conv[rows].clone(), self.ssm[rows].clone())


LayerState = AttentionState | MambaState | None


@dataclass
class MambaTrace:
    """Every intermediate state of one Mamba layer over a chunk of l new tokens (for rollback):
    ssm [b, l + 1, heads, head_dim, state] (index j = after j new tokens) and the raw conv columns
    [b, conv_dim, conv_kernel + l] (old state columns, then the chunk's)."""

    ssm: Tensor
    cols: Tensor

    def state_after(self, keep: Tensor) -> MambaState:
        """The state after keep[r] new tokens of row r."""
        rows = torch.arange(keep.shape[0], device=keep.device)
        w = self.cols.shape[-1] - (self.ssm.shape[1] - 1)
        idx = keep.to(torch.long)[:, None] + torch.arange(w, device=keep.device)[None, :]
        conv = torch.gather(self.cols, 2, idx[:, None, :].expand(-1, self.cols.shape[1], -1))
        return MambaState(conv, self.ssm[rows, keep.to(torch.long)].clone())


@dataclass
class BlockInputs:
    """What one Mamba layer read in a verified block, enough to advance its state later by any prefix
    (pool steps' rollback): the raw conv input columns xBC [b, conv_dim, l] and the discretised dt
    [b, l, h] (float32, 0 past each row's n_valid). For the real TwoTower config at S 16 that is about
    0.2 MiB per layer per row, against 35 MiB for MambaTrace's state after every position."""

    xBC: Tensor
    dt: Tensor


def _grow(t: Tensor, capacity: int) -> Tensor:
    if t.shape[1] >= capacity:
        return t
    out = t.new_zeros(t.shape[0], capacity, *t.shape[2:])
    out[:, : t.shape[1]] = t
    return out


@dataclass
class ContextState:
    layers: list[LayerState]  # one entry per layer of the pattern
    lengths: Tensor  # [b] int64: tokens read so far, per row

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_length(self) -> int:
        return int(self.lengths.max().item()) if self.batch_size else 0

    @property
    def capacity(self) -> int:
        for s in self.layers:
            if isinstance(s, AttentionState):
                return s.k.shape[1]
        return 1 << 62  # no attention layer: unbounded

    def ensure_capacity(self, needed: int) -> None:
        """Grow every KV cache (geometrically) so that `needed` positions fit."""
        if needed <= self.capacity:
            return
        cap = max(needed, 2 * self.capacity)
        for i, s in enumerate(self.layers):
            if isinstance(s, AttentionState):
                self.layers[i] = AttentionState(_grow(s.k, cap), _grow(s.v, cap))

    def select(self, rows: list[int] | Tensor) -> ContextState:
        """A copy holding only `rows`, KV cropped to their longest length."""
        rows_t = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        lengths = self.lengths[rows_t].clone()
        upto = int(lengths.max().item()) if len(rows_t) else 0
        return ContextState([None if s is None else s.select(rows_t, upto) for s in self.layers], lengths)

    @staticmethod
    def cat(states: list[ContextState]) -> ContextState:
        """Stack the rows of several states (KV padded to the longest)."""
        if not states:
            raise ValueError("ContextState.cat: no states given")
        upto = max(s.max_length for s in states)
        layers: list[LayerState] = []
        for per_layer in zip(*(s.layers for s in states), strict=True):
            first = per_layer[0]
            if first is None:
                layers.append(None)
            elif isinstance(first, AttentionState):
                layers.append(AttentionState(
                    torch.cat([_grow(p.k[:, :upto], upto) for p in per_layer]),
                    torch.cat([_grow(p.v[:, :upto], upto) for p in per_layer]),
                ))  # fmt: skip
            else:
                layers.append(MambaState(torch.cat([p.conv for p in per_layer]),
                                         torch.cat([p.ssm for p in per_layer])))  # fmt: skip
        return ContextState(layers, torch.cat([s.lengths for s in states]))

    def clone(self) -> ContextState:
        return self.select(torch.arange(self.batch_size, device=self.lengths.device))

    def to(self, device: torch.device | str) -> ContextState:
        flat = {k: v.to(device) for k, v in self.to_flat().items()}
        return ContextState.from_flat(flat, len(self.layers))

    def to_flat(self) -> dict[str, Tensor]:
        """A flat dict of tensors (KV cropped to the longest row), e.g. for safetensors or a channel."""
        out = {"lengths": self.lengths}
        upto = self.max_length
        for i, s in enumerate(self.layers):
            if isinstance(s, AttentionState):
                out[f"layers.{i}.k"], out[f"layers.{i}.v"] = s.k[:, :upto], s.v[:, :upto]
            elif isinstance(s, MambaState):
                out[f"layers.{i}.conv"], out[f"layers.{i}.ssm"] = s.conv, s.ssm
        return out

    @staticmethod
    def from_flat(flat: dict[str, Tensor], num_layers: int) -> ContextState:
        layers: list[LayerState] = []
        for i in range(num_layers):
            if f"layers.{i}.k" in flat:
                layers.append(AttentionState(flat[f"layers.{i}.k"], flat[f"layers.{i}.v"]))
            elif f"layers.{i}.conv" in flat:
                layers.append(MambaState(flat[f"layers.{i}.conv"], flat[f"layers.{i}.ssm"]))
            else:
                layers.append(None)
        return ContextState(layers, flat["lengths"])

    def rewind(self, base_lengths: Tensor, traces: dict[int, MambaTrace], keep: Tensor) -> None:
        """Undo part of the last write: row r keeps only keep[r] of the tokens it read after
        `base_lengths[r]`. KV is cropped by length; Mamba layers take their traced intermediate states."""
        self.lengths = base_lengths + keep
        for i, tr in traces.items():
            self.layers[i] = tr.state_after(keep)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.to_flat().values())
