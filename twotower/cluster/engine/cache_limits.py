"""Sizes that EngineConfig (no torch) and the slot table (torch) both need: the prefill chunk, and the
prefix cache's settings as the context runner receives them."""

from __future__ import annotations

from dataclasses import dataclass

PREFILL_CHUNK = 64  # prompt tokens per row per prefill step (one static shape for any prompt length)


@dataclass(frozen=True)
class PrefixCacheConfig:
    """The context tower's prefix cache (prefix_cache.py), from EngineConfig."""

    grid: int = 256  # G: tokens per grid block (a multiple of PREFILL_CHUNK)
    budget: int = 1 << 30  # bytes its entries may take
