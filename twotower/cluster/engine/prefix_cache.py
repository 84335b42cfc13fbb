"""The context tower's prefix cache on a grid of G tokens (plain Python bookkeeping; the payloads are
towers.pool snapshots).

A Mamba state exists only for the exact prefix a tower has read, so the cache keeps one at each grid
point a sequence stopped at: entry k of a chain holds the K/V of tokens [(k-1)G, kG) and every Mamba
layer's conv and SSM state after kG tokens. Its key is (parent entry, the block's G tokens): a hash
chain whose equality check is exact, so two prefixes never share an entry by collision.

Where snapshots come from: prefill reads prompts in chunks that end on multiples of PREFILL_CHUNK, and
G is a multiple of it, so every grid point inside a prompt is a stop. After that, a write that lands
exactly on the next grid point (one AR or mock-AR token, an extension or verified draft that ends
there) snapshots too; a write that steps over it ends that sequence's chain (its Mamba state never
existed at the grid point).

Lookup: a prompt is seated at its longest cached grid point strictly before its last token (the last
token is always read, for the logits the first sample needs), and prefills only the rest.

Memory: `budget` bytes, every entry `entry_bytes` (exact, towers.pool.prefix_entry_bytes). Entries on a
running sequence's chain are pinned; eviction takes the least recently used entry that is neither
pinned nor a parent, so every chain in the cache stays whole from its first block. With no such
entry, a new snapshot is simply not kept.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field


def grid_prefix_keys(tokens: list[int], grid: int) -> list[int]:
    """One key per grid point a prompt can be seated at (k*grid tokens, k >= 1, strictly before its last
    token, as PrefixCache.match allows): a chained hash of tokens[:k*grid]. For routing by prefix
    (serve/prefix_router.py): a hash collision there only misroutes, the cache's own keys are exact."""
    keys, h = [], 0
    for k in range((len(tokens) - 1) // grid):
        h = hash((h, tuple(tokens[k * grid : (k + 1) * grid])))
        keys.append(h)
    return keys


@dataclass(eq=False)
class Entry:
    id: int
    key: tuple  # (parent id or -1, the block's G tokens)
    parent: Entry | None
    payload: object  # towers.pool.snapshot_block output
    children: int = 0
    pins: int = 0


@dataclass
class Chain:
    """What one slot's sequence has in the cache: its entries from the first block on, and the tokens
    it has read since the last one (None once it stepped over a grid point)."""

    entries: list[Entry] = field(default_factory=list)
    tail: list[int] | None = field(default_factory=list)


@dataclass
class CacheStats:
    queries: int = 0  # prompts looked up
    hit_tokens: int = 0  # prompt tokens seated from the cache instead of prefilled
    prefill_tokens: int = 0  # prompt tokens the context tower read (hits excluded)
    inserted: int = 0
    evictions: int = 0
    entries: int = 0
    bytes_used: int = 0
    budget: int = 0
    grid: int = 0


class PrefixCache:
    def __init__(self, grid: int, budget: int, entry_bytes: int) -> None:
        self.grid, self.budget, self.entry_bytes = grid, budget, entry_bytes
        self.capacity = budget // entry_bytes  # entries that fit the budget
        self.entries: OrderedDict[tuple, Entry] = OrderedDict()  # least recently used first
        self.chains: dict[int, Chain] = {}  # slot -> its sequence's chain
        self.stats = CacheStats(budget=budget, grid=grid)
        self._ids = itertools.count()

    @property
    def bytes_used(self) -> int:
        return len(self.entries) * self.entry_bytes

    def snapshot_stats(self) -> CacheStats:
        s = self.stats
        s.entries, s.bytes_used = len(self.entries), self.bytes_used
        return CacheStats(**vars(s))

    # ---- lookup and seating ------------------------------------------------------------------------
    def match(self, tokens: list[int]) -> list[Entry]:
        """The longest chain of cached blocks that is a prefix of tokens[:-1] (marked recently used)."""
        self.stats.queries += 1
        G, found, parent = self.grid, [], -1
        for k in range((len(tokens) - 1) // G):
            e = self.entries.get((parent, tuple(tokens[k * G : (k + 1) * G])))
            if e is None:
                break
            found.append(e)
            parent = e.id
        for e in found:
            self.entries.move_to_end(e.key)
        self.stats.hit_tokens += len(found) * G
        return found

    def open(self, slot: int, seated: list[Entry]) -> None:
        """Slot `slot` starts a sequence seated after `seated` (possibly none): pin them."""
        self.close(slot)
        for e in seated:
            e.pins += 1
        self.chains[slot] = Chain(list(seated))

    def close(self, slot: int) -> None:
        """The slot's sequence is gone: unpin its chain."""
        chain = self.chains.pop(slot, None)
        for e in chain.entries if chain else ():
            e.pins -= 1

    # ---- snapshots -------------------------------------------------------------------------------
    def read(self, slot: int, tokens: list[int], length: int, snapshot) -> None:
        """The slot read `tokens` and now holds `length` tokens. When that is exactly its next grid point,
        `snapshot(start, end)` copies the block out and the entry is kept (if the budget allows)."""
        chain = self.chains.get(slot)
        if chain is None or chain.tail is None:
            return
        chain.tail += tokens
        G = self.grid
        if len(chain.tail) < G:
            return
        if len(chain.tail) > G or length != (len(chain.entries) + 1) * G:
            chain.tail = None  # stepped over the grid point: no Mamba state exists there
            return
        parent = chain.entries[-1] if chain.entries else None
        key = (parent.id if parent else -1, tuple(chain.tail))
        chain.tail = []
        e = self.entries.get(key)
        if e is None:
            if not self._make_room():
                chain.tail = None  # no room: this chain stops growing
                return
            e = Entry(next(self._ids), key, parent, snapshot(length - G, length))
            self.entries[key] = e
            if parent is not None:
                parent.children += 1
            self.stats.inserted += 1
        self.entries.move_to_end(key)
        e.pins += 1
        chain.entries.append(e)

    def _make_room(self) -> bool:
        while len(self.entries) >= self.capacity:
            victim = next((e for e in self.entries.values() if e.pins == 0 and e.children == 0), None)
            if victim is None:
                return False
            del self.entries[victim.key]
            if victim.parent is not None:
                victim.parent.children -= 1
            self.stats.evictions += 1
        return True
