"""The denoiser tower's runner: denoise and mock-AR steps over the context tower's state.

In one process it reads the context runner's pool and slot table directly; otherwise it keeps a mirror
pool of the same size, current through `apply_delta` (the context runner's `take_delta`), and
`keep_rows` forgets what finished rows held so that the next owner's first delta applies.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from twotower.decoding.sampler import RowSampling
from twotower.decoding.unmask import x0_predict
from twotower.towers.denoiser import DenoiserTower
from twotower.towers.pool import StatePool, apply_slot_delta

from .runners import ContextRunner, OpTimes, Sampled, _pad, _sample
from .slots import PoolLimits, SlotTable
from .steps import StepRunner, batch_bucket, batch_buckets, window_bucket


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
