"""Tower runners: each owns one tower and runs lane operations on it (no Ray here).

`ContextRunner` owns the context tower and the authoritative per-lane ContextState. For lanes whose
denoiser runs elsewhere it tracks what that mirror has already received, so `take_delta` returns only
new data: the K/V rows appended since, and the Mamba states of the rows that changed.
`DenoiserRunner` owns the denoiser; it reads lane states from a mapping that is either the context
runner's own (one process, one device) or its mirrors, kept current with `apply_delta`.

The in-process executor calls both directly; the Ray layer wraps each in its own actor.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import MutableMapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from twotower.decoding.sampler import RowSampling, sample
from twotower.decoding.unmask import x0_predict
from twotower.towers.context import ContextTower
from twotower.towers.denoiser import DenoiserTower
from twotower.towers.state import ContextState, MambaTrace, apply_delta, delta_nbytes, export_delta


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


def _sample(logits: Tensor, sampling: RowSampling | None) -> Sampled | None:
    if sampling is None:
        return None
    ids, lp = sample(logits, sampling)
    return Sampled(ids.cpu(), None if lp is None else lp.cpu())


@dataclass
class _Sync:
    """What a lane's mirror already holds: its row count, lengths, and rows whose Mamba state changed."""

    rows: int = 0
    lengths: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    dirty: set[int] = field(default_factory=set)


class ContextRunner:
    def __init__(self, tower: ContextTower, kv_capacity: int = 256) -> None:
        self.tower = tower
        self.device = tower.lm_head.weight.device
        self.kv_capacity = kv_capacity
        self.states: dict[str, ContextState] = {}
        self.mirrored: dict[str, _Sync] = {}  # lanes with a remote mirror
        self._verify: dict[str, tuple[Tensor, dict[int, MambaTrace], Tensor]] = {}
        self.times = OpTimes()

    def _ids(self, t: Tensor) -> Tensor:
        return t.to(self.device, torch.long)

    def _dirty(self, lane: str, rows) -> None:
        if lane in self.mirrored:
            self.mirrored[lane].dirty.update(int(r) for r in rows)

    @torch.no_grad()
    def add_rows(self, lane: str, prompts: list[list[int]], sampling: RowSampling | None,
                 mirror: bool = False) -> Sampled | None:  # fmt: skip
        t0 = time.perf_counter()
        n = len(prompts)
        longest = max((len(p) for p in prompts), default=0)
        state = self.tower.new_state(n, max(self.kv_capacity, longest))
        logits = None
        if longest:
            ids = torch.zeros(n, longest, dtype=torch.long)
            for r, p in enumerate(prompts):
                ids[r, : len(p)] = torch.tensor(p, dtype=torch.long)
            n_valid = torch.tensor([len(p) for p in prompts], device=self.device)
            logits = self.tower.extend(self._ids(ids), state, n_valid)
        old = self.states.get(lane)
        first = 0 if old is None else old.batch_size
        self.states[lane] = state if old is None or old.batch_size == 0 else ContextState.cat([old, state])
        if mirror:
            self.mirrored.setdefault(lane, _Sync())
        self._dirty(lane, range(first, first + n))
        self.times.record("add_rows", t0)
        if sampling is not None and logits is None:
            raise ValueError("add_rows: sampling needs non-empty prompts")
        return None if logits is None else _sample(logits, sampling)

    def keep_rows(self, lane: str, rows: list[int]) -> None:
        state = self.states[lane]
        if list(rows) != list(range(state.batch_size)):
            self.states[lane] = state.select(rows)
        sync = self.mirrored.get(lane)
        if sync is not None:  # the mirror applies the same keep_rows; re-index its bookkeeping
            kept_synced = [r for r in rows if r < sync.rows]
            sync.lengths = sync.lengths[torch.tensor(kept_synced, dtype=torch.long)] if kept_synced else \
                sync.lengths[:0]  # fmt: skip
            sync.dirty = {i for i, r in enumerate(rows) if r in sync.dirty}
            sync.rows = len(kept_synced)

    @torch.no_grad()
    def decode(self, lane: str, ids: Tensor, sampling: RowSampling | None) -> Sampled | None:
        t0 = time.perf_counter()
        out = _sample(self.tower.decode(self._ids(ids), self.states[lane]), sampling)
        self._dirty(lane, range(len(ids)))
        self.times.record("decode", t0)
        return out

    @torch.no_grad()
    def extend(self, lane: str, ids: Tensor, n_valid: Tensor) -> None:
        t0 = time.perf_counter()
        self.tower(self._ids(ids), self.states[lane], n_valid.to(self.device))
        self._dirty(lane, (n_valid > 0).nonzero().flatten().tolist())
        self.times.record("extend", t0)

    @torch.no_grad()
    def verify(self, lane: str, ids: Tensor, n_valid: Tensor) -> Tensor:
        t0 = time.perf_counter()
        logits, base, traces = self.tower.verify(self._ids(ids), self.states[lane], n_valid.to(self.device))
        self._verify[lane] = (base, traces, n_valid)
        self.times.record("verify", t0)
        return logits.argmax(-1).cpu()

    def rewind(self, lane: str, keep: Tensor) -> None:
        base, traces, n_valid = self._verify.pop(lane)
        self.states[lane].rewind(base, traces, keep.to(self.device))
        self._dirty(lane, (n_valid > 0).nonzero().flatten().tolist())

    def take_delta(self, lane: str) -> dict[str, Tensor]:
        """New data for the lane's mirror since the last call (see towers.state.export_delta), plus
        `new_rows`: how many empty rows the mirror appends first."""
        state, sync = self.states[lane], self.mirrored[lane]
        new_rows = state.batch_size - sync.rows
        since = torch.cat([sync.lengths.to(self.device),
                           torch.zeros(new_rows, dtype=torch.long, device=self.device)])  # fmt: skip
        rows = torch.tensor(sorted(sync.dirty), dtype=torch.long, device=self.device)
        delta = export_delta(state, since, rows)
        delta["new_rows"] = torch.tensor(new_rows)
        sync.rows, sync.lengths, sync.dirty = state.batch_size, state.lengths.clone().cpu(), set()
        return delta

    def close_lane(self, lane: str) -> None:
        self.states.pop(lane, None)
        self.mirrored.pop(lane, None)
        self._verify.pop(lane, None)

    @torch.no_grad()
    def score(self, prompt: list[int], continuation: list[int]) -> list[float]:
        """log p(continuation[j] | prompt, continuation[:j]) under the context tower, one per token."""
        t0 = time.perf_counter()
        ids = torch.tensor([prompt + continuation], dtype=torch.long, device=self.device)
        state = self.tower.new_state(1, ids.shape[1])
        hidden = self.tower(ids, state)[0, len(prompt) - 1 : -1]  # position j predicts token j + 1
        logp = torch.log_softmax(self.tower.logits(hidden), dim=-1)
        out = logp.gather(-1, ids[0, len(prompt) :, None])[:, 0].tolist()
        self.times.record("score", t0)
        return out


