"""The tower-pair server: what one Serve replica runs. It owns one tower pair (two Ray actors in the
replica's placement group, or both towers in-process when `pair.enabled` is false), an AsyncEngine
over it, and the serving metrics. Ingresses reach it through a DeploymentHandle (handle_client.py).
Ray is imported only when the pair is enabled, so the in-process variant runs without a cluster.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from twotower.cluster.engine.async_engine import AsyncEngine
from twotower.cluster.engine.executor import InProcessExecutor
from twotower.cluster.engine.loading import ModelFiles, load_model, resolve_model
from twotower.cluster.engine.params import SamplingParams
from twotower.cluster.engine.request import FinishReason
from twotower.cluster.ingress.api_types import (
    GenerateDelta,
    GenerateRequest,
    InvalidRequest,
    ModelInfo,
    ScoreRequest,
    ScoreResult,
)

from .config import ServeConfig

log = logging.getLogger("twotower.server")


class TowerPairServer:
    def __init__(self, config: dict) -> None:
        self.cfg = ServeConfig.from_dict(config) if isinstance(config, dict) else config
        self.files = ModelFiles.inspect(resolve_model(self.cfg.model))
        self.path, self.model_cfg, self.tokenizer = self.files.path, self.files.config, self.files.tokenizer
        self.limits = self.files.limits(self.cfg.engine)
        self.eos_ids = self.files.eos_token_ids
        self.executor = self._executor()
        self.metrics = self._metrics()
        micro = self.cfg.pair.micro_batches if self.cfg.pair.enabled else 1
        engine = self.files.engine(self.executor, self.cfg.engine, micro_batches=micro)
        if self.metrics is not None:
            engine.hooks.on_step.append(self._on_step)
            engine.hooks.on_finish.append(self.metrics.on_finish)
        self.engine = AsyncEngine(engine)

    def _executor(self):
        p = self.cfg.pair
        if p.enabled:
            from twotower.cluster.actors.pair import TowerPair
            from twotower.cluster.actors.ray_executor import RayExecutor

            self.pair = TowerPair(str(self.path), p, self.cfg.engine)
            return RayExecutor(self.pair)
        self.pair = None
        m = load_model(self.path, self.cfg.engine.device, p.dtype)
        eng = self.cfg.engine
        return InProcessExecutor(m.context, m.denoiser, eng.pool_limits(), compile=not eng.eager)

    def _metrics(self):
        try:
            from .metrics import ServeMetrics

            return ServeMetrics(self.cfg.served_model_name)
        except Exception as e:  # outside a Ray worker the metrics API is unavailable
            log.warning("metrics disabled: %s", e)
            return None

    def _on_step(self, stats) -> None:
        self.metrics.on_step(stats)
        transfers = getattr(self.executor, "transfers", None)
        if transfers:
            self.metrics.on_transfers(transfers)
            transfers.clear()

    # ---- API -------------------------------------------------------------------------------------
    def _params(self, req: GenerateRequest) -> SamplingParams:
        merged = {**self.cfg.defaults, **req.sampling}
        try:
            return GenerateRequest(req.request_id, sampling=merged).params()
        except (TypeError, ValueError) as e:
            raise InvalidRequest(str(e)) from e

    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateDelta]:
        t0 = time.monotonic()
        try:
            params = self._params(req)
            stream = self.engine.generate(req.prompt_input(), params, req.request_id)
            out = await stream.__anext__()  # validation errors surface here, before anything streams
        except ValueError as e:
            raise InvalidRequest(str(e)) from e
        limits = [x for x in (req.deadline_s, self.cfg.request_timeout_s) if x is not None]
        deadline = t0 + min(limits) if limits else None
        m = self.metrics
        if m is not None:
            m.ttft.observe(time.monotonic() - t0, m.tags)
        try:
            while True:
                last = time.monotonic()
                yield GenerateDelta.from_output(out)
                if out.finished:
                    if m is not None:
                        m.latency.observe(time.monotonic() - t0, m.tags)
                    return
                timeout = None if deadline is None else deadline - time.monotonic()
                if timeout is not None and timeout <= 0:
                    raise asyncio.TimeoutError
                out = await asyncio.wait_for(stream.__anext__(), timeout=timeout)
                if m is not None:
                    m.inter_block.observe(time.monotonic() - last, m.tags)
        except asyncio.TimeoutError:
            await stream.aclose()  # aborts the request and frees its slot
            u = out.usage
            yield GenerateDelta(req.request_id, [], "", True, FinishReason.ABORT.value, u.prompt_tokens,
                                u.completion_tokens, u.denoiser_forwards, u.context_forwards,
                                error=f"deadline of {deadline - t0:.3g} s exceeded")  # fmt: skip
        finally:
            await stream.aclose()

    async def score(self, req: ScoreRequest) -> ScoreResult:
        def pick(text, ids, name):
            if (text is None) == (ids is None):
                raise InvalidRequest(f"{name}: give exactly one of {name} (text) and {name}_token_ids")
            return text if text is not None else list(ids)

        try:
            prompt = pick(req.prompt, req.prompt_token_ids, "prompt")
            cont = pick(req.continuation, req.continuation_token_ids, "continuation")
            ids, logprobs, n_prompt = await asyncio.to_thread(self.engine.engine.score, prompt, cont)
        except InvalidRequest:
            raise
        except ValueError as e:
            raise InvalidRequest(str(e)) from e
        return ScoreResult(ids, logprobs, float(sum(logprobs)), n_prompt)

    async def model_info(self) -> ModelInfo:
        c = self.model_cfg
        d = self._params(GenerateRequest("info"))
        defaults = {k: getattr(d, k) for k in ("mode", "max_tokens", "temperature", "block_size", "steps_per_block",
                                               "gamma", "top_k", "top_p")}  # fmt: skip
        return ModelInfo(self.cfg.served_model_name, str(self.path), list(self.limits.modes), c.vocab_size,
                         self.limits.max_model_len, self.limits.max_block_size, c.pattern, c.hidden_size,
                         defaults, self.engine.engine.mask_id, list(self.eos_ids))  # fmt: skip

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def health(self) -> bool:
        if self.engine.dead is not None:
            return False
        if self.pair is None:
            return True
        try:
            await asyncio.to_thread(self.pair.check_health, 10.0)
            return True
        except Exception:
            return False

    async def stats(self) -> dict:
        """Engine occupancy (for tests and operators): requests running and waiting, live lanes."""
        e = self.engine.engine
        return {"running": e.scheduler.num_running, "waiting": e.scheduler.num_waiting, "lanes": len(e.lanes),
                "streams": len(self.engine.queues)}  # fmt: skip

    async def check_health(self) -> None:
        """Serve's replica health check: raising marks the replica unhealthy and Serve replaces it."""
        if not await self.health():
            raise RuntimeError("tower pair unhealthy")

    def __del__(self) -> None:
        pair = getattr(self, "pair", None)
        if pair is not None:
            try:
                pair.shutdown()
            except Exception:
                pass
