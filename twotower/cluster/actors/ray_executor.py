"""TowerExecutor over a tower pair of Ray actors.

The context actor holds every lane's authoritative state. For lanes the denoiser reads, each write on
the context side is followed by a delta (new K/V rows, changed Mamba states) sent actor to actor over
the pair's tensor transport and applied to the denoiser's mirror. Calls to one actor run in submission
order, so a mirror is always current when the next denoiser call on that lane runs; nothing here waits
for a write, which lets the context tower work on one lane while the denoiser works on another.
"""

from __future__ import annotations

from collections import deque

import ray

from twotower.cluster.engine.errors import LaneOpError
from twotower.cluster.engine.executor import TowerExecutor

from .pair import TowerPair, TowerPairError


class RayFuture:
    def __init__(self, ref, pair: TowerPair) -> None:
        self.ref, self.pair = ref, pair

    def result(self):
        try:
            return ray.get(self.ref)
        except ray.exceptions.RayActorError as e:
            self.pair.alive = False
            raise TowerPairError(f"{self.pair.name}: a tower actor died: {e}") from e


class RayExecutor(TowerExecutor):
    def __init__(self, pair: TowerPair) -> None:
        self.pair = pair
        self.ctx, self.den = pair.context, pair.denoiser
        self.mirrored: set[str] = set()
        self._unwaited: dict = {}  # ref -> lane of each write nobody waits for; errors surface in check()
        self.delta_bytes = 0
        # (bytes, seconds) per delta, drained by the metrics hook; bounded when nobody drains it
        self.transfers: deque[tuple[int, float]] = deque(maxlen=4096)

    def _guard(self) -> None:
        if not self.pair.alive:
            raise TowerPairError(f"{self.pair.name}: tower pair is down")

    def _fire(self, ref, lane: str) -> None:
        self._unwaited[ref] = lane

    def _sync(self, lane: str) -> None:
        if lane in self.mirrored:
            delta = self.ctx.take_delta.options(tensor_transport=self.pair.tensor_transport).remote(lane)
            self._fire(self.den.apply_delta.remote(lane, delta), lane)

    def check(self) -> None:
        """Collect finished fire-and-forget writes; raise TowerPairError if one failed."""
        if not self._unwaited:
            return
        done, _ = ray.wait(list(self._unwaited), num_returns=len(self._unwaited), timeout=0)
        for ref in done:
            lane = self._unwaited.pop(ref)
            try:
                out = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                self.pair.alive = False
                raise TowerPairError(f"{self.pair.name}: a tower actor died: {e}") from e
            except ray.exceptions.RayTaskError as e:  # the op raised; the actors live on
                raise LaneOpError(lane, f"{self.pair.name}: a tower operation of lane {lane} failed: {e}") from e
            if isinstance(out, tuple):  # apply_delta: (bytes received, transfer seconds)
                self.delta_bytes += out[0]
                self.transfers.append(out)

    def drain(self) -> None:
        """Wait for every queued write (benchmarks, shutdown)."""
        while self._unwaited:
            ray.wait(list(self._unwaited), num_returns=len(self._unwaited))
            self.check()

    # ---- TowerExecutor ---------------------------------------------------------------------------
    def warm_up(self, block_sizes):
        """Both towers warm up at once, each in its own actor; the pair is ready when the slower is."""
        self._guard()
        return max(ray.get([self.ctx.warm_up.remote(block_sizes), self.den.warm_up.remote(block_sizes)]))

    def add_rows(self, lane, prompts, sampling, uses_denoiser=False):
        self._guard()
        if uses_denoiser:
            self.mirrored.add(lane)
        ref = self.ctx.add_rows.remote(lane, prompts, sampling, uses_denoiser)
        self._sync(lane)
        return RayFuture(ref, self.pair)

    def keep_rows(self, lane, rows):
        self._guard()
        self._fire(self.ctx.keep_rows.remote(lane, rows), lane)
        if lane in self.mirrored:
            self._fire(self.den.keep_rows.remote(lane, rows), lane)

    def decode(self, lane, ids, sampling):
        self._guard()
        ref = self.ctx.decode.remote(lane, ids, sampling)
        self._sync(lane)
        return RayFuture(ref, self.pair)

    def extend(self, lane, ids, n_valid):
        self._guard()
        self._fire(self.ctx.extend.remote(lane, ids, n_valid), lane)
        self._sync(lane)

    def verify(self, lane, ids, n_valid):
        self._guard()
        return RayFuture(self.ctx.verify.remote(lane, ids, n_valid), self.pair)

    def rewind(self, lane, keep):
        self._guard()
        self._fire(self.ctx.rewind.remote(lane, keep), lane)
        self._sync(lane)

    def denoise(self, lane, xt, t, mask_id, temperature, seeds):
        self._guard()
        return RayFuture(self.den.denoise.remote(lane, xt, t, mask_id, temperature, seeds), self.pair)

    def mock_ar(self, lane, ids, sampling):
        self._guard()
        return RayFuture(self.den.mock_ar.remote(lane, ids, sampling), self.pair)

    def close_lane(self, lane):
        if not self.pair.alive:
            return
        self._fire(self.ctx.close_lane.remote(lane), lane)
        if lane in self.mirrored:
            self._fire(self.den.close_lane.remote(lane), lane)
            self.mirrored.discard(lane)

    def score(self, prompt, continuation, top=0, echo=False):
        self._guard()
        return RayFuture(self.ctx.score.remote(prompt, continuation, top, echo), self.pair)

    def prefix_cache_stats(self):
        self._guard()
        return RayFuture(self.ctx.cache_stats.remote(), self.pair)

    def shutdown(self) -> None:
        self.pair.shutdown()
