"""Tower runners: each owns one tower and runs lane operations on it, over a state pool (no Ray here).

A lane is a list of pool slots in row order (`SlotTable`). Admission takes free slots and prefills only
them; `keep_rows` frees the slots of finished rows and reorders the list; no state moves for either. Every
tower step is a static-shape step function (steps.py) run eagerly or as one compiled graph per bucket.
Lengths are tracked on the host too, so choosing a bucket never reads the device.

`ContextRunner` owns the context tower and the authoritative pool. For lanes whose denoiser runs
elsewhere it tracks what that mirror holds, so `take_delta` returns only new data: the K/V rows appended
since, and the Mamba states of the slots that changed. `DenoiserRunner` (denoiser_runner.py) owns the
denoiser; it reads the context runner's pool and slot table (one process) or its own mirror of them,
kept current with `apply_delta`. The in-process executor calls both directly; the Ray layer wraps each in its own actor.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from twotower.decoding.sampler import RowSampling, sample
from twotower.towers.context import ContextTower
from twotower.towers.pool import StatePool, export_slot_delta, prefix_entry_bytes, seat_prefix, snapshot_block
from twotower.towers.state import BlockInputs, MambaState

from .prefix_cache import CacheStats, PrefixCache
from .request import Scores
from .slots import PREFILL_CHUNK, PoolLimits, SlotTable
from .steps import StepRunner, batch_bucket, batch_buckets, window_bucket

__all__ = ["Admitted", "ContextRunner", "PoolLimits", "Sampled", "SlotTable"]

@dataclass
class Sampled:
    ids: Tensor  # [b] int64 (cpu)
    logprobs: Tensor | None = None  # [b] float32 under the untempered distribution


@dataclass
class Admitted:
    """What add_rows did: per new row, the leading tokens seated from the prefix cache, and the first
    sample (None without sampling)."""

    cached: list[int]
    sampled: Sampled | None = None


@dataclass
class OpTimes:
    """Busy intervals of a runner (perf_counter seconds), for overlap / busy-fraction reports."""

    # bounded: a replica that leaves recording on must not grow without end
    spans: deque[tuple[str, float, float]] = field(default_factory=lambda: deque(maxlen=65536))
    keep: bool = False

    def record(self, name: str, t0: float) -> None:
        if self.keep:
            self.spans.append((name, t0, time.perf_counter()))


def _pad(t: Tensor, bucket: int, value=0) -> Tensor:
    """Rows of t padded to `bucket` with `value`."""
    if t.shape[0] == bucket:
        return t
    return torch.cat([t, t.new_full((bucket - t.shape[0], *t.shape[1:]), value)])


def _sample(logits: Tensor, sampling: RowSampling | None) -> Sampled | None:
    if sampling is None:
        return None
    ids, lp = sample(logits, sampling)
    return Sampled(ids.cpu(), None if lp is None else lp.cpu())


class ContextRunner:
    def __init__(self, tower: ContextTower, limits: PoolLimits | None = None, compile: bool | str = False) -> None:
        self.tower = tower
        self.limits = limits or PoolLimits()
        self.device = tower.lm_head.weight.device
        self.pool = StatePool.allocate(tower.cfg, self.limits.slots, self.limits.capacity, self.device,
                                       tower.lm_head.weight.dtype)  # fmt: skip
        self.table = SlotTable(self.limits.slots)
        self.steps = StepRunner(compile, self.device)
        self.synced: dict[int, int] = {}  # slot -> length its remote mirror holds (mirrored lanes only)
        self.dirty: set[int] = set()  # mirrored slots whose Mamba state changed since the last delta
        self.mirrored: set[str] = set()
        self._verify: dict[str, tuple[list[int], list[int], Tensor, tuple[Tensor, ...]]] = {}
        self.times = OpTimes()
        cc = self.limits.prefix_cache
        self.cache = None if cc is None else PrefixCache(cc.grid, cc.budget, prefix_entry_bytes(
            tower.cfg, cc.grid, tower.lm_head.weight.dtype))  # fmt: skip
        self._define_steps()

    # ---- the step functions: static shapes, no host reads (compiled per key by self.steps) -----------
    def _define_steps(self) -> None:
        tower, pool = self.tower, self.pool
        mamba = [i for i, s in enumerate(pool.layers) if isinstance(s, MambaState)]

        def extend(ids, slots, n_valid, window):  # -> logits at each row's last real token [b, V]
            hidden = tower.forward_slots(ids, pool, slots, window, n_valid)
            last = (n_valid - 1).clamp(min=0)
            return tower.logits(hidden[torch.arange(ids.shape[0], device=ids.device), last])

        def decode(ids, slots, window):  # ids [b] -> next-token logits [b, V]
            return tower.logits(tower.forward_slots(ids[:, None], pool, slots, window)[:, 0])

        def verify(ids, slots, n_valid, window):  # -> greedy [b, S], (xBC, dt) per Mamba layer
            record: dict[int, BlockInputs] = {}
            hidden = tower.forward_slots(ids, pool, slots, window, n_valid, record=record)
            flat = tuple(t for i in mamba for t in (record[i].xBC, record[i].dt))
            return tower.logits(hidden).argmax(-1), flat

        def rewind(slots, keep, *flat):  # the Mamba states of the slots advance by keep[r] verified tokens
            record = {i: BlockInputs(flat[2 * j], flat[2 * j + 1]) for j, i in enumerate(mamba)}
            tower.advance_slots(pool, slots, record, keep)
            return keep  # (a step returns something)

        self._fns = {"extend": extend, "decode": decode, "verify": verify, "rewind": rewind}
        self._mamba = mamba

    def _scratch(self, kind: str, B: int, window: int, S: int | None = None) -> tuple:
        """Arguments of the step `kind` that read and write only the scratch slot (warm-up, capture)."""
        d = self.device
        slots = torch.full((B,), self.table.scratch, dtype=torch.long, device=d)
        if kind == "decode":
            return torch.zeros(B, dtype=torch.long, device=d), slots, window
        if kind == "rewind":  # key ("rewind", B, S): recorded inputs of an S-token block per Mamba layer
            cfg, S, dtype = self.tower.cfg, window, self.tower.lm_head.weight.dtype
            flat = [t for _ in self._mamba for t in (torch.zeros(B, cfg.conv_dim, S, dtype=dtype, device=d),
                                                      torch.zeros(B, S, cfg.mamba_num_heads, device=d))]  # fmt: skip
            return slots, torch.zeros(B, dtype=torch.long, device=d), *flat
        return (torch.zeros(B, S, dtype=torch.long, device=d), slots, torch.zeros(B, dtype=torch.long, device=d),
                window)  # fmt: skip

    def _step(self, key: tuple, *args):
        return self.steps.run(key, self._fns[key[0]], *args, scratch=lambda: self._scratch(*key))

    def warmup_plan(self, block_sizes: list[int]):
        """(key, step, scratch args) of the start-up step set: every batch bucket at the smallest window;
        decode, the prefill chunk, and extend + verify at each block size."""
        window = window_bucket(0, self.limits.capacity, self.limits.min_window)
        sizes = [S for S in block_sizes if S <= self.limits.max_block_size]
        for B in batch_buckets(self.limits.slots):
            keys = [("decode", B, window)] + [("extend", B, window, S) for S in sorted({PREFILL_CHUNK, *sizes})]
            keys += [("verify", B, window, S) for S in sizes] + [("rewind", B, S) for S in sizes]
            for key in keys:
                yield key, self._fns[key[0]], (lambda key=key: self._scratch(*key))

    # ---- lane operations ---------------------------------------------------------------------------
    def _slots(self, lane: str) -> list[int]:
        return self.table.lanes[lane]

    def _changed(self, slots) -> None:
        self.dirty.update(s for s in slots if s in self.synced)

    @torch.no_grad()
    def add_rows(self, lane: str, prompts: list[list[int]], sampling: RowSampling | None,
                 mirror: bool = False) -> Admitted:  # fmt: skip
        t0 = time.perf_counter()
        longest = max((len(p) for p in prompts), default=0)
        self.table.check_room([self.table.scratch], -(-longest // PREFILL_CHUNK) * PREFILL_CHUNK, self.limits)
        new = self.table.allocate(len(prompts))
        if new:
            self.pool.reset(torch.tensor(new, dtype=torch.long, device=self.device))
        self.table.lanes.setdefault(lane, []).extend(new)
        if mirror:
            self.mirrored.add(lane)
        if lane in self.mirrored:  # a mirror's first delta starts at 0, so it carries a seated prefix too
            self.synced.update({s: 0 for s in new})
            self.dirty.update(new)
        cached = [0] * len(new)
        logits = self._read_prompts(new, prompts, cached)
        self.times.record("add_rows", t0)
        if sampling is not None and logits is None:
            raise ValueError("add_rows: sampling needs non-empty prompts")
        return Admitted(cached, None if logits is None else _sample(logits, sampling))

    def _read_prompts(self, slots: list[int], prompts: list[list[int]], cached: list[int]) -> Tensor | None:
        """Seat each fresh slot from the prefix cache and prefill the rest; logits at each last token
        (None when no prompt has a token). Prompts whose first grid block an earlier prompt of this call
        shares go in a second pass, seated from what the first pass just cached instead of reading the
        same prefix again (a burst of requests behind one system prompt pays for it once). cached[r]:
        set to the tokens row r was seated with."""
        out, passes = None, self._shared_later(prompts)
        for rows in passes:
            for r in rows:
                cached[r] = self._seat(slots[r], prompts[r])
            rest = [prompts[r][cached[r] :] for r in rows]
            if not any(rest):
                continue
            logits = self._prefill([slots[r] for r in rows], rest)
            if out is None:
                out = torch.zeros(len(slots), logits.shape[1], device=self.device)
            out[torch.tensor(rows, device=self.device)] = logits
        return out

    def _shared_later(self, prompts: list[list[int]]) -> list[list[int]]:
        """Row indices in two passes: first those whose first grid block no earlier row has, then the rest."""
        if self.cache is None:
            return [list(range(len(prompts)))]
        G, seen, passes = self.cache.grid, set(), ([], [])
        for r, p in enumerate(prompts):
            head = tuple(p[:G]) if len(p) > G else None
            passes[head is not None and head in seen].append(r)
            seen.add(head)
        return [rows for rows in passes if rows]

    def _seat(self, slot: int, prompt: list[int]) -> int:
        """Seat a fresh slot from the prefix cache's longest match of `prompt`; returns the tokens seated."""
        if self.cache is None:
            return 0
        found = self.cache.match(prompt)
        n = len(found) * self.cache.grid
        if found:
            seat_prefix(self.pool, slot, [e.payload for e in found], n)
            self.table.length[slot] = n
        self.cache.open(slot, found)
        return n

    def _read(self, slot: int, tokens: list[int]) -> None:
        """Tell the prefix cache what a slot just read (it snapshots when that ends on its grid)."""
        if self.cache is not None:
            self.cache.read(slot, tokens, self.table.length[slot],
                            lambda a, b: snapshot_block(self.pool, slot, a, b))  # fmt: skip

    def cache_stats(self) -> CacheStats | None:
        return None if self.cache is None else self.cache.snapshot_stats()

    def _prefill(self, slots: list[int], prompts: list[list[int]]) -> Tensor:
        """Read prompts into slots (fresh, or seated at a multiple of PREFILL_CHUNK) in chunks of
        PREFILL_CHUNK tokens, so every chunk ends on the chunk grid; logits at each last token."""
        b, P = len(slots), PREFILL_CHUNK
        B = batch_bucket(b, self.limits.slots)
        slot_t = self.table.padded(slots, B, self.device)
        lens = torch.tensor([len(p) for p in prompts])
        ids = torch.zeros(b, -(-int(lens.max()) // P) * P, dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, : len(p)] = torch.tensor(p, dtype=torch.long)
        out = torch.zeros(b, self.tower.cfg.vocab_size, device=self.device)
        for c in range(ids.shape[1] // P):
            n_valid = (lens - c * P).clamp(0, P)
            window = self.table.window(slots, self.limits)
            logits = self._step(("extend", B, window, P), _pad(ids[:, c * P : (c + 1) * P], B).to(self.device),
                                slot_t, _pad(n_valid, B).to(self.device), window)  # fmt: skip
            ends = ((lens > c * P) & (lens <= (c + 1) * P)).nonzero().flatten()
            out[ends.to(self.device)] = logits[ends.to(self.device)]
            for r, s in enumerate(slots):
                n = int(n_valid[r])
                self.table.length[s] += n
                if n:
                    self._read(s, prompts[r][c * P : c * P + n])
        if self.cache is not None:
            self.cache.stats.prefill_tokens += int(lens.sum())
        return out

    def keep_rows(self, lane: str, rows: list[int]) -> None:
        old = self._slots(lane)
        kept = [old[i] for i in rows]
        gone = set(old) - set(kept)
        self.table.lanes[lane] = kept
        self.table.release(gone)
        for s in gone:
            self.synced.pop(s, None)
            self.dirty.discard(s)
            if self.cache is not None:
                self.cache.close(s)

    @torch.no_grad()
    def decode(self, lane: str, ids: Tensor, sampling: RowSampling | None) -> Sampled | None:
        t0 = time.perf_counter()
        slots = self._slots(lane)
        self.table.check_room(slots, 1, self.limits)
        B = batch_bucket(len(slots), self.limits.slots)
        window = self.table.window(slots, self.limits)
        logits = self._step(("decode", B, window), _pad(ids.long(), B).to(self.device),
                            self.table.padded(slots, B, self.device), window)[: len(slots)]  # fmt: skip
        for s, t in zip(slots, ids.tolist(), strict=True):
            self.table.length[s] += 1
            self._read(s, [t])
        self._changed(slots)
        self.times.record("decode", t0)
        return _sample(logits, sampling)

    def _block(self, kind: str, lane: str, ids: Tensor, n_valid: Tensor):
        slots = self._slots(lane)
        self.table.check_room(slots, ids.shape[1], self.limits)
        B = batch_bucket(len(slots), self.limits.slots)
        window = self.table.window(slots, self.limits)
        out = self._step((kind, B, window, ids.shape[1]), _pad(ids.long(), B).to(self.device),
                         self.table.padded(slots, B, self.device), _pad(n_valid, B).to(self.device), window)
        base = [self.table.length[s] for s in slots]
        for r, (s, n) in enumerate(zip(slots, n_valid.tolist(), strict=True)):
            self.table.length[s] += n
            if kind == "extend" and n:  # verify's tokens are read in rewind, once it is known how many stay
                self._read(s, ids[r, :n].tolist())
        self._changed([s for s, n in zip(slots, n_valid.tolist(), strict=True) if n > 0])
        return slots, base, out

    @torch.no_grad()
    def extend(self, lane: str, ids: Tensor, n_valid: Tensor) -> None:
        t0 = time.perf_counter()
        self._block("extend", lane, ids, n_valid)
        self.times.record("extend", t0)

    @torch.no_grad()
    def verify(self, lane: str, ids: Tensor, n_valid: Tensor) -> Tensor:
        t0 = time.perf_counter()
        slots, base, (greedy, traces) = self._block("verify", lane, ids, n_valid)
        if self.steps.capture:  # a captured graph's outputs are overwritten by its next replay
            traces = tuple(t.clone() for t in traces)
        self._verify[lane] = (slots, base, n_valid, traces, ids)
        self.times.record("verify", t0)
        return greedy[: len(slots)].cpu()

    @torch.no_grad()
    def rewind(self, lane: str, keep: Tensor) -> None:
        """After verify: row r keeps the first keep[r] tokens of the block. KV by length; the Mamba
        states, which verify left where they were, advance by keep[r] tokens of the recorded inputs."""
        slots, base, n_valid, traces, ids = self._verify.pop(lane)
        B = traces[0].shape[0] if traces else batch_bucket(len(slots), self.limits.slots)
        slot_t = self.table.padded(slots, B, self.device)
        keep_d = _pad(keep.long(), B).to(self.device)
        if self._mamba:
            self._step(("rewind", B, traces[1].shape[1]), slot_t, keep_d, *traces)
        real = torch.tensor(slots, dtype=torch.long, device=self.device)
        self.pool.lengths[real] = torch.tensor(base, device=self.device) + keep_d[: len(slots)]
        for r, (s, n0, k) in enumerate(zip(slots, base, keep.tolist(), strict=True)):
            self.table.length[s] = n0 + k
            if k:
                self._read(s, ids[r, :k].tolist())
        self._changed([s for s, n in zip(slots, n_valid.tolist(), strict=True) if n > 0])

    def take_delta(self, lane: str) -> dict[str, Tensor]:
        """New data for the lane's mirror since the last call (towers.pool.export_slot_delta)."""
        slots = self._slots(lane)
        slot_t = torch.tensor(slots, dtype=torch.long, device=self.device)
        since = torch.tensor([self.synced[s] for s in slots], dtype=torch.long, device=self.device)
        changed = torch.tensor([s for s in slots if s in self.dirty], dtype=torch.long, device=self.device)
        delta = export_slot_delta(self.pool, slot_t, since, changed)
        for s in slots:
            self.synced[s] = self.table.length[s]
            self.dirty.discard(s)
        return delta

    def close_lane(self, lane: str) -> None:
        if lane in self.table.lanes:
            self.keep_rows(lane, [])
        self.table.lanes.pop(lane, None)
        self.mirrored.discard(lane)
        self._verify.pop(lane, None)

    @torch.no_grad()
    def score(self, prompt: list[int], continuation: list[int], top: int = 0, echo: bool = False) -> Scores:
        """Context-tower log-probabilities of each continuation token (and with `echo` each prompt token
        after the first), with the `top` most likely tokens at each position (request.Scores). A one-off
        state outside the pool: scoring holds no slot."""
        t0 = time.perf_counter()
        ids = torch.tensor([prompt + continuation], dtype=torch.long, device=self.device)
        state = self.tower.new_state(1, ids.shape[1])
        first = 0 if echo else len(prompt) - 1
        hidden = self.tower(ids, state)[0, first:-1]  # position j predicts token j + 1
        logp = torch.log_softmax(self.tower.logits(hidden).float(), dim=-1)  # [n, V]
        lps = logp.gather(-1, ids[0, first + 1 :, None])[:, 0].tolist()
        tops: list[list[tuple[int, float]]] | None = None
        if top > 0:
            v, i = logp.topk(min(top, logp.shape[-1]), dim=-1)
            tops = [list(zip(r_i, r_v, strict=True)) for r_i, r_v in zip(i.tolist(), v.tolist(), strict=True)]
        n_prompt = len(prompt) - 1 - first  # scored prompt tokens (echo: all but the first)
        out = Scores(lps[n_prompt:], None if tops is None else tops[n_prompt:])
        if echo:
            out.prompt_logprobs = [None, *lps[:n_prompt]]
            out.prompt_top = None if tops is None else [None, *tops[:n_prompt]]
        self.times.record("score", t0)
        return out
