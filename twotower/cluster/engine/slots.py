"""Slot bookkeeping of a state pool: what a pool is sized for, and which slots each lane's rows own.

The host keeps its own copy of every slot's length, so choosing a step's buckets never reads the device.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor

from .cache_limits import PREFILL_CHUNK, PrefixCacheConfig
from .steps import MIN_WINDOW, window_bucket

__all__ = ["PREFILL_CHUNK", "PoolLimits", "SlotTable"]


@dataclass
class PoolLimits:
    """What a tower's state memory is sized for (from EngineConfig): its pool, and for the context tower
    the prefix cache (None: off)."""

    slots: int = 32  # sequences at once (max_num_seqs)
    max_model_len: int = 4096
    max_block_size: int = 64
    min_window: int = MIN_WINDOW  # smallest attention window bucket (steps.window_bucket)
    prefix_cache: PrefixCacheConfig | None = None

    @property
    def capacity(self) -> int:
        """KV positions per slot: a sequence's whole length plus one block or prefill chunk written past
        it (static steps write their full width; what lies past a row's length stays masked)."""
        return self.max_model_len + 2 * max(self.max_block_size, PREFILL_CHUNK)


class SlotTable:
    """Which pool slots each lane's rows own, and the host's copy of every slot's length."""

    def __init__(self, slots: int) -> None:
        self.free: deque[int] = deque(range(slots))
        self.lanes: dict[str, list[int]] = {}
        self.length = [0] * (slots + 1)  # index `slots` is the scratch slot (always 0)
        self.scratch = slots

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"state pool: {n} slots asked, {len(self.free)} free (raise max_num_seqs)")
        return [self.free.popleft() for _ in range(n)]

    def release(self, slots) -> None:
        for s in slots:
            self.length[s] = 0
            self.free.append(s)

    def padded(self, slots: list[int], bucket: int, device) -> Tensor:
        return torch.tensor(slots + [self.scratch] * (bucket - len(slots)), dtype=torch.long, device=device)

    def check_room(self, slots: list[int], width: int, limits: PoolLimits) -> None:
        """A step writes `width` positions past each row's length: refuse before indexing past the pool
        (an engine whose limits exceed the pool's would otherwise fail inside the step)."""
        longest = max((self.length[s] for s in slots), default=0)
        if longest + width > limits.capacity:
            raise ValueError(f"max_model_len: a sequence would reach {longest + width} positions; this state "
                             f"pool holds {limits.capacity} (size it from the same EngineConfig as the engine)")

    def window(self, slots: list[int], limits: PoolLimits) -> int:
        longest = max((self.length[s] for s in slots), default=0)
        return window_bucket(longest, limits.capacity, limits.min_window)
