"""The tower-pair server: what one Serve replica runs. It owns one tower pair (two Ray actors in the
replica's placement group, or both towers in-process when `pair.enabled` is false), an AsyncEngine
over it, and the serving metrics. Ingresses reach it through a DeploymentHandle (handle_client.py).
Ray is imported only when the pair is enabled, so the in-process variant runs without a cluster.
"""

from __future__ import annotations

import asyncio
import logging
import os
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
    PrefixCacheInfo,
    ScoreRequest,
    ScoreResult,
)

from .config import ServeConfig
from .loopback import bind_replica_server_to_loopback

log = logging.getLogger("twotower.server")
EXIT_DELAY_S = 1.0  # from a dead pair to the end of its replica
GAUGE_REFRESH_S = 5.0  # Ray's OpenTelemetry export drops a gauge not set since the last export (~10 s)


class TowerPairServer:
    def __init__(self, config: dict) -> None:
        bind_replica_server_to_loopback()
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
        if self.pair is not None:
            self.engine.on_dead.append(self._exit_soon)
        self._ticker: asyncio.Task | None = None

    def _ensure_ticker(self) -> None:
        """Keep the gauges exported while nothing steps (started from the first async call)."""
        if self.metrics is None or (self._ticker is not None and not self._ticker.done()):
            return

        async def tick() -> None:
            while True:
                self.engine.engine.report_idle()  # the counts between steps; 0 tokens/s when idle
                await self._refresh_prefix_cache_metrics()
                await asyncio.sleep(GAUGE_REFRESH_S)

        self._ticker = asyncio.get_running_loop().create_task(tick())

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

    async def _refresh_prefix_cache_metrics(self) -> None:
        """The cache's counters live with the context tower (an actor, in a pair): read them every tick,
        off the event loop, rather than once per engine step."""
        try:
            stats = await asyncio.to_thread(lambda: self.executor.prefix_cache_stats().result())
        except Exception as e:  # a dying pair: the engine reports that; the metrics just skip a tick
            log.debug("prefix cache stats unavailable: %s", e)
            return
        if stats is not None:
            self.metrics.prefix_cache.update(stats)

    def _on_step(self, stats) -> None:
        self.metrics.on_step(stats)
        transfers = getattr(self.executor, "transfers", None)
        if transfers and stats.seconds > 0:  # a real step, on the engine's thread (not an idle report)
            self.metrics.on_transfers(transfers)
            transfers.clear()

    def _exit_soon(self, error: BaseException) -> None:
        """The pair is gone: end this replica shortly (once the failed streams' errors have gone out), so
        that Serve replaces it now and routers stop sending it requests, rather than at the next health
        check. The ingress resumes those streams on another replica (handle_client.py)."""
        log.error("tower pair died (%s: %s); this replica exits in %.1f s", type(error).__name__, error,
                  EXIT_DELAY_S)  # fmt: skip
        asyncio.get_running_loop().call_later(EXIT_DELAY_S, os._exit, 1)

    # ---- API -------------------------------------------------------------------------------------
    def _params(self, req: GenerateRequest) -> SamplingParams:
        merged = {**self.cfg.defaults, **req.sampling}
        try:
            return GenerateRequest(req.request_id, sampling=merged).params()
        except (TypeError, ValueError) as e:
            raise InvalidRequest(str(e)) from e

    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateDelta]:
        self._ensure_ticker()
        t0 = time.monotonic()
        try:
            params = self._params(req)
            stream = self.engine.generate(req.prompt_input(), params, req.request_id, req.resume)
            out = await stream.__anext__()  # validation errors surface here, before anything streams
        except ValueError as e:
            raise InvalidRequest(str(e)) from e
        limits = [x for x in (req.deadline_s, self.cfg.request_timeout_s) if x is not None]
        deadline = t0 + min(limits) if limits else None
        m = self.metrics
        if m is not None:
            m.ttft.observe(time.monotonic() - t0, m.tags)
        texts = params.logprobs  # each token's own text goes with its logprob
        try:
            while True:
                last = time.monotonic()
                delta = GenerateDelta.from_output(out)
                if texts:
                    delta.token_texts = self._texts(delta.token_ids)
                yield delta
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
                                error=f"deadline of {deadline - t0:.3g} s exceeded",
                                cached_tokens=u.cached_tokens)  # fmt: skip
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
            if not isinstance(req.top_logprobs, int) or isinstance(req.top_logprobs, bool):
                raise InvalidRequest(f"top_logprobs: must be an integer (got {req.top_logprobs!r})")
            p_ids, ids, s = await asyncio.to_thread(self.engine.engine.score_tokens, prompt, cont,
                                                    req.top_logprobs, bool(req.echo))  # fmt: skip
        except InvalidRequest:
            raise
        except ValueError as e:
            raise InvalidRequest(str(e)) from e
        out = ScoreResult(ids, s.logprobs, float(sum(s.logprobs)), len(p_ids), token_texts=self._texts(ids),
                          top_logprobs=self._tops(s.top))  # fmt: skip
        if req.echo:
            out.prompt_token_ids, out.prompt_token_texts = p_ids, self._texts(p_ids)
            out.prompt_logprobs, out.prompt_top_logprobs = s.prompt_logprobs, self._tops(s.prompt_top)
        return out

    def _texts(self, ids: list[int]) -> list[str]:
        """Each token's own text (special tokens by name; a piece of a multi-byte character is U+FFFD)."""
        tok = self.tokenizer
        if tok is None:
            return [f"token_id:{i}" for i in ids]
        return [tok.decode([i], skip_special_tokens=False) for i in ids]

    def _tops(self, tops):
        if tops is None:
            return None
        out = []
        for pos in tops:
            if pos is None:
                out.append(None)
                continue
            texts = self._texts([i for i, _ in pos])
            out.append([(i, t, lp) for (i, lp), t in zip(pos, texts, strict=True)])
        return out

    def _tokenizer(self):
        if self.tokenizer is None:
            raise InvalidRequest(f"the model {self.cfg.served_model_name} has no tokenizer; use token ids")
        return self.tokenizer

    async def tokenize(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise InvalidRequest(f"prompt: must be a string (got {type(text).__name__})")
        try:
            self._tokenizer()
            return self.engine.engine.encode(text)
        except ValueError as e:
            raise InvalidRequest(str(e)) from e

    async def detokenize(self, token_ids: list[int]) -> str:
        vocab = self.limits.vocab_size
        if not isinstance(token_ids, list) or any(type(t) is not int or not 0 <= t < vocab for t in token_ids):
            raise InvalidRequest(f"tokens: must be a list of token ids in [0, {vocab})")
        return self._tokenizer().decode(token_ids)

    async def tokenizer_info(self) -> dict:
        tok = self.tokenizer

        def name(i):
            return None if tok is None or i is None else tok.id_to_token(i)

        return {"tokenizer_class": type(tok).__name__ if tok is not None else None,
                "bos_token": name(getattr(tok, "bos_token_id", None)),
                "eos_token": name(self.eos_ids[0] if self.eos_ids else None),
                "pad_token": name(getattr(tok, "pad_token_id", None)),
                "chat_template": getattr(tok, "chat_template", None),
                "model_max_length": self.limits.max_model_len, "vocab_size": self.limits.vocab_size}  # fmt: skip

    async def model_info(self) -> ModelInfo:
        c, e = self.model_cfg, self.cfg.engine
        d = self._params(GenerateRequest("info"))
        defaults = {k: getattr(d, k) for k in ("mode", "max_tokens", "temperature", "block_size", "steps_per_block",
                                               "gamma", "top_k", "top_p")}  # fmt: skip
        return ModelInfo(self.cfg.served_model_name, str(self.path), list(self.limits.modes), c.vocab_size,
                         self.limits.max_model_len, self.limits.max_block_size, c.pattern, c.hidden_size,
                         defaults, self.engine.engine.mask_id, list(self.eos_ids), PrefixCacheInfo(
                             e.prefix_cache, e.prefix_cache_grid, e.prefix_cache_bytes))  # fmt: skip

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def health(self) -> bool:
        self._ensure_ticker()
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