class DenoiserRunner:
    def __init__(self, tower: DenoiserTower, states: MutableMapping[str, ContextState] | None = None) -> None:
        self.tower = tower
        self.device = tower.lm_head.weight.device
        self.states: MutableMapping[str, ContextState] = {} if states is None else states
        self.times = OpTimes()

    @torch.no_grad()
    def denoise(self, lane: str, xt: Tensor, t: Tensor, mask_id: int, temperature: Tensor,
                seeds: list[int]) -> tuple[Tensor, Tensor]:  # fmt: skip
        t0 = time.perf_counter()
        logits = self.tower.denoise(xt.to(self.device, torch.long), t.to(self.device), self.states[lane])
        pred, conf = x0_predict(logits, mask_id, temperature.to(self.device), seeds)
        self.times.record("denoise", t0)
        return pred.cpu(), conf.cpu()

    @torch.no_grad()
    def mock_ar(self, lane: str, ids: Tensor, sampling: RowSampling) -> Sampled:
        t0 = time.perf_counter()
        out = _sample(self.tower.mock_ar_step(ids.to(self.device, torch.long), self.states[lane]), sampling)
        self.times.record("mock_ar", t0)
        return out

    # ---- mirror maintenance (only when the states are not shared with a ContextRunner) -----------
    def apply_delta(self, lane: str, delta: dict[str, Tensor]) -> int:
        """Append `new_rows` empty rows, then apply the delta; returns the bytes received."""
        t0 = time.perf_counter()
        new_rows = int(delta["new_rows"])
        state = self.states.get(lane)
        if new_rows:
            fresh = self.tower.model.new_state(new_rows, 16)
            state = fresh if state is None or state.batch_size == 0 else ContextState.cat([state, fresh])
            self.states[lane] = state
        apply_delta(state, {k: v for k, v in delta.items() if k != "new_rows"})
        n = delta_nbytes(delta)
        self.times.record("apply_delta", t0)
        return n

    def keep_rows(self, lane: str, rows: list[int]) -> None:
        state = self.states.get(lane)
        if state is not None:
            kept = [r for r in rows if r < state.batch_size]
            self.states[lane] = state.select(kept)

    def close_lane(self, lane: str) -> None:
        self.states.pop(lane, None)
