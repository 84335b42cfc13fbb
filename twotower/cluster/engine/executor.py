"""The seam between the engine and the towers.

The engine never touches tower state: it asks an executor to run tower operations on a *lane* (a batch
of sequences decoded together, rows in a fixed order that only `add_rows` / `keep_rows` change). The
in-process executor below runs both towers in this process; the Ray executor (ray_executor.py) runs
each tower in its own actor. Both satisfy `TowerExecutor`, so they are interchangeable.

Operations whose result the engine needs return a `Future`; the others may still be running when they
return (a remote executor queues them in order). Only small tensors cross this seam: token ids,
per-position predictions and confidences, never logits.
"""

from __future__ import annotations

import abc
from typing import Generic, Protocol, TypeVar

from torch import Tensor

from twotower.decoding.sampler import RowSampling
from twotower.towers.context import ContextTower
from twotower.towers.denoiser import DenoiserTower

from .denoiser_runner import DenoiserRunner
from .prefix_cache import CacheStats
from .request import Scores
from .runners import ContextRunner, PoolLimits, Sampled
from .steps import warm_up

T = TypeVar("T", covariant=True)

__all__ = ["Done", "Future", "InProcessExecutor", "PoolLimits", "Sampled", "TowerExecutor"]


class Future(Protocol[T]):
    def result(self) -> T: ...


class Done(Generic[T]):
    """An already computed result."""

    def __init__(self, value: T) -> None:
        self.value = value

    def result(self) -> T:
        return self.value


class TowerExecutor(abc.ABC):
    """Tower operations on lanes. Row r of a lane is one sequence; ids tensors are on the CPU."""

    @abc.abstractmethod
    def add_rows(
        self, lane: str, prompts: list[list[int]], sampling: RowSampling | None, uses_denoiser: bool
    ) -> Future[Sampled | None]:
        """Prefill new sequences (any may be empty) and append them as the lane's last rows; sample
        from each one's last-position logits when `sampling` is given. One context forward.
        `uses_denoiser`: the lane's state is also read by the denoiser."""

    @abc.abstractmethod
    def keep_rows(self, lane: str, rows: list[int]) -> None:
        """Keep only these rows, in this order (the others' state is freed)."""

    @abc.abstractmethod
    def decode(self, lane: str, ids: Tensor, sampling: RowSampling | None) -> Future[Sampled | None]:
        """Context tower reads one token per row, ids [b]; optionally samples the next token."""

    @abc.abstractmethod
    def extend(self, lane: str, ids: Tensor, n_valid: Tensor) -> None:
        """Context tower reads a committed block ids [b, S]; row r reads n_valid[r] tokens (0: none)."""

    @abc.abstractmethod
    def verify(self, lane: str, ids: Tensor, n_valid: Tensor) -> Future[Tensor]:
        """Like `extend`, returning the context tower's greedy next token after every position
        [b, S]; must be followed by `rewind`."""

    @abc.abstractmethod
    def rewind(self, lane: str, keep: Tensor) -> None:
        """After `verify`: row r keeps only the first keep[r] tokens of the verified block."""

    @abc.abstractmethod
    def denoise(
        self, lane: str, xt: Tensor, t: Tensor, mask_id: int, temperature: Tensor, seeds: list[int]
    ) -> Future[tuple[Tensor, Tensor]]:
        """Denoiser forward on blocks xt [b, S] at masked fractions t [b] -> x0 predictions and their
        confidences, each [b, S] (see unmask.x0_predict)."""

    @abc.abstractmethod
    def mock_ar(self, lane: str, ids: Tensor, sampling: RowSampling) -> Future[Sampled]:
        """Denoiser mock-AR step on the last committed token ids [b] (the lane's state covers the
        tokens before it) -> the next token. State unchanged."""

    @abc.abstractmethod
    def close_lane(self, lane: str) -> None:
        """Forget a lane."""

    @abc.abstractmethod
    def score(self, prompt: list[int], continuation: list[int], top: int = 0, echo: bool = False) -> Future[Scores]:
        """Context tower log-probabilities of each continuation token after the prompt, the `top` most
        likely tokens at each position, and with `echo` the prompt's own (no lane; request.Scores)."""

    def warm_up(self, block_sizes: list[int]) -> float:
        """Compile (and on CUDA capture) the start-up step set of both towers for these block sizes, with
        a progress bar; returns the seconds it took (0 when steps run eagerly)."""
        return 0.0

    def prefix_cache_stats(self) -> Future[CacheStats | None]:
        """The context tower's prefix-cache counters (prefix_cache.CacheStats); None when it is off."""
        return Done(None)

    def check(self) -> None:
        """Raise if an operation that nobody waited for has failed (remote executors): LaneOpError when
        the op failed and the towers live on, TowersUnavailable when they are gone."""

    def drain(self) -> None:
        """Wait until every submitted operation has completed (remote executors)."""

    def shutdown(self) -> None:
        """Release the towers."""


class InProcessExecutor(TowerExecutor):
    """Both towers in this process (tests, one device): the denoiser reads the context runner's state
    pool and slot table directly, so no state moves at all. `compile`: each step as one compiled graph
    per bucket (steps.py) instead of eagerly."""

    def __init__(self, context: ContextTower, denoiser: DenoiserTower | None, limits: PoolLimits | None = None,
                 compile: bool | str = False) -> None:  # fmt: skip
        self.ctx = ContextRunner(context, limits, compile)
        self.den = DenoiserRunner(denoiser, context=self.ctx, compile=compile) if denoiser is not None else None

    @property
    def lane_slots(self) -> dict[str, list[int]]:
        """Each live lane's pool slots, in row order."""
        return self.ctx.table.lanes

    def _den(self) -> DenoiserRunner:
        if self.den is None:
            raise RuntimeError("this executor has no denoiser tower (AR-only checkpoint)")
        return self.den

    def warm_up(self, block_sizes):
        return warm_up([r for r in (self.ctx, self.den) if r is not None], block_sizes)

    def add_rows(self, lane, prompts, sampling, uses_denoiser=False):
        return Done(self.ctx.add_rows(lane, prompts, sampling))

    def keep_rows(self, lane, rows):
        self.ctx.keep_rows(lane, rows)

    def decode(self, lane, ids, sampling):
        return Done(self.ctx.decode(lane, ids, sampling))

    def extend(self, lane, ids, n_valid):
        self.ctx.extend(lane, ids, n_valid)

    def verify(self, lane, ids, n_valid):
        return Done(self.ctx.verify(lane, ids, n_valid))

    def rewind(self, lane, keep):
        self.ctx.rewind(lane, keep)

    def denoise(self, lane, xt, t, mask_id, temperature, seeds):
        return Done(self._den().denoise(lane, xt, t, mask_id, temperature, seeds))

    def mock_ar(self, lane, ids, sampling):
        return Done(self._den().mock_ar(lane, ids, sampling))

    def close_lane(self, lane):
        self.ctx.close_lane(lane)

    def score(self, prompt, continuation, top=0, echo=False):
        return Done(self.ctx.score(prompt, continuation, top, echo))

    def prefix_cache_stats(self):
        return Done(self.ctx.cache_stats())
