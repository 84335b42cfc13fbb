"""Tower runners: each owns one tower and runs lane operations on it, over a state pool (no Ray here).

A lane is a list of pool slots in row order (`SlotTable`). Admission takes free slots and prefills only
them; `keep_rows` frees the slots of finished rows and reorders the list; no state moves for either. Every
tower step is a static-shape step function (steps.py) run eagerly or as one compiled graph per bucket.
Lengths are tracked on the host too, so choosing a bucket never reads the device.

`ContextRunner` owns the context tower and the authoritative pool. For lanes whose denoiser runs
elsewhere it tracks what that mirror holds, so `take_delta` returns only new data: the K/V rows appended
since, and the Mamba states of the slots that changed. `DenoiserRunner` owns the denoiser; it reads the
context runner's pool and slot table (one process) or its own mirror of them, kept current with
`apply_delta`. The in-process executor calls both directly; the Ray layer wraps each in its own actor.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from twotower.decoding.sampler import RowSampling, sample
from twotower.decoding.unmask import x0_predict
from twotower.towers.context import ContextTower
from twotower.towers.denoiser import DenoiserTower
from twotower.towers.pool import StatePool, apply_slot_delta, export_slot_delta
from twotower.towers.state import BlockInputs, MambaState

from .request import Scores
from .slots import PREFILL_CHUNK, PoolLimits, SlotTable
from .steps import StepRunner, batch_bucket, batch_buckets, window_bucket

__all__ = ["ContextRunner", "DenoiserRunner", "PoolLimits", "Sampled", "SlotTable"]

@dataclass
class Sampled:
    ids: Tensor  # [b] int64 (cpu)
    logprobs: Tensor | None = None  # [b] float32 under the untempered distribution


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
                 mirror: bool = False) -> Sampled | None:  # fmt: skip
        t0 = time.perf_counter()
        longest = max((len(p) for p in prompts), default=0)
        self.table.check_room([self.table.scratch], -(-longest // PREFILL_CHUNK) * PREFILL_CHUNK, self.limits)
        new = self.table.allocate(len(prompts))
        if new:
            self.pool.reset(torch.tensor(new, dtype=torch.long, device=self.device))
        self.table.lanes.setdefault(lane, []).extend(new)
        if mirror:
            self.mirrored.add(lane)
        if lane in self.mirrored:
            self.synced.update({s: 0 for s in new})
            self.dirty.update(new)
        logits = self._prefill(new, prompts) if any(prompts) else None
        self.times.record("add_rows", t0)
        if sampling is not None and logits is None:
            raise ValueError("add_rows: sampling needs non-empty prompts")
        return None if logits is None else _sample(logits, sampling)

    def _prefill(self, slots: list[int], prompts: list[list[int]]) -> Tensor:
        """Read prompts into fresh slots in chunks of PREFILL_CHUNK tokens; logits at each last token."""
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
                self.table.length[s] += int(n_valid[r])
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

    @torch.no_grad()
    def decode(self, lane: str, ids: Tensor, sampling: RowSampling | None) -> Sampled | None:
        t0 = time.perf_counter()
        slots = self._slots(lane)
        self.table.check_room(slots, 1, self.limits)
        B = batch_bucket(len(slots), self.limits.slots)
        window = self.table.window(slots, self.limits)
        logits = self._step(("decode", B, window), _pad(ids.long(), B).to(self.device),
                            self.table.padded(slots, B, self.device), window)[: len(slots)]  # fmt: skip
        for s in slots:
            self.table.length[s] += 1
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
        for s, n in zip(slots, n_valid.tolist(), strict=True):
            self.table.length[s] += n
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
        self._verify[lane] = (slots, base, n_valid, traces)
        self.times.record("verify", t0)
        return greedy[: len(slots)].cpu()

    @torch.no_grad()
    def rewind(self, lane: str, keep: Tensor) -> None:
        """After verify: row r keeps the first keep[r] tokens of the block. KV by length; the Mamba
        states, which verify left where they were, advance by keep[r] tokens of the recorded inputs."""
        slots, base, n_valid, traces = self._verify.pop(lane)
        B = traces[0].shape[0] if traces else batch_bucket(len(slots), self.limits.slots)
        slot_t = self.table.padded(slots, B, self.device)
        keep_d = _pad(keep.long(), B).to(self.device)
        if self._mamba:
            self._step(("rewind", B, traces[1].shape[1]), slot_t, keep_d, *traces)
        real = torch.tensor(slots, dtype=torch.long, device=self.device)
        self.pool.lengths[real] = torch.tensor(base, device=self.device) + keep_d[: len(slots)]
        for s, n0, k in zip(slots, base, keep.tolist(), strict=True):
            self.table.length[s] = n0 + k
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


class DenoiserRunner:
    def __init__(self, tower: DenoiserTower, context: ContextRunner | None = None, limits: PoolLimits | None = None,
                 compile: bool | str = False) -> None:  # fmt: skip
        """context: the context runner of this process, whose pool and slot table are read directly;
        None: a mirror pool of our own, kept current with apply_delta."""
        self.tower = tower
        self.device = tower.lm_head.weight.device
        if context is not None:
            self.limits, self.pool, self.table = context.limits, context.pool, context.table
        else:
            self.limits = limits or PoolLimits()
            self.pool = StatePool.allocate(tower.cfg, self.limits.slots, self.limits.capacity, self.device,
                                           tower.lm_head.weight.dtype)  # fmt: skip
            self.table = SlotTable(self.limits.slots)
        self.steps = StepRunner(compile, self.device)
        self.times = OpTimes()
        pool = self.pool

        def denoise(xt, t, slots, window):  # -> x0 logits [b, S, V]
            return tower.denoise_slots(xt, t, pool, slots, window)

        def mock_ar(ids, slots, window):  # -> next-token logits [b, V]
            return tower.mock_ar_slots(ids, pool, slots, window)

        self._fns = {"denoise": denoise, "mock_ar": mock_ar}

    def _scratch(self, kind: str, B: int, window: int, S: int | None = None) -> tuple:
        d = self.device
        slots = torch.full((B,), self.table.scratch, dtype=torch.long, device=d)
        if kind == "mock_ar":
            return torch.zeros(B, dtype=torch.long, device=d), slots, window
        return torch.zeros(B, S, dtype=torch.long, device=d), torch.ones(B, device=d), slots, window

    def warmup_plan(self, block_sizes: list[int]):
        """(key, step, scratch args) of the start-up step set: every batch bucket at the smallest window;
        mock-AR, and denoise at each block size."""
        window = window_bucket(0, self.limits.capacity, self.limits.min_window)
        for B in batch_buckets(self.limits.slots):
            keys = [("mock_ar", B, window)] + [("denoise", B, window, S) for S in block_sizes
                                                if S <= self.limits.max_block_size]  # fmt: skip
            for key in keys:
                yield key, self._fns[key[0]], (lambda key=key: self._scratch(*key))

    def _run(self, kind: str, lane: str, first: Tensor, *rest: Tensor):
        slots = self.table.lanes[lane]
        B = batch_bucket(len(slots), self.limits.slots)
        window = self.table.window(slots, self.limits)
        key = (kind, B, window, *first.shape[1:])
        args = [_pad(first, B).to(self.device), *(_pad(t, B, 1.0).to(self.device) for t in rest)]
        out = self.steps.run(key, self._fns[kind], *args, self.table.padded(slots, B, self.device), window,
                             scratch=lambda: self._scratch(*key))  # fmt: skip
        return out[: len(slots)]

    @torch.no_grad()
    def denoise(self, lane: str, xt: Tensor, t: Tensor, mask_id: int, temperature: Tensor,
                seeds: list[int]) -> tuple[Tensor, Tensor]:  # fmt: skip
        t0 = time.perf_counter()
        logits = self._run("denoise", lane, xt.long(), t.float())
        pred, conf = x0_predict(logits, mask_id, temperature, seeds)
        self.times.record("denoise", t0)
        return pred.cpu(), conf.cpu()

    @torch.no_grad()
    def mock_ar(self, lane: str, ids: Tensor, sampling: RowSampling) -> Sampled:
        t0 = time.perf_counter()
        out = _sample(self._run("mock_ar", lane, ids.long()), sampling)
        self.times.record("mock_ar", t0)
        return out

    # ---- mirror maintenance (only with a pool of our own) -------------------------------------------
    def apply_delta(self, lane: str, delta: dict[str, Tensor]) -> int:
        """Apply a delta of the context runner's take_delta; the lane's slots become the delta's.
        Returns the bytes received."""
        t0 = time.perf_counter()
        apply_slot_delta(self.pool, delta)
        slots = delta["slots"].tolist()
        self.table.lanes[lane] = slots
        for s, n in zip(slots, delta["lengths"].tolist(), strict=True):
            self.table.length[s] = n
        self.times.record("apply_delta", t0)
        return sum(t.numel() * t.element_size() for t in delta.values())

    def keep_rows(self, lane: str, rows: list[int]) -> None:
        """Forget the dropped rows' slots: length 0 here too, so that the next owner's first delta
        (since 0) applies."""
        old = self.table.lanes.get(lane)
        if old is None:
            return
        kept = [old[i] for i in rows if i < len(old)]
        gone = sorted(set(old) - set(kept))
        if gone:
            self.pool.lengths[torch.tensor(gone, dtype=torch.long, device=self.device)] = 0
            for s in gone:
                self.table.length[s] = 0
        self.table.lanes[lane] = kept

    def close_lane(self, lane: str) -> None:
        self.keep_rows(lane, [])
        self.table.lanes.pop(lane, None)
