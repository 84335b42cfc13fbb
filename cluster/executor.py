"""The seam between the engine and the towers.

The engine never touches tower state: it asks an executor to run tower operations on a *lane* (a batch
of sequences decoded together, rows in a fixed order that only `add_rows` / `keep_rows` change). The
in-process executor below runs both towers in this process on one device; the Ray executor runs each
tower in its own actor. Both satisfy `TowerExecutor`, so they are interchangeable.

Only small tensors cross this seam: token ids, per-position predictions and confidences, never logits.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from torch import Tensor

from twotower.towers.context import ContextTower
from twotower.towers.denoiser import DenoiserTower
from twotower.towers.state import ContextState, MambaTrace

from .sampler import RowSampling, sample
from .unmask import x0_predict


@dataclass
class Sampled:
    ids: Tensor  # [b] int64 (cpu)
    logprobs: Tensor | None = None  # [b] float32 under the untempered distribution


class TowerExecutor(abc.ABC):
    """Tower operations on lanes. Row r of a lane is one sequence; ids tensors are on the CPU."""

    @abc.abstractmethod
    def add_rows(self, lane: str, prompts: list[list[int]], sampling: RowSampling | None) -> Sampled | None:
        """Prefill new sequences (any may be empty) and append them as the lane's last rows; sample
        from each one's last-position logits when `sampling` is given. One context forward."""

    @abc.abstractmethod
    def keep_rows(self, lane: str, rows: list[int]) -> None:
        """Keep only these rows, in this order (others are freed at once)."""

    @abc.abstractmethod
    def decode(self, lane: str, ids: Tensor, sampling: RowSampling | None) -> Sampled | None:
        """Context tower reads one token per row, ids [b]; optionally samples the next token."""

    @abc.abstractmethod
    def extend(self, lane: str, ids: Tensor, n_valid: Tensor) -> None:
        """Context tower reads a committed block ids [b, S]; row r reads n_valid[r] tokens (0: none)."""

    @abc.abstractmethod
    def verify(self, lane: str, ids: Tensor, n_valid: Tensor) -> Tensor:
        """Like `extend`, returning the context tower's greedy next token after every position
        [b, S]; must be followed by `rewind`."""

    @abc.abstractmethod
    def rewind(self, lane: str, keep: Tensor) -> None:
        """After `verify`: row r keeps only the first keep[r] tokens of the verified block."""

    @abc.abstractmethod
    def denoise(
        self, lane: str, xt: Tensor, t: Tensor, mask_id: int, temperature: Tensor, seeds: list[int]
    ) -> tuple[Tensor, Tensor]:
        """Denoiser forward on blocks xt [b, S] at masked fractions t [b] -> x0 predictions and their
        confidences, each [b, S] (see unmask.x0_predict)."""

    @abc.abstractmethod
    def mock_ar(self, lane: str, ids: Tensor, sampling: RowSampling) -> Sampled:
        """Denoiser mock-AR step on the last committed token ids [b] (the lane's state covers the
        tokens before it) -> the next token. State unchanged."""

    @abc.abstractmethod
    def close_lane(self, lane: str) -> None:
        """Forget a lane."""


class InProcessExecutor(TowerExecutor):
    """Both towers in this process (tests, one device). The denoiser reads the context tower's state
    object directly."""

    def __init__(self, context: ContextTower, denoiser: DenoiserTower | None, kv_capacity: int = 256) -> None:
        self.context, self.denoiser = context, denoiser
        self.device = context.lm_head.weight.device
        self.kv_capacity = kv_capacity
        self.states: dict[str, ContextState] = {}
        self._pending: dict[str, tuple[Tensor, dict[int, MambaTrace]]] = {}

    # ---- helpers ---------------------------------------------------------------------------------
    def _ids(self, t: Tensor) -> Tensor:
        return t.to(self.device, torch.long)

    def _den(self) -> DenoiserTower:
        if self.denoiser is None:
            raise RuntimeError("this executor has no denoiser tower (AR-only checkpoint)")
        return self.denoiser

    @staticmethod
    def _sample(logits: Tensor, sampling: RowSampling | None) -> Sampled | None:
        if sampling is None:
            return None
        ids, lp = sample(logits, sampling)
        return Sampled(ids.cpu(), None if lp is None else lp.cpu())

    # ---- operations ------------------------------------------------------------------------------
    @torch.no_grad()
    def add_rows(self, lane, prompts, sampling):
        n = len(prompts)
        longest = max((len(p) for p in prompts), default=0)
        state = self.context.new_state(n, max(self.kv_capacity, longest))
        logits = None
        if longest:
            ids = torch.zeros(n, longest, dtype=torch.long)
            for r, p in enumerate(prompts):
                ids[r, : len(p)] = torch.tensor(p, dtype=torch.long)
            n_valid = torch.tensor([len(p) for p in prompts], device=self.device)
            logits = self.context.extend(self._ids(ids), state, n_valid)
        old = self.states.get(lane)
        self.states[lane] = state if old is None or old.batch_size == 0 else ContextState.cat([old, state])
        if sampling is None:
            return None
        if logits is None:
            raise ValueError("add_rows: sampling needs non-empty prompts")
        return self._sample(logits, sampling)

    def keep_rows(self, lane, rows):
        state = self.states[lane]
        if list(rows) != list(range(state.batch_size)):
            self.states[lane] = state.select(rows)

    @torch.no_grad()
    def decode(self, lane, ids, sampling):
        return self._sample(self.context.decode(self._ids(ids), self.states[lane]), sampling)

    @torch.no_grad()
    def extend(self, lane, ids, n_valid):
        self.context(self._ids(ids), self.states[lane], n_valid.to(self.device))

    @torch.no_grad()
    def verify(self, lane, ids, n_valid):
        logits, base, traces = self.context.verify(self._ids(ids), self.states[lane], n_valid.to(self.device))
        self._pending[lane] = (base, traces)
        return logits.argmax(-1).cpu()

    def rewind(self, lane, keep):
        base, traces = self._pending.pop(lane)
        self.states[lane].rewind(base, traces, keep.to(self.device))

    @torch.no_grad()
    def denoise(self, lane, xt, t, mask_id, temperature, seeds):
        logits = self._den().denoise(self._ids(xt), t.to(self.device), self.states[lane])
        pred, conf = x0_predict(logits, mask_id, temperature.to(self.device), seeds)
        return pred.cpu(), conf.cpu()

    @torch.no_grad()
    def mock_ar(self, lane, ids, sampling):
        logits = self._den().mock_ar_step(self._ids(ids), self.states[lane])
        return self._sample(logits, sampling)

    def close_lane(self, lane):
        self.states.pop(lane, None)
        self._pending.pop(lane, None)
